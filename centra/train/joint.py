"""Students l = 1..n of one teacher trained as one: the joint student (the `students` setting).

The mixed allocation compares students with l = 1, 2, 3 task layers, each starting from its teacher's
first l layers, pooler and classifier, and serves the smallest within `threshold` dev points of one more
layer. Trained one by one that is 1 + 2 + 3 = 6 layers of training (3 when l = 3 is not reached).
Trained jointly it is n = 3: one student of n task layers with an exit after each of them (pooling, pooler
and classifier, each starting from the teacher's), on the sum of the exits' losses from each batch read.
Each exit keeps its own best epoch on dev and is published as an ordinary student (its first l layers and
its exit), so merging, serving and `centra plan` see no difference. What differs: an exit's layers also
serve the exits above them, so it is not the student it would be alone (docs/results.md measures how far).
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from torch import nn

from centra.core.task import TaskHead, TaskSpec
from centra.progress import progress_line
from centra.train.cache import ActivationCache
from centra.train.finetune import BranchTrainer, TrainConfig, dev_scores, loss_fn, predict_outputs, selection_score


class JointStudent(nn.Module):
    """Exits 1..n over n shared task layers: exit l reads the output of layer l. `exits[l - 1]` is a
    TaskHead of l layers whose layers are the deepest exit's first l (the same modules)."""

    def __init__(self, exits: list[TaskHead]):
        super().__init__()
        if [e.spec.task_layers for e in exits] != list(range(1, len(exits) + 1)):
            raise ValueError("a joint student's exits have 1, 2, ... n task layers, in order")
        deepest = exits[-1]
        for head in exits[:-1]:
            head.layers = nn.ModuleList(deepest.layers[: head.spec.task_layers])
        self.exits = nn.ModuleList(exits)

    @property
    def spec(self) -> TaskSpec:
        """The deepest exit's spec: the kind, the attach layer and the task layers trained."""
        return self.exits[-1].spec

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, the shared layers computed once."""
        out = []
        for layer, head in zip(self.exits[-1].layers, self.exits):
            hidden = layer(hidden, bias)
            out.append(head.readout(hidden, mask))
        return out


class JointTrainer(BranchTrainer):
    """BranchTrainer over a JointStudent: one optimizer over the shared layers and every exit, the sum of
    the exits' losses per batch, and per exit its dev scores every epoch and its own best epoch."""

    head: JointStudent

    def __init__(self, joint: JointStudent, train: ActivationCache, train_targets: list, dev: ActivationCache,
                 dev_targets: list, cfg: TrainConfig, desc: str, soft: np.ndarray | None = None):
        super().__init__(joint, train, train_targets, dev, dev_targets, cfg, desc, soft)  # type: ignore[arg-type]
        exits = joint.exits
        self.exit_logs = [{"trainable_parameters": sum(p.numel() for p in head.parameters()), "epochs": []}
                          for head in exits]
        self.exit_best: list[dict | None] = [None] * len(exits)
        self.exit_scores = [-math.inf] * len(exits)

    def run(self, epochs: float) -> float:
        """Train `epochs` more whole epochs: a joint student is scored at epoch ends only (the search's
        mid-epoch cuts are for teachers)."""
        if epochs != int(epochs):
            raise ValueError(f"a joint student trains whole epochs, not {epochs}")
        return super().run(epochs)

    def _loss(self, logits: list[torch.Tensor], rows: list[int]) -> torch.Tensor:  # type: ignore[override]
        target, soft = self.targets[rows], self.soft[rows] if self.soft is not None else None
        return sum(loss_fn(self.kind, out.float(), target, soft, self.cfg.alpha, self.cfg.temperature)
                   for out in logits)

    def _end_epoch(self, epoch: int) -> None:
        cfg, start = self.cfg, time.perf_counter()
        loss = self.epoch_loss / self.steps_per_epoch
        shown = []
        for i, (head, logits) in enumerate(zip(self.head.exits, predict_outputs(self.head, self.dev))):
            scores = dev_scores(self.kind, logits, self.dev_targets, head.spec.thresholds, cfg.tuning)
            self.exit_logs[i]["epochs"].append({"epoch": epoch + 1, "train_loss": loss, **scores})
            score = selection_score(self.kind, scores, cfg.metric)
            if self.exit_best[i] is None or score > self.exit_scores[i]:
                self.exit_scores[i], self.exit_best[i] = score, copy.deepcopy(head.state_dict())
                self.exit_logs[i]["best_epoch"] = epoch + 1
            shown.append(f"l={i + 1} {100 * score:.2f}")
        self.log["epochs"].append({"epoch": epoch + 1, "train_loss": loss})  # epochs_done counts these
        self.best_score = self.exit_scores[-1]
        tuned = " (tuned)" if self.kind == "multilabel" else ""
        progress_line(f"{self.desc} epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, dev {cfg.metric}{tuned} "
                      f"{', '.join(shown)} ({self.epoch_seconds + time.perf_counter() - start:.1f} s)", cfg.progress)

    def finish(self) -> list[tuple[TaskHead, dict]]:  # type: ignore[override]
        """Each exit on its own (its first l layers copied out of the shared ones) at its best epoch, and its
        log: its dev scores, the joint loss, and the joint student's seconds and task layers (`joint`)."""
        if not self.epochs_done:
            raise RuntimeError("a joint student is trained at least one epoch before it is finished")
        out = []
        for head, best, log in zip(self.head.exits, self.exit_best, self.exit_logs):
            alone = copy.deepcopy(head)
            alone.load_state_dict(best)
            log.update(losses=self.log["losses"], dev=log["epochs"][log["best_epoch"] - 1],
                       epochs_trained=round(self.epochs_trained, 4), seconds=round(self.seconds, 2),
                       joint=self.head.spec.task_layers)
            out.append((alone.eval().requires_grad_(False), log))
        self.optimizer = self.schedule = None  # type: ignore[assignment]
        return out


def train_joint(joint: JointStudent, train: ActivationCache, train_targets: list, dev: ActivationCache,
                dev_targets: list, cfg: TrainConfig, desc: str, soft: np.ndarray | None = None
                ) -> list[tuple[TaskHead, dict]]:
    """Train the joint student cfg.epochs; return each exit (l = 1..n) at its best epoch, with its log."""
    trainer = JointTrainer(joint, train, train_targets, dev, dev_targets, cfg, desc, soft)
    trainer.run(cfg.epochs)
    return trainer.finish()
