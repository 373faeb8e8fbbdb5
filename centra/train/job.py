"""What a training run is given and holds: the job (TaskJob: the settings, and what they train on), the
job once checked (CheckedJob, made by centra.train.pipeline.validate_job) and the run in progress (Run:
data, caches, a head factory), shared by the pipeline, the teacher search and the distillation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from torch import nn

from centra.core.backbone import Backbone
from centra.core.task import TaskHead, init_task
from centra.train.cache import ActivationCache, CacheBudget
from centra.train.data import Columns, Examples
from centra.train.finetune import BranchTrainer, TrainConfig, train_branch
from centra.train.settings import REFERENCE_EPOCHS, Settings
from centra.train.thresholds import Tuning


@dataclass(kw_only=True)
class TaskJob(Settings):
    """One task to train: its settings (inherited, with their defaults: centra.train.settings) and what
    they train on. Its teacher_logits is a file path (a recipe's is relative to the data root)."""

    name: str
    kind: str
    train: Path
    dev: Path
    columns: Columns
    label_names: list[str] | None = None
    reference_epochs: int = REFERENCE_EPOCHS  # of the full fine-tuning reference (centra results sets it)
    cache_dir: Path | None = None  # where an over-cap cache spills (default: the system temp dir)
    source: dict = field(default_factory=dict)  # recorded in task.json: recipe and data sha256
    recipe: dict | None = None  # a new recipe.json to publish with the task (None: keep the folder's)
    progress: bool = True  # progress bars and per-epoch lines
    # multilabel, filled in once the data is read: the label named "neutral" (its index; for the tail figure
    # of neutral texts given another label) and where max_labels came from ("data": not set, the default
    # the training labels give)
    neutral: int | None = None
    max_labels_from: str | None = None

    @classmethod
    def of(cls, settings: Settings, **inputs) -> TaskJob:
        """The job training on `inputs` (name, kind, train, dev, columns...) with `settings`."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(Settings)}, **inputs)

    @property
    def settings(self) -> Settings:
        """The job's settings alone."""
        return Settings(**{f.name: getattr(self, f.name) for f in fields(Settings)})

    @property
    def train_config(self) -> TrainConfig:
        """What the training loop takes of the job (its settings of that name, progress, and how a
        multilabel branch's thresholds are tuned)."""
        return replace(TrainConfig.of(self), tuning=Tuning(self.threshold_objective, self.max_labels, seed=self.seed,
                                                           neutral=self.neutral))


@dataclass(frozen=True)
class CheckedJob:
    """A job whose every setting was checked against the backbone, with its defaults resolved."""

    job: TaskJob  # its metric filled in
    lo: int  # the teacher search's range of trainable top layers
    hi: int
    max_length: int
    attach: int | None  # the students' attach layer under an external teacher (None: no external teacher)

    @property
    def tc(self) -> TrainConfig:
        return self.job.train_config


@dataclass
class Run:
    """What one training run holds while it goes: the checked job, data, caches, a head factory."""

    checked: CheckedJob
    backbone: Backbone
    train: Examples
    dev: Examples
    labels: list[str]
    caches: list[ActivationCache]
    budget: CacheBudget
    soft: np.ndarray | None = None  # an external teacher's logits table (None: the search's teacher fills it)
    times: dict[str, float] = field(default_factory=dict)
    # called with the full fine-tuning's model before it is dropped (measure.languages scores it on test sets)
    score_reference: Callable[[nn.Module], None] | None = None

    @property
    def job(self) -> TaskJob:
        return self.checked.job

    def new_head(self, attach: int, layers: int) -> TaskHead:
        job = self.job
        _, head = init_task(self.backbone, job.name, job.kind, self.labels, attach, layers,
                            input="pair" if job.columns.pair else "single", max_length=self.checked.max_length,
                            pooling=job.pooling, seed=job.seed)
        return head

    def train_branch(self, head: TaskHead, desc: str, soft: np.ndarray | None = None) -> tuple[TaskHead, dict]:
        return train_branch(head, self.caches[0], self.train.targets, self.caches[1], self.dev.targets,
                            self.checked.tc, desc, soft=soft)

    def trainer(self, head: TaskHead, desc: str) -> BranchTrainer:
        """A resumable training of `head` on the run's caches (the teacher search interleaves them)."""
        return BranchTrainer(head, self.caches[0], self.train.targets, self.caches[1], self.dev.targets,
                             self.checked.tc, desc)

    def advance_to(self, layer: int) -> None:
        for cache in self.caches:
            cache.advance_to(layer)

    def close(self) -> None:
        for cache in self.caches:
            cache.close()
