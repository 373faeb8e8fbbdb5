"""The merged graph: embeddings + trunk layers computed once, each task's branch reading its attach layer.

`MergedModel` is what serves; `StandaloneModel` (one task on its own) is the reference it must equal.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from centra.core.backbone import Embeddings, EncoderConfig, EncoderLayer, attention_bias
from centra.core.shadow import detour_start, is_candidate, task_of
from centra.core.task import TaskHead, TaskSpec
from centra.errors import CentraError


def tasks_by_layer(specs: dict[str, TaskSpec], names) -> dict[int, list[str]]:
    """The named tasks grouped by attach layer (the order of a trunk pass); unknown names refused."""
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise CentraError(f"unknown task {unknown[0]!r} (known: {', '.join(sorted(specs))})")
    by_layer: dict[int, list[str]] = {}
    for name in names:
        by_layer.setdefault(specs[name].attach_layer, []).append(name)
    return by_layer


class TrunkRows:
    """The row bookkeeping of one trunk pass that calls asking for different task sets share, kept once for
    MergedModel.forward_rows and the graph runners (centra.runtime.graphs): which tasks read each attach
    layer, which of the rows still in the trunk each reads, and which rows leave the trunk once no task
    they asked for attaches deeper. Indices stay on the CPU (no device sync).

    A candidate branch (centra.core.shadow) is no task of the walk: its rows are taken out at its detour
    start (`detours`) and carried to its own attach layer apart, so the rows in the trunk, and so every
    active branch's inputs, are those of the same call without it."""

    def __init__(self, specs: dict[str, TaskSpec], wants: dict[str, torch.Tensor], batch: int):
        self.by_layer = tasks_by_layer(specs, [n for n in wants if not is_candidate(n)])
        self.by_start: dict[int, list[str]] = {}  # candidate keys by the layer their detour starts at
        for key in (n for n in wants if is_candidate(n)):
            if key not in specs:
                raise CentraError(f"no candidate head for task {task_of(key)!r}")
            active = specs.get(task_of(key))  # absent: a graph of the candidate alone (an export's check)
            start = specs[key].attach_layer if active is None else detour_start(active, specs[key])
            self.by_start.setdefault(start, []).append(key)
        self.depth = max([*self.by_layer, *self.by_start], default=0)  # the trunk runs this deep
        self.rows = {name: torch.as_tensor(r, dtype=torch.long).cpu() for name, r in wants.items()}
        self.batch = batch
        self.position = torch.arange(batch)  # batch row -> its row in the live tensors (-1: dropped)
        self.live = batch  # rows in the live tensors

    def _live(self, name: str) -> torch.Tensor | None:
        """The live rows `name` reads (None: every live row, in order)."""
        live = self.position[self.rows[name]]
        whole = len(live) == self.live and torch.equal(live, torch.arange(self.live))
        return None if whole else live

    def branches(self, layer: int) -> list[tuple[str, torch.Tensor | None]]:
        """The tasks attached at `layer`, each with the live rows it reads (None: every live row, in order)."""
        return [(name, self._live(name)) for name in self.by_layer.get(layer, ())]

    def detours(self, layer: int) -> list[tuple[str, torch.Tensor | None]]:
        """The candidate branches whose rows leave the walk at `layer`, each with its live rows (as
        `branches`): the caller carries them through the trunk layers up to the candidate's attach layer."""
        return [(key, self._live(key)) for key in self.by_start.get(layer, ())]

    def leave_after(self, layer: int) -> torch.Tensor | None:
        """Rows that no task attached deeper than `layer` asked for leave the trunk here: the live rows
        that stay, to index the live tensors with (None: every row stays, or no task reads deeper)."""
        deeper = [self.rows[n] for k, names in (*self.by_layer.items(), *self.by_start.items()) if k > layer
                  for n in names]
        if not deeper:
            return None
        needed = torch.unique(torch.cat(deeper))
        if len(needed) >= self.live:
            return None
        keep = self.position[needed]
        self.position = torch.full((self.batch,), -1, dtype=torch.long)
        self.position[needed] = torch.arange(len(needed))
        self.live = len(needed)
        return keep


class MergedModel(nn.Module):
    """Embeddings + trunk layers computed once; each task's branch reads its attach layer."""

    def __init__(self, cfg: EncoderConfig, embeddings: Embeddings, trunk: nn.ModuleList,
                 heads: dict[str, TaskHead]):
        super().__init__()
        self.cfg = cfg
        self.embeddings = embeddings
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)
        self.specs: dict[str, TaskSpec] = {name: head.spec for name, head in heads.items()}
        deepest = max((s.attach_layer for s in self.specs.values()), default=0)
        if deepest > len(trunk):
            raise CentraError(f"a task attaches at layer {deepest} but the trunk has {len(trunk)} layers")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                names: list[str]) -> list[torch.Tensor]:
        """Logits of the named tasks for every row of the batch (which must share one tokenisation)."""
        rows = torch.arange(input_ids.shape[0])
        out = self.forward_rows(input_ids, attention_mask, token_type_ids, {name: rows for name in names})
        return [out[n] for n in names]

    def forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                     wants: dict[str, torch.Tensor], spent: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Logits per task for the rows that asked for it: wants[name] = row indices (long) of the batch.

        Calls that ask for different task sets share this one trunk pass; each branch runs only on its
        rows, and rows drop out of the trunk once no task they asked for attaches deeper. A candidate key
        (centra.core.shadow) runs on a detour that leaves the rest as it is; `spent`, when given, adds the
        seconds each candidate's detour took.
        """
        rows = TrunkRows(self.specs, wants, input_ids.shape[0])
        mask = attention_mask
        bias = attention_bias(mask)
        hidden = self.embeddings(input_ids, token_type_ids)
        out: dict[str, torch.Tensor] = {}
        for k in range(rows.depth + 1):
            if k:
                hidden = self.trunk[k - 1](hidden, bias)
            for name, live in rows.branches(k):
                head = self.heads[name]
                out[name] = head(hidden, bias, mask) if live is None else head(hidden[live], bias[live], mask[live])
            for key, live in rows.detours(k):
                started = time.perf_counter()
                out[key] = self.detour(key, k, *((hidden, bias, mask) if live is None
                                                 else (hidden[live], bias[live], mask[live])))
                if spent is not None:
                    spent[key] = spent.get(key, 0.0) + time.perf_counter() - started
            keep = rows.leave_after(k)
            if keep is not None:
                hidden, bias, mask = hidden[keep], bias[keep], mask[keep]
        return out

    def detour(self, key: str, layer: int, hidden: torch.Tensor, bias: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """A candidate branch on its rows' hidden states at trunk `layer`: the trunk layers up to its own
        attach layer, then its head."""
        for trunk_layer in self.trunk[layer: self.specs[key].attach_layer]:
            hidden = trunk_layer(hidden, bias)
        return self.heads[key](hidden, bias, mask)

    def depth_for(self, names: list[str]) -> int:
        return max((self.specs[n].attach_layer for n in names), default=0)


class StandaloneModel(nn.Module):
    """One task on its own: embeddings, backbone layers 1..k, then its branch. The merge's reference."""

    def __init__(self, embeddings: Embeddings, layers: list[EncoderLayer], head: TaskHead):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers[: head.spec.attach_layer])
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        bias = attention_bias(attention_mask)
        hidden = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return self.head(hidden, bias, attention_mask)
