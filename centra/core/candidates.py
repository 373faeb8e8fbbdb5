"""Candidates: the trained heads a task folder keeps beside its active one, and activating one of them.

add-task keeps every head it trained with at most 3 task layers (students l = 1..3, teachers L <= 3)
in tasks/NAME/candidates/ID/, each a task.json + head.safetensors of its own with its dev metrics. The
active head is one of them: the folder's task.json and head.safetensors are that candidate's, byte
for byte. `centra plan` chooses one candidate per task under a budget (centra.train.plan) and
`activate` swaps it in: the task folder is published anew in one atomic step (stage, load, exchange),
every other file of it copied byte for byte; nothing is retrained. `add_candidates` publishes the
folder with more candidates kept (students distilled later: `centra plan --extra-attach`), the
served head and every other file copied byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from centra.core.backbone import Backbone, EncoderConfig
from centra.core.task import (
    CANDIDATES_DIR,
    HEAD_FILE,
    NAME_RE,
    RECIPE_FILE,
    TASK_FILE,
    TASK_KIND,
    TaskHead,
    TaskSpec,
    is_legacy_task,
    load_task,
    read_task_json,
    write_head,
)
from centra.errors import CentraError
from centra.io import copy_verified, write_json
from centra.publish import ARTIFACT_FILE, publish_folder

ACTIVE = "active"  # the id of a task's active head when no kept candidate is it (a task trained before)
SAME = ("kind", "labels", "input", "max_length", "pooling")  # what every candidate of a task shares
SHALLOWER_PREFIX = "student-a"  # students attached below their teacher: student-a<attach>-l<layers>


def shallower_id(attach: int, layers: int) -> str:
    """The candidate id of a student attached at `attach`, below its teacher, with `layers` task layers."""
    return f"{SHALLOWER_PREFIX}{attach}-l{layers}"


@dataclass(frozen=True)
class Candidate:
    id: str
    spec: TaskSpec
    task_json_sha256: str  # of the task.json bytes read: activation copies exactly these
    folder: Path

    @property
    def score(self) -> float:
        """Its dev metric as served: a multilabel head's at its tuned thresholds (recorded as "tuned")."""
        metrics = self.spec.metrics
        return float(metrics.get("tuned", metrics)[metrics["metric"]])


@dataclass
class TaskCandidates:
    """One task folder: its active head and the candidates it keeps."""

    folder: Path
    active: TaskSpec
    active_sha256: str
    candidates: list[Candidate]

    @property
    def name(self) -> str:
        return self.active.name

    @property
    def metric(self) -> str | None:
        return self.active.metrics.get("metric")

    @property
    def active_id(self) -> str | None:
        """The kept candidate that is active now (its task.json is the folder's, byte for byte)."""
        return next((c.id for c in self.candidates if c.task_json_sha256 == self.active_sha256), None)

    @property
    def has_shallower(self) -> bool:
        """Whether it keeps a student attached below its teacher (distill_shallower's candidates)."""
        return any(c.id.startswith(SHALLOWER_PREFIX) for c in self.candidates)

    def options(self) -> list[Candidate]:
        """What a plan may choose for this task: every kept candidate, and the active head when it is
        not one of them but has a dev metric (a task trained before candidates were kept)."""
        if self.active_id is not None or not has_score(self.active):
            return list(self.candidates)
        return [*self.candidates, Candidate(ACTIVE, self.active, self.active_sha256, self.folder)]


def has_score(spec: TaskSpec) -> bool:
    """Trained, with a finite dev metric (and a finite tuned one, when it records one: that one is planned)."""
    metric = spec.metrics.get("metric")
    tuned = spec.metrics.get("tuned", spec.metrics)
    values = [m.get(metric) if isinstance(metric, str) and isinstance(m, dict) else None for m in (spec.metrics, tuned)]
    return spec.trained and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                for v in values)


