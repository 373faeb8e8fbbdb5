"""`centra bench-server`: the gRPC server under concurrent one-text calls vs the same engine in process.

The measuring is centra.serve.bench's; this module checks the options, finds the texts, loads the model
and prints the figures (the last line: one JSON object).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import positive_float
from centra.cli.bench import SST2_DEV
from centra.errors import CentraError


def read_lines(path: Path) -> list[str]:
    """Texts, one per non-blank line of a UTF-8 file."""
    from centra.core.tokens import check_texts

    if not path.is_file():
        raise CentraError(f"{path}: file not found")
    try:
        texts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CentraError(f"{path}: not UTF-8 text") from None
    if not texts:
        raise CentraError(f"{path}: no texts (one per line)")
    try:
        check_texts(texts, None)
    except CentraError as exc:
        raise CentraError(f"{path}: {exc}") from None
    return texts


def default_texts() -> tuple[list[str], str]:
    """SST-2 dev sentences when the data is there, else verify's sample texts; and where they came from."""
    from centra.runtime.verify import SAMPLE_TEXTS
    from centra.train.data import read_rows
    from centra.train.recipe import data_root

    path = data_root() / SST2_DEV
    if path.is_file():
        rows = read_rows(path)
        header = rows[0][1]
        if isinstance(header, list) and "sentence" in header:
            column = header.index("sentence")
            texts = [row[column].strip() for _, row in rows[1:] if len(row) > column and row[column].strip()]
            if texts:
                return texts, f"{len(texts)} SST-2 dev sentences ({path})"
    return list(SAMPLE_TEXTS), f"{len(SAMPLE_TEXTS)} sample texts (no {path})"


def cmd_bench_server(args: argparse.Namespace) -> int:
    from centra.core.merge import model_folder
    from centra.progress import progress_line
    from centra.serve.bench import BenchOptions

    options = BenchOptions(concurrency=args.concurrency, seconds=args.seconds, warmup=args.warmup,
                           max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           tasks_per_call=args.tasks_per_call, flood=args.flood)
    options.check()  # options, texts and the model folder are checked before the model loads
    if args.texts:
        texts = read_lines(Path(args.texts))
        source = f"{len(texts)} texts of {args.texts}"
    else:
        texts, source = default_texts()
    folder = model_folder(Path(args.model))

    from centra.serve.app import load_engine
    from centra.serve.bench import bench_server
    from centra.serve.reload import in_fresh_thread

    def progress(line: str) -> None:
        progress_line(f"bench-server: {line}")

    progress(f"loading {folder} (max batch {options.max_batch}); {source}")
    engine = in_fresh_thread(load_engine, folder, options.max_batch)  # as `centra serve` does
    print_figures(bench_server(engine, texts, options, progress))
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
    print(f"server / in process: {f['ratio']:.1%}")
    if "flood_calls" in f:
        codes = ", ".join(f"{code} {n}" for code, n in f["flood_codes"].items())
        print(f"flood:      {f['flood_calls']} calls of 4 MB from {f['flood_senders']} threads ({codes}): answered in "
              f"p50 {f['flood_refusal_p50_ms']:.1f} ms, max {f['flood_refusal_max_ms']:.1f} ms; a valid client's p50 "
              f"{f['probe_p50_ms_before']:.2f} ms alone, {f['probe_p50_ms_during']:.2f} ms during (p99 "
              f"{f['probe_p99_ms_during']:.2f}); RSS {f['rss_mb_before']:.0f} MB before, peak "
              f"{f['rss_mb_peak']:.0f}, after {f['rss_mb_after']:.0f}")
    print(json.dumps(f))


def add_parsers(sub, common) -> None:
    from centra.cli import positive_int
    from centra.cli.serve import non_negative_float

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
                   help="then N threads send 4 MB calls (2,000,000 empty inputs) beside one valid client: how fast "
                   "they are refused, the valid calls' latency, the process's RSS (default 0: skip)")
    p.set_defaults(func=cmd_bench_server)
