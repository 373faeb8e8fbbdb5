"""Distillation: a teacher's logits table, students built from the teacher, mixed layer allocation
(the students l = 1..3 trained one by one, or as one joint student: train/joint.py).

Student = the teacher's bottom k + l layers: k frozen (shared trunk) layers and l task layers that
start from the teacher's layers k+1..k+l, with the teacher's pooler and classifier. It trains on
hard loss + alpha * F^2 * KL(teacher || student) (see finetune.loss_fn). The logits table is computed
once per task; any teacher can fill it (teacher_logits: a JSONL file, one row per train example).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from centra.core.backbone import EncoderConfig
from centra.core.candidates import shallower_id
from centra.core.task import TaskHead
from centra.errors import CentraError
from centra.train.cache import ActivationCache
from centra.train.finetune import predict_cache, selection_score
from centra.train.job import Run
from centra.train.joint import JointStudent, train_joint
from centra.train.report import BranchLog, Student
from centra.train.settings import Name, SettingError


def logits_table(teacher: TaskHead, cache: ActivationCache, progress: bool = True) -> np.ndarray:
    """The teacher's logits for every training example (the cache sits at its attach layer)."""
    assert cache.layer == teacher.spec.attach_layer
    return predict_cache(teacher, cache, desc="teacher logits" if progress else None)


def read_teacher_logits(path: Path, rows: int, outputs: int) -> np.ndarray:
    """A JSONL table: one row per training example, a list of logits or {"logits": [...]}."""
    path = Path(path)
    if not path.is_file():
        raise CentraError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CentraError(f"{path}: not UTF-8 text (byte offset {exc.start}); save the file as UTF-8") from None
    table = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CentraError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
        row = row.get("logits") if isinstance(row, dict) else row
        if not isinstance(row, list) or len(row) != outputs or \
                not all(isinstance(x, (int, float)) and np.isfinite(x) for x in row):
            raise CentraError(f"{path}:{n}: expected {outputs} finite logits")
        table.append(row)
    if len(table) != rows:
        raise CentraError(f"{path}: {len(table)} rows of logits but the training file has {rows} examples")
    return np.asarray(table, dtype=np.float32)


