"""One task, end to end: data -> teacher search over L -> distilled student -> task folder.

Every setting is checked before any compute (`validate_job`); each stage returns what it trained
(`Trained`), and the training report (`TrainingReport`, train/report.py) is built once, when the task
folder is published. Nothing here touches another task: the result is published to DIR/NAME only,
atomically.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from centra.core import KINDS
from centra.core.backbone import Backbone, EncoderConfig
from centra.core.candidates import shallower_id
from centra.core.task import (
    NAME_RE,
    RECIPE_FILE,
    REPORT_FILE,
    TASK_KIND,
    TEACHER_FILE,
    TaskHead,
    TaskSpec,
    is_legacy_task,
    max_positions,
    save_task,
)
from centra.core.tokens import encode
from centra.errors import CentraError
from centra.io import sha256_file
from centra.progress import job_bar, progress_line, work_left
from centra.publish import check_replaceable
from centra.train import precision
from centra.train.cache import ActivationCache, CacheBudget
from centra.train.data import Examples, load_examples
from centra.train.distill import (
    distill_shallower,
    distill_students,
    logits_table,
    read_teacher_logits,
    shallower_students,
)
from centra.train.job import CheckedJob, Run, TaskJob
from centra.train.metrics import METRICS, baseline
from centra.train.reference import TokenSource, train_reference
from centra.train.report import (
    BranchLog,
    CacheCost,
    Chosen,
    JobRecord,
    KeptCandidate,
    Reference,
    SearchCost,
    Student,
    Teacher,
    TrainingReport,
)
from centra.train.search import rungs, search_teachers, successive_halving
from centra.train.settings import REFERENCE_EPOCHS, Name, SettingError, Settings, refused
from centra.train.thresholds import label_count_limit, neutral_of, threshold_report


def validate_job(job: TaskJob, cfg: EncoderConfig) -> CheckedJob:
    """Check every setting and input before any compute (centra.train.settings holds the settings'
    checks); return a checked copy with the defaults resolved (the caller's job is untouched)."""
    if not NAME_RE.match(job.name):
        raise CentraError(f"task name {job.name!r} must be 1-64 letters, digits, '_' or '-'")
    if job.kind not in KINDS:
        raise CentraError(f"kind {job.kind!r} must be one of {', '.join(KINDS)}")
    resolved = job.resolve(job.kind, cfg.num_layers, max_positions(cfg))
    if job.reference_epochs < 1:
        raise refused("reference_epochs", f"must be >= 1, not {job.reference_epochs}")
    for name in ("train", "dev", "teacher_logits"):
        path = getattr(job, name)
        if path is not None and not Path(path).is_file():
            raise SettingError(f"{path}: file not found (", Name(name), ")")
    return CheckedJob(replace(job, metric=resolved.metric, precision=precision.resolve(job.precision)),
                      resolved.lo, resolved.hi, resolved.max_length, resolved.attach)


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
    soft = read_teacher_logits(Path(job.teacher_logits), len(train), outputs) if job.teacher_logits else None
    if job.max_train_examples and job.max_train_examples < len(train):
        gen = torch.Generator().manual_seed(job.seed)
        rows = sorted(torch.randperm(len(train), generator=gen)[: job.max_train_examples].tolist())
        train, soft = train.subset(rows), soft[rows] if soft is not None else None
    return train, dev, labels, soft


def train_task(job: TaskJob, backbone: Backbone, tasks_dir: Path,
               score_reference: Callable[[nn.Module], None] | None = None) -> tuple[TrainingReport, TaskHead]:
    """Run the whole pipeline for one task and publish tasks_dir/NAME; return the training report (what
    report.json holds) and the chosen student, with the spec it was published with. `score_reference`
    is given the full fine-tuning's model (job.reference), which is never published, before it is dropped."""
    checked = validate_job(job, backbone.cfg)
    check_destination(tasks_dir, job.name)
    clock = time.perf_counter()
    run = open_run(checked, backbone)
    run.score_reference = score_reference
    try:
        with job_bar(planned_work(run), f"{job.name}: all stages", job.progress):
            trained = train_run(run)
    finally:
        run.close()
    # what adding the task cost, end to end: everything but the reference (which only measures it)
    run.times["task"] = time.perf_counter() - clock - run.times.get("reference", 0.0)
    progress_line(cost_line(run, trained), job.progress)
    return publish(run, trained, Path(tasks_dir))


def planned_work(run: Run) -> float:
    """The job's work, planned before it runs, for its bar's ETA: in layer passes over one example (a
    training step of l layers over B examples counts 3 l B: forward and backward; a dev scoring l B). The
    halving search is planned as if the deepest half went on at each cut (its costliest course), the
    students as if the teacher attached where they cost the most (a shallower teacher leaves more layers
    for its students, and more attach layers below it) until the teacher is chosen (then the bar is
    replanned: students_work), and every student of the mixed allocation as if trained: the bar may end
    before its end, never run past it."""
    job, n, tc = run.job, run.backbone.cfg.num_layers, run.checked.tc
    ntr, ndev = len(run.train), len(run.dev)

    def branch(layers: int, epochs: float) -> float:
        return layers * epochs * (3 * ntr + ndev)

    units = branch(n, job.reference_epochs) if job.reference else 0.0
    if run.soft is None:
        lo, hi = run.checked.lo, run.checked.hi
        units += (n - lo) * (ntr + ndev) + hi * ntr  # the caches up to the shallowest teacher; its logits
        arms = list(range(hi, lo - 1, -1))
        marks = rungs(len(arms), tc.epochs, job.first_rung) if job.search == "halving" else [tc.epochs]
        trained = dict.fromkeys(arms, 0.0)

        def train_to(layers: int, epochs: float) -> float:  # the search's own cuts, the deepest ranked first
            nonlocal units
            units += branch(layers, epochs - trained[layers])
            trained[layers] = epochs
            return layers

        successive_halving(arms, marks, train_to, prune=False)
        attaches = range(n - hi, n - lo + 1)  # wherever the search's teacher attaches
    else:
        attaches = range(run.checked.attach, run.checked.attach + 1)
        units += run.checked.attach * (ntr + ndev)

    return units + max(students_work(run, at) for at in attaches)


def students_work(run: Run, attach: int) -> float:
    """The students' work once the teacher attaches at `attach`, in planned_work's units: those at its layer
    (every one of the mixed allocation, as if trained), then the shallower ones (none by default). Once the
    teacher is chosen the job bar is replanned with it: a teacher attached deeper leaves fewer students."""
    job, n, epochs = run.job, run.backbone.cfg.num_layers, run.checked.tc.epochs
    most = min(3, n - attach)
    layers = [job.student_layers] if job.student_layers else [most] if job.students == "joint" \
        else range(1, most + 1)  # a joint student trains its deepest exit's layers once
    return sum(lay * epochs * (3 * len(run.train) + len(run.dev)) for lay in layers) + shallower_work(
        run, shallower_students(attach, job.extra_attach, n, job.student_layers))


def shallower_work(run: Run, students: dict[int, list[int]]) -> float:
    """The work of distill_shallower training `students` ({attach layer: [task layers]}), in planned_work's
    units: each attach layer's cache rebuilt there (the costlier of a snapshot or a rebuild), then its students."""
    ntr, ndev, epochs = len(run.train), len(run.dev), run.checked.tc.epochs
    return sum(attach * (ntr + ndev) + sum(lay * epochs * (3 * ntr + ndev) for lay in layers)
               for attach, layers in students.items() if layers)


def cost_line(run: Run, trained: Trained) -> str:
    """The job's wall time against the full fine-tuning: measured (job.reference) or estimated from the
    speed its own branches trained at."""
    task, ref = run.times["task"], run.times.get("reference")
    if ref:
        return f"{run.job.name}: added in {task:.0f} s, {task / ref:.2f}x its full fine-tuning ({ref:.0f} s, measured)"
    estimate = full_finetune_estimate(run, trained)
    if estimate is None:
        return f"{run.job.name}: added in {task:.0f} s"
    return (f"{run.job.name}: added in {task:.0f} s, ~{task / estimate:.2f}x a full fine-tuning (~{estimate:.0f} s "
            f"for {REFERENCE_EPOCHS} epochs, estimated without its embeddings' training; --reference measures it)")


def full_finetune_estimate(run: Run, trained: Trained) -> float | None:
    """Seconds a full fine-tuning of REFERENCE_EPOCHS epochs would take here, from the branches this job
    trained: their seconds per layer and epoch, times every layer of the model. It leaves out the
    embeddings' training (their optimizer step over the whole vocabulary), so it is a lower bound."""
    logs = [(t.trainable_layers, t.log) for t in trained.teachers if t.trainable_layers and t.log is not None]
    # a joint student's layers and seconds once: at its deepest exit (every exit's log holds the whole's)
    logs += [(s.task_layers, s.log) for s in [*trained.students, *trained.shallower]
             if s.log.joint in (None, s.task_layers)]
    layer_epochs = sum(layers * log.epochs_trained for layers, log in logs)
    if layer_epochs <= 0:
        return None
    per_layer_epoch = sum(log.seconds for _, log in logs) / layer_epochs
    return REFERENCE_EPOCHS * run.backbone.cfg.num_layers * per_layer_epoch


def open_run(checked: CheckedJob, backbone: Backbone) -> Run:
    """Read the data and open the trunk caches (built as the stages need them)."""
    job, clock = checked.job, time.perf_counter()
    train, dev, labels, soft = load_data(job)
    if job.kind == "multilabel":  # what the labels tell: a default max_labels, the neutral label
        defaults = {"max_labels": label_count_limit(train.targets), "max_labels_from": "data"} \
            if job.max_labels is None else {}
        checked = replace(checked, job=replace(job, **defaults, neutral=neutral_of(labels)))
        job = checked.job
    tok = backbone.tokenizer()
    encoded = [encode(tok, backbone.cfg.type_vocab_size, x.texts, x.pairs, checked.max_length) for x in (train, dev)]
    budget = CacheBudget(int(job.cache_gb * 2**30))  # one cap for the whole run: both caches and snapshots
    spill = Path(job.cache_dir or tempfile.gettempdir())
    progress_line(precision.notice(job.precision), job.progress)
    # the training set's states in the training precision; dev's in fp32, so dev scores are the served ones
    dtypes = (precision.storage_dtype(job.precision), torch.float32)
    caches = [ActivationCache(backbone, e, tok.pad_token_id or 0, budget, spill, desc=d, progress=job.progress,
                              dtype=t) for e, d, t in zip(encoded, ("train", "dev"), dtypes)]
    return Run(checked, backbone, train, dev, labels, caches, budget, soft, {"data": time.perf_counter() - clock})


@dataclass
class Trained:
    """What a run trained, before it is published."""

    student: TaskHead
    students: list[Student]
    teachers: list[Teacher]
    kept: dict[str, TaskHead]  # candidates for `centra plan`, by id
    reference: Reference | None = None
    search: SearchCost | None = None
    shallower: list[Student] = field(default_factory=list)  # students attached below the teacher (candidates)
    teacher: TaskHead | None = None  # the students' teacher (searched, or the external one's starting head)
    soft: np.ndarray | None = None  # its logits table over the training rows


def train_run(run: Run) -> Trained:
    """The reference (when asked for), the teachers (searched, or the external one), the students."""
    job, n = run.job, run.backbone.cfg.num_layers
    reference = run_reference(run) if job.reference else None
    for cache in run.caches:
        cache.build(0 if run.soft is not None else n - run.checked.hi)
    if run.soft is None:
        found = search_teachers(run)
        search = found.cost
        if reference is not None:  # the search's cost in full fine-tunes, the measure
            search = replace(search, per_reference=round(run.times["teacher_search"] / run.times["reference"], 3))
        teacher, teachers, kept = found.best, found.teachers, {f"teacher-L{k}": h for k, h in found.kept.items()}
        soft = teacher_table(run, teacher)
    else:
        search, kept, soft, k = None, {}, run.soft, run.checked.attach
        run.advance_to(k)
        teacher = run.new_head(k, min(3, n - k))  # the external teacher's student starts here
        teachers = [Teacher(k, external=str(job.teacher_logits))]
    work_left(students_work(run, teacher.spec.attach_layer))
    clock = time.perf_counter()
    distilled = distill_students(run, teacher, soft)
    run.times["students"] = time.perf_counter() - clock
    kept.update({f"student-l{layers}": head for layers, head in distilled.heads.items()})
    clock = time.perf_counter()
    more, shallower = distill_shallower(run, teacher, soft)
    if shallower:
        run.times["shallower_students"] = time.perf_counter() - clock  # what the extra candidates cost
    kept.update(more)
    return Trained(distilled.chosen, distilled.students, teachers, kept, reference, search, shallower, teacher, soft)


def run_reference(run: Run) -> Reference:
    """Fine-tune the whole model, embeddings too (train/reference.py), on the run's tokens."""
    job, n, clock = run.job, run.backbone.cfg.num_layers, time.perf_counter()
    sources = [TokenSource(cache.enc, cache.pad_id) for cache in run.caches]
    model, log = train_reference(run.backbone, run.new_head(0, n), sources[0], run.train.targets, sources[1],
                                 run.dev.targets, run.checked.tc, job.reference_epochs)
    if run.score_reference is not None:
        run.score_reference(model)
    run.times["reference"] = time.perf_counter() - clock
    thresholds = threshold_report(log["dev"], run.dev.targets, run.checked.tc.tuning, run.job.max_labels_from) \
        if job.kind == "multilabel" else None
    return Reference(BranchLog.from_dict(log), n, n, "trained", job.reference_epochs, thresholds)


def teacher_table(run: Run, teacher: TaskHead) -> np.ndarray:
    """The teacher's logits for every training example (the table the students learn from)."""
    run.advance_to(teacher.spec.attach_layer)
    clock = time.perf_counter()
    soft = logits_table(teacher, run.caches[0], run.checked.tc.progress)
    run.times["teacher_logits"] = time.perf_counter() - clock
    return soft


def publish(run: Run, trained: Trained, tasks_dir: Path) -> tuple[TrainingReport, TaskHead]:
    """Publish the task folder: the chosen student trained and scored, the candidates kept (teachers with
    L <= 3 and every student, for `centra plan`), report.json, and the recipe when the job brings one."""
    job, metric = run.job, run.checked.tc.metric
    logs = {f"student-l{s.task_layers}": s.log for s in trained.students}
    logs.update({f"teacher-L{t.trainable_layers}": t.log for t in trained.teachers if t.log is not None})
    logs.update({shallower_id(s.attach_layer, s.task_layers): s.log for s in trained.shallower})
    spec = trained_spec(job, trained.student.spec, logs[f"student-l{trained.student.spec.task_layers}"], metric)
    candidates = {name: (trained_spec(job, head.spec, logs[name], metric), head)
                  for name, head in sorted(trained.kept.items())}
    report = training_report(run, trained, spec, candidates)
    extra = {REPORT_FILE: report.to_dict(), **({RECIPE_FILE: job.recipe} if job.recipe is not None else {})}
    saved = save_task(tasks_dir / job.name, spec, trained.student, extra_files=extra, candidates=candidates,
                      tensor_files={TEACHER_FILE: teacher_file(trained.teacher, trained.soft)})
    return report, trained.student.with_spec(saved)


def teacher_file(teacher: TaskHead, soft: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the task folder keeps of the teacher (TEACHER_FILE) for students distilled later: its logits
    table over the training rows, exactly the one the students learnt from, and the pooler and classifier
    they start from; its attach layer in the metadata. Small: rows x outputs, and one pooler."""
    head = {k: v for k, v in teacher.state_dict().items() if k.split(".")[0] in ("pooler", "classifier")}
    return {"logits": torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32)), **head}, \
        {"attach_layer": str(teacher.spec.attach_layer)}


def job_record(run: Run) -> JobRecord:
    """The job as the run resolved it, with its data files' absolute paths and sha256 (report.json's
    `job`): distilling more students later (train/shallower.py) runs it again."""
    job = run.job
    files = {role: Path(getattr(job, role)).resolve() for role in ("train", "dev", "teacher_logits")
             if getattr(job, role) is not None}
    settings = {f.name: getattr(job, f.name) for f in fields(Settings)}
    settings["teacher_logits"] = str(files["teacher_logits"]) if "teacher_logits" in files else None
    return JobRecord(settings,
                     {role: {"path": str(path), "sha256": sha256_file(path)} for role, path in files.items()},
                     asdict(job.columns), job.label_names, job.max_labels_from)


def trained_spec(job: TaskJob, spec: TaskSpec, log: BranchLog, metric: str) -> TaskSpec:
    """A head's task.json once trained: its dev metrics at its best epoch, what it was trained from; a
    multilabel head served at the thresholds tuned on dev at that epoch (its metrics stay at 0.5, like
    every run's, with the tuned ones beside them)."""
    metrics = {"metric": metric, **{m: round(log.dev[m], 6) for m in METRICS[job.kind]}}
    thresholds, max_labels = spec.thresholds, None
    if job.kind == "multilabel":
        thresholds, max_labels = log.dev["thresholds"], job.max_labels
        metrics["tuned"] = {m: round(v, 6) for m, v in log.dev["tuned"].items()}  # held out (cross-fitted)
        if "labels_per_text" in log.dev:
            metrics["labels_per_text"] = log.dev["labels_per_text"]
    return replace(spec, trained=True, metrics=metrics, source=dict(job.source), thresholds=thresholds,
                   max_labels=max_labels)


def training_report(run: Run, trained: Trained, spec: TaskSpec, candidates: dict[str, tuple[TaskSpec, TaskHead]]
                    ) -> TrainingReport:
    """The report of the run (report.json), its chosen student published with `spec`."""
    job, tc = run.job, run.checked.tc
    chosen = next(s for s in trained.students if s.task_layers == spec.task_layers)
    scores = {k: v for k, v in spec.metrics.items() if k not in ("metric", "tuned", "labels_per_text")}
    return TrainingReport(
        task=job.name, kind=job.kind, backbone=run.backbone.backbone_id, labels=run.labels,
        train_examples=len(run.train), dev_examples=len(run.dev), metric=tc.metric,
        train_config={k: v for k, v in asdict(tc).items() if k != "progress"},
        data={"train": str(job.train), "dev": str(job.dev), "max_length": run.checked.max_length},
        baseline=baseline(job.kind, 1 if job.kind == "regression" else len(run.labels), run.train.targets,
                          run.dev.targets),
        reference=trained.reference, teachers=trained.teachers, search=trained.search, students=trained.students,
        shallower_students=trained.shallower,
        thresholds=threshold_report(chosen.log.dev, run.dev.targets, tc.tuning, job.max_labels_from)
        if job.kind == "multilabel" else None,
        cache=cache_cost(run, trained.teachers), seconds={k: round(v, 2) for k, v in run.times.items()},
        chosen=Chosen(tc.metric, scores, spec.metrics.get("tuned"), spec.attach_layer, spec.task_layers,
                      spec.attach_layer + spec.task_layers, f"student-l{spec.task_layers}"),
        candidates=[KeptCandidate(name, s.attach_layer, s.task_layers, s.metrics[tc.metric])
                    for name, (s, _) in candidates.items()], job=job_record(run))


def cache_cost(run: Run, teachers: list[Teacher]) -> CacheCost:
    """What the cache cost and what recomputing the frozen layers every epoch would have cost."""
    caches, epochs = run.caches, run.checked.tc.epochs
    per_layer = [c.seconds / max(1, c.layer) if not c.layer_seconds else float(np.mean(c.layer_seconds))
                 for c in caches]
    frozen = sum(t.attach_layer * (t.log.epochs_trained if t.log else epochs) for t in teachers
                 if t.trainable_layers is not None)
    without = frozen * sum(per_layer)
    spent = sum(c.seconds for c in caches)
    return CacheCost(round(spent, 2), int(sum(c.nbytes for c in caches)), run.budget.peak, run.budget.cap,
                     any(c.spilled is not None for c in caches), round(without, 2), round(without - spent, 2))
