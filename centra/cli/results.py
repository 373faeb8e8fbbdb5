"""`centra results`: train GLUE + GoEmotions tasks on the default backbone, merge them, and print the
tables of docs/results.md.

    centra results [--data ../shared/data] [--out runs/glue] [--epochs 2] [--reference-epochs 3]
                   [--only sst2,cola] [--search full|halving] [--table]

The work is centra.measure.results' (its docstring says what each table holds); this module parses the
flags, calls it and prints the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from centra.cli import flags_named


def cmd_results(args: argparse.Namespace) -> int:
    from centra.measure.results import ResultsOptions, check_run, results_tables, run_results

    options = ResultsOptions(data=Path(args.data) if args.data else None, out=Path(args.out), epochs=args.epochs,
                             reference_epochs=args.reference_epochs, seed=args.seed, only=args.only,
                             search=args.search, progress=args.progress,
                             threshold_objective=args.threshold_objective, max_labels=args.max_labels,
                             precision=args.precision)
    with flags_named():  # every refusal before anything runs
        if args.table:
            options.check()
        else:
            check_run(options)
    print(results_tables(options) if args.table else run_results(options))
    return 0


def add_parser(sub, common) -> None:
    p = sub.add_parser("results", parents=[common], help="train GLUE + GoEmotions tasks and print docs/results.md's "
                       "tables (51 min on 2 cores for five tasks with halving)")
    p.add_argument("--data", help="data folder (default: $CENTRA_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/glue")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--reference-epochs", type=int, default=3,
                   help="epochs of the full fine-tuning reference (embeddings and every layer trained) [3]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated task names")
    p.add_argument("--search", choices=["full", "halving"], default="full",
                   help="teacher search [full: every L trained to the end, as the tables show]")
    from centra.cli.tasks import flag_help
    from centra.train.settings import DECLARED

    for d in DECLARED:  # the multilabel settings, declared once in centra.train.settings
        if d.name == "precision":
            p.add_argument(d.flag, choices=d.choices, help=flag_help(f"{d.help} [{d.default_text}]"))
        if d.name in ("threshold_objective", "max_labels"):
            p.add_argument(d.flag, type=d.type, choices=d.choices, default=d.default,
                           help=flag_help(f"multilabel tasks (GoEmotions): {d.help.removeprefix('multilabel: ')} "
                                          f"[{d.default_text}]"))
    p.add_argument("--progress", action="store_true", help="show progress")
    p.add_argument("--table", action="store_true", help="only print the tables of OUT/results.json")
    p.set_defaults(func=cmd_results)
    c = sub.add_parser("costs", parents=[common], help="the training-cost table of trained tasks (their "
                       "report.json): reference, search, students, all / reference, dev metric against the reference")
    c.add_argument("folders", nargs="+", metavar="FOLDER", help="task folders, or folders of task folders")
    c.set_defaults(func=cmd_costs)


def cmd_costs(args: argparse.Namespace) -> int:
    from centra.measure.costs import cost_table, read_reports

    print(cost_table(read_reports([Path(f) for f in args.folders])))
    return 0
