"""Candidate heads: a second head beside a task's active one, in the same merged version.

`centra merge --candidate T=FOLDER` publishes a version in which task T has its active head (tasks/T/, as
in any version) and a candidate head (candidates/T/: another trained folder of the same task: the same
kind, labels and inputs; any attach layer or depth). The manifest lists the candidates beside the tasks.

Inside the runtime the candidate is one more branch of the merged graph, under its own key
(`candidate_key`: "T@candidate", which no task name can be): the layout gives it a branch graph, the
exports export and check it like any branch, and a row computes it only when it asks for the key. Such
a row never changes what the other branches compute: the trunk's rows and the walk of the active tasks
stay as they are without the key (`centra.core.graph.TrunkRows`); the candidate reads the trunk at its
own attach layer through a detour of its own (its rows' hidden states, taken where the active task's
rows are sure to be in the trunk, carried deeper when it attaches deeper). So a task's active answers
are bit-identical with and without a candidate, and a row that does not ask for the key pays nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from centra.core.task import TaskSpec

if TYPE_CHECKING:
    from centra.core.manifest import ManifestTask
from centra.errors import CentraError

SUFFIX = "@candidate"  # '@' is no task name's character (core.task.NAME_RE)
VERSION_DIR = "candidates"  # a version's candidate heads: candidates/<task>/task.json + head.safetensors
SAME = ("kind", "labels", "input", "max_length")  # what a candidate shares with its task
HEADS = ("active", "candidate")  # the heads that can answer a task; the first is the default


def candidate_key(task: str) -> str:
    """The branch key of task's candidate head."""
    return task + SUFFIX


def is_candidate(key: str) -> bool:
    return key.endswith(SUFFIX)


def task_of(key: str) -> str:
    """The task a branch key answers for: the key itself, or the task of a candidate key."""
    return key[: -len(SUFFIX)] if is_candidate(key) else key


def as_branch(spec: TaskSpec) -> TaskSpec:
    """A candidate's spec (named after its task, as in its task.json) as the runtime's branch: named by
    its key. Validate the spec before: the key is not a task name."""
    return replace(spec, name=candidate_key(spec.name))


def check_same_task(active: TaskSpec, candidate: TaskSpec, source: str) -> None:
    """The candidate answers the same question as the active head: kind, labels, inputs, and backbone
    (one line naming `source`, the candidate's task.json)."""
    for key in SAME:
        if getattr(candidate, key) != getattr(active, key):
            raise CentraError(f"{source}: {key} {getattr(candidate, key)!r} differs from task {active.name!r}'s "
                              f"{getattr(active, key)!r}: a candidate answers the same task")
    if candidate.backbone.get("fingerprint") != active.backbone.get("fingerprint"):
        raise CentraError(f"{source}: trained on another backbone than task {active.name!r}")


def detour_start(active: TaskSpec, candidate: TaskSpec) -> int:
    """The trunk layer where a candidate's rows leave the active walk: its own attach layer, or the
    active task's when it attaches deeper (the rows are in the trunk until there, whatever else runs)."""
    return min(active.attach_layer, candidate.attach_layer)


def extra_layers(active: TaskSpec | ManifestTask, candidate: TaskSpec | ManifestTask) -> int:
    """Transformer layers a row that asks for the task runs for its candidate beside the active head: the
    candidate's task layers, and the trunk layers between the two attach layers when it attaches deeper."""
    return candidate.task_layers + max(0, candidate.attach_layer - active.attach_layer)
