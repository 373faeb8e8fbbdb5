"""`centra plan`: choose one kept candidate per task for the best average dev metric under a budget
(layers per request, or milliseconds converted at this machine's measured cost of a layer), print and
plot the cost/quality frontier, and activate the choice in the task folders (no retraining)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from centra.cli import save_figure
from centra.core import DEFAULT_TASKS_DIR
from centra.errors import CentraError

DEFAULT_PLOT = "plan.png"
DEFAULT_LENGTH = 64  # tokens of a typical request (a review, an utterance) for --budget-ms


def cmd_plan(args: argparse.Namespace) -> int:
    from centra.core.backbone import Backbone
    from centra.core.candidates import activate, check_candidate, read_candidates
    from centra.core.task import task_dirs
    from centra.train.plan import best_plan, frontier

    if (args.budget_layers is None) == (args.budget_ms is None):
        raise CentraError("plan: give one budget: --budget-layers N or --budget-ms X" +
                          (", not both" if args.budget_layers is not None else ""))
    plot = check_plot(args.plot) if not args.no_plot else None
    tasks = [read_candidates(folder) for folder in task_dirs(Path(args.tasks_dir))]
    if not tasks:
        raise CentraError(f"{args.tasks_dir}: no task folders")
    if not any(t.candidates for t in tasks):
        raise CentraError(f"{args.tasks_dir}: no candidates in any task folder (add-task keeps them in "
                          "NAME/candidates/: train the tasks again with centra add-task)")
    for t in tasks:
        if not t.options():
            raise CentraError(f"{t.folder}: no candidates and no dev metric (an untrained task): train it with "
                              "centra add-task or remove it")
    backbone = Backbone.load(args.backbone or backbone_hint(tasks[0].active))
    for t in tasks:
        if t.active.backbone.get("fingerprint") != backbone.fingerprint:
            raise CentraError(f"{t.folder / 'task.json'}: trained on backbone {t.active.backbone.get('id')!r}, "
                              f"not on {backbone.backbone_id!r} (every task of a plan shares one backbone)")
    budget, note = args.budget_layers, None
    if args.budget_ms is not None:
        budget, note = ms_budget(args.budget_ms, backbone, args.length or default_length(tasks))
    options = {t.name: [option(t.name, c, t.active_id) for c in t.options()] for t in tasks}
    plans = frontier(options)
    chosen = best_plan(options, budget)
    if chosen is None:
        cheapest = plans[0]
        raise CentraError(f"plan: a budget of {budget} layer{'s' if budget != 1 else ''}"
                          f"{f' ({args.budget_ms:g} ms)' if note else ''} is below the cheapest plan "
                          f"({cheapest.cost} layers, average dev {100 * cheapest.average:.2f})")
    full = backbone.cfg.num_layers * len(tasks)
    points = reference_points(tasks, options, full)
    picks = {t.name: next(c for c in t.options() if c.id == chosen.choice[t.name].id) for t in tasks}
    if note:
        print(note)
    print(table(tasks, chosen, [picks[name].spec for name in chosen.choice], plans, points, budget, full))
    if plot is not None and write_plot(plot, plans, chosen, points, budget, full):
        print(f"plot: {plot}")
    if args.dry_run:
        print("dry run: nothing activated")
        return 0
    for t in tasks:  # every chosen head loaded in full before any folder changes
        check_candidate(t, picks[t.name], backbone)
    changed = [t.name for t in tasks if activate(t, picks[t.name], backbone.cfg)]
    print(f"activated {len(changed)} task{'s' if len(changed) != 1 else ''}"
          f"{': ' + ', '.join(changed) if changed else ''}; {len(tasks) - len(changed)} unchanged"
          + ("; run `centra merge` to serve the plan" if changed else ""))
    return 0


def check_plot(value: str) -> Path:
    from centra.io import check_writable_parent

    plot = Path(value)
    if plot.suffix.lower() != ".png":
        raise CentraError(f"plan: --plot {plot}: the plot is a PNG file (name it *.png)")
    if plot.is_dir():
        raise CentraError(f"plan: --plot {plot}: is a folder")
    check_writable_parent(plot)
    return plot


def backbone_hint(spec) -> str:
    path = spec.backbone.get("path")
    return path if path and Path(path).is_dir() else spec.backbone["id"]


def default_length(tasks: list) -> int:
    return min(DEFAULT_LENGTH, max(t.active.max_length for t in tasks))


def ms_budget(budget_ms: float, backbone, length: int) -> tuple[int, str]:
    """Milliseconds -> layers at the cost of one encoder layer measured now (batch 1, `length` tokens)."""
    from centra.runtime.bench import layer_ms

    per_layer = layer_ms(backbone.layers[0], backbone.cfg.hidden_size, length)
    layers = math.floor(budget_ms / per_layer)
    return layers, (f"one layer costs {per_layer:.3f} ms here (batch 1 x {length} tokens, torch fp32, measured "
                    f"now): a budget of {budget_ms:g} ms is {layers} layer{'s' if layers != 1 else ''} per request")


def option(task: str, candidate, active_id: str | None):
    from centra.core.candidates import ACTIVE
    from centra.train.plan import Option

    spec = candidate.spec
    return Option(task, candidate.id, spec.encoding_key, spec.attach_layer, spec.task_layers, candidate.score,
                  active=candidate.id in (active_id, ACTIVE))


def reference_points(tasks: list, options: dict, full: int) -> dict[str, tuple[int, float]]:
    """(layers, average dev) of the heads active now, of KD-l for every task (when each has it), and of
    full fine-tuning (when every task's report.json has its reference run)."""
    from centra.train.plan import Plan

    points = {}
    before = Plan({name: o for name, opts in options.items() for o in opts if o.active})
    if len(before.choice) == len(tasks):
        points["before"] = (before.cost, before.average)
    for layers in (1, 2, 3):
        picks = {name: [o for o in opts if o.id == f"student-l{layers}"] for name, opts in options.items()}
        if all(picks.values()):
            plan = Plan({name: found[0] for name, found in picks.items()})
            points[f"KD-{layers}"] = (plan.cost, plan.average)
    scores = [reference_score(t) for t in tasks]
    if None not in scores:
        points["full fine-tuning"] = (full, sum(scores) / len(scores))
    return points


def reference_score(task) -> float | None:
    """The task's full fine-tuning reference as served (a multilabel one at its tuned thresholds), from
    its report.json; None when it has none."""
    from centra.core.task import REPORT_FILE
    from centra.train.report import read_report

    try:
        reference = read_report(task.folder / REPORT_FILE).reference
        return None if reference is None else reference.served(task.metric)
    except (CentraError, KeyError, TypeError, ValueError):  # no report, or no score of the task's metric
        return None


def table(tasks: list, chosen, specs: list, plans: list, points: dict, budget: int, full: int) -> str:
    """The chosen plan (`specs`: its candidates' specs), its trunk passes, the frontier and the reference
    points."""
    from centra.core.candidates import ACTIVE
    from centra.core.overhead import token_groups

    rows = [("task", "metric", "before", "chosen", "attach", "layers", "dev")]
    for t in tasks:
        o = chosen.choice[t.name]
        rows.append((t.name, t.metric or "-", t.active_id or ACTIVE, o.id, str(o.attach), str(o.layers),
                     f"{100 * o.score:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
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


def write_plot(path: Path, plans: list, chosen, points: dict, budget: int, full: int) -> bool:
    """The frontier (best average dev per layers), the chosen plan, the budget and the reference points,
    as a PNG written beside its name and renamed; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("centra: note: matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
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
    fig.tight_layout()
    save_figure(fig, path)
    return True


def add_parsers(sub, common) -> None:
    from centra.cli import positive_float, positive_int

    p = sub.add_parser("plan", parents=[common],
                       help="choose one kept candidate per task: best average dev metric under a budget")
    p.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help="folder of task folders (default: tasks)")
    p.add_argument("--budget-layers", type=positive_int, metavar="N",
                   help="layers per request: each token group's trunk depth + every task's layers")
    p.add_argument("--budget-ms", type=positive_float, metavar="X",
                   help="milliseconds per request, at the cost of one layer measured on this machine")
    p.add_argument("--length", type=positive_int, help=f"tokens per request for --budget-ms [{DEFAULT_LENGTH}, "
                   "or the tasks' max_length when shorter]")
    p.add_argument("--backbone", help="backbone folder or 'default' (default: the one the tasks name)")
    p.add_argument("--plot", default=DEFAULT_PLOT, help=f"PNG of the frontier [{DEFAULT_PLOT}]")
    p.add_argument("--no-plot", action="store_true", help="no plot")
    p.add_argument("--dry-run", action="store_true", help="show the plan, activate nothing")
    p.set_defaults(func=cmd_plan)
