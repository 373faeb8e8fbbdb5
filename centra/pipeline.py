"""One task, end to end: data -> teacher search over L -> distilled student -> task folder.

Nothing here touches another task: the result is written to DIR/NAME only, atomically.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from centra.backbone import Backbone
from centra.data import Columns, Examples, load_examples
from centra.distill import distill_students, logits_table, read_teacher_logits
from centra.engine import encode
from centra.errors import CentraError
from centra.finetune import ActivationCache, TrainConfig, train_branch
from centra.metrics import DEFAULT_METRIC, METRICS
from centra.task import TaskHead, init_task, max_positions, save_task


@dataclass
class TaskJob:
    name: str
    kind: str
    train: Path
    dev: Path
    columns: Columns
    label_names: list[str] | None = None
    layers: tuple[int, int] | None = None  # teacher search range (MIN, MAX) of trainable top layers
    student_layers: int | None = None
    threshold: float = 1.0
    reference: bool = False
    teacher_logits: Path | None = None
    attach_layer: int | None = None  # students' attach layer with an external teacher
    max_train_examples: int | None = None
    max_length: int | None = None
    pooling: str = "mean"
    cache_gb: float = 4.0
    cache_dir: Path | None = None  # where an over-cap cache spills (default: the system temp dir)
    train_config: TrainConfig = field(default_factory=TrainConfig)


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """1:5 on 6 layers, 4:10 on 12 (the paper's range), scaled for other depths."""
    if num_layers <= 6:
        return 1, max(1, num_layers - 1)
    return max(1, round(num_layers / 3)), num_layers - 2


def load_data(job: TaskJob) -> tuple[Examples, Examples, list[str], np.ndarray | None]:
    train, labels = load_examples(job.train, job.kind, job.columns, label_names=job.label_names)
    dev, _ = load_examples(job.dev, job.kind, job.columns, labels=labels, label_names=job.label_names)
    if job.kind == "multiclass" and len(labels) < 2:
        raise CentraError(f"{job.train}: a multiclass task needs at least 2 distinct labels, found {labels}")
    outputs = 1 if job.kind == "regression" else len(labels)
    soft = read_teacher_logits(job.teacher_logits, len(train), outputs) if job.teacher_logits else None
    if job.max_train_examples and job.max_train_examples < len(train):
        gen = torch.Generator().manual_seed(job.train_config.seed)
        rows = sorted(torch.randperm(len(train), generator=gen)[: job.max_train_examples].tolist())
        train, soft = train.subset(rows), soft[rows] if soft is not None else None
    return train, dev, labels, soft


def train_task(job: TaskJob, backbone: Backbone, tasks_dir: Path) -> tuple[dict, TaskHead]:
    """Run the whole pipeline for one task and write tasks_dir/NAME; return report.json's contents
    and the chosen student."""
    tc = job.train_config
    n = backbone.cfg.num_layers
    lo, hi = validate_job(job, n)
    times: dict[str, float] = {}
    clock = time.perf_counter()
    train, dev, labels, soft = load_data(job)
    input_kind = "pair" if job.columns.pair else "single"
    max_length = job.max_length or min(128, max_positions(backbone.cfg))
    tok = backbone.tokenizer()
    enc_train = encode(tok, backbone.cfg.type_vocab_size, train.texts, train.pairs, max_length)
    enc_dev = encode(tok, backbone.cfg.type_vocab_size, dev.texts, dev.pairs, max_length)
    times["data"] = time.perf_counter() - clock

    def new_head(attach: int, layers: int, seed: int):
        return init_task(backbone, job.name, job.kind, labels, attach, layers, input=input_kind,
                         max_length=max_length, pooling=job.pooling, seed=seed)

    cap = int(job.cache_gb * 2**30)
    spill = Path(job.cache_dir or tempfile.gettempdir())
    caches = [ActivationCache(backbone, e, tok.pad_token_id or 0, cap, spill, desc=d, progress=tc.progress)
              for e, d in ((enc_train, "train"), (enc_dev, "dev"))]
    report: dict = {"task": job.name, "kind": job.kind, "backbone": backbone.backbone_id, "labels": labels,
                    "train_examples": len(train), "dev_examples": len(dev), "metric": tc.metric,
                    "train_config": {k: v for k, v in vars(tc).items() if k != "progress"},
                    "data": {"train": str(job.train), "dev": str(job.dev), "max_length": max_length}}
    try:
        first = 0 if job.reference else (n - hi if soft is None else 0)
        for cache in caches:
            cache.build(first)
        if job.reference:
            clock = time.perf_counter()
            _, head = new_head(0, n, tc.seed)
            _, log = train_branch(head, caches[0], train.targets, caches[1], dev.targets, tc, "reference")
            report["reference"] = {"layers": n, "overhead": n, **log}
            times["reference"] = time.perf_counter() - clock
        if soft is None:
            teacher, report["teachers"] = search_teachers(job, backbone, caches, train, dev, new_head, lo, hi, times)
            k = teacher.spec.attach_layer
            for cache in caches:
                cache.advance_to(k)
            clock = time.perf_counter()
            soft = logits_table(teacher, caches[0], tc.progress)
            times["teacher_logits"] = time.perf_counter() - clock
        else:
            k = job.attach_layer if job.attach_layer is not None else n // 2
            for cache in caches:
                cache.advance_to(k)
            _, teacher = new_head(k, min(3, n - k), tc.seed)  # the external teacher's student starts here
            report["teachers"] = [{"external": str(job.teacher_logits), "attach_layer": k}]
        clock = time.perf_counter()
        student, report["students"] = distill_students(teacher, backbone.cfg, soft, caches[0], train.targets,
                                                       caches[1], dev.targets, tc, job.student_layers,
                                                       job.threshold)
        times["students"] = time.perf_counter() - clock
        report["cache"] = cache_report(caches, report.get("teachers", []), tc.epochs, n)
    finally:
        for cache in caches:
            cache.close()
    report["seconds"] = {k: round(v, 2) for k, v in times.items()}
    return finish(job, student, report, Path(tasks_dir)), student


def validate_job(job: TaskJob, num_layers: int) -> tuple[int, int]:
    """Fill the kind's default metric, check it and the layer range; return (MIN, MAX)."""
    tc = job.train_config
    tc.metric = tc.metric or DEFAULT_METRIC[job.kind]
    if tc.metric not in METRICS[job.kind]:
        raise CentraError(f"metric {tc.metric!r} does not fit a {job.kind} task ({', '.join(METRICS[job.kind])})")
    lo, hi = job.layers or default_layer_range(num_layers)
    if not 1 <= lo <= hi <= num_layers:
        raise CentraError(f"--layers {lo}:{hi} must satisfy 1 <= MIN <= MAX <= {num_layers}")
    return lo, hi


def finish(job: TaskJob, student: TaskHead, report: dict, tasks_dir: Path) -> dict:
    """Mark the chosen student trained, record its dev metrics, write the task folder atomically."""
    spec = copy.deepcopy(student.spec)
    chosen = next(s for s in report["students"] if s["task_layers"] == spec.task_layers)
    spec.trained = True
    spec.metrics = {"metric": report["metric"], **{m: round(chosen["dev"][m], 6) for m in METRICS[job.kind]}}
    report["chosen"] = {"attach_layer": spec.attach_layer, "task_layers": spec.task_layers,
                        "overhead": spec.attach_layer + spec.task_layers, **spec.metrics}
    student.spec = spec
    save_task(tasks_dir / job.name, spec, student, extra_files={"report.json": report})
    return report


def search_teachers(job, backbone, caches, train, dev, new_head, lo, hi, times):
    """Teachers for L = hi..lo (the cache climbs one layer between them); the best on dev wins,
    ties going to fewer layers."""
    tc, n = job.train_config, backbone.cfg.num_layers
    logs, best, best_score = [], None, None
    for layers in range(hi, lo - 1, -1):
        for cache in caches:
            cache.advance_to(n - layers)
        clock = time.perf_counter()
        _, head = new_head(n - layers, layers, tc.seed)
        head, log = train_branch(head, caches[0], train.targets, caches[1], dev.targets, tc, f"teacher L={layers}")
        times[f"teacher_L{layers}"] = time.perf_counter() - clock
        logs.append({"trainable_layers": layers, "attach_layer": n - layers, **log})
        if best_score is None or log["dev"][tc.metric] >= best_score:
            best, best_score = head, log["dev"][tc.metric]
    for log in logs:
        log["chosen"] = log["trainable_layers"] == best.spec.task_layers
    return best, logs


def cache_report(caches: list[ActivationCache], teachers: list[dict], epochs: int, n: int) -> dict:
    """What the cache cost and what recomputing the frozen layers every epoch would have cost."""
    per_layer = [c.seconds / max(1, c.layer) if not c.layer_seconds else float(np.mean(c.layer_seconds))
                 for c in caches]
    frozen = sum(t.get("attach_layer", 0) for t in teachers if "trainable_layers" in t)
    without = epochs * frozen * sum(per_layer)
    spent = sum(c.seconds for c in caches)
    return {"seconds": round(spent, 2), "bytes": int(sum(c.nbytes for c in caches)),
            "spilled_to_disk": any(c.spilled is not None for c in caches),
            "estimated_seconds_without_cache": round(without, 2),
            "estimated_seconds_saved": round(without - spent, 2)}
