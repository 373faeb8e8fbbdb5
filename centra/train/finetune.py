"""Partial fine-tuning: train a branch (top layers + head) over cached frozen-trunk activations.

A teacher that trains the top L of N layers is a branch attached at layer N - L with L task layers,
so teachers and students share one training loop. The frozen part is computed once: the cache holds
every example's hidden state at one trunk layer and climbs one layer at a time (one forward pass
each), so a search over L = MAX..MIN never recomputes the frozen bottom per epoch.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from centra.core.backbone import attention_bias
from centra.core.task import TaskHead
from centra.errors import CentraError
from centra.progress import progress_bar, progress_line
from centra.train.cache import ActivationCache
from centra.train.metrics import compute


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0
    metric: str | None = None  # None: the kind's default (metrics.DEFAULT_METRIC)
    alpha: float = 1.0
    temperature: float = 2.0
    progress: bool = True

    def check(self) -> None:
        """Refuse settings that cannot train, before any compute (one line each)."""
        if self.epochs < 1:
            raise CentraError(f"--epochs must be >= 1, not {self.epochs}")
        if self.batch_size < 1:
            raise CentraError(f"--batch-size must be >= 1, not {self.batch_size}")
        for flag, value in (("--lr", self.lr), ("--head-lr", self.head_lr), ("--temperature", self.temperature)):
            if not value > 0 or not math.isfinite(value):
                raise CentraError(f"{flag} must be a positive number, not {value}")
        if not self.alpha >= 0 or not math.isfinite(self.alpha):
            raise CentraError(f"--alpha must be >= 0, not {self.alpha}")
        if not 0 <= self.weight_decay < 1 or not 0 <= self.warmup <= 1:
            raise CentraError("weight decay must be in [0, 1) and warm-up in [0, 1]")


def param_groups(head: TaskHead, cfg: TrainConfig) -> list[dict]:
    """Task layers at cfg.lr, pooler + classifier at cfg.head_lr; weight decay on matrices only
    (never on biases or LayerNorm weights)."""
    groups = []
    for is_layer, lr in ((True, cfg.lr), (False, cfg.head_lr)):
        params = [(n, p) for n, p in head.named_parameters() if p.requires_grad and n.startswith("layers.") == is_layer]
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def loss_fn(kind: str, logits: torch.Tensor, target: torch.Tensor, soft: torch.Tensor | None,
            alpha: float, temperature: float) -> torch.Tensor:
    """Hard loss + alpha * F^2 * KL(teacher || student) at temperature F (Qualtrics eq. 2)."""
    if kind == "multiclass":
        loss = F.cross_entropy(logits, target)
        if soft is not None:
            kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(soft / temperature, -1),
                          log_target=True, reduction="batchmean")
            loss = loss + alpha * temperature**2 * kl
    elif kind == "multilabel":
        loss = F.binary_cross_entropy_with_logits(logits, target)
        if soft is not None:
            q = torch.sigmoid(soft / temperature)
            log_p, log_1p = F.logsigmoid(logits / temperature), F.logsigmoid(-logits / temperature)
            log_q, log_1q = F.logsigmoid(soft / temperature), F.logsigmoid(-soft / temperature)
            kl = (q * (log_q - log_p) + (1 - q) * (log_1q - log_1p)).mean()
            loss = loss + alpha * temperature**2 * kl
    else:
        loss = F.mse_loss(logits[:, 0], target)
        if soft is not None:
            loss = loss + alpha * F.mse_loss(logits[:, 0], soft[:, 0])
    return loss


def make_batches(lengths: np.ndarray, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort within chunks of 50 batches, shuffle batches."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda r: lengths[r])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def _target_tensor(kind: str, targets: list) -> torch.Tensor:
    if kind == "multiclass":
        return torch.tensor(targets, dtype=torch.long)
    return torch.tensor(targets, dtype=torch.float32)


@torch.inference_mode()
def predict_cache(head: TaskHead, cache: ActivationCache, batch_size: int = 128, desc: str | None = None
                  ) -> np.ndarray:
    """Logits of every cached example, in example order (a progress bar when `desc` is given)."""
    head.eval()
    out = np.zeros((len(cache.lengths), head.spec.num_outputs), dtype=np.float32)
    for rows in progress_bar(cache.rows_in_batches(batch_size), desc or "", desc is not None):
        hidden, mask = cache.batch(rows)
        out[rows] = head(hidden, attention_bias(mask), mask).numpy()
    return out


def evaluate(head: TaskHead, cache: ActivationCache, targets: list) -> dict:
    return compute(head.spec.kind, predict_cache(head, cache), targets, head.spec.thresholds)


def train_branch(head: TaskHead, train: ActivationCache, train_targets: list, dev: ActivationCache,
                 dev_targets: list, cfg: TrainConfig, desc: str, soft: np.ndarray | None = None
                 ) -> tuple[TaskHead, dict]:
    """Train a branch attached at the caches' layer; keep the epoch best on dev. Returns (head, log)."""
    trainer = BranchTrainer(head, train, train_targets, dev, dev_targets, cfg, desc, soft)
    trainer.run(cfg.epochs)
    return trainer.finish()


