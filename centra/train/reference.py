"""The full fine-tuning reference, as the papers do it: embeddings and every layer trained, for
REFERENCE_EPOCHS epochs, one model per task. It is what the students are measured against; it is
never served (its embeddings are no longer the shared trunk's).

Its embeddings train, so nothing below the classifier can be cached: `TokenSource` hands the training
loop (finetune.BranchTrainer) token ids where a cache hands hidden states, and `FullModel` runs the
embeddings before the task layers. Same optimizer, schedule, batch order and best-epoch rule as every
branch; the embeddings train at the layers' learning rate.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from centra.core.backbone import Backbone
from centra.core.task import TaskHead, TaskSpec
from centra.core.tokens import Encoded
from centra.train.cache import batches_by_length
from centra.train.finetune import BranchTrainer, TrainConfig
from centra.train.settings import REFERENCE_EPOCHS


class TokenSource:
    """Token ids of a dataset, served in batches the way ActivationCache serves hidden states."""

    layer = 0  # what the loop checks against the attach layer: the model starts at the embeddings

    def __init__(self, enc: Encoded, pad_id: int):
        self.enc, self.pad_id = enc, pad_id
        self.lengths = np.array([len(ids) for ids in enc.input_ids])

    def rows_in_batches(self, batch_size: int = 64) -> list[list[int]]:
        return batches_by_length(self.lengths, batch_size)

    def batch(self, rows: list[int]) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        ids, mask, types = self.enc.batch(rows, self.pad_id)
        return (ids, types), mask


class FullModel(nn.Module):
    """A trainable copy of the backbone's embeddings under a head attached at layer 0 with every layer."""

    def __init__(self, backbone: Backbone, head: TaskHead):
        super().__init__()
        if head.spec.attach_layer != 0 or head.spec.task_layers != backbone.cfg.num_layers:
            raise ValueError("the reference head must attach at layer 0 and hold every layer")
        self.embeddings = copy.deepcopy(backbone.embeddings)
        self.head = head

    @property
    def spec(self) -> TaskSpec:
        return self.head.spec

    def forward(self, tokens: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        return self.head(self.embeddings(*tokens), bias, mask)


def train_reference(backbone: Backbone, head: TaskHead, train: TokenSource, train_targets: list,
                    dev: TokenSource, dev_targets: list, cfg: TrainConfig, epochs: int = REFERENCE_EPOCHS
                    ) -> tuple[FullModel, dict]:
    """Fine-tune embeddings + every layer + the head for `epochs` epochs; the model at its best epoch on
    dev, frozen, and its log. The backbone itself is left as it was."""
    model = FullModel(backbone, head)
    trainer = BranchTrainer(model, train, train_targets, dev, dev_targets,  # type: ignore[arg-type]
                            replace(cfg, epochs=epochs), "reference")
    trainer.run(epochs)
    return trainer.finish()  # type: ignore[return-value]
