"""`centra bench`: the merged graph against each task served as its own full-depth model, same texts.

The engines and the measuring are centra.measure.bench's; this module finds the texts, prints the report
(the last line: one JSON object) and plots it. Texts: SST-2 dev sentences for single-text tasks and MRPC
dev pairs for pair tasks (when found under the data root), else the sample texts; or --texts FILE (a line:
a text, or text<TAB>second text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import flags_named, positive_float, positive_int
from centra.cli.plots import check_plot, pyplot, save_figure
from centra.measure.bench import DEFAULT_BATCHES, DEFAULT_SECONDS, BenchReport, EngineBenchOptions


def cmd_bench(args: argparse.Namespace) -> int:
    from centra.measure.bench import bench_job, run_bench
    from centra.train.texts import default_sequences

    plot = check_plot(args.plot, "bench") if args.plot else None
    options = EngineBenchOptions(tuple(args.batch or DEFAULT_BATCHES), args.seconds, args.repeats, args.skip_separate)
    with flags_named():
        job = bench_job(Path(args.model), Path(args.texts) if args.texts else default_sequences(), options)
        report = run_bench(job)
    for line in report.lines():
        print(line)
    if plot is not None and write_plot(plot, report):
        print(f"plot: {plot}")
    print(json.dumps(report.figures()))
    return 0


def write_plot(path: Path, report: BenchReport) -> bool:
    """Sequences/s per engine, batch size and length setting (log scale), as a PNG; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    from centra.measure.bench_batches import LENGTHS

    results, manifest = report.results, report.job.manifest
    engines = list(dict.fromkeys(r.engine for r in results))
    batches = sorted({r.batch for r in results})
    value = {(r.engine, r.batch, r.lengths): r.sequences_per_s for r in results}
    fig, axes = plt.subplots(1, len(LENGTHS), figsize=(6 * len(LENGTHS), 4.8), sharey=True)
    width = 0.8 / len(engines)
    for ax, lengths in zip(axes, LENGTHS):
        for i, engine in enumerate(engines):
            xs = [j + i * width for j in range(len(batches))]
            ax.bar(xs, [value.get((engine, b, lengths), 0.0) for b in batches], width, label=engine)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_title("realistic lengths (dynamic padding)" if lengths == "realistic" else
                     f"fixed length {report.fixed}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("sequences/s (every task per sequence)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"centra bench: {len(manifest.tasks)} tasks, {manifest.backbone.id}, {report.threads} threads")
    return save_figure(fig, path)


def add_parsers(sub, common) -> None:
    p = sub.add_parser("bench", parents=[common],
                       help="sequences/s and latency of the merged model vs each task as its own full-depth model")
    p.add_argument("--model", required=True, help="merged model folder (read only: exports go to a temp folder)")
    p.add_argument("--batch", type=positive_int, action="append",
                   help="sequences per batch (repeatable; default: 1 and 32)")
    p.add_argument("--texts", help="texts, one per line; 'text<TAB>second text' lines feed the pair tasks "
                   "(default: SST-2 dev sentences + MRPC dev pairs, else sample texts)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=positive_float,
                     help=f"whole passes over the texts until this many seconds per engine, for each batch size and "
                     f"length setting (default {DEFAULT_SECONDS:g})")
    how.add_argument("--repeats", type=positive_int,
                     help="exactly this many passes over the texts per engine, batch size and length setting")
    p.add_argument("--plot", help="write a PNG plot of sequences/s here (needs matplotlib)")
    p.add_argument("--skip-separate", action="store_true", help="measure only the merged model")
    p.set_defaults(func=cmd_bench, batch=None)
