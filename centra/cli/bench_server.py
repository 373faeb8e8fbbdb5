"""`centra bench-server`: the gRPC server under concurrent one-text calls vs the same engine in process.

The measuring is centra.measure.bench_server's; this module checks the options, finds the texts and prints
the figures (the last line: one JSON object).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import flags_named, non_negative_float, positive_float, positive_int


def cmd_bench_server(args: argparse.Namespace) -> int:
    from centra.serve.memory import fix_mmap_threshold

    fix_mmap_threshold()  # first, before the model and torch allocate (serve/memory.py)
    from centra.core.texts import read_texts_file
    from centra.core.versions import model_folder
    from centra.measure.bench_server import ServerBenchOptions, bench_server_model
    from centra.progress import progress_line
    from centra.train.texts import default_sequences

    options = ServerBenchOptions(concurrency=args.concurrency, seconds=args.seconds, warmup=args.warmup,
                                 max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                 tasks_per_call=args.tasks_per_call, flood=args.flood, protocol=args.protocol)
    with flags_named():  # options, texts and the model folder are checked before the model loads
        options.check()
    if args.texts:
        texts = read_texts_file(Path(args.texts))
        source = f"{len(texts)} texts of {args.texts}"
    else:
        texts, _, source, _ = default_sequences()
    folder = model_folder(Path(args.model))

    def progress(line: str) -> None:
        progress_line(f"bench-server: {line}")

    print_figures(bench_server_model(folder, texts, options, args.triton, progress, source))
    return 0


def print_figures(f: dict) -> None:
    print(f"model {f['model_version']}, tasks {', '.join(f['tasks'])} ({f['tasks_per_call']} per call), "
          f"max-batch {f['max_batch']}, max-wait {f['max_wait_ms']:g} ms")
    print(f"server:     {f['concurrency']} clients for {f['seconds']:g} s: {f['calls_per_s']:,.1f} calls/s, "
          f"{f['inputs_per_s']:,.1f} inputs/s ({f['errors']} errors)")
    print(f"latency:    p50 {f['p50_ms']:.2f} ms, p95 {f['p95_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms")
    print(f"batches:    {f['mean_batch_rows']:.2f} rows, {f['mean_batch_calls']:.2f} calls on average; engine busy "
          f"{f['engine_busy']:.0%} of the time; queue wait {f['mean_queue_wait_ms']:.2f} ms per call")
    print(f"in process: engine.run over batches of {f['inprocess_batch_rows']} rows: "
          f"{f['inprocess_inputs_per_s']:,.1f} inputs/s")
    print(f"server / in process: {f['ratio']:.1%} ({f['protocol']} clients)")
    if "triton_inputs_per_s" in f:
        print(f"triton:     the python-backend repository on tritonserver, {f['concurrency']} OIP gRPC clients: "
              f"{f['triton_inputs_per_s']:,.1f} inputs/s, p50 {f['triton_p50_ms']:.2f} ms, p99 "
              f"{f['triton_p99_ms']:.2f} ms ({f['triton_errors']} errors, {f['triton_mean_batch_calls']:.2f} requests "
              "per execution); "
              f"{f['triton_inputs_per_s'] / f['inputs_per_s']:.1%} of centra serve's")
    if "flood_calls" in f:
        codes = ", ".join(f"{code} {n}" for code, n in f["flood_codes"].items())
        print(f"flood:      {f['flood_calls']} calls of 4 MB, {f['flood_senders']} at once every second ({codes}): "
              f"answered in "
              f"p50 {f['flood_refusal_p50_ms']:.1f} ms, max {f['flood_refusal_max_ms']:.1f} ms; a valid client's p50 "
              f"{f['probe_p50_ms_before']:.2f} ms alone, {f['probe_p50_ms_during']:.2f} ms during (p99 "
              f"{f['probe_p99_ms_during']:.2f}); RSS {f['rss_mb_before']:.0f} MB before, peak "
              f"{f['rss_mb_peak']:.0f}, after {f['rss_mb_after']:.0f}")
    print(json.dumps(f))


def add_parsers(sub, common) -> None:
    p = sub.add_parser("bench-server", parents=[common],
                       help="measure the gRPC server under concurrent calls against the engine in process")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--concurrency", type=positive_int, default=16, help="client threads (default 16)")
    p.add_argument("--seconds", type=positive_float, default=10.0, help="measured seconds per phase (default 10)")
    p.add_argument("--texts", help="texts, one per line (default: SST-2 dev sentences, else sample texts)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="the server's rows per engine run (default 32)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=0.0,
                   help="the server's --max-wait-ms (default 0)")
    p.add_argument("--tasks-per-call", choices=("mixed", "all"), default="mixed",
                   help="mixed: random non-empty subsets of the single-text tasks (seeded); all: every one")
    p.add_argument("--warmup", type=non_negative_float, default=2.0, help="seconds of warm-up per phase (default 2)")
    p.add_argument("--flood", type=int, default=0, metavar="N",
                   help="then N calls of 4 MB (2,000,000 empty inputs) at once every second beside one valid client: "
                   "how fast they are refused, the valid calls' latency, the server process's RSS (default 0: skip)")
    p.add_argument("--protocol", choices=("grpc", "rest", "oip-grpc"), default="grpc",
                   help="the clients' door: grpc (centra.v1 Classify, default), rest (POST /v1/classify), oip-grpc "
                   "(the Open Inference Protocol's ModelInfer)")
    p.add_argument("--triton", action="store_true",
                   help="then the same OIP gRPC clients against the version's python-backend Triton repository on "
                   "tritonserver (nvidia-pytriton), on the same machine")
    p.set_defaults(func=cmd_bench_server)
