"""What a training run is given and holds: the job (TaskJob), the job once checked (CheckedJob, made by
centra.train.pipeline.validate_job) and the run in progress (Run: data, caches, a head factory), shared
by the pipeline and the teacher search (centra.train.search)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from centra.core.backbone import Backbone
from centra.core.task import TaskHead, init_task
from centra.train.cache import ActivationCache
from centra.train.data import Columns, Examples
from centra.train.finetune import BranchTrainer, TrainConfig, train_branch

# A quarter-epoch first rung cut the full search's winner on CoLA and RTE (2,500-8,500 examples: every L
# still near chance then; docs/results.md), so the default ranks after one epoch, as the search was designed.
FIRST_RUNG = 1.0  # halving: epochs every L trains before the first cut (--first-rung)


@dataclass
class TaskJob:
    name: str
    kind: str
    train: Path
    dev: Path
    columns: Columns
    label_names: list[str] | None = None
    layers: tuple[int, int] | None = None  # teacher search range (MIN, MAX) of trainable top layers
    search: str = "halving"  # how the teacher search goes: halving | full (see train/search.py)
    first_rung: float = FIRST_RUNG  # halving: epochs every L trains before the first cut
    student_layers: int | None = None
    threshold: float = 1.0
    reference: bool = False  # also fine-tune the whole model (train/reference.py), to compare against
    reference_epochs: int = 3
    teacher_logits: Path | None = None
    attach_layer: int | None = None  # students' attach layer with an external teacher
    max_train_examples: int | None = None
    max_length: int | None = None
    pooling: str = "mean"
    cache_gb: float = 4.0
    cache_dir: Path | None = None  # where an over-cap cache spills (default: the system temp dir)
    source: dict = field(default_factory=dict)  # recorded in task.json: recipe and data sha256
    recipe: dict | None = None  # a new recipe.json to publish with the task (None: keep the folder's)
    train_config: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class CheckedJob:
    """A job whose every option was checked against the backbone, with defaults filled in."""

    job: TaskJob
    lo: int
    hi: int
    max_length: int

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
    times: dict[str, float] = field(default_factory=dict)

    def new_head(self, attach: int, layers: int) -> TaskHead:
        job = self.checked.job
        _, head = init_task(self.backbone, job.name, job.kind, self.labels, attach, layers,
                            input="pair" if job.columns.pair else "single", max_length=self.checked.max_length,
                            pooling=job.pooling, seed=self.checked.tc.seed)
        return head

    def train_branch(self, head: TaskHead, desc: str, soft: np.ndarray | None = None) -> tuple[TaskHead, dict]:
        return train_branch(head, self.caches[0], self.train.targets, self.caches[1], self.dev.targets,
                            self.checked.tc, desc, soft=soft)

    def trainer(self, head: TaskHead, desc: str) -> BranchTrainer:
        """A resumable training of `head` on the run's caches (the teacher search interleaves them)."""
        return BranchTrainer(head, self.caches[0], self.train.targets, self.caches[1], self.dev.targets,
                             self.checked.tc, desc)
