"""The engine bench's batches and its clock: the same pre-tokenised batches for every engine, each batch timed.

A *sequence* is one input classified by every task: its text for the single-text tasks and its text pair
for the pair tasks (the two may be unrelated inputs, e.g. an SST-2 sentence and an MRPC pair). A batch
holds, for every token group (tasks that read the same tokens: core.overhead.TokenGroup), one row per
sequence. Two length settings:

- "realistic": each group's rows sorted by their own token length and cut into batches, each padded
  only to its longest row (dynamic padding, as the engine batches);
- "fixed": every batch padded to FIXED_LENGTH tokens (the group's max_length when that is shorter), as a
  server with static input shapes runs.

Texts are tokenised once, before any timing, for every engine alike: the figures are the models' own.
`time_engines` runs engines (measure/bench_engines.py) over the batches and gives one EngineResult each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from centra.core.backbone import EncoderConfig
from centra.core.overhead import token_groups
from centra.core.task import TaskSpec
from centra.core.tokens import encode
from centra.errors import CentraError

FIXED_LENGTH = 128
LENGTHS = ("realistic", "fixed")
CHUNK = 8  # batches an engine runs in a row before the next engine's turn (see `time_engines`)
GroupKey = tuple[str, int]  # (input kind, max_length): TokenGroup.key
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, token_type_ids


@dataclass
class Batch:
    """`size` sequences: per token group, its padded tensors (one row per sequence)."""

    size: int
    groups: dict[GroupKey, Tensors]


BenchEngine = Callable[[Batch], dict[str, torch.Tensor]]


@dataclass
class EngineResult:
    """One engine on one batch size and length setting: whole passes over the same batches."""

    engine: str
    batch: int
    lengths: str
    sequences: int  # sequences run (passes x batches x batch)
    seconds: float  # sum of the batches' latencies
    sequences_per_s: float
    p50_ms: float
    p99_ms: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(self).items()}


def fixed_width(max_length: int) -> int:
    return min(FIXED_LENGTH, max_length)


def pad_to(tensors: Tensors, width: int, pad_id: int) -> Tensors:
    ids, mask, types = tensors
    extra = width - ids.shape[1]
    if extra <= 0:
        return tensors
    pad = torch.nn.functional.pad
    return pad(ids, (0, extra), value=pad_id), pad(mask, (0, extra), value=0), pad(types, (0, extra), value=0)


def make_batches(tokenizer, cfg: EncoderConfig, specs: dict[str, TaskSpec], texts: list[str],
                 pairs: list[tuple[str, str]], batch_size: int, lengths: str) -> list[Batch]:
    """Full batches of `batch_size` sequences (a remainder smaller than a batch is left out): sequence i
    is texts[i] for the single-text groups and pairs[i] for the pair groups."""
    if lengths not in LENGTHS:
        raise CentraError(f"unknown length setting {lengths!r} (known: {', '.join(LENGTHS)})")
    groups = token_groups(specs.values())
    kinds = {group.input for group in groups}
    counts = ([len(texts)] if "single" in kinds else []) + ([len(pairs)] if "pair" in kinds else [])
    n = min(counts, default=0)
    if n < batch_size:
        raise CentraError(f"{n} sequences are fewer than one batch of {batch_size}")
    pad_id = tokenizer.pad_token_id or 0
    per_group: dict[GroupKey, list[Tensors]] = {}
    for group in groups:
        limit = group.max_length if lengths == "realistic" else fixed_width(group.max_length)
        if group.input == "pair":
            enc = encode(tokenizer, cfg.type_vocab_size, [a for a, _ in pairs[:n]], [b for _, b in pairs[:n]], limit)
        else:
            enc = encode(tokenizer, cfg.type_vocab_size, texts[:n], None, limit)
        order = list(range(n))
        if lengths == "realistic":
            order.sort(key=lambda i: len(enc.input_ids[i]))
        chunks = [order[start:start + batch_size] for start in range(0, n - batch_size + 1, batch_size)]
        per_group[group.key] = [enc.batch(chunk, pad_id) if lengths == "realistic" else
                                pad_to(enc.batch(chunk, pad_id), limit, pad_id) for chunk in chunks]
    return [Batch(batch_size, {key: per_group[key][j] for key in per_group}) for j in range(n // batch_size)]


def time_engines(engines: dict[str, BenchEngine], batches: list[Batch], lengths: str, seconds: float | None = None,
            repeats: int | None = None, chunk: int = CHUNK) -> list[EngineResult]:
    """Every engine on the same batches, in whole passes: `repeats` passes, or passes until `seconds` per
    engine have gone by (at least one). Within a pass the engines take turns, `chunk` batches each (the
    first engine changing from chunk to chunk), so a load that comes and goes on a shared machine falls
    on all of them alike while each still runs several batches in a row with its own weights in cache.
    Each engine is warmed up on the shortest and the longest batch first."""
    if (seconds is None) == (repeats is None):
        raise CentraError("give seconds or repeats")
    if not batches or not engines:
        raise CentraError("nothing to measure")
    for engine in engines.values():
        engine(batches[0])
        engine(batches[-1])
    names = list(engines)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    chunks = [batches[i:i + chunk] for i in range(0, len(batches), chunk)]
    passes, turn, start = 0, 0, time.perf_counter()
    while True:
        for part in chunks:
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                for batch in part:
                    begin = time.perf_counter()
                    engines[name](batch)
                    latencies[name].append(time.perf_counter() - begin)
            turn += 1
        passes += 1
        if (repeats is not None and passes >= repeats) or \
                (seconds is not None and time.perf_counter() - start >= seconds * len(names)):
            break
    size = batches[0].size
    results = []
    for name in names:
        total = float(sum(latencies[name]))
        p50, p99 = np.percentile(np.array(latencies[name]) * 1000.0, [50, 99])
        count = passes * len(batches) * size
        results.append(EngineResult(name, size, lengths, count, total, count / total, float(p50), float(p99)))
    return results
