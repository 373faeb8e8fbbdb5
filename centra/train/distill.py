"""Distillation: a teacher's logits table, students built from the teacher, mixed layer allocation.

Student = the teacher's bottom k + l layers: k frozen (shared trunk) layers and l task layers that
start from the teacher's layers k+1..k+l, with the teacher's pooler and classifier. It trains on
hard loss + alpha * F^2 * KL(teacher || student) (see finetune.loss_fn). The logits table is computed
once per task; any teacher can fill it (--teacher-logits: a JSONL file, one row per train example).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from centra.core.backbone import EncoderConfig
from centra.core.task import TaskHead
from centra.errors import CentraError
from centra.train.cache import ActivationCache
from centra.train.finetune import TrainConfig, predict_cache, selection_score, train_branch


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
    logs: list[dict]  # one per student trained
    students: dict[int, TaskHead]  # every student trained, by task layers (candidates for `centra plan`)


def distill_students(teacher: TaskHead, cfg: EncoderConfig, soft: np.ndarray, train: ActivationCache,
                     train_targets: list, dev: ActivationCache, dev_targets: list, tc: TrainConfig,
                     student_layers: int | None, threshold: float) -> Distilled:
    """Train students; with `student_layers` fixed, that one; else add layers while each gains >= threshold
    dev points (the 'mixed' allocation)."""
    most = min(3, teacher.spec.task_layers)
    if student_layers is not None and not 1 <= student_layers <= most:
        raise CentraError(f"--student-layers must be in 1..{most} (the teacher has "
                          f"{teacher.spec.task_layers} task layers)")
    tried: list[tuple[TaskHead, dict]] = []
    chosen = None
    for layers in ([student_layers] if student_layers else range(1, most + 1)):
        student, log = train_branch(student_from(teacher, layers, cfg), train, train_targets, dev, dev_targets,
                                    tc, f"student l={layers}", soft=soft)
        tried.append((student, {"task_layers": layers, **log}))
        if student_layers is None:
            keep = mixed_layers({t[1]["task_layers"]: selection_score(teacher.spec.kind, t[1]["dev"], tc.metric)
                                 for t in tried}, threshold)
            if keep < layers:
                chosen = tried[keep - 1][0]
                break
    return Distilled(chosen or tried[-1][0], [t[1] for t in tried], {t[1]["task_layers"]: t[0] for t in tried})


def mixed_layers(scores: dict[int, float], threshold: float) -> int:
    """The mixed allocation: the smallest l after which one more layer gains less than `threshold`
    dev points (scores: dev metric per number of task layers, in [0, 1])."""
    chosen = min(scores)
    for layers in sorted(scores)[1:]:
        if 100 * (scores[layers] - scores[chosen]) < threshold:
            break
        chosen = layers
    return chosen
