"""The training result as typed records: what one add-task run trained, chose and kept (report.json).

The pipeline builds a `TrainingReport`; it becomes report.json once, when the task folder is published
(`to_dict`), and every reader (the add-task summary, the demo, plan, results) reads report.json back
through `read_report` / `TrainingReport.from_dict`. The JSON layout is the one report.json has always
had, key for key. A field that an older or hand-written report.json lacks reads as its default.
Light: no torch, so results can be read anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from centra.errors import CentraError
from centra.io import read_json


@dataclass(frozen=True)
class BranchLog:
    """One branch's training (finetune.BranchTrainer's log): the dev scores of the epoch kept (or of the
    weights as a search cut them: then no epoch ended and best_epoch is None), every epoch's scores, the
    losses. A dev entry is the metrics by name (a multilabel one also "thresholds" and "tuned")."""

    dev: dict
    epochs: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    epochs_trained: float = 0.0
    seconds: float = 0.0
    trainable_parameters: int = 0
    # an exit of a joint student of this many task layers (train/joint.py): the losses and seconds are the
    # whole joint student's, shared by its exits; None for a branch trained on its own
    joint: int | None = None

    def to_dict(self) -> dict:
        best = {} if self.best_epoch is None else {"best_epoch": self.best_epoch}
        joint = {} if self.joint is None else {"joint": self.joint}
        return {"trainable_parameters": self.trainable_parameters, "epochs": self.epochs, "losses": self.losses,
                **best, "dev": self.dev, "epochs_trained": self.epochs_trained, "seconds": self.seconds, **joint}

    @classmethod
    def from_dict(cls, data: dict) -> BranchLog:
        return cls(data.get("dev", {}), data.get("epochs", []), data.get("losses", []), data.get("best_epoch"),
                   data.get("epochs_trained", 0.0), data.get("seconds", 0.0), data.get("trainable_parameters", 0),
                   data.get("joint"))


@dataclass(frozen=True)
class Teacher:
    """A teacher of the search (L trainable top layers, attached at N - L), or an external one whose
    logits came from a file (then `external` is that file and only attach_layer is set)."""

    attach_layer: int
    trainable_layers: int | None = None
    chosen: bool = False
    log: BranchLog | None = None
    external: str | None = None

    def to_dict(self) -> dict:
        if self.external is not None:
            return {"external": self.external, "attach_layer": self.attach_layer}
        return {"trainable_layers": self.trainable_layers, "attach_layer": self.attach_layer, "chosen": self.chosen,
                **(self.log or BranchLog({})).to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Teacher:
        if "trainable_layers" not in data:
            return cls(data.get("attach_layer", 0), external=data.get("external"))
        return cls(data["attach_layer"], data["trainable_layers"], data.get("chosen", False), BranchLog.from_dict(data))


@dataclass(frozen=True)
class Student:
    """A distilled student: its task layers and log; attach_layer only for one attached below its
    teacher (a plan candidate: distill.distill_shallower), None for those at the teacher's layer."""

    task_layers: int
    log: BranchLog
    attach_layer: int | None = None

    def to_dict(self) -> dict:
        attach = {} if self.attach_layer is None else {"attach_layer": self.attach_layer}
        return {**attach, "task_layers": self.task_layers, **self.log.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Student:
        return cls(data["task_layers"], BranchLog.from_dict(data), data.get("attach_layer"))


@dataclass(frozen=True)
class Thresholds:
    """A multilabel branch's per-label thresholds tuned on dev (train/thresholds.py): the values served
    (tuned on all of dev), the dev metrics at 0.5, held out ("tuned": each dev fold scored at thresholds
    tuned on the other folds) and in-sample at the values ("fit"), and the mean labels per text held out
    against gold; how they were tuned (objective, folds, the guard's minimum positives and margin)."""

    values: list[float]
    min_positives: int
    positives: list[int]
    at_half: dict[str, float]
    tuned: dict[str, float]
    fit: dict[str, float] = field(default_factory=dict)
    labels_per_text: dict[str, float] = field(default_factory=dict)
    objective: str | None = None
    folds: int | None = None
    margin: float | None = None
    max_labels: int | None = None
    guard: list[str] | None = None  # per label: "tuned", "kept 0.5" (the guard) or "floor"
    floor: float | None = None  # no tuned threshold below this
    max_labels_from: str | None = None  # "data": not set, the default the training labels give

    def tail(self) -> str:
        """'p labels per text (gold g), m% given more than gold, n% of neutral texts given another label',
        held out; '' when the report lacks them."""
        found = self.labels_per_text
        if not {"predicted", "gold"} <= set(found):
            return ""
        parts = [f"{found['predicted']:.2f} labels per text (gold {found['gold']:.2f})"]
        if "more_than_gold" in found:
            parts.append(f"{100 * found['more_than_gold']:.0f}% given more than gold")
        if "neutral_given_other" in found:
            parts.append(f"{100 * found['neutral_given_other']:.0f}% of neutral texts given another label")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        data = {"values": self.values, "min_positives": self.min_positives, "positives": self.positives,
                "at_0.5": self.at_half, "tuned": self.tuned}
        more = {"fit": self.fit, "labels_per_text": self.labels_per_text, "objective": self.objective,
                "folds": self.folds, "margin": self.margin, "max_labels": self.max_labels, "guard": self.guard,
                "floor": self.floor, "max_labels_from": self.max_labels_from}
        return {**data, **{k: v for k, v in more.items() if v not in (None, {})}}

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        return cls(data.get("values", []), data.get("min_positives", 0), data.get("positives", []),
                   data.get("at_0.5", {}), data.get("tuned", {}), data.get("fit", {}),
                   data.get("labels_per_text", {}), data.get("objective"), data.get("folds"), data.get("margin"),
                   data.get("max_labels"), data.get("guard"), data.get("floor"), data.get("max_labels_from"))


@dataclass(frozen=True)
class Reference:
    """The full fine-tuning reference (train/reference.py): every layer and the embeddings trained."""

    log: BranchLog
    layers: int = 0
    overhead: int = 0
    embeddings: str | None = None  # "trained" (a report from before the embeddings trained lacks it)
    epochs_setting: int | None = None
    thresholds: Thresholds | None = None

    def served(self, metric: str) -> float:
        """Its dev metric as a task is served: a multilabel one at its tuned thresholds."""
        return float((self.thresholds.tuned if self.thresholds else self.log.dev)[metric])

    def to_dict(self) -> dict:
        head = {"layers": self.layers, "overhead": self.overhead, "embeddings": self.embeddings,
                "epochs_setting": self.epochs_setting}
        return {**{k: v for k, v in head.items() if v is not None}, **self.log.to_dict(),
                **({"thresholds": self.thresholds.to_dict()} if self.thresholds else {})}

    @classmethod
    def from_dict(cls, data: dict) -> Reference:
        thresholds = Thresholds.from_dict(data["thresholds"]) if "thresholds" in data else None
        return cls(BranchLog.from_dict(data), data.get("layers", 0), data.get("overhead", 0), data.get("embeddings"),
                   data.get("epochs_setting"), thresholds)


@dataclass(frozen=True)
class SearchCost:
    """What the teacher search cost, in epochs and layer-epochs, against what the full search trains;
    halving's rounds (epochs, scores, kept); with a reference, the cost in full fine-tunes."""

    method: str
    seconds: float
    epochs_trained: float
    epochs_full_search: int
    layer_epochs: float
    layer_epochs_full_search: int
    rounds: list[dict] | None = None
    per_reference: float | None = None

    def to_dict(self) -> dict:
        data = {"method": self.method, "seconds": self.seconds, "epochs_trained": self.epochs_trained,
                "epochs_full_search": self.epochs_full_search, "layer_epochs": self.layer_epochs,
                "layer_epochs_full_search": self.layer_epochs_full_search}
        return {**data, **{k: v for k, v in (("rounds", self.rounds), ("per_reference", self.per_reference))
                           if v is not None}}

    @classmethod
    def from_dict(cls, data: dict) -> SearchCost:
        return cls(data["method"], data["seconds"], data["epochs_trained"], data["epochs_full_search"],
                   data["layer_epochs"], data["layer_epochs_full_search"], data.get("rounds"),
                   data.get("per_reference"))


@dataclass(frozen=True)
class CacheCost:
    """What the trunk cache cost, and what recomputing the frozen layers every epoch would have."""

    seconds: float
    nbytes: int
    peak_memory_bytes: int
    cap_bytes: int
    spilled_to_disk: bool
    estimated_seconds_without_cache: float
    estimated_seconds_saved: float

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "bytes": self.nbytes, "peak_memory_bytes": self.peak_memory_bytes,
                "cap_bytes": self.cap_bytes, "spilled_to_disk": self.spilled_to_disk,
                "estimated_seconds_without_cache": self.estimated_seconds_without_cache,
                "estimated_seconds_saved": self.estimated_seconds_saved}

    @classmethod
    def from_dict(cls, data: dict) -> CacheCost:
        return cls(data["seconds"], data["bytes"], data["peak_memory_bytes"], data["cap_bytes"],
                   data["spilled_to_disk"], data["estimated_seconds_without_cache"], data["estimated_seconds_saved"])


