"""Partial fine-tuning: train a branch (top layers + head) over cached frozen-trunk activations.

A teacher that trains the top L of N layers is a branch attached at layer N - L with L task layers,
so teachers and students share one training loop. The frozen part is computed once: the cache holds
every example's hidden state at one trunk layer and climbs one layer at a time (one forward pass
each), so a search over L = MAX..MIN never recomputes the frozen bottom per epoch. (The full
fine-tuning reference, whose embeddings train too, feeds the same loop token ids: train/reference.py.)

A multilabel branch is served at per-label thresholds tuned on dev, so it is also chosen at them: its
best epoch, the search's L and the mixed allocation's student all compare `selection_score`, the
metric at tuned thresholds (the metrics at 0.5 are still logged and reported).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from centra.core.backbone import attention_bias
from centra.core.task import TaskHead
from centra.progress import progress_bar, progress_line, work_done
from centra.train.cache import ActivationCache
from centra.train.metrics import compute
from centra.train.precision import autocast, autocast_for, resolve
from centra.train.settings import Settings
from centra.train.thresholds import Tuning, tune_logits

_DEFAULT = Settings()


@dataclass(frozen=True)
class TrainConfig:
    """What the training loop reads: settings (their defaults declared in centra.train.settings, their
    checks made there before any compute) and two optimizer constants."""

    epochs: int = _DEFAULT.epochs
    batch_size: int = _DEFAULT.batch_size
    lr: float = _DEFAULT.lr
    head_lr: float = _DEFAULT.head_lr
    weight_decay: float = 0.01
    warmup: float = 0.1  # the share of the steps over which the learning rate climbs
    seed: int = _DEFAULT.seed
    metric: str | None = _DEFAULT.metric  # None: the kind's default (metrics.DEFAULT_METRIC)
    alpha: float = _DEFAULT.alpha
    temperature: float = _DEFAULT.temperature
    tuning: Tuning = Tuning()  # multilabel: how thresholds are tuned and scored (the job's settings)
    precision: str = _DEFAULT.precision  # of the training steps (centra.train.precision); dev is scored in fp32
    progress: bool = True

    @classmethod
    def of(cls, source: object) -> TrainConfig:
        """The config taking every field of that name from `source` (a job or settings), the rest default."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)})


HEAD_MODULES = ("pooler", "classifier")  # trained at cfg.head_lr; everything else at cfg.lr


