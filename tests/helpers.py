"""Shared test helpers: a standard set of tasks on a backbone, with branches that differ from it."""

from __future__ import annotations

from pathlib import Path

import torch

from centra.core.backbone import Backbone
from centra.core.task import TaskHead, init_task, save_task

# name, kind, labels, input, attach layer, task layers, pooling (a 4-layer backbone)
STANDARD_TASKS = [
    ("alpha", "multiclass", ["neg", "neu", "pos"], "single", 1, 1, "mean"),
    ("beta", "multilabel", ["billing", "delivery", "product", "app"], "single", 2, 2, "mean"),
    ("gamma", "regression", ["score"], "single", 3, 1, "cls"),
    ("delta", "multiclass", ["different", "same"], "pair", 2, 1, "cls"),
    ("epsilon", "multiclass", ["a", "b"], "single", 0, 2, "mean"),
]


def perturb(head: TaskHead, seed: int, scale: float = 0.5) -> TaskHead:
    """Move every branch weight away from the backbone's (as training would), logits of order 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in head.parameters():
            spread = max(param.float().std(correction=0).item(), 0.05)
            param.add_(torch.randn(param.shape, generator=gen) * scale * spread)
        head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=gen))
    return head


def make_task(backbone: Backbone, tasks_dir: Path, row: tuple, seed: int = 0) -> TaskHead:
    name, kind, labels, input_kind, attach, layers, pooling = row
    spec, head = init_task(backbone, name, kind, labels, attach, layers, input=input_kind, pooling=pooling,
                           max_length=48, seed=seed)
    perturb(head, seed)
    save_task(Path(tasks_dir) / name, spec, head)
    return head


def make_tasks(backbone: Backbone, tasks_dir: Path, rows: list[tuple] = STANDARD_TASKS) -> dict[str, TaskHead]:
    return {row[0]: make_task(backbone, tasks_dir, row, seed=i) for i, row in enumerate(rows)}
