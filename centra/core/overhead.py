"""Overhead, the papers' cost measure: transformer layers run per request for all tasks.

The engine runs one trunk pass per token group (tasks reading the same tokens: same input kind and
max_length), each as deep as the deepest attach layer in the group, then every task's own layers.
So overhead = the sum of the groups' trunk depths + the sum of task layers. Serving T tasks as T
separate N-layer models costs N * T.
"""

from __future__ import annotations

from collections.abc import Iterable

from centra.core.task import TaskSpec


def trunk_passes(specs: Iterable[TaskSpec]) -> list[dict]:
    """One entry per token group: input, max_length, depth (its trunk layers) and its tasks, deepest
    group first (ties: more tasks, then single texts)."""
    groups: dict[tuple[str, int], list[TaskSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.encoding_key, []).append(spec)
    passes = [{"input": key[0], "max_length": key[1], "depth": max(s.attach_layer for s in members),
               "tasks": [s.name for s in members]} for key, members in groups.items()]
    return sorted(passes, key=lambda p: (-p["depth"], -len(p["tasks"]), p["input"] != "single", p["max_length"]))


def overhead_layers(specs: Iterable[TaskSpec]) -> int:
    specs = list(specs)
    return sum(p["depth"] for p in trunk_passes(specs)) + sum(s.task_layers for s in specs)


def extra_pass_warnings(specs: Iterable[TaskSpec]) -> list[str]:
    """One line per token group beyond the main one (the group with the most tasks; ties: single
    texts, then the deeper pass): which tasks add a trunk pass and what it costs."""
    passes = trunk_passes(specs)
    if not passes:
        return []
    main = max(passes, key=lambda p: (len(p["tasks"]), p["input"] == "single", p["depth"]))
    lines = []
    for p in (p for p in passes if p is not main):
        many = len(p["tasks"]) > 1
        names = ", ".join(repr(n) for n in p["tasks"])
        verb, own = ("read", "their") if many else ("reads", "its")
        lines.append(f"task{'s' if many else ''} {names} ({p['input']} input, max_length {p['max_length']}) "
                     f"{verb} other tokens than the rest: a trunk pass of {own} own, "
                     f"+{p['depth']} layer{'s' if p['depth'] != 1 else ''} per request")
    return lines
