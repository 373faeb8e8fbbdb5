"""Allocation under a budget: one candidate per task, the best average dev metric for the layers paid.

The cost of a plan is its overhead as the merged engine runs it (core/overhead.py): per token group
(tasks that read the same tokens) one trunk pass as deep as the group's deepest attach layer, plus every
task's own layers. The trunk depth is shared, so the tasks' choices are not independent; but for a
fixed depth D of a group, each task may take any candidate attached at or below D and the rest is a
knapsack over task layers. So, exactly: per group, for every depth D, a knapsack over the group's
tasks (value: summed dev metric, weight: task layers); then the groups' best-value-per-cost curves are
combined by one more knapsack. Sizes are tiny (depths <= N, task layers <= 3 per task).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Option:
    """One candidate of one task, as the planner sees it."""

    task: str
    id: str
    group: tuple  # the token group (TaskSpec.encoding_key): tasks of a group share one trunk pass
    attach: int
    layers: int
    score: float  # dev metric, in [0, 1] (or [-1, 1])
    active: bool = False  # the task's head now: between plans equal in score and cost, the fewer changes win


@dataclass
class Plan:
    choice: dict[str, Option] = field(default_factory=dict)

    @property
    def cost(self) -> int:
        return plan_cost(self.choice.values())

    @property
    def total(self) -> float:
        return sum(o.score for o in self.choice.values())

    @property
    def average(self) -> float:
        return self.total / max(1, len(self.choice))


def plan_cost(options: Iterable[Option]) -> int:
    """Layers per request: each token group's deepest attach layer + every task's layers."""
    depth: dict[tuple, int] = {}
    layers = 0
    for o in options:
        depth[o.group] = max(depth.get(o.group, 0), o.attach)
        layers += o.layers
    return sum(depth.values()) + layers


Entry = tuple[float, int, tuple[Option, ...]]  # (summed score, active heads kept, the choices)
Curve = dict[int, Entry]  # cost bound -> the best entry


def _better(new: Entry, old: Entry | None) -> bool:
    return old is None or new[:2] > old[:2]


def _knapsack(tasks: list[list[Option]]) -> Curve:
    """Over task layers: for each total of task layers, the best summed score taking one option per task."""
    best: Curve = {0: (0.0, 0, ())}
    for options in tasks:
        nxt: Curve = {}
        for weight, (value, kept, chosen) in best.items():
            for o in options:
                entry = (value + o.score, kept + o.active, (*chosen, o))
                if _better(entry, nxt.get(weight + o.layers)):
                    nxt[weight + o.layers] = entry
        best = nxt
    return best


def _group_curve(tasks: list[list[Option]]) -> Curve:
    """One token group: for every trunk depth D, the knapsack over candidates attached at <= D; a plan
    whose deepest attach is below D is also found at its own depth, at its true (lower) cost."""
    curve: Curve = {}
    for depth in sorted({o.attach for options in tasks for o in options}):
        allowed = [[o for o in options if o.attach <= depth] for options in tasks]
        if not all(allowed):
            continue
        for layers, entry in _knapsack(allowed).items():
            if _better(entry, curve.get(depth + layers)):
                curve[depth + layers] = entry
    return curve


def _combine(a: Curve, b: Curve) -> Curve:
    out: Curve = {}
    for ca, (va, ka, xa) in a.items():
        for cb, (vb, kb, xb) in b.items():
            entry = (va + vb, ka + kb, xa + xb)
            if _better(entry, out.get(ca + cb)):
                out[ca + cb] = entry
    return out


def _check(tasks: dict[str, list[Option]]) -> None:
    for name, options in tasks.items():
        if not options:
            raise ValueError(f"task {name!r} has no options")
        if len({o.group for o in options}) != 1 or any(o.task != name for o in options):
            raise ValueError(f"task {name!r}: options of one task share its name and token group")


def frontier(tasks: dict[str, list[Option]]) -> list[Plan]:
    """Every plan on the cost/quality frontier, cheapest first: for each cost where the best average
    improves, the best plan costing at most that (ties: the cheaper plan, then the one changing fewer
    tasks)."""
    _check(tasks)
    groups: dict[tuple, list[list[Option]]] = {}
    for options in tasks.values():
        groups.setdefault(options[0].group, []).append(sorted(options, key=lambda o: (o.layers, o.attach, o.id)))
    total: Curve = {0: (0.0, 0, ())}
    for group in sorted(groups, key=repr):
        total = _combine(total, _group_curve(groups[group]))
    plans, best = [], None
    for cost in sorted(total):
        value, _, chosen = total[cost]
        if best is None or value > best:
            best = value
            plans.append(Plan({o.task: o for o in sorted(chosen, key=lambda o: o.task)}))
    return plans


def best_plan(tasks: dict[str, list[Option]], budget: int) -> Plan | None:
    """The best average dev metric costing at most `budget` layers (None when even the cheapest
    plan costs more)."""
    fits = [p for p in frontier(tasks) if p.cost <= budget]
    return fits[-1] if fits else None
