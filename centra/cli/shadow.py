"""Commands over candidate heads (merged with `centra merge --candidate TASK=FOLDER`): the shadow report of a
running server, and promoting or dropping a candidate.

    centra shadow report --metrics http://127.0.0.1:9400/metrics [--sample FILE]
    centra shadow bench --model OUT [--texts FILE] [--engine onnx]
    centra promote TASK --model OUT
    centra drop-candidate TASK --model OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.errors import CentraError

SHOWN_SAMPLES = 10  # lines of a sample file the report prints


def cmd_shadow_report(args: argparse.Namespace) -> int:
    from centra.measure.shadow import read_metrics, report, shadow_figures

    figures = shadow_figures(read_metrics(args.metrics))
    if args.task:
        missing = [t for t in args.task if t not in figures]
        if missing:
            raise CentraError(f"shadow report: no shadow figures for task {missing[0]!r} in {args.metrics}")
        figures = {t: figures[t] for t in args.task}
    print(report(figures))
    if args.sample:
        print_sample(Path(args.sample), args.task)
    return 0


def print_sample(path: Path, tasks: list[str] | None) -> None:
    """The first lines of a server's sample of disagreeing inputs (serve --shadow-sample)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CentraError(f"{path}: cannot read the sample ({getattr(exc, 'strerror', None) or exc})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise CentraError(f"{path}:{number}: not a line of a shadow sample") from None
        if not tasks or entry.get("task") in tasks:
            entries.append(entry)
    print(f"\ndisagreeing inputs ({len(entries)} in {path}; the first {min(len(entries), SHOWN_SAMPLES)}):")
    for entry in entries[:SHOWN_SAMPLES]:
        active, candidate = (shown(entry.get(head, {})) for head in ("active", "candidate"))
        print(f"  {entry.get('task')}: {entry.get('text')!r}: active {active}, candidate {candidate}")


def shown(answer: dict) -> str:
    for key in ("label", "labels", "value"):
        if key in answer:
            return json.dumps(answer[key], ensure_ascii=False)
    return "?"


def cmd_shadow_bench(args: argparse.Namespace) -> int:
    from centra.cli import flags_named
    from centra.core.texts import SAMPLE_TEXTS, read_sequences_file
    from centra.measure.bench_shadow import bench_lines, bench_shadow, check_options

    with flags_named("shadow bench"):
        check_options(args.batch, args.repeats)
    texts = read_sequences_file(Path(args.texts))[0] if args.texts else \
        (SAMPLE_TEXTS * (2 * args.batch // len(SAMPLE_TEXTS) + 1))[: 2 * args.batch]
    print(bench_lines(bench_shadow(Path(args.model), texts, args.engine, args.batch, args.repeats, args.task)))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    return republished(args, promote=True)


def cmd_drop_candidate(args: argparse.Namespace) -> int:
    return republished(args, promote=False)


def republished(args: argparse.Namespace, promote: bool) -> int:
    from centra.core.merge import overhead_table
    from centra.export.engines import drop_candidate
    from centra.export.engines import promote as promote_candidate

    act = promote_candidate if promote else drop_candidate
    manifest = act(Path(args.model), args.task, keep_versions=args.keep_versions)
    what = "its candidate head is now the active one" if promote else "its candidate head removed"
    print(f"task {args.task!r}: {what}; published {args.model} version {manifest.version} (every other task's "
          "files as they were; a server following the model reloads it)")
    print(overhead_table(manifest))
    return 0


def add_parsers(sub, common) -> None:
    from centra.cli import positive_int
    from centra.cli.models import add_engine_arg

    p = sub.add_parser("shadow", parents=[common], help="shadowed and canaried candidate heads: the report")
    inner = p.add_subparsers(dest="shadow_command", required=True, parser_class=type(p))
    r = inner.add_parser("report", parents=[common], help="agreement, confusion and cost of each candidate head "
                         "from a server's metrics")
    r.add_argument("--metrics", required=True, help="the server's metrics URL (http://HOST:9400/metrics) or a file "
                   "of its metrics text")
    r.add_argument("--task", action="append", help="only this task (repeatable; default: every shadowed task)")
    r.add_argument("--sample", help="also print the first disagreeing inputs of this sample file (serve "
                   "--shadow-sample)")
    r.set_defaults(func=cmd_shadow_report)
    b = inner.add_parser("bench", parents=[common], help="time shadowing each task against what its candidate's "
                         "layers predict (target: overhead <= 1.1 x their share)")
    b.add_argument("--model", required=True, help="merged model folder whose version has candidate heads")
    b.add_argument("--texts", help="texts to time, one per line (default: the sample texts, two batches)")
    b.add_argument("--task", action="append", help="only this task (repeatable; default: every shadowed task)")
    b.add_argument("--batch", type=positive_int, default=32, help="rows per batch (default 32)")
    b.add_argument("--repeats", type=positive_int, default=20, help="passes over the texts (default 20)")
    add_engine_arg(b)
    b.set_defaults(func=cmd_shadow_bench)

    for name, func, text in (("promote", cmd_promote, "publish a version where TASK's candidate head is the active "
                              "one"),
                             ("drop-candidate", cmd_drop_candidate, "publish a version without TASK's candidate "
                              "head")):
        p = sub.add_parser(name, parents=[common], help=f"{text} (every other task's files byte-identical)")
        p.add_argument("task", metavar="TASK")
        p.add_argument("--model", required=True, help="merged model folder (its current version)")
        p.add_argument("--keep-versions", type=positive_int, default=3, help="versions kept (default 3)")
        p.set_defaults(func=func)