class BranchTrainer:
    """One branch's training, resumable epoch by epoch: `run(k)` trains k more epochs of the cfg.epochs
    schedule (optimizer, learning-rate schedule, batch order and dropout RNG carried over), so a search
    can interleave several branches and a branch trained in pieces ends exactly as one trained straight
    through. The caches must sit at the branch's attach layer whenever it runs."""

    def __init__(self, head: TaskHead, train: ActivationCache, train_targets: list, dev: ActivationCache,
                 dev_targets: list, cfg: TrainConfig, desc: str, soft: np.ndarray | None = None):
        self.head, self.train, self.dev, self.dev_targets = head, train, dev, dev_targets
        self.cfg, self.desc = cfg, desc
        torch.manual_seed(cfg.seed)
        self.rng = torch.get_rng_state()  # dropout's stream, restored whenever this branch resumes
        self.gen = torch.Generator().manual_seed(cfg.seed)
        head.train().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(param_groups(head, cfg))
        steps = cfg.epochs * math.ceil(len(train_targets) / cfg.batch_size)
        warm = max(1, int(cfg.warmup * steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
        self.targets = _target_tensor(head.spec.kind, train_targets)
        self.soft = torch.from_numpy(soft) if soft is not None else None
        self.n_train = sum(p.numel() for p in head.parameters())
        self.log: dict = {"trainable_parameters": self.n_train, "epochs": [], "losses": []}
        self.best: dict | None = None
        self.best_score = -math.inf
        self.seconds = 0.0

    @property
    def epochs_done(self) -> int:
        return len(self.log["epochs"])

    def run(self, epochs: int) -> float:
        """Train up to `epochs` more epochs (never past cfg.epochs); return the best dev score so far."""
        head, cfg = self.head, self.cfg
        assert self.train.layer == self.dev.layer == head.spec.attach_layer, "caches must sit at the attach layer"
        start = time.perf_counter()
        torch.set_rng_state(self.rng)
        head.train().requires_grad_(True)
        for epoch in range(self.epochs_done, min(cfg.epochs, self.epochs_done + epochs)):
            self._epoch(epoch)
        self.rng = torch.get_rng_state()
        self.seconds += time.perf_counter() - start
        return self.best_score

    def _epoch(self, epoch: int) -> None:
        head, cfg, log = self.head, self.cfg, self.log
        head.train()
        epoch_start = time.perf_counter()
        batches = make_batches(self.train.lengths, cfg.batch_size, self.gen)
        bar = progress_bar(batches, f"{self.desc} epoch {epoch + 1}/{cfg.epochs} ({self.n_train / 1e6:.1f}M "
                           "trainable)", cfg.progress)
        total = 0.0
        for rows in bar:
            hidden, mask = self.train.batch(rows)
            logits = head(hidden, attention_bias(mask), mask)
            loss = loss_fn(head.spec.kind, logits, self.targets[rows],
                           self.soft[rows] if self.soft is not None else None, cfg.alpha, cfg.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            self.optimizer.step()
            self.schedule.step()
            total += loss.item()
            log["losses"].append(round(loss.item(), 6))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        scores = evaluate(head, self.dev, self.dev_targets)
        log["epochs"].append({"epoch": epoch + 1, "train_loss": total / max(1, len(batches)), **scores})
        progress_line(f"{self.desc} epoch {epoch + 1}/{cfg.epochs}: train loss {total / max(1, len(batches)):.4f}, "
                      f"dev {cfg.metric} {100 * scores[cfg.metric]:.2f} ({time.perf_counter() - epoch_start:.1f} s)",
                      cfg.progress)
        if self.best is None or scores[cfg.metric] > self.best_score:
            self.best_score, self.best = scores[cfg.metric], copy.deepcopy(head.state_dict())

    def finish(self) -> tuple[TaskHead, dict]:
        """The head at its best epoch on dev, frozen, and its log; the optimizer state is dropped."""
        cfg, log = self.cfg, self.log
        self.head.load_state_dict(self.best)
        log["dev"] = next((e for e in log["epochs"] if e[cfg.metric] == self.best_score), log["epochs"][-1])
        log["seconds"] = round(self.seconds, 2)
        self.optimizer = self.schedule = None  # type: ignore[assignment]
        return self.head.eval().requires_grad_(False), log
