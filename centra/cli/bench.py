"""`centra bench`: the merged graph against each task served as its own full-depth model, same texts.

The engines and the measuring are centra.measure.bench's (and centra.measure.bench_engines's); this module finds
the texts, prints the figures (the last line: one JSON object) and plots them. Texts: SST-2 dev sentences
for single-text tasks and MRPC dev pairs for pair tasks (when found under the data root), else the sample
texts; or --texts FILE (a line: a text, or text<TAB>second text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import flags_named, positive_float, positive_int
from centra.cli.plots import check_plot, pyplot, save_figure
from centra.core.table import table
from centra.measure.bench import BASELINES, DEFAULT_BATCHES, DEFAULT_SECONDS, BenchOptions, BenchReport

DISTURBED = 5.0  # p99 / p50 above which a measurement is flagged as stalled (see `disturbed_lines`)


def cmd_bench(args: argparse.Namespace) -> int:
    from centra.measure.bench import bench_job, run_bench
    from centra.train.texts import default_sequences

    plot = check_plot(args.plot, "bench") if args.plot else None
    options = BenchOptions(tuple(args.batch or DEFAULT_BATCHES), args.seconds, args.repeats, args.skip_separate)
    with flags_named():
        job = bench_job(Path(args.model), Path(args.texts) if args.texts else default_sequences(), options)
        report = run_bench(job)
    manifest, figures = job.manifest, report.figures()
    names = manifest.task_names
    print(f"model {manifest.version} ({job.folder}): {len(names)} tasks ({', '.join(names)}) on "
          f"{manifest.backbone.id}; overhead {manifest.overhead_layers} layers per sequence vs "
          f"{manifest.single_task_layers} as separate {manifest.backbone.num_layers}-layer models")
    print(f"texts: {job.source}; fixed: every batch padded to {report.fixed} tokens; tokenisation not timed; "
          f"{report.threads} torch/ORT threads; load average {report.load_before:.2f} before, "
          f"{report.load_after:.2f} after")
    print(results_table(report.results))
    for line in ratio_lines(figures) + disturbed_lines(report.results):
        print(line)
    if plot is not None and write_plot(plot, report):
        print(f"plot: {plot}")
    print(json.dumps(figures))
    return 0


def results_table(results: list) -> str:
    base = {(r.lengths, r.batch): r.sequences_per_s for r in results if r.engine == "separate_torch_fp32"}
    rows = [("lengths", "batch", "engine", "seq/s", "p50 ms", "p99 ms", "vs separate_torch_fp32")]
    for r in results:
        ref = base.get((r.lengths, r.batch))
        rows.append((r.lengths, str(r.batch), r.engine, f"{r.sequences_per_s:,.1f}", f"{r.p50_ms:.2f}",
                     f"{r.p99_ms:.2f}", f"{r.sequences_per_s / ref:.2f}x" if ref else "-"))
    return table(rows, right=(1, 3, 4, 5, 6))


def ratio_lines(figures: dict) -> list[str]:
    merged = figures.get("merged_onnx_int8")
    parts = [f"{merged / figures[b]:.2f}x {b}" for b in BASELINES if merged and figures.get(b)]
    return [f"merged_onnx_int8 at batch {figures['batch']}, realistic lengths: {', '.join(parts)}"] if parts else []


def disturbed_lines(results: list, factor: float = DISTURBED) -> list[str]:
    """A note naming the measurements whose p99 is above `factor` x their p50: stalls that batch lengths do
    not explain (on a shared machine: other jobs on its cores), so their seq/s understate the engine."""
    hit = [f"{r.lengths}/{r.batch}/{r.engine}" for r in results if r.p99_ms > factor * r.p50_ms]
    return [f"note: p99 > {factor:g}x p50 in {', '.join(hit)}: stalled by other load on the machine; their "
            "seq/s understate those engines (rerun on an idle machine)"] if hit else []


def write_plot(path: Path, report: BenchReport) -> bool:
    """Sequences/s per engine, batch size and length setting (log scale), as a PNG; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    from centra.measure.bench_engines import LENGTHS

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
