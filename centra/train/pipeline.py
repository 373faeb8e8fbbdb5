"""One task, end to end: data -> teacher search over L -> distilled student -> task folder.

Every option is checked before any compute (`validate_job`); nothing here touches another task: the
result is published to DIR/NAME only, atomically.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from centra.core.backbone import Backbone, EncoderConfig
from centra.core.task import (
    KINDS,
    NAME_RE,
    RECIPE_FILE,
    REPORT_FILE,
    TASK_KIND,
    TaskHead,
    TaskSpec,
    is_legacy_task,
    max_positions,
    save_task,
)
from centra.core.tokens import encode
from centra.errors import CentraError
from centra.io import check_replaceable
from centra.train.cache import ActivationCache, CacheBudget
from centra.train.data import Examples, load_examples
from centra.train.distill import distill_students, logits_table, read_teacher_logits
from centra.train.job import CheckedJob, Run, TaskJob
from centra.train.metrics import DEFAULT_METRIC, METRICS, baseline
from centra.train.reference import TokenSource, train_reference
from centra.train.search import SEARCHES, search_teachers
from centra.train.thresholds import threshold_report


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """1:5 on 6 layers, 4:10 on 12 (the paper's range), scaled for other depths."""
    if num_layers <= 6:
        return 1, max(1, num_layers - 1)
    return max(1, round(num_layers / 3)), num_layers - 2


def validate_job(job: TaskJob, cfg: EncoderConfig) -> CheckedJob:
    """Check every option before any compute; return a checked copy (the caller's job is untouched)."""
    n = cfg.num_layers
    if not NAME_RE.match(job.name):
        raise CentraError(f"task name {job.name!r} must be 1-64 letters, digits, '_' or '-'")
    if job.kind not in KINDS:
        raise CentraError(f"kind {job.kind!r} must be one of {', '.join(KINDS)}")
    tc = replace(job.train_config, metric=job.train_config.metric or DEFAULT_METRIC[job.kind])
    tc.check()
    if tc.metric not in METRICS[job.kind]:
        raise CentraError(f"metric {tc.metric!r} does not fit a {job.kind} task ({', '.join(METRICS[job.kind])})")
    lo, hi = job.layers or default_layer_range(n)
    if not 1 <= lo <= hi <= n:
        raise CentraError(f"--layers {lo}:{hi} must satisfy 1 <= MIN <= MAX <= {n}")
    if job.search not in SEARCHES:
        raise CentraError(f"--search {job.search!r} must be one of {', '.join(SEARCHES)}")
    if not 0 < job.first_rung <= tc.epochs:
        raise CentraError(f"--first-rung must be in (0, --epochs {tc.epochs}], not {job.first_rung}")
    if job.teacher_logits is None and job.attach_layer is not None:
        raise CentraError("--attach-layer is for students of an external teacher (--teacher-logits)")
    most = min(3, lo)  # the fewest task layers any teacher of the search has
    if job.teacher_logits is not None:
        k = job.attach_layer if job.attach_layer is not None else n // 2
        if not 0 <= k < n:
            raise CentraError(f"--attach-layer {k} must be in 0..{n - 1} (the backbone has {n} layers)")
        most = min(3, n - k)
    if job.student_layers is not None and not 1 <= job.student_layers <= most:
        raise CentraError(f"--student-layers must be in 1..{most}, not {job.student_layers}")
    limit = max_positions(cfg)
    max_length = job.max_length if job.max_length is not None else min(128, limit)
    if not 4 <= max_length <= limit:
        raise CentraError(f"--max-length {max_length} must be in 4..{limit} (the backbone's position embeddings)")
    if job.reference_epochs < 1:
        raise CentraError(f"--reference-epochs must be >= 1, not {job.reference_epochs}")
    if job.max_train_examples is not None and job.max_train_examples < 1:
        raise CentraError(f"--max-train-examples must be >= 1, not {job.max_train_examples}")
    if not job.cache_gb >= 0:
        raise CentraError(f"--cache-gb must be >= 0, not {job.cache_gb}")
    if job.pooling not in ("mean", "cls"):
        raise CentraError(f"pooling {job.pooling!r} must be mean or cls")
    for flag, path in (("--train", job.train), ("--dev", job.dev), ("--teacher-logits", job.teacher_logits)):
        if path is not None and not Path(path).is_file():
            raise CentraError(f"{path}: file not found ({flag})")
    return CheckedJob(replace(job, train_config=tc), lo, hi, max_length)


def check_destination(tasks_dir: Path, name: str) -> None:
    """Refuse, before training, a destination that publishing would refuse after it."""
    tasks_dir = Path(tasks_dir)
    if tasks_dir.exists() and not tasks_dir.is_dir():
        raise CentraError(f"{tasks_dir}: exists and is not a folder")
    check_replaceable(tasks_dir / name, TASK_KIND, (RECIPE_FILE,), is_legacy_task)


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
    """Run the whole pipeline for one task and publish tasks_dir/NAME; return report.json's contents
    and the chosen student."""
    checked = validate_job(job, backbone.cfg)
    check_destination(tasks_dir, job.name)
    job, tc, n = checked.job, checked.tc, backbone.cfg.num_layers
    clock = time.perf_counter()
    train, dev, labels, soft = load_data(job)
    tok = backbone.tokenizer()
    encoded = [encode(tok, backbone.cfg.type_vocab_size, x.texts, x.pairs, checked.max_length) for x in (train, dev)]
    budget = CacheBudget(int(job.cache_gb * 2**30))  # one cap for the whole run: both caches and snapshots
    spill = Path(job.cache_dir or tempfile.gettempdir())
    caches = [ActivationCache(backbone, e, tok.pad_token_id or 0, budget, spill, desc=d, progress=tc.progress)
              for e, d in zip(encoded, ("train", "dev"))]
    run = Run(checked, backbone, train, dev, labels, caches, {"data": time.perf_counter() - clock})
    report: dict = {"task": job.name, "kind": job.kind, "backbone": backbone.backbone_id, "labels": labels,
                    "train_examples": len(train), "dev_examples": len(dev), "metric": tc.metric,
                    "train_config": {k: v for k, v in vars(tc).items() if k != "progress"},
                    "data": {"train": str(job.train), "dev": str(job.dev), "max_length": checked.max_length},
                    "baseline": baseline(job.kind, 1 if job.kind == "regression" else len(labels), train.targets,
                                         dev.targets)}
    try:
        if job.reference:
            clock = time.perf_counter()
            sources = [TokenSource(e, tok.pad_token_id or 0) for e in encoded]
            _, log = train_reference(backbone, run.new_head(0, n), sources[0], train.targets, sources[1],
                                     dev.targets, tc, job.reference_epochs)
            run.times["reference"] = time.perf_counter() - clock
            report["reference"] = {"layers": n, "overhead": n, "embeddings": "trained",
                                   "epochs_setting": job.reference_epochs, **log}
            if job.kind == "multilabel":
                report["reference"]["thresholds"] = threshold_report(log["dev"], dev.targets)
        for cache in caches:
            cache.build(0 if soft is not None else n - checked.hi)
        kept: dict[str, TaskHead] = {}
        if soft is None:
            search = search_teachers(run, job.search)
            teacher, report["teachers"], report["search"] = search.best, search.logs, search.cost
            if "reference" in run.times:  # the search's cost in full fine-tunes, the measure
                report["search"]["per_reference"] = round(run.times["teacher_search"] / run.times["reference"], 3)
            kept = {f"teacher-L{layers}": head for layers, head in search.kept.items()}
            for cache in caches:
                cache.advance_to(teacher.spec.attach_layer)
            clock = time.perf_counter()
            soft = logits_table(teacher, caches[0], tc.progress)
            run.times["teacher_logits"] = time.perf_counter() - clock
        else:
            k = job.attach_layer if job.attach_layer is not None else n // 2
            for cache in caches:
                cache.advance_to(k)
            teacher = run.new_head(k, min(3, n - k))  # the external teacher's student starts here
            report["teachers"] = [{"external": str(job.teacher_logits), "attach_layer": k}]
        clock = time.perf_counter()
        distilled = distill_students(teacher, backbone.cfg, soft, caches[0], train.targets, caches[1],
                                     dev.targets, tc, job.student_layers, job.threshold)
        student, report["students"] = distilled.chosen, distilled.logs
        kept.update({f"student-l{layers}": head for layers, head in distilled.students.items()})
        run.times["students"] = time.perf_counter() - clock
        if job.kind == "multilabel":  # served at its best epoch's tuned thresholds
            chosen = next(s for s in report["students"] if s["task_layers"] == student.spec.task_layers)
            report["thresholds"] = threshold_report(chosen["dev"], dev.targets)
        report["cache"] = cache_report(caches, budget, report.get("teachers", []), tc.epochs)
    finally:
        for cache in caches:
            cache.close()
    report["seconds"] = {k: round(v, 2) for k, v in run.times.items()}
    return finish(job, student, report, Path(tasks_dir), kept), student


def trained_spec(job: TaskJob, head: TaskHead, log: dict, metric: str) -> TaskSpec:
    """The head's task.json: trained, its dev metrics at its best epoch, what it was trained from."""
    spec = copy.deepcopy(head.spec)
    spec.trained = True
    spec.metrics = {"metric": metric, **{m: round(log["dev"][m], 6) for m in METRICS[job.kind]}}
    spec.source = dict(job.source)
    return spec


def finish(job: TaskJob, student: TaskHead, report: dict, tasks_dir: Path,
           kept: dict[str, TaskHead] | None = None) -> dict:
    """Mark the chosen student trained, record its dev metrics, publish the task folder with the
    candidates kept (teachers with L <= 3 and every student, for `centra plan`)."""
    logs = {f"student-l{s['task_layers']}": s for s in report["students"]}
    logs.update({f"teacher-L{t['trainable_layers']}": t for t in report["teachers"] if "trainable_layers" in t})
    spec = trained_spec(job, student, logs[f"student-l{student.spec.task_layers}"], report["metric"])
    if "thresholds" in report:  # served at the tuned thresholds; the metrics above stay at 0.5, like every run's
        spec.thresholds = report["thresholds"]["values"]
        spec.metrics["tuned"] = {m: round(v, 6) for m, v in report["thresholds"]["tuned"].items()}
    report["chosen"] = {"attach_layer": spec.attach_layer, "task_layers": spec.task_layers,
                        "overhead": spec.attach_layer + spec.task_layers,
                        "candidate": f"student-l{spec.task_layers}", **spec.metrics}
    candidates = {name: (trained_spec(job, head, logs[name], report["metric"]), head)
                  for name, head in sorted((kept or {}).items())}
    for name, (cand, _) in candidates.items():  # a multilabel candidate serves at its own tuned thresholds
        if job.kind == "multilabel":
            cand.thresholds = logs[name]["dev"]["thresholds"]
            cand.metrics["tuned"] = {m: round(v, 6) for m, v in logs[name]["dev"]["tuned"].items()}
    report["candidates"] = [{"id": name, "attach_layer": s.attach_layer, "task_layers": s.task_layers,
                             report["metric"]: s.metrics[report["metric"]]} for name, (s, _) in candidates.items()]
    student.spec = spec
    extra = {REPORT_FILE: report, **({RECIPE_FILE: job.recipe} if job.recipe is not None else {})}
    save_task(tasks_dir / job.name, spec, student, extra_files=extra, candidates=candidates)
    return report


def cache_report(caches: list[ActivationCache], budget: CacheBudget, teachers: list[dict], epochs: int) -> dict:
    """What the cache cost and what recomputing the frozen layers every epoch would have cost."""
    per_layer = [c.seconds / max(1, c.layer) if not c.layer_seconds else float(np.mean(c.layer_seconds))
                 for c in caches]
    frozen = sum(t["attach_layer"] * t.get("epochs_trained", epochs) for t in teachers if "trainable_layers" in t)
    without = frozen * sum(per_layer)
    spent = sum(c.seconds for c in caches)
    return {"seconds": round(spent, 2), "bytes": int(sum(c.nbytes for c in caches)),
            "peak_memory_bytes": budget.peak, "cap_bytes": budget.cap,
            "spilled_to_disk": any(c.spilled is not None for c in caches),
            "estimated_seconds_without_cache": round(without, 2),
            "estimated_seconds_saved": round(without - spent, 2)}
