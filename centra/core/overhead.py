"""Token groups and overhead, the papers' cost measure: transformer layers run per request for all tasks.

Tasks that read the same tokens (same input kind and max_length: TaskSpec.encoding_key) form one token
group. The engine runs one trunk pass per group, as deep as the deepest attach layer in the group, then
every task's own layers. So overhead = the sum of the groups' trunk depths + the sum of task layers.
Serving T tasks as T separate N-layer models costs N * T.

`TokenGroup` is the one type of a token group: the engine groups rows by it, bench batches by it, the
Triton export serves one per group, plan and the merge table print them, and the manifest records them
as its trunk passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from centra.errors import CentraError

if TYPE_CHECKING:
    from centra.core.task import TaskSpec


@dataclass(frozen=True)
class TokenGroup:
    """Tasks that read the same tokens: their input kind and max_length, their names (in the order of
    the specs they were built from) and the trunk depth of their pass (their deepest attach layer)."""

    input: str
    max_length: int
    tasks: tuple[str, ...]
    depth: int

    @property
    def key(self) -> tuple[str, int]:
        """TaskSpec.encoding_key of its tasks."""
        return self.input, self.max_length

    @property
    def label(self) -> str:
        """"single_128": the group in a name."""
        return f"{self.input}_{self.max_length}"

    def to_dict(self) -> dict:
        return {"input": self.input, "max_length": self.max_length, "depth": self.depth, "tasks": list(self.tasks)}

    @classmethod
    def from_dict(cls, data: object, source: str) -> TokenGroup:
        """A manifest's trunk pass, every field checked (one line naming `source`)."""
        if not isinstance(data, dict):
            raise CentraError(f"{source}: malformed manifest (each trunk pass must be an object)")
        for key, typ in (("input", str), ("max_length", int), ("depth", int), ("tasks", list)):
            if not isinstance(data.get(key), typ) or isinstance(data[key], bool):
                raise CentraError(f"{source}: malformed manifest (trunk pass {key!r} must be {typ.__name__})")
        if not all(isinstance(t, str) for t in data["tasks"]):
            raise CentraError(f"{source}: malformed manifest (trunk pass tasks must be names)")
        return cls(data["input"], data["max_length"], tuple(data["tasks"]), data["depth"])


def token_groups(specs: Iterable[TaskSpec]) -> list[TokenGroup]:
    """One group per encoding key, in the order its first task appears; its tasks in the specs' order."""
    members: dict[tuple[str, int], list[TaskSpec]] = {}
    for spec in specs:
        members.setdefault(spec.encoding_key, []).append(spec)
    return [TokenGroup(key[0], key[1], tuple(s.name for s in group), max(s.attach_layer for s in group))
            for key, group in members.items()]


def trunk_passes(specs: Iterable[TaskSpec]) -> list[TokenGroup]:
    """The token groups, deepest first (ties: more tasks, then single texts, then the shorter max_length)."""
    return sorted(token_groups(specs), key=lambda g: (-g.depth, -len(g.tasks), g.input != "single", g.max_length))


def overhead_layers(specs: Iterable[TaskSpec]) -> int:
    specs = list(specs)
    return sum(g.depth for g in token_groups(specs)) + sum(s.task_layers for s in specs)


def extra_pass_warnings(specs: Iterable[TaskSpec]) -> list[str]:
    """One line per token group beyond the main one: see `pass_warnings`."""
    return pass_warnings(trunk_passes(specs))


def pass_warnings(passes: list[TokenGroup]) -> list[str]:
    """One line per trunk pass beyond the main one (the group with the most tasks; ties: single texts,
    then the deeper pass): which tasks add a trunk pass and what it costs (a manifest's trunk passes)."""
    if not passes:
        return []
    main = max(passes, key=lambda g: (len(g.tasks), g.input == "single", g.depth))
    lines = []
    for g in (g for g in passes if g is not main):
        many = len(g.tasks) > 1
        names = ", ".join(repr(n) for n in g.tasks)
        verb, own = ("read", "their") if many else ("reads", "its")
        lines.append(f"task{'s' if many else ''} {names} ({g.input} input, max_length {g.max_length}) "
                     f"{verb} other tokens than the rest: a trunk pass of {own} own, "
                     f"+{g.depth} layer{'s' if g.depth != 1 else ''} per request")
    return lines