def param_groups(head: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Transformer layers (and the reference's embeddings) at cfg.lr, pooler + classifier at
    cfg.head_lr; weight decay on matrices only (never on biases or LayerNorm weights)."""
    groups = []
    for is_layer, lr in ((True, cfg.lr), (False, cfg.head_lr)):
        params = [(n, p) for n, p in head.named_parameters()
                  if p.requires_grad and (n.split(".")[-2] not in HEAD_MODULES) == is_layer]
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW, fused where torch has it (CPU since torch 2.4, CUDA): one kernel over every parameter instead
    of a loop of small ops per tensor. On a 4-layer MiniLM branch its step took ~20 ms against ~260 ms; it
    differs from the loop by float rounding only (2e-7 after 20 steps) and is as reproducible."""
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a torch or device without the fused kernel
        return torch.optim.AdamW(groups)


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


def predict_cache(head: TaskHead, cache: ActivationCache, batch_size: int = 128, desc: str | None = None
                  ) -> np.ndarray:
    """Logits of every cached example, in example order (a progress bar when `desc` is given)."""
    return predict_outputs(head, cache, batch_size, desc)[0]


@torch.inference_mode()
def predict_outputs(module: torch.nn.Module, cache: ActivationCache, batch_size: int = 128,
                    desc: str | None = None) -> list[np.ndarray]:
    """predict_cache for a module that gives one tensor of logits (a TaskHead) or a list of them (a joint
    student's exits, train/joint.py): one array per output, in example order."""
    module.eval()
    outs: list[np.ndarray] = []
    with autocast_for(getattr(cache, "dtype", torch.float32)):  # a bf16 cache is read in bf16
        for rows in progress_bar(cache.rows_in_batches(batch_size), desc or "", desc is not None):
            hidden, mask = cache.batch(rows)
            got = module(hidden, attention_bias(mask), mask)
            got = [got] if isinstance(got, torch.Tensor) else got
            if not outs:
                outs = [np.zeros((len(cache.lengths), g.shape[-1]), dtype=np.float32) for g in got]
            for out, logits in zip(outs, got, strict=True):
                out[rows] = logits.float().numpy()
            work_done(module.spec.task_layers * len(rows))
    return outs or [np.zeros((0, module.spec.num_outputs), dtype=np.float32)]  # no examples: no batch


def dev_scores(kind: str, logits: np.ndarray, targets: list, thresholds: list[float] | None = None,
               tuning: Tuning | None = None) -> dict:
    """Every metric of the kind; a multilabel task's also the thresholds tuned on these logits
    ("thresholds": the branch is served at the ones of its best epoch), the metrics at thresholds
    cross-fitted on them ("tuned", held out), in-sample at the thresholds ("fit") and the labels per text."""
    scores = compute(kind, logits, targets, thresholds)
    if kind == "multilabel":
        found = tune_logits(logits, targets, tuning)
        scores["tuned"], scores["thresholds"] = found["tuned"], found["values"]
        scores.update({k: found[k] for k in ("fit", "labels_per_text", "guard") if k in found})
    return scores


def selection_score(kind: str, scores: dict, metric: str) -> float:
    """What chooses between epochs, teachers and students: the dev metric as the task will be served
    (a multilabel task at its tuned thresholds)."""
    return float((scores["tuned"] if kind == "multilabel" else scores)[metric])


def evaluate(head: TaskHead, cache: ActivationCache, targets: list, cfg: TrainConfig | None = None) -> dict:
    return dev_scores(head.spec.kind, predict_cache(head, cache), targets, head.spec.thresholds,
                      (cfg or TrainConfig()).tuning)


def train_branch(head: TaskHead, train: ActivationCache, train_targets: list, dev: ActivationCache,
                 dev_targets: list, cfg: TrainConfig, desc: str, soft: np.ndarray | None = None
                 ) -> tuple[TaskHead, dict]:
    """Train a branch attached at the caches' layer; keep the epoch best on dev. Returns (head, log)."""
    trainer = BranchTrainer(head, train, train_targets, dev, dev_targets, cfg, desc, soft)
    trainer.run(cfg.epochs)
    return trainer.finish()


class BranchTrainer:
    """One branch's training, resumable at any step: `run(e)` trains e more epochs of the cfg.epochs
    schedule, a fraction of an epoch stopping mid-epoch (optimizer, learning-rate schedule, batch order,
    position in the epoch and dropout RNG carried over), so a search can interleave several branches
    and a branch trained in pieces ends exactly as one trained straight through. The best epoch is
    chosen at epoch ends only. The caches must sit at the branch's attach layer whenever it runs."""

    def __init__(self, head: TaskHead, train: ActivationCache, train_targets: list, dev: ActivationCache,
                 dev_targets: list, cfg: TrainConfig, desc: str, soft: np.ndarray | None = None):
        self.head, self.train, self.dev, self.dev_targets = head, train, dev, dev_targets
        self.cfg, self.desc, self.kind = cfg, desc, head.spec.kind
        self.precision = resolve(cfg.precision)
        torch.manual_seed(cfg.seed)
        self.rng = torch.get_rng_state()  # dropout's stream, restored whenever this branch resumes
        self.gen = torch.Generator().manual_seed(cfg.seed)
        head.train().requires_grad_(True)
        self.optimizer = adamw(param_groups(head, cfg))
        self.steps_per_epoch = math.ceil(len(train_targets) / cfg.batch_size)
        steps = cfg.epochs * self.steps_per_epoch
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
        self.steps = 0  # optimizer steps taken
        self.batches: list[list[int]] = []  # the current epoch's batch order
        self.epoch_loss = 0.0  # its summed loss so far
        self.epoch_seconds = 0.0
        self.partial: dict | None = None  # dev scores taken mid-epoch (a search's first rung), before any epoch ended

    @property
    def epochs_done(self) -> int:
        return len(self.log["epochs"])

    @property
    def epochs_trained(self) -> float:
        """Epochs trained so far, fractional mid-epoch."""
        return self.steps / self.steps_per_epoch

    def run(self, epochs: float) -> float:
        """Train up to `epochs` more epochs (never past cfg.epochs; a fraction stops mid-epoch) and
        return the branch's selection score: its best epoch's, or the current weights' before its first
        epoch has ended."""
        head, cfg = self.head, self.cfg
        assert self.train.layer == self.dev.layer == head.spec.attach_layer, "caches must sit at the attach layer"
        more = epochs * self.steps_per_epoch
        more = max(1, round(more)) if more > 1e-9 else 0  # a first rung of a tiny set still takes a step
        target = min(cfg.epochs * self.steps_per_epoch, self.steps + more)
        start = time.perf_counter()
        torch.set_rng_state(self.rng)
        while self.steps < target:
            self._piece(target)
        self.rng = torch.get_rng_state()
        if not self.epochs_done and (self.partial is None or
                                     self.partial["epochs_trained"] != round(self.epochs_trained, 4)):
            self.partial = {"epochs_trained": round(self.epochs_trained, 4),
                            **evaluate(head, self.dev, self.dev_targets, self.cfg)}
        self.seconds += time.perf_counter() - start
        return self.best_score if self.epochs_done else selection_score(self.kind, self.partial, cfg.metric)

    def _piece(self, target: int) -> None:
        """Train from the current step to `target` or the end of the current epoch, whichever is first."""
        head, cfg, log = self.head, self.cfg, self.log
        epoch, pos = divmod(self.steps, self.steps_per_epoch)
        if pos == 0:
            self.batches = make_batches(self.train.lengths, cfg.batch_size, self.gen)
            assert len(self.batches) == self.steps_per_epoch
            self.epoch_loss = self.epoch_seconds = 0.0
        end = min(self.steps_per_epoch, pos + target - self.steps)
        start = time.perf_counter()
        head.train()
        bar = progress_bar(self.batches[pos:end], f"{self.desc} epoch {epoch + 1}/{cfg.epochs} "
                           f"({self.n_train / 1e6:.1f}M trainable)", cfg.progress, initial=pos,
                           total=self.steps_per_epoch)
        for rows in bar:
            hidden, mask = self.train.batch(rows)
            with autocast(self.precision):  # the loss, its backward and the optimizer step in fp32
                logits = head(hidden, attention_bias(mask), mask)
            loss = self._loss(logits, rows)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            self.optimizer.step()
            self.schedule.step()
            self.steps += 1
            work_done(3 * head.spec.task_layers * len(rows))
            self.epoch_loss += loss.item()
            log["losses"].append(round(loss.item(), 6))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        self.epoch_seconds += time.perf_counter() - start
        if end == self.steps_per_epoch:
            self._end_epoch(epoch)

    def _loss(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The training loss of one batch's logits (hard, plus distillation when a logits table is given)."""
        return loss_fn(self.kind, logits.float(), self.targets[rows], self.soft[rows] if self.soft is not None
                       else None, self.cfg.alpha, self.cfg.temperature)

    def _end_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        scores = evaluate(self.head, self.dev, self.dev_targets, self.cfg)
        loss = self.epoch_loss / self.steps_per_epoch
        self.log["epochs"].append({"epoch": epoch + 1, "train_loss": loss, **scores})
        tuned = f" ({100 * scores['tuned'][cfg.metric]:.2f} tuned)" if "tuned" in scores else ""
        progress_line(f"{self.desc} epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, dev {cfg.metric} "
                      f"{100 * scores[cfg.metric]:.2f}{tuned} "
                      f"({self.epoch_seconds + time.perf_counter() - start:.1f} s)", cfg.progress)
        score = selection_score(self.kind, scores, cfg.metric)
        if self.best is None or score > self.best_score:
            self.best_score, self.best = score, copy.deepcopy(self.head.state_dict())
            self.log["best_epoch"] = epoch + 1

    def finish(self) -> tuple[TaskHead, dict]:
        """The head at its best epoch on dev (or as it stands, when no epoch ended: a search dropped it
        mid-epoch), frozen, and its log; the optimizer state is dropped."""
        log = self.log
        if self.best is not None:
            self.head.load_state_dict(self.best)
            log["dev"] = log["epochs"][log["best_epoch"] - 1]
        else:
            log["dev"] = self.partial or {"epochs_trained": round(self.epochs_trained, 4),
                                          **evaluate(self.head, self.dev, self.dev_targets, self.cfg)}
        log["epochs_trained"] = round(self.epochs_trained, 4)
        log["seconds"] = round(self.seconds, 2)
        self.optimizer = self.schedule = None  # type: ignore[assignment]
        return self.head.eval().requires_grad_(False), log
