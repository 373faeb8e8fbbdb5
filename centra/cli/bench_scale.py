"""`centra bench-scale`: memory, speed, merge time and disk per task count, and a server reloading +1 task at
the largest count (the measuring is centra.measure.scale's). A table, a PNG plot, a last line of JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import flags_named, positive_int


def task_counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected task counts such as 8,32,100, got {value!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"task counts must be >= 1, got {value!r}")
    return counts


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from centra.cli.plots import check_plot
    from centra.core.texts import read_texts_file
    from centra.measure.scale import ScaleBenchOptions, check_workdir, run_bench_scale
    from centra.progress import progress_line
    from centra.train.texts import default_sequences

    options = ScaleBenchOptions(tasks=args.tasks, engines=tuple(args.engines.split(",")),
                                separate_up_to=args.separate_up_to, texts=args.texts, reload=not args.no_reload,
                                seed=args.seed, backbone=args.backbone)
    with flags_named("bench-scale"):
        options.check()
    plot = check_plot(args.plot, "bench-scale") if args.plot else None
    workdir = Path(args.workdir) if args.workdir else None
    check_workdir(workdir)
    if args.texts_file:
        texts, source = read_texts_file(Path(args.texts_file)), args.texts_file
    else:
        texts, _, source, _ = default_sequences()

    def progress(line: str) -> None:
        progress_line(f"bench-scale: {line}")

    report = run_bench_scale(options, texts, workdir, progress, source)
    print_report(report)
    if plot is not None:
        write_plot(report, plot)
    print(json.dumps(report.to_dict()))
    return 0


def print_report(report) -> None:
    from centra.core.table import table

    rows = [("tasks", "engine", "layout", "layers/req", "texts/s all", "texts/s one", "RSS MB", "load s",
             "merge s (peak MB)", "+1 task s (peak MB)", "version MB", "+1 adds MB")]
    for r in report.rows:
        merge = f"{r.merge_s:g} ({r.merge_peak_mb:g})" if r.merge_s is not None else "-"
        add = f"{r.add_one_s:g} ({r.add_one_peak_mb:g})" if r.add_one_s is not None else "-"
        rows.append((str(r.tasks), r.engine, r.layout, str(r.layers_per_request or "-"), f"{r.texts_per_s:.1f}",
                     f"{r.one_task_texts_per_s:.0f}", f"{r.rss_mb:.0f}", f"{r.load_s:.1f}", merge, add,
                     "-" if r.version_mb is None else f"{r.version_mb:g}",
                     "-" if r.add_one_disk_mb is None else f"{r.add_one_disk_mb:g}"))
    print(table(rows))
    if report.reload:
        r = report.reload
        print(f"reload: centra serve on {r['tasks']} int8 tasks, +1 task merged in: RSS {r['rss_before_mb']} MB "
              f"before, peak {r['peak_mb']} MB, {r['rss_after_mb']} MB after; merge {r['merge_s']:g} s, "
              f"new task answering {r['merge_to_answer_s']:g} s after the merge started")


def write_plot(report, path: Path) -> None:
    from centra.cli.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series: dict[tuple[str, str], list] = {}
    for r in report.rows:
        series.setdefault((r.engine, r.layout), []).append(r)
    for (engine, layout), rows in sorted(series.items()):
        x = [r.tasks for r in rows]
        style = "-o" if layout == "merged" else "--s"
        axes[0].plot(x, [r.rss_mb for r in rows], style, label=f"{engine} {layout}")
        axes[1].plot(x, [r.texts_per_s for r in rows], style, label=f"{engine} {layout}")
        if layout == "merged":
            axes[2].plot(x, [r.add_one_s for r in rows], style, label=f"{engine}: +1 task")
            axes[2].plot(x, [r.merge_s for r in rows], ":x", label=f"{engine}: from scratch")
    counts = sorted({r.tasks for r in report.rows})
    for ax, title in zip(axes, ("RSS serving every task (MB)", "texts/s, every task answered",
                                "merge seconds")):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("tasks")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    save_figure(fig, path)


def add_parsers(sub, common) -> None:
    p = sub.add_parser("bench-scale", parents=[common],
                       help="memory, speed, merge time and disk per task count, on synthetic tasks")
    p.add_argument("--tasks", type=task_counts, default=(8, 32, 100), help="task counts (default 8,32,100)")
    p.add_argument("--engines", default="torch,onnx-int8", help="torch and/or onnx-int8 (default both)")
    p.add_argument("--separate-up-to", type=int, default=32, help="also measure one model per task up to this "
                   "many tasks (default 32; 0: never)")
    p.add_argument("--texts", type=positive_int, default=128, help="texts answered per measurement (default 128)")
    p.add_argument("--texts-file", help="texts, one per line (default: SST-2 dev sentences, else sample texts)")
    p.add_argument("--backbone", help="backbone folder, 'default' or a name of `centra backbone list` "
                   "(default: the default backbone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reload", action="store_true", help="skip the reload measurement (a server at the largest "
                   "count, +1 task merged in)")
    p.add_argument("--workdir", help="keep the tasks, versions and graphs here (default: a temp folder)")
    p.add_argument("--plot", help="write a PNG of cost against task count here")
    p.set_defaults(func=cmd_bench_scale)