@dataclass(frozen=True)
class JobRecord:
    """The job a run trained, as distilling more students later needs it again (`centra plan
    --extra-attach`, train/shallower.py): every setting as the run resolved it (centra.train.settings,
    by field name), the data files (absolute path and sha256, by role: train, dev, teacher_logits), the
    columns, the label names and where a multilabel task's max_labels came from."""

    settings: dict
    files: dict[str, dict]
    columns: dict
    label_names: list[str] | None = None
    max_labels_from: str | None = None

    def to_dict(self) -> dict:
        return {"settings": self.settings, "files": self.files, "columns": self.columns,
                "label_names": self.label_names, "max_labels_from": self.max_labels_from}

    @classmethod
    def from_dict(cls, data: dict) -> JobRecord:
        return cls(data["settings"], data["files"], data["columns"], data.get("label_names"),
                   data.get("max_labels_from"))


CHOSEN_KEYS = ("attach_layer", "task_layers", "overhead", "candidate", "metric", "tuned")


@dataclass(frozen=True)
class Chosen:
    """The student the task serves: where it attaches, its layers, its dev metrics (task.json's)."""

    metric: str | None
    scores: dict[str, float]  # every metric of the kind, at 0.5 for a multilabel task
    tuned: dict[str, float] | None = None  # a multilabel task's, at its tuned thresholds (as it is served)
    attach_layer: int | None = None
    task_layers: int | None = None
    overhead: int | None = None
    candidate: str | None = None

    @property
    def served(self) -> float:
        """Its dev metric as served: a multilabel task at its tuned thresholds."""
        return float((self.tuned or {}).get(self.metric, self.scores[self.metric]))

    @property
    def dev(self) -> dict:
        """Its scores in the shape of a dev entry (the metrics, and "tuned" when it has them)."""
        return {**self.scores, **({"tuned": self.tuned} if self.tuned is not None else {})}

    def to_dict(self) -> dict:
        head = {"attach_layer": self.attach_layer, "task_layers": self.task_layers, "overhead": self.overhead,
                "candidate": self.candidate, "metric": self.metric}
        return {**{k: v for k, v in head.items() if v is not None}, **self.dev}

    @classmethod
    def from_dict(cls, data: dict) -> Chosen:
        scores = {k: v for k, v in data.items() if k not in CHOSEN_KEYS}
        return cls(data.get("metric"), scores, data.get("tuned"), data.get("attach_layer"), data.get("task_layers"),
                   data.get("overhead"), data.get("candidate"))


