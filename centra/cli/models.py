"""Commands over merged models: merge, predict, verify, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from centra.errors import CentraError

if TYPE_CHECKING:
    from centra.core.manifest import EngineInfo

DEFAULT_TASKS_DIR = "tasks"
ENGINES = ("torch", "onnx", "tensorrt")  # centra.runtime.engine.ENGINES, without importing torch for the parser
PRECISIONS = {"onnx": ("fp32", "int8"), "tensorrt": ("fp32", "fp16", "int8")}


def cmd_merge(args: argparse.Namespace) -> int:
    from centra.core.merge import MODEL_KIND, overhead_table, plan_merge, write_merged
    from centra.core.overhead import extra_pass_warnings
    from centra.io import check_replaceable, check_writable_parent

    out = Path(args.out)
    check_writable_parent(out)
    check_replaceable(out, MODEL_KIND)  # before any work: never over a user's file or folder
    if args.precision is not None and args.precision not in PRECISIONS.get(args.engine, ()):
        known = "; ".join(f"--engine {e}: {', '.join(p)}" for e, p in PRECISIONS.items())
        raise CentraError(f"merge: --precision {args.precision} does not apply to --engine {args.engine} ({known})")
    if (args.calibration or args.max_batch) and args.engine != "tensorrt":
        raise CentraError("merge: --calibration and --max-batch apply to --engine tensorrt")
    if args.engine == "tensorrt" and (args.precision == "int8") != bool(args.calibration):
        raise CentraError("merge: --engine tensorrt --precision int8 needs --calibration FILE (a few hundred dev "
                          "texts, one per line), and --calibration applies to int8 only")
    extend = None
    if args.engine == "onnx":
        from centra.export.onnx import onnx_extender

        extend = onnx_extender(args.precision or "fp32")
    elif args.engine == "tensorrt":
        from centra.export.tensorrt import DEFAULT_MAX_BATCH, tensorrt_extender

        calibration = None
        if args.calibration:
            from centra.cli.bench import read_texts_file

            calibration = read_texts_file(Path(args.calibration))
        extend = tensorrt_extender(args.precision or "fp16", calibration, args.max_batch or DEFAULT_MAX_BATCH)
    plan = plan_merge([Path(d) for d in args.tasks_dir or [DEFAULT_TASKS_DIR]], args.backbone)
    manifest = write_merged(plan, out, keep_versions=args.keep_versions, extend=extend)
    print(f"merged {len(manifest.tasks)} tasks on {manifest.backbone.id} into {out} (version {manifest.version})")
    print(overhead_table(manifest))
    if manifest.engine is not None:
        print_engine(manifest.engine)
    for line in extra_pass_warnings(plan.specs):
        print(f"centra: warning: {line}", file=sys.stderr)
    return 0


def print_engine(info: EngineInfo) -> None:
    """The export's checks (and for ONNX the fusions ONNX Runtime made), as merge's last lines."""
    if info.name == "tensorrt":
        print(f"tensorrt {info.tensorrt} on {info.device}: {len(info.graphs)} {info.precision} plans, "
              f"batch 1-{info.max_batch}, sequence 1-{info.max_length}")
        for name, r in info.check["tasks"].items():
            print(f"tensorrt: {name}: label agreement with PyTorch fp32 {r['agreement']:.0%}; mean error "
                  f"{r['relative_error']:.1%} of the logit size; max |tensorrt - torch| {r['max_abs_diff']:.1e}")
        return
    parity = info.parity
    worst = max(parity, key=parity.get)
    print(f"onnx: {len(info.graphs)} graphs (opset {info.opset}), fp32 parity: max |onnx - torch| "
          f"{parity[worst]:.1e} ({worst}; tolerance {info.tolerance:g})")
    for precision, counts in info.fusions.items():
        found = ", ".join(f"{op} {n}" for op, n in counts.items()) or "none"
        print(f"onnx: {precision} graphs after ORT_ENABLE_ALL: {found}")
    if info.int8 is not None:
        floor = info.int8["min_agreement"]
        for name, r in info.int8["tasks"].items():
            clear = "n/a" if r["decided_agreement"] is None else f"{r['decided_agreement']:.0%}"
            print(f"onnx: int8 {name}: label agreement with fp32 {r['agreement']:.0%} of {info.int8['samples']} "
                  f"samples, {clear} of the {r['decided']} answers fp32 decides clearly (floor {floor:.0%}); "
                  f"mean error {r['relative_error']:.0%} of the logit size; max |int8 - fp32| "
                  f"{r['max_abs_diff']:.1e}")


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts and args.texts != ["-"]:
        return args.texts
    try:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    except UnicodeDecodeError:
        raise CentraError("stdin is not UTF-8 text") from None


def cmd_predict(args: argparse.Namespace) -> int:
    from centra.runtime.engine import Engine

    engine = Engine.load(Path(args.model), batch_size=args.batch_size, engine=args.engine)
    texts = read_texts(args)
    pairs = args.pair
    if pairs is not None and len(pairs) == 1 and len(texts) > 1:
        pairs = pairs * len(texts)  # one --pair applies to every text
    for answer in engine.predict(texts, pairs, args.task):
        print(json.dumps(answer, ensure_ascii=False))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from centra.runtime.engine import Engine
    from centra.runtime.verify import verify

    if not args.tolerance >= 0:
        raise CentraError(f"--tolerance must be >= 0, not {args.tolerance}")
    engine = Engine.load(Path(args.model), engine=args.engine)
    checks = verify(engine)
    print(f"version {engine.version} ({engine.runtime}); reference: standalone models built from "
          f"{checks[0].reference}")
    worst = 0.0
    for check in checks:
        verdict = "ok" if check.ok(args.tolerance) else "FAIL"
        print(f"{check.name:<24} max |merged - standalone| = {check.max_abs_diff:.3e}  {verdict}")
        worst = max(worst, check.max_abs_diff)
    if worst > args.tolerance:
        print(f"centra: error: merged outputs differ from standalone by {worst:.3e} > {args.tolerance:g}",
              file=sys.stderr)
        return 1
    print(f"all {len(checks)} tasks within {args.tolerance:g}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from centra.cli.tasks import columns_from
    from centra.runtime.engine import Engine
    from centra.train.data import load_examples, parse_label_names, read_segments
    from centra.train.metrics import by_segment, compute

    columns = columns_from(args)
    engine = Engine.load(Path(args.model), batch_size=args.batch_size, engine=args.engine)
    if args.task not in engine.specs:
        raise CentraError(f"unknown task {args.task!r} (known: {', '.join(sorted(engine.specs))})")
    other = None
    if args.against is not None:  # loaded (and refused) before any work
        other = Engine.load(Path(args.model), batch_size=args.batch_size, engine=args.against)
        if other.version != engine.version:  # the pointer moved between the two loads
            raise CentraError(f"{args.model}: a new version was published while loading; run again")
    spec = engine.specs[args.task]
    labels = None if spec.kind == "regression" else spec.labels
    examples, _ = load_examples(Path(args.data), spec.kind, columns, labels=labels,
                                label_names=parse_label_names(args.label_names))
    segments = read_segments(Path(args.data), columns, args.by) if args.by is not None else None
    logits = engine.logits(examples.texts, examples.pairs, [args.task])[args.task].numpy()
    scores = compute(spec.kind, logits, examples.targets, spec.thresholds)
    result = {"task": args.task, "examples": len(examples), **rounded(scores)}
    if other is not None:
        result["against"] = against(args.task, other, spec, examples, logits)
    if segments is not None:
        parts = by_segment(spec.kind, logits, examples.targets, segments, spec.thresholds)
        result |= {"by": args.by, "segments": {v: rounded(m) for v, m in parts.items()}}
        print(segment_table(result))
    print(json.dumps(result, ensure_ascii=False))
    return 0


def against(task: str, other, spec, examples, logits) -> dict:
    """The same examples through another engine of the same version: its metrics, the share of examples
    answered alike (labels_agree: the same label, the same label set, a value within 10% of the spread)
    and the metric deltas (engine - other), e.g. int8 against the torch reference."""
    import torch

    from centra.export.int8 import labels_agree
    from centra.train.metrics import compute

    theirs = other.logits(examples.texts, examples.pairs, [task])[task]
    scores = compute(spec.kind, theirs.numpy(), examples.targets, spec.thresholds)
    ours = compute(spec.kind, logits, examples.targets, spec.thresholds)
    same = labels_agree(spec, theirs.double(), torch.from_numpy(logits).double())
    return {"engine": other.runtime, **rounded(scores), "agreement": round(same.float().mean().item(), 6),
            "delta": {k: round(ours[k] - v, 6) for k, v in scores.items() if isinstance(v, float) and k in ours}}


def rounded(scores: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items()}


def segment_table(result: dict) -> str:
    """One row per segment and one for all rows: examples, then each metric in points (x100)."""
    metrics = [k for k in next(iter(result["segments"].values())) if k != "examples"]
    rows = [(result["by"], "examples", *metrics)]
    for value, m in [*result["segments"].items(), ("(all)", result)]:
        rows.append((value, str(m["examples"]), *(f"{100 * m[k]:.2f}" for k in metrics)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"task {result['task']!r} by {result['by']!r} (metrics x100)"]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip())
    return "\n".join(lines)


def add_engine_arg(p) -> None:
    p.add_argument("--engine", choices=ENGINES, help="runtime to run the model with (default: the one the model "
                   "was merged for; torch always works)")


def add_parsers(sub, common) -> None:
    from centra.cli import positive_int
    from centra.cli.tasks import add_column_args

    p = sub.add_parser("merge", parents=[common], help="validate task folders and publish one merged model")
    p.add_argument("--tasks-dir", action="append", help="folder of task folders (repeatable; default: tasks)")
    p.add_argument("--out", required=True, help="merged model folder: each merge publishes a new version in it")
    p.add_argument("--backbone", help="backbone folder or 'default' (default: the one the tasks name)")
    p.add_argument("--keep-versions", type=positive_int, default=3, help="versions kept in OUT (default 3)")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="runtime the version is served with by default: torch, onnx (ONNX graphs exported and "
                   "checked against torch) or tensorrt (plans built on this machine's GPU); the torch files are "
                   "always kept")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="onnx: fp32 (default) or int8 (dynamic quantization, checked by label agreement); tensorrt: "
                   "fp16 (default), fp32 or int8 (QDQ calibrated on --calibration)")
    p.add_argument("--calibration", help="tensorrt int8: texts to calibrate on, one per line (text<TAB>second text "
                   "for pair tasks; default: verify's samples; give a few hundred dev texts)")
    p.add_argument("--max-batch", type=positive_int, help="tensorrt: the largest batch of the plans' profile "
                   "(default 64; larger batches run in slices)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("predict", parents=[common],
                       help="classify texts with a merged model, one JSON line per text and task")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--task", action="append", help="task to run (repeatable; default: all that fit the input)")
    p.add_argument("--pair", action="append", help="second text of a pair (once, or once per text)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_engine_arg(p)
    p.add_argument("texts", nargs="*", help="texts to classify ('-' or none: one per line on stdin)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("verify", parents=[common], help="check merged outputs against each task's standalone model")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |difference| of logits "
                   "(default 1e-5)")
    add_engine_arg(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("evaluate", parents=[common], help="dev metrics of one task of a merged model on a file "
                       "(--by COLUMN: per segment)")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, help="labelled file (.tsv, .csv, .jsonl)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--by", metavar="COLUMN", help="also break the metrics down by the values of this column "
                   "(language, channel, product): a table, then the JSON line")
    add_engine_arg(p)
    p.add_argument("--against", choices=ENGINES, help="also run another engine of the same version on the data and "
                   "report its metrics, the share of answers alike and the metric deltas (e.g. --engine onnx "
                   "against torch for int8)")
    add_column_args(p)
    p.set_defaults(func=cmd_evaluate)
