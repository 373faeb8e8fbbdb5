"""`centra plan`: choose one kept candidate per task for the best average dev metric under a budget
(layers per request, or milliseconds converted at this machine's measured cost of a layer), print and
plot the cost/quality frontier, and activate the choice in the task folders (no retraining). With
--extra-attach N it first distils the students below each teacher that a task folder lacks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from centra.cli import flags_named, non_negative_int, positive_float, positive_int
from centra.cli.plots import check_plot, pyplot, save_figure
from centra.core import DEFAULT_TASKS_DIR
from centra.core.table import table
from centra.train.planning import DEFAULT_LENGTH

if TYPE_CHECKING:
    from centra.train.planning import PlanResult

DEFAULT_PLOT = "plan.png"


def cmd_plan(args: argparse.Namespace) -> int:
    from centra.train.planning import activate_plan, plan_tasks

    plot = check_plot(args.plot, "plan") if not args.no_plot else None
    with flags_named():
        result = plan_tasks(Path(args.tasks_dir), args.budget_layers, args.budget_ms, args.length, args.backbone,
                            args.extra_attach or 0)
    for w in result.widened:
        print(f"{w.task}: distilled {', '.join(w.trained)} in {w.seconds:.1f} s (kept as candidates)")
    if args.extra_attach and not result.widened:
        print(f"--extra-attach {args.extra_attach}: every task keeps those students already; nothing trained")
    for line in (result.wider, result.note):
        if line:
            print(line)
    print(plan_table(result))
    if plot is not None and write_plot(plot, result):
        print(f"plot: {plot}")
    if args.dry_run:
        print("dry run: nothing activated")
        return 0
    changed = activate_plan(result)
    unchanged = len(result.tasks) - len(changed)
    print(f"activated {len(changed)} task{'s' if len(changed) != 1 else ''}"
          f"{': ' + ', '.join(changed) if changed else ''}; {unchanged} unchanged"
          + ("; run `centra merge` to serve the plan" if changed else ""))
    return 0


def plan_table(result: PlanResult) -> str:
    """The chosen plan, its trunk passes, the frontier and the reference points."""
    from centra.core.candidates import ACTIVE
    from centra.core.overhead import token_groups

    tasks, chosen, plans, points = result.tasks, result.chosen, result.plans, result.points
    budget, full = result.budget, result.full
    specs = [result.picks[name].spec for name in chosen.choice]
    rows = [("task", "metric", "before", "chosen", "attach", "layers", "dev")]
    for t in tasks:
        o = chosen.choice[t.name]
        rows.append((t.name, t.metric or "-", t.active_id or ACTIVE, o.id, str(o.attach), str(o.layers),
                     f"{100 * o.score:.2f}"))
    lines = [table(rows)]
    groups = sorted(token_groups(specs), key=lambda g: -g.depth)
    trunk = " + ".join(f"{g.depth} [{g.input}, max_length {g.max_length}]" for g in groups)
    lines.append(f"plan: {chosen.cost} layers per request of a budget of {budget} (trunk passes: {trunk}; task "
                 f"layers: {chosen.cost - sum(g.depth for g in groups)}), {100 * chosen.cost / full:.0f}% of {full} as "
                 f"{len(tasks)} separate models; average dev {100 * chosen.average:.2f}")
    lines.append("frontier (layers: best average dev):")
    for p in plans:
        mark = "  <- chosen" if p.cost == chosen.cost else ""
        lines.append(f"  {p.cost:4d} ({100 * p.cost / full:3.0f}%): {100 * p.average:6.2f}{mark}")
    if points:
        lines.append("for comparison: " + "; ".join(f"{name} {cost} layers {100 * avg:.2f}"
                                                    for name, (cost, avg) in points.items()))
    return "\n".join(lines)


def write_plot(path: Path, result: PlanResult) -> bool:
    """The frontier (best average dev per layers), the chosen plan, the budget and the reference points,
    as a PNG written beside its name and renamed; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    import matplotlib

    plans, chosen, points, budget, full = result.plans, result.chosen, result.points, result.budget, result.full
    fig, ax = plt.subplots(figsize=(7, 4.8))
    xs, ys = [p.cost for p in plans], [100 * p.average for p in plans]
    ax.step(xs, ys, where="post", color="tab:blue", alpha=0.5)
    ax.plot(xs, ys, "o", color="tab:blue", label="frontier (best plan per cost)")
    ax.plot([chosen.cost], [100 * chosen.average], "*", color="tab:red", markersize=16,
            label=f"chosen: {chosen.cost} layers, {100 * chosen.average:.2f}")
    ax.axvline(budget, color="tab:red", linestyle="--", alpha=0.5, label=f"budget: {budget} layers")
    markers = {"before": ("s", "tab:gray"), "full fine-tuning": ("D", "black")}
    for name, (cost, avg) in points.items():
        marker, color = markers.get(name, ("^", "tab:green"))
        ax.plot([cost], [100 * avg], marker, color=color, label=f"{name}: {cost} layers, {100 * avg:.2f}")
        ax.annotate(name, (cost, 100 * avg), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(f"overhead: layers per request (separate models: {full})")
    ax.set_ylabel("average dev metric (x100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("centra plan: cost/quality frontier")
    return save_figure(fig, path)


def add_parsers(sub, common) -> None:
    p = sub.add_parser("plan", parents=[common],
                       help="choose one kept candidate per task: best average dev metric under a budget")
    p.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help="folder of task folders (default: tasks)")
    p.add_argument("--budget-layers", type=positive_int, metavar="N",
                   help="layers per request: each token group's trunk depth + every task's layers")
    p.add_argument("--budget-ms", type=positive_float, metavar="X",
                   help="milliseconds per request, at the cost of one layer measured on this machine")
    p.add_argument("--length", type=positive_int, help=f"tokens per request for --budget-ms [{DEFAULT_LENGTH}, "
                   "or the tasks' max_length when shorter]")
    p.add_argument("--backbone", help="backbone folder, 'default' or a name of `centra backbone list` "
                   "(default: the one the tasks name)")
    p.add_argument("--extra-attach", type=non_negative_int, metavar="N",
                   help="first distil the students at the N attach layers below each task's teacher that its "
                   "folder lacks (add-task's --extra-attach, trained later; kept as candidates, the served "
                   "heads untouched, even with --dry-run)")
    p.add_argument("--plot", default=DEFAULT_PLOT, help=f"PNG of the frontier [{DEFAULT_PLOT}]")
    p.add_argument("--no-plot", action="store_true", help="no plot")
    p.add_argument("--dry-run", action="store_true", help="show the plan, activate nothing")
    p.set_defaults(func=cmd_plan)