@dataclass(frozen=True)
class KeptCandidate:
    """A head kept in candidates/ID/ for `centra plan`, with its dev metric (at 0.5)."""

    id: str
    attach_layer: int
    task_layers: int
    score: float

    def to_dict(self, metric: str) -> dict:
        return {"id": self.id, "attach_layer": self.attach_layer, "task_layers": self.task_layers, metric: self.score}

    @classmethod
    def from_dict(cls, data: dict, metric: str) -> KeptCandidate:
        return cls(data["id"], data["attach_layer"], data["task_layers"], data[metric])


@dataclass(frozen=True)
class TrainingReport:
    """One task's training: its data, the reference, the teachers and the search, the students, the
    thresholds, the cache, the wall times, the student chosen and the candidates kept (report.json)."""

    task: str = ""
    kind: str = ""
    backbone: str = ""
    labels: list[str] = field(default_factory=list)
    train_examples: int = 0
    dev_examples: int = 0
    metric: str = ""
    train_config: dict = field(default_factory=dict)  # the training loop's config (finetune.TrainConfig)
    data: dict = field(default_factory=dict)  # train and dev files, max_length
    baseline: dict = field(default_factory=dict)  # the dev metrics of a constant answer (metrics.baseline)
    teachers: list[Teacher] = field(default_factory=list)
    students: list[Student] = field(default_factory=list)
    shallower_students: list[Student] = field(default_factory=list)  # plan candidates below the teacher
    cache: CacheCost | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage
    chosen: Chosen | None = None
    candidates: list[KeptCandidate] = field(default_factory=list)
    reference: Reference | None = None
    search: SearchCost | None = None
    thresholds: Thresholds | None = None
    job: JobRecord | None = None  # a report from before it was recorded lacks it

    @property
    def chosen_teacher(self) -> Teacher | None:
        return next((t for t in self.teachers if t.chosen), None)

    def to_dict(self) -> dict:
        data = {"task": self.task, "kind": self.kind, "backbone": self.backbone, "labels": self.labels,
                "train_examples": self.train_examples, "dev_examples": self.dev_examples, "metric": self.metric,
                "train_config": self.train_config, "data": self.data, "baseline": self.baseline}
        if self.reference is not None:
            data["reference"] = self.reference.to_dict()
        data["teachers"] = [t.to_dict() for t in self.teachers]
        if self.search is not None:
            data["search"] = self.search.to_dict()
        data["students"] = [s.to_dict() for s in self.students]
        if self.shallower_students:
            data["shallower_students"] = [s.to_dict() for s in self.shallower_students]
        if self.thresholds is not None:
            data["thresholds"] = self.thresholds.to_dict()
        if self.cache is not None:
            data["cache"] = self.cache.to_dict()
        data["seconds"] = self.seconds
        if self.chosen is not None:
            data["chosen"] = self.chosen.to_dict()
        data["candidates"] = [c.to_dict(self.metric) for c in self.candidates]
        if self.job is not None:
            data["job"] = self.job.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainingReport:
        def part(key: str, parse):
            return parse(data[key]) if data.get(key) is not None else None

        plain = {k: data[k] for k in ("task", "kind", "backbone", "labels", "train_examples", "dev_examples",
                                      "metric", "train_config", "data", "baseline", "seconds") if k in data}
        metric = data.get("metric", "")
        return cls(**plain, teachers=[Teacher.from_dict(t) for t in data.get("teachers", [])],
                   students=[Student.from_dict(s) for s in data.get("students", [])],
                   shallower_students=[Student.from_dict(s) for s in data.get("shallower_students", [])],
                   cache=part("cache", CacheCost.from_dict), chosen=part("chosen", Chosen.from_dict),
                   candidates=[KeptCandidate.from_dict(c, metric) for c in data.get("candidates", [])],
                   reference=part("reference", Reference.from_dict), search=part("search", SearchCost.from_dict),
                   thresholds=part("thresholds", Thresholds.from_dict), job=part("job", JobRecord.from_dict))