def read_candidates(folder: Path) -> TaskCandidates:
    """The task folder's active spec and its candidates, each checked: same task (kind, labels,
    inputs, pooling, backbone), trained, scored on the same dev metric (one line naming the file)."""
    folder = Path(folder)
    active, digest = read_task_json(folder)
    found = []
    root = folder / CANDIDATES_DIR
    for sub in sorted(root.iterdir()) if root.is_dir() else []:
        if sub.name.startswith("."):
            continue
        if not sub.is_dir():
            raise CentraError(f"{sub}: expected a candidate folder (task.json + {HEAD_FILE})")
        spec, sha = read_task_json(sub, name=folder.name)
        where = sub / TASK_FILE
        for key in SAME:
            if getattr(spec, key) != getattr(active, key):
                raise CentraError(f"{where}: {key} differs from the task's own {folder / TASK_FILE}")
        if spec.backbone.get("fingerprint") != active.backbone.get("fingerprint"):
            raise CentraError(f"{where}: trained on another backbone than {folder / TASK_FILE}")
        if not has_score(spec):
            raise CentraError(f"{where}: not a trained candidate with a dev metric")
        if active.metrics.get("metric") not in (None, spec.metrics["metric"]):
            raise CentraError(f"{where}: scored on {spec.metrics['metric']!r}, the task on "
                              f"{active.metrics['metric']!r}")
        found.append(Candidate(sub.name, spec, sha, sub))
    return TaskCandidates(folder, active, digest, found)


def check_candidate(task: TaskCandidates, candidate: Candidate, backbone: Backbone | EncoderConfig) -> None:
    """Load the candidate in full (fingerprint, sha256, keys, shapes) before anything is activated."""
    load_task(candidate.folder, backbone, name=task.folder.name)


def activate(task: TaskCandidates, candidate: Candidate, cfg: EncoderConfig) -> bool:
    """Make `candidate` the task's active head; False (nothing written) when it already is.

    The folder is rebuilt beside itself: every file but task.json and head.safetensors copied byte for
    byte (report, recipe, the candidates themselves), those two copied from the candidate and checked
    against the hashes read when the plan was made; then one atomic exchange."""
    if candidate.task_json_sha256 == task.active_sha256:
        return False
    folder, src = task.folder, candidate.folder

    def build(tmp: Path) -> None:
        copy_folder(task, tmp, skip={TASK_FILE, HEAD_FILE})
        copy_verified(src / TASK_FILE, tmp / TASK_FILE, candidate.task_json_sha256)
        copy_verified(src / HEAD_FILE, tmp / HEAD_FILE, candidate.spec.head_sha256)

    def check(tmp: Path) -> None:
        load_task(tmp, cfg, check_fingerprint=False, name=folder.name)

    publish_folder(folder, TASK_KIND, build, check, keep=(RECIPE_FILE,), legacy=is_legacy_task)
    return True


def add_candidates(task: TaskCandidates, new: dict[str, tuple[TaskSpec, TaskHead]], files: dict[str, dict],
                   cfg: EncoderConfig) -> None:
    """Publish the task folder with the `new` candidates kept beside the others and the JSON `files`
    (its report.json) rewritten: every other file copied byte for byte (the served task.json and head,
    checked against the hashes read with `task`), each new head loaded back; then
    one atomic exchange. A crash leaves the folder as it was."""
    folder = task.folder
    for cid in new:
        if not NAME_RE.match(cid):
            raise CentraError(f"candidate id {cid!r} must be letters, digits, '_' or '-'")

    def build(tmp: Path) -> None:
        copy_folder(task, tmp, skip=set(files))
        for name, data in files.items():
            write_json(tmp / name, data)
        for cid, (spec, head) in new.items():
            if (tmp / CANDIDATES_DIR / cid).exists():
                raise CentraError(f"{folder / CANDIDATES_DIR / cid}: exists already (kept meanwhile by another run)")
            (tmp / CANDIDATES_DIR / cid).mkdir(parents=True)
            write_head(tmp / CANDIDATES_DIR / cid, spec, head)

    def check(tmp: Path) -> None:
        load_task(tmp, cfg, check_fingerprint=False, name=folder.name)
        for cid in new:
            load_task(tmp / CANDIDATES_DIR / cid, cfg, check_fingerprint=False, name=folder.name)

    publish_folder(folder, TASK_KIND, build, check, keep=(RECIPE_FILE,), legacy=is_legacy_task)


def copy_folder(task: TaskCandidates, tmp: Path, skip: set[str]) -> None:
    """Copy the task folder into `tmp` byte for byte but the files named in `skip` (and the marker,
    which publishing writes again, identically); the served task.json and head must still have the
    hashes read with `task` (else the folder changed meanwhile, and nothing is written)."""
    folder = task.folder
    expected = {TASK_FILE: task.active_sha256, HEAD_FILE: task.active.head_sha256}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in skip and rel != ARTIFACT_FILE:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_verified(path, tmp / rel, expected.get(rel))
