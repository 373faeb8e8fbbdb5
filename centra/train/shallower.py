"""Students below the teacher, distilled later: when `centra plan --extra-attach N` asks for them.

add-task distils students only at its kept teacher's attach layer k by default (extra_attach 0): the
students at k-1, k-2, ... are candidates that serve only when a plan chooses them, and they cost most of
a job (519 s of GoEmotions' 766 s). This trains exactly those a task folder lacks, through the same code
as add-task's `--extra-attach N` (distill.distill_shallower), from what the folder keeps of its run:
report.json's `job` (every setting as resolved, the data files with their sha256, the columns, the label
names) and the teacher file (TEACHER_FILE: the logits table the students learn from, the pooler and
classifier they start from, the attach layer). Each student is seeded on its own, so a student trained
here has the weights and the dev figures add-task would have given it. The folder is then published
again with the new candidates (core/candidates.add_candidates): the served head and every other file
byte for byte, report.json with the students added. Every check (report, job, teacher file, data files
present and unchanged) is made for every task before any trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from centra.core.backbone import Backbone, check_state, load_safetensors
from centra.core.candidates import SHALLOWER_PREFIX, TaskCandidates, add_candidates, shallower_id
from centra.core.task import REPORT_FILE, TEACHER_FILE, TaskHead
from centra.errors import CentraError
from centra.io import read_json, sha256_file
from centra.progress import job_bar
from centra.train.data import Columns
from centra.train.distill import distill_shallower, shallower_students
from centra.train.job import CheckedJob, TaskJob
from centra.train.pipeline import open_run, shallower_work, trained_spec, validate_job
from centra.train.report import JobRecord, KeptCandidate, TrainingReport, with_shallower
from centra.train.settings import Settings


@dataclass(frozen=True)
class Pending:
    """One task folder's students to train: {attach layer: [task layers]}, with the checked job and the
    teacher file's tensors."""

    task: TaskCandidates
    report: dict  # report.json as read (rewritten with the students added)
    attach: int  # the teacher's
    missing: dict[int, list[int]]
    checked: CheckedJob
    teacher: dict[str, torch.Tensor]

    @property
    def ids(self) -> list[str]:
        return [shallower_id(attach, layers) for attach, counts in self.missing.items() for layers in counts]


@dataclass(frozen=True)
class Widened:
    """What one task folder gained: the candidate ids trained and their wall time."""

    task: str
    trained: list[str]
    seconds: float


def distil_missing(tasks: list[TaskCandidates], backbone: Backbone, extra_attach: int, progress: bool = True
                   ) -> list[Widened]:
    """Give every task its students at the `extra_attach` attach layers below its teacher's that its folder
    lacks (a folder that has them trains nothing); every task checked before any trains, each published
    on its own once trained. The tasks must be `backbone`'s (planning checks their fingerprints)."""
    pending = [p for p in (pending_students(t, backbone, extra_attach, progress) for t in tasks) if p is not None]
    return [distill_pending(p, backbone) for p in pending]


def pending_students(task: TaskCandidates, backbone: Backbone, extra_attach: int, progress: bool = True
                     ) -> Pending | None:
    """The students the folder lacks (None: none), every input they need checked: the report's teacher and
    job, the teacher file, the data files present and as they were when the task trained."""
    path = task.folder / REPORT_FILE
    if not path.is_file():
        raise CentraError(f"{path}: file not found: task {task.name!r} has no training report, so its teacher "
                          "is unknown (train it with centra add-task)")
    data = read_json(path)
    try:
        report = TrainingReport.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CentraError(f"{path}: not a training report ({type(exc).__name__}: {exc})") from None
    teacher = report.chosen_teacher or next((t for t in report.teachers if t.external is not None), None)
    if teacher is None:
        raise CentraError(f"{path}: names no teacher (chosen, or external) to distil students from")
    job = report.job
    fixed = job.settings.get("student_layers") if job is not None else None
    have = {c.id for c in task.candidates}
    missing = {}
    for attach, counts in shallower_students(teacher.attach_layer, extra_attach, backbone.cfg.num_layers,
                                             fixed).items():
        if job is None:  # an older report: an attach layer with any student kept counts as done
            todo = [] if any(i.startswith(f"{SHALLOWER_PREFIX}{attach}-l") for i in have) else counts
        else:
            todo = [layers for layers in counts if shallower_id(attach, layers) not in have]
        if todo:
            missing[attach] = todo
    if not missing:
        return None
    if job is None:
        raise CentraError(f"{path}: records no training job (written by an older centra), so task {task.name!r} "
                          f"cannot distil more students now: train it again with centra add-task --extra-attach "
                          f"{extra_attach}")
    check_files(job, task.name, path)
    tensors = read_teacher(task, teacher.attach_layer, report.train_examples, backbone)
    checked = validate_job(job_of(job, task, report.kind, extra_attach, progress), backbone.cfg)
    return Pending(task, data, teacher.attach_layer, missing, checked, tensors)