def with_shallower(data: dict, students: list[Student], candidates: list[KeptCandidate], seconds: float) -> dict:
    """A report.json (as read: every key it has kept, in its order) with more shallower students and
    candidates (kept in the order a run writes them: attach layer down, then task layers; candidates by
    id) and their seconds added to `shallower_students` and to the task's total."""
    metric = data.get("metric", "")
    old = data.get("shallower_students", [])
    shallower = sorted([*old, *(s.to_dict() for s in students)],
                       key=lambda s: (-s.get("attach_layer", 0), s["task_layers"]))
    kept = sorted([*data.get("candidates", []), *(c.to_dict(metric) for c in candidates)], key=lambda c: c["id"])
    times = {}
    for key, value in data.get("seconds", {}).items():
        if key == "task" and "shallower_students" not in data.get("seconds", {}):
            times["shallower_students"] = 0.0  # where a run writes it
        times[key] = value
    for key in ("shallower_students", "task"):
        if key in times or key == "shallower_students":
            times[key] = round(times.get(key, 0.0) + seconds, 2)
    out = {}
    for key, value in data.items():
        if key != "shallower_students":
            out[key] = value
        if key == "students":  # where a run writes them
            out["shallower_students"] = shallower
    out.setdefault("shallower_students", shallower)
    return {**out, "candidates": kept, "seconds": times}


def read_report(path: Path) -> TrainingReport:
    """A task's report.json, read through the record (one line naming the file when it does not parse)."""
    data = read_json(Path(path))
    try:
        return TrainingReport.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CentraError(f"{path}: not a training report ({type(exc).__name__}: {exc})") from None
