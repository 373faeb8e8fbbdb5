"""The activation cache: every example's hidden state at one frozen trunk layer, computed once.

A teacher search over L = MAX..MIN climbs the cache one layer at a time (one forward pass of one
layer each) instead of recomputing the frozen bottom every epoch. All caches of a run draw memory
from one `CacheBudget` (the `cache_gb` setting): the train and dev caches and the snapshots kept for going back
down share the cap, and a cache that does not fit spills to a memory-mapped file.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from centra.core.backbone import Backbone, attention_bias
from centra.core.tokens import Encoded
from centra.progress import progress_bar, progress_line, work_done
from centra.train.precision import autocast_for


class CacheBudget:
    """Bytes of memory the caches of one run may hold, all together."""

    def __init__(self, cap_bytes: int):
        self.cap = int(cap_bytes)
        self.used = 0
        self.peak = 0

    def reserve(self, nbytes: int) -> bool:
        if self.used + nbytes > self.cap:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


def batches_by_length(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar lengths, shortest first (passes that need no shuffling)."""
    order = np.argsort(lengths, kind="stable").tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class ActivationCache:
    """Hidden states of every example at trunk layer `layer` (0 = embeddings), unpadded.

    Rows live in one flat (tokens, H) array of `dtype` (fp32, or bf16 when training in bf16: the trunk
    then runs under bf16 autocast too): in memory while the budget allows, else a memory-mapped file
    under `spill_dir`.
    """

    def __init__(self, backbone: Backbone, enc: Encoded, pad_id: int, budget: CacheBudget | int,
                 spill_dir: Path | None = None, desc: str = "cache", progress: bool = True,
                 dtype: torch.dtype = torch.float32):
        self.backbone, self.enc, self.pad_id, self.desc, self.progress = backbone, enc, pad_id, desc, progress
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"a cache holds fp32 or bf16, not {dtype}")
        self.dtype = dtype
        self.budget = budget if isinstance(budget, CacheBudget) else CacheBudget(budget)
        lengths = np.array([len(x) for x in enc.input_ids])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.lengths = lengths
        shape = (int(self.offsets[-1]), backbone.cfg.hidden_size)
        self.nbytes = shape[0] * shape[1] * dtype.itemsize
        self.spilled: Path | None = None
        self.reserved = 0
        fits = self.budget.reserve(self.nbytes)
        if fits or spill_dir is None:  # without a spill folder it stays in memory, over the cap
            self.reserved = self.nbytes if fits else 0
            self.store = torch.empty(shape, dtype=dtype)
        else:
            bf16 = dtype == torch.bfloat16
            fd, name = tempfile.mkstemp(prefix=".activations-", suffix=".bf16" if bf16 else ".f32", dir=spill_dir)
            os.close(fd)  # np.memmap opens the file itself
            self.spilled = Path(name)
            # numpy has no bf16: the file's 16-bit words, seen by torch as bf16
            mapped = torch.from_numpy(np.memmap(name, dtype=np.uint16 if bf16 else np.float32, mode="w+",
                                                shape=shape))
            self.store = mapped.view(torch.bfloat16) if bf16 else mapped
        self.snapshots: dict[int, torch.Tensor] = {}
        self.layer = -1
        self.seconds = 0.0
        self.layer_seconds: list[float] = []

    def close(self) -> None:
        """Free the memory (and the budget it held); delete the spill file."""
        for _ in self.snapshots:
            self.budget.release(self.nbytes)
        self.snapshots.clear()
        self.budget.release(self.reserved)
        self.reserved = 0
        if self.spilled is not None:
            del self.store
            self.spilled.unlink(missing_ok=True)

    def rows_in_batches(self, batch_size: int = 64) -> list[list[int]]:
        return batches_by_length(self.lengths, batch_size)

    def _write(self, rows: list[int], hidden: torch.Tensor) -> None:
        for i, r in enumerate(rows):
            self.store[self.offsets[r]:self.offsets[r + 1]] = hidden[i, : self.lengths[r]]

    @torch.inference_mode()
    def build(self, layer: int) -> None:
        """Compute states at `layer` from the token ids (embeddings + layers 1..layer)."""
        start = time.perf_counter()
        bb = self.backbone.eval()
        with autocast_for(self.dtype):
            for rows in progress_bar(self.rows_in_batches(), f"{self.desc}: trunk to layer {layer}", self.progress):
                ids, mask, types = self.enc.batch(rows, self.pad_id)
                bias = attention_bias(mask)
                hidden = bb.embeddings(ids, types)
                for lay in bb.layers[:layer]:
                    hidden = lay(hidden, bias)
                self._write(rows, hidden)
                work_done(layer * len(rows))
        self.layer = layer
        took = time.perf_counter() - start
        self.seconds += took
        progress_line(f"{self.desc} cache: {len(self.lengths)} examples to layer {layer} in {took:.1f} s "
                      f"({self.nbytes / 2**20:.0f} MiB{', on disk' if self.spilled else ''})", self.progress)

    @torch.inference_mode()
    def advance_to(self, layer: int) -> None:
        """Move the cache up to `layer`, one frozen layer pass at a time. Going down restores a
        snapshot kept on the way up (while the budget allows), else rebuilds."""
        if layer in self.snapshots and layer != self.layer:
            self.store.copy_(self.snapshots[layer])
            self.layer = layer
            return
        if layer < self.layer or self.layer < 0:
            self.build(layer)
            return
        while self.layer < layer:
            if self.spilled is None and self.layer not in self.snapshots and self.budget.reserve(self.nbytes):
                self.snapshots[self.layer] = self.store.clone()
            start = time.perf_counter()
            lay = self.backbone.layers[self.layer].eval()
            with autocast_for(self.dtype):
                for rows in progress_bar(self.rows_in_batches(), f"{self.desc}: layer {self.layer + 1}",
                                         self.progress):
                    hidden, mask = self.batch(rows)
                    self._write(rows, lay(hidden, attention_bias(mask)))
                    work_done(len(rows))
            self.layer += 1
            took = time.perf_counter() - start
            self.layer_seconds.append(took)
            self.seconds += took
            progress_line(f"{self.desc} cache: climbed to layer {self.layer} in {took:.1f} s", self.progress)

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (B, T, H) states (in the cache's dtype) and the (B, T) mask of the given examples."""
        width = int(self.lengths[rows].max())
        hidden = torch.zeros((len(rows), width, self.store.shape[1]), dtype=self.dtype)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = int(self.lengths[r])
            hidden[i, :n] = self.store[self.offsets[r]:self.offsets[r + 1]]
            mask[i, :n] = 1
        return hidden, mask