def student_from(teacher: TaskHead, layers: int, cfg: EncoderConfig) -> TaskHead:
    """A student attached where the teacher is, keeping the teacher's first `layers` task layers."""
    if not 1 <= layers <= teacher.spec.task_layers:
        raise CentraError(f"a student takes 1..{teacher.spec.task_layers} of its teacher's layers, not {layers}")
    spec = replace(teacher.spec, task_layers=layers)
    student = TaskHead(spec, cfg)
    state = {k: v.clone() for k, v in teacher.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    student.load_state_dict(state, strict=True)
    return student


@dataclass
class Distilled:
    chosen: TaskHead
    students: list[Student]  # one per student trained
    heads: dict[int, TaskHead]  # every student trained, by task layers (candidates for `centra plan`)


def distill_students(run: Run, teacher: TaskHead, soft: np.ndarray) -> Distilled:
    """Train students of `teacher` on its logits table `soft`; with the job's student_layers, that one;
    else add layers while each gains >= the job's threshold dev points (the 'mixed' allocation)."""
    fixed, metric = run.job.student_layers, run.checked.tc.metric
    most = min(3, teacher.spec.task_layers)
    if fixed is not None and not 1 <= fixed <= most:
        raise SettingError(Name("student_layers"), f" must be in 1..{most} (the teacher has "
                           f"{teacher.spec.task_layers} task layers)")
    if fixed is None and run.job.students == "joint" and most > 1:
        return distill_joint(run, teacher, soft, most)
    tried: list[tuple[TaskHead, Student]] = []
    for layers in [fixed] if fixed else range(1, most + 1):
        student, log = run.train_branch(student_from(teacher, layers, run.backbone.cfg), f"student l={layers}",
                                        soft=soft)
        tried.append((student, Student(layers, BranchLog.from_dict(log))))
        if fixed is None:
            keep = mixed_layers({s.task_layers: selection_score(teacher.spec.kind, s.log.dev, metric)
                                 for _, s in tried}, run.job.threshold)
            if keep < layers:
                return Distilled(tried[keep - 1][0], [s for _, s in tried], {s.task_layers: h for h, s in tried})
    return Distilled(tried[-1][0], [s for _, s in tried], {s.task_layers: h for h, s in tried})


def joint_student(teacher: TaskHead, layers: int, cfg: EncoderConfig) -> JointStudent:
    """Students l = 1..layers of `teacher` as one joint student: each exit starts as that student would."""
    return JointStudent([student_from(teacher, lay, cfg) for lay in range(1, layers + 1)])


def distill_joint(run: Run, teacher: TaskHead, soft: np.ndarray, layers: int) -> Distilled:
    """The mixed allocation over the exits l = 1..layers of one joint student (train/joint.py): every exit
    is trained (the work of `layers` layers), and the allocation serves the one the separate students' rule
    picks from their dev scores."""
    metric = run.checked.tc.metric
    trained = train_joint(joint_student(teacher, layers, run.backbone.cfg), run.caches[0], run.train.targets,
                          run.caches[1], run.dev.targets, run.checked.tc, f"students l=1..{layers} (joint)", soft)
    students = [Student(head.spec.task_layers, BranchLog.from_dict(log)) for head, log in trained]
    keep = mixed_layers({s.task_layers: selection_score(teacher.spec.kind, s.log.dev, metric) for s in students},
                        run.job.threshold)
    return Distilled(trained[keep - 1][0], students, {head.spec.task_layers: head for head, _ in trained})


def shallower_attach_layers(teacher_attach: int, count: int) -> list[int]:
    """The attach layers of the extra students: the `count` layers below the teacher's, deepest first
    (the trunk cache walks down), never below 0."""
    return list(range(teacher_attach - 1, max(-1, teacher_attach - 1 - count), -1))


def shallower_students(teacher_attach: int, count: int, num_layers: int, fixed: int | None) -> dict[int, list[int]]:
    """The students distill_shallower trains, as {attach layer: [task layers]}: at each of the `count`
    attach layers below the teacher's, l = 1..3 (as many as fit the backbone), or `fixed` alone."""
    return {attach: [fixed] if fixed else list(range(1, min(3, num_layers - attach) + 1))
            for attach in shallower_attach_layers(teacher_attach, count)}


def distill_shallower(run: Run, teacher: TaskHead, soft: np.ndarray, only: set[str] | None = None
                      ) -> tuple[dict[str, TaskHead], list[Student]]:
    """Students of `teacher` attached below it (extra_attach layers: k-1, k-2, ...), each with l = 1..3
    task layers (or the job's student_layers): candidates for `centra plan`, which can then trade trunk
    depth as well as task layers. Such a student reads an earlier hidden state than the teacher's layers
    were trained on, so its task layers start from the backbone's layers k'+1..k'+l (what reads that
    state) and its pooler and classifier from the teacher's; it learns from the same logits table.
    Cheap: the trunk cache walks down (a snapshot, or one rebuild), and each student trains l layers.
    `only`: the candidate ids to train (the others a task folder keeps already); None: all of them. Each
    student is seeded on its own, so one trained alone equals the same one trained among the others."""
    heads, students = {}, []
    wanted = shallower_students(teacher.spec.attach_layer, run.job.extra_attach, run.backbone.cfg.num_layers,
                                run.job.student_layers)
    for attach, layer_counts in wanted.items():
        todo = [lay for lay in layer_counts if only is None or shallower_id(attach, lay) in only]
        if todo:
            run.advance_to(attach)
        for layers in todo:
            head = run.new_head(attach, layers)
            head.load_state_dict({k: v.clone() for k, v in teacher.state_dict().items()
                                  if k.split(".")[0] in ("pooler", "classifier")}, strict=False)
            trained, log = run.train_branch(head, f"student k={attach} l={layers}", soft=soft)
            heads[shallower_id(attach, layers)] = trained
            students.append(Student(layers, BranchLog.from_dict(log), attach))
    return heads, students


def mixed_layers(scores: dict[int, float], threshold: float) -> int:
    """The mixed allocation: the smallest l after which one more layer gains less than `threshold`
    dev points (scores: dev metric per number of task layers, in [0, 1])."""
    chosen = min(scores)
    for layers in sorted(scores)[1:]:
        if 100 * (scores[layers] - scores[chosen]) < threshold:
            break
        chosen = layers
    return chosen
