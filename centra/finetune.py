"""Partial fine-tuning: train a branch (top layers + head) over cached frozen-trunk activations.

A teacher that trains the top L of N layers is a branch attached at layer N - L with L task layers,
so teachers and students share one training loop. The frozen part is computed once: the cache holds
every example's hidden state at one trunk layer and climbs one layer at a time (one forward pass
each), so a search over L = MAX..MIN never recomputes the frozen bottom per epoch.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from centra.backbone import Backbone, attention_bias
from centra.engine import Encoded
from centra.metrics import compute
from centra.task import TaskHead


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


class ActivationCache:
    """Hidden states of every example at trunk layer `layer` (0 = embeddings), unpadded.

    Rows live in one flat (tokens, H) fp32 array: in memory up to `cap_bytes`, else a memory-mapped
    file under `spill_dir`.
    """

    def __init__(self, backbone: Backbone, enc: Encoded, pad_id: int, cap_bytes: int,
                 spill_dir: Path | None = None, desc: str = "cache", progress: bool = True):
        self.backbone, self.enc, self.pad_id, self.desc, self.progress = backbone, enc, pad_id, desc, progress
        lengths = np.array([len(x) for x in enc.input_ids])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.lengths = lengths
        shape = (int(self.offsets[-1]), backbone.cfg.hidden_size)
        self.nbytes = shape[0] * shape[1] * 4
        if self.nbytes <= cap_bytes or spill_dir is None:
            self.store = torch.empty(shape, dtype=torch.float32)
            self.spilled = None
        else:
            fd, name = tempfile.mkstemp(prefix=".activations-", suffix=".f32", dir=spill_dir)
            os.close(fd)  # np.memmap opens the file itself
            self.spilled = Path(name)
            self.store = torch.from_numpy(np.memmap(name, dtype=np.float32, mode="w+", shape=shape))
        self.cap_bytes = cap_bytes
        self.snapshots: dict[int, torch.Tensor] = {}
        self.layer = -1
        self.seconds = 0.0
        self.layer_seconds: list[float] = []

    def close(self) -> None:
        self.snapshots.clear()
        if self.spilled is not None:
            del self.store
            self.spilled.unlink(missing_ok=True)

    def rows_in_batches(self, batch_size: int = 64) -> list[list[int]]:
        order = np.argsort(self.lengths, kind="stable").tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def _write(self, rows: list[int], hidden: torch.Tensor) -> None:
        for i, r in enumerate(rows):
            self.store[self.offsets[r]:self.offsets[r + 1]] = hidden[i, : self.lengths[r]]

    @torch.inference_mode()
    def build(self, layer: int) -> None:
        """Compute states at `layer` from the token ids (embeddings + layers 1..layer)."""
        start = time.perf_counter()
        bb = self.backbone.eval()
        for rows in tqdm(self.rows_in_batches(), desc=f"{self.desc}: trunk to layer {layer}",
                         disable=not self.progress, leave=False):
            ids, mask, types = self.enc.batch(rows, self.pad_id)
            bias = attention_bias(mask)
            hidden = bb.embeddings(ids, types)
            for lay in bb.layers[:layer]:
                hidden = lay(hidden, bias)
            self._write(rows, hidden)
        self.layer = layer
        self.seconds += time.perf_counter() - start

    @torch.inference_mode()
    def advance_to(self, layer: int) -> None:
        """Move the cache up to `layer`, one frozen layer pass at a time. Going down restores a
        snapshot kept on the way up (while they fit under the cap), else rebuilds."""
        if layer in self.snapshots and layer != self.layer:
            self.store.copy_(self.snapshots[layer])
            self.layer = layer
            return
        if layer < self.layer or self.layer < 0:
            self.build(layer)
            return
        while self.layer < layer:
            if self.spilled is None and (len(self.snapshots) + 2) * self.nbytes <= self.cap_bytes:
                self.snapshots[self.layer] = self.store.clone()
            start = time.perf_counter()
            lay = self.backbone.layers[self.layer].eval()
            for rows in tqdm(self.rows_in_batches(), desc=f"{self.desc}: layer {self.layer + 1}",
                             disable=not self.progress, leave=False):
                hidden, mask = self.batch(rows)
                self._write(rows, lay(hidden, attention_bias(mask)))
            self.layer += 1
            took = time.perf_counter() - start
            self.layer_seconds.append(took)
            self.seconds += took

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (B, T, H) states and the (B, T) mask of the given examples."""
        width = int(self.lengths[rows].max())
        hidden = torch.zeros((len(rows), width, self.store.shape[1]), dtype=torch.float32)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = int(self.lengths[r])
            hidden[i, :n] = self.store[self.offsets[r]:self.offsets[r + 1]]
            mask[i, :n] = 1
        return hidden, mask


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
    for rows in tqdm(cache.rows_in_batches(batch_size), desc=desc, disable=desc is None, leave=False):
        hidden, mask = cache.batch(rows)
        out[rows] = head(hidden, attention_bias(mask), mask).numpy()
    return out


def evaluate(head: TaskHead, cache: ActivationCache, targets: list) -> dict:
    return compute(head.spec.kind, predict_cache(head, cache), targets, head.spec.thresholds)


def train_branch(head: TaskHead, train: ActivationCache, train_targets: list, dev: ActivationCache,
                 dev_targets: list, cfg: TrainConfig, desc: str, soft: np.ndarray | None = None
                 ) -> tuple[TaskHead, dict]:
    """Train a branch attached at the caches' layer; keep the epoch best on dev. Returns (head, log)."""
    assert train.layer == dev.layer == head.spec.attach_layer, "caches must sit at the attach layer"
    kind = head.spec.kind
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = head.train().requires_grad_(True)
    head_params = [p for n, p in head.named_parameters() if not n.startswith("layers.")]
    layer_params = [p for n, p in head.named_parameters() if n.startswith("layers.")]
    groups = [{"params": layer_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_targets) / cfg.batch_size)
    warm = max(1, int(cfg.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    targets = _target_tensor(kind, train_targets)
    soft_t = torch.from_numpy(soft) if soft is not None else None
    n_train = sum(p.numel() for p in head.parameters())
    log = {"trainable_parameters": n_train, "epochs": [], "losses": []}
    best, best_score, start = None, -math.inf, time.perf_counter()
    for epoch in range(cfg.epochs):
        head.train()
        bar = tqdm(make_batches(train.lengths, cfg.batch_size, gen), disable=not cfg.progress, leave=False,
                   desc=f"{desc} epoch {epoch + 1}/{cfg.epochs} ({n_train / 1e6:.1f}M trainable)")
        total = 0.0
        for rows in bar:
            hidden, mask = train.batch(rows)
            logits = head(hidden, attention_bias(mask), mask)
            loss = loss_fn(kind, logits, targets[rows], soft_t[rows] if soft_t is not None else None,
                           cfg.alpha, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item()
            log["losses"].append(round(loss.item(), 6))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        scores = evaluate(head, dev, dev_targets)
        log["epochs"].append({"epoch": epoch + 1, "train_loss": total / max(1, len(bar)), **scores})
        if best is None or scores[cfg.metric] > best_score:
            best_score, best = scores[cfg.metric], copy.deepcopy(head.state_dict())
    head.load_state_dict(best)
    log["dev"] = next((e for e in log["epochs"] if e[cfg.metric] == best_score), log["epochs"][-1])
    log["seconds"] = round(time.perf_counter() - start, 2)
    return head.eval().requires_grad_(False), log