def check_files(job: JobRecord, name: str, report: Path) -> None:
    """The data files the task trained on: present, with the sha256 recorded."""
    for role, record in job.files.items():
        path = Path(record["path"])
        if not path.is_file():
            raise CentraError(f"{path}: file not found (the {role} data task {name!r} was trained on, as its "
                              f"{report} records); nothing was trained")
        if sha256_file(path) != record["sha256"]:
            raise CentraError(f"{path}: changed since task {name!r} was trained on it (sha256 differs from its "
                              f"{report}): train it again with centra add-task; nothing was trained")


def read_teacher(task: TaskCandidates, attach: int, rows: int, backbone: Backbone) -> dict[str, torch.Tensor]:
    """The folder's teacher file, checked: the report's teacher's attach layer, a logits table of one row
    per training example and output, a pooler and classifier of the task's shapes."""
    from safetensors import safe_open

    path = task.folder / TEACHER_FILE
    if not path.is_file():
        raise CentraError(f"{path}: file not found: the task keeps no teacher (trained by an older centra): "
                          f"train it again with centra add-task")
    tensors = load_safetensors(path)
    with safe_open(str(path), framework="pt") as fh:
        recorded = (fh.metadata() or {}).get("attach_layer")
    if recorded != str(attach):
        raise CentraError(f"{path}: attach layer {recorded!r}, but report.json's teacher attaches at {attach}")
    head = TaskHead(replace(task.active, attach_layer=attach, task_layers=0), backbone.cfg)
    check_state({"logits": torch.empty(rows, task.active.num_outputs), **head.state_dict()}, tensors, str(path))
    return tensors


def job_of(record: JobRecord, task: TaskCandidates, kind: str, extra_attach: int, progress: bool) -> TaskJob:
    """The recorded job again, asking for `extra_attach` shallower attach layers; its candidates record the
    source the task's heads record. (Only its students train: distill_pending runs no search, no reference.)"""
    known = {f.name for f in fields(Settings)}
    values = {k: v for k, v in record.settings.items() if k in known}
    values["teacher_logits"] = record.files["teacher_logits"]["path"] if "teacher_logits" in record.files else None
    settings = replace(Settings(**values), extra_attach=extra_attach)
    return TaskJob.of(settings, name=task.name, kind=kind, train=Path(record.files["train"]["path"]),
                      dev=Path(record.files["dev"]["path"]), columns=Columns(**record.columns),
                      label_names=record.label_names, source=dict(task.active.source),
                      max_labels_from=record.max_labels_from, progress=progress)


def distill_pending(pending: Pending, backbone: Backbone) -> Widened:
    """Train the pending students (one job bar over them) and publish the folder with them kept."""
    clock, name = time.perf_counter(), pending.task.name
    run = open_run(pending.checked, backbone)
    try:
        soft = pending.teacher["logits"].numpy().astype(np.float32)
        if len(soft) != len(run.train):
            raise CentraError(f"{pending.task.folder / TEACHER_FILE}: {len(soft)} rows of teacher logits, but the "
                              f"training data gives {len(run.train)} examples")
        teacher = run.new_head(pending.attach, 0)
        teacher.load_state_dict({k: v for k, v in pending.teacher.items() if k != "logits"}, strict=True)
        with job_bar(shallower_work(run, pending.missing), f"{name}: shallower students", run.job.progress):
            heads, students = distill_shallower(run, teacher, soft, only=set(pending.ids))
    finally:
        run.close()
    seconds = time.perf_counter() - clock
    job, metric = run.job, run.checked.tc.metric
    logs = {shallower_id(s.attach_layer, s.task_layers): s.log for s in students}
    new = {cid: (trained_spec(job, head.spec, logs[cid], metric), head) for cid, head in sorted(heads.items())}
    kept = [KeptCandidate(cid, spec.attach_layer, spec.task_layers, spec.metrics[metric])
            for cid, (spec, _) in new.items()]
    add_candidates(pending.task, new, {REPORT_FILE: with_shallower(pending.report, students, kept, seconds)},
                   backbone.cfg)
    return Widened(name, sorted(new), round(seconds, 2))
