"""The merged graph: embeddings + trunk layers computed once, each task's branch reading its attach layer.

`MergedModel` is what serves; `StandaloneModel` (one task on its own) is the reference it must equal.
"""

from __future__ import annotations

import torch
from torch import nn

from centra.core.backbone import Embeddings, EncoderConfig, EncoderLayer, attention_bias
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
                     wants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits per task for the rows that asked for it: wants[name] = row indices (long) of the batch.

        Calls that ask for different task sets share this one trunk pass; each branch runs only on its
        rows, and rows drop out of the trunk once no task they asked for attaches deeper.
        """
        by_layer = tasks_by_layer(self.specs, wants)
        depth = max(by_layer, default=0)
        batch = input_ids.shape[0]
        position = torch.arange(batch)  # batch row -> its row in the live tensors (-1: dropped)
        mask = attention_mask
        bias = attention_bias(mask)
        hidden = self.embeddings(input_ids, token_type_ids)
        out: dict[str, torch.Tensor] = {}
        for k in range(depth + 1):
            if k:
                hidden = self.trunk[k - 1](hidden, bias)
            for name in by_layer.get(k, ()):
                live = position[wants[name]]
                if len(live) == hidden.shape[0] and torch.equal(live, torch.arange(len(live))):
                    out[name] = self.heads[name](hidden, bias, mask)
                else:
                    out[name] = self.heads[name](hidden[live], bias[live], mask[live])
            deeper = [wants[n] for layer, names in by_layer.items() if layer > k for n in names]
            if deeper:
                needed = torch.unique(torch.cat(deeper))
                if len(needed) < hidden.shape[0]:  # rows no deeper task wants leave the trunk here
                    keep = position[needed]
                    hidden, bias, mask = hidden[keep], bias[keep], mask[keep]
                    position = torch.full((batch,), -1, dtype=torch.long)
                    position[needed] = torch.arange(len(needed))
        return out

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
