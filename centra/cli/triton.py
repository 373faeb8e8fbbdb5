"""`centra export-triton`: a Triton Inference Server model repository of a merged model."""

from __future__ import annotations

import argparse
from pathlib import Path

from centra.cli import flags_named

ENGINES = ("onnx", "tensorrt")  # centra.export.triton.ENGINES, without importing torch to build the parser


def cmd_export_triton(args: argparse.Namespace) -> int:
    if args.backend == "python":
        return export_python(args)
    from centra.export.triton import export_triton

    with flags_named("export-triton"):
        summary = export_triton(Path(args.model), Path(args.repo), engine=args.engine, precision=args.precision,
                                max_batch=args.max_batch)
    models = [m for g in summary["groups"] for m in (g["tokenizer_model"], g["graph_model"])]
    tasks = sum(len(g["tasks"]) for g in summary["groups"])
    print(f"wrote Triton model repository {args.repo} from version {summary['source_version']} "
          f"({summary['graphs_from']}): ensemble {summary['ensemble']!r} over {', '.join(models)}; "
          f"{tasks} tasks, max_batch_size {summary['max_batch_size']}")
    for graph, diff in summary["parity"].items():
        print(f"triton: {graph}: max |triton graph - {summary['reference']}| {diff:.1e} on the sample texts "
              f"(tolerance {summary['tolerance']:g}); token ids equal centra's")
    print(f"run: tritonserver --model-repository {Path(args.repo).resolve()}")
    return 0


def export_python(args: argparse.Namespace) -> int:
    from centra.export.triton_python import PythonRepoOptions, export_triton_python

    if args.engine != "onnx" or args.precision is not None:
        from centra.errors import CentraError

        raise CentraError("export-triton: --engine and --precision apply to --backend onnxruntime; the python "
                          "backend runs the version's own engine (--runtime torch|onnx to choose)")
    options = PythonRepoOptions(max_batch=args.max_batch, instances=args.instances, queue_delay_us=args.queue_delay_us,
                                engine=args.runtime)
    with flags_named("export-triton"):
        summary = export_triton_python(Path(args.model), Path(args.repo), options)
    print(f"wrote Triton model repository {args.repo} (python backend) from version {summary['source_version']}: "
          f"model {summary['model']!r} runs centra's engine ({summary['runtime']}), {len(summary['tasks'])} tasks, "
          f"max_batch_size {summary['max_batch_size']}, {summary['instances']} instance(s), queue delay "
          f"{summary['queue_delay_us']} us")
    print(f"triton: max |staged model - engine| {summary['parity']:.1e} on the sample texts (tolerance "
          f"{summary['tolerance']:g}); a bad call failed alone")
    print(f"run: tritonserver --model-repository {Path(args.repo).resolve()}  (its Python needs centra installed)")
    return 0


def add_parsers(sub, common) -> None:
    from centra.cli import number_type, positive_int

    non_negative_int = number_type(int, 0, inclusive=True)

    p = sub.add_parser("export-triton", parents=[common],
                       help="write a Triton Inference Server model repository of a merged model")
    p.add_argument("--model", required=True, help="merged model folder (its current version is exported)")
    p.add_argument("--repo", required=True, help="model repository folder to write (replaced only if it is one)")
    p.add_argument("--backend", choices=("python", "onnxruntime"), default="python",
                   help="python (default: Triton's python backend runs centra's engine, each request's own task set, "
                   "branches on their rows only) or onnxruntime (one fixed ONNX graph per token group: every task of "
                   "the group runs for every request; for GPU servers and TensorRT)")
    p.add_argument("--instances", type=positive_int, default=1,
                   help="python backend: model instances (processes, each with its own engine; default 1)")
    p.add_argument("--queue-delay-us", type=non_negative_int, default=0,
                   help="python backend: dynamic batching's max queue delay in microseconds (default 0)")
    p.add_argument("--runtime", choices=("torch", "onnx"),
                   help="python backend: the engine's runtime (default: the one the version's manifest names)")
    p.add_argument("--engine", choices=ENGINES, default="onnx",
                   help="onnxruntime backend: onnx (default: onnxruntime_onnx graphs, CPU or GPU) or tensorrt (the "
                   "same graphs in standard ops, run by ONNX Runtime's TensorRT execution provider on the GPU)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="onnx: fp32 or int8 (default: the version's ONNX precision, else fp32); tensorrt: fp16 "
                   "(default) or fp32")
    p.add_argument("--max-batch", type=positive_int, default=32, help="max_batch_size of every model (default 32)")
    p.set_defaults(func=cmd_export_triton)
