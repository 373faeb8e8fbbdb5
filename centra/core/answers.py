"""Answers: one example's logits -> label (multiclass) / labels (multilabel) / value (regression); and
whether two outputs give the same answer (`labels_agree`: int8 against fp32, one engine against another)."""

from __future__ import annotations

import torch

from centra.core.task import TaskSpec

# A regression output "agrees" when within this fraction of the spread of fp32's outputs on the samples
# (at least one unit of the target: STS-B's 0..5 scale then allows 0.1, more on a wider spread); every
# regression sample counts.
REGRESSION_AGREEMENT = 0.1


def interpret(spec: TaskSpec, logits: torch.Tensor, max_labels: int | None = None) -> dict:
    """Logits of one example -> label / labels / value and per-label scores. A multilabel answer holds
    the labels whose score reaches its threshold, at most `limit_of(spec, max_labels)` of them (the
    highest-scoring, ties to the earlier label), in label order."""
    if spec.kind == "regression":
        value = float(logits[0])
        return {"value": round(value, 6), "scores": {spec.labels[0]: round(value, 6)}}
    if spec.kind == "multiclass":
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": spec.labels[best], "scores": {lab: round(p, 6) for lab, p in zip(spec.labels, probs)}}
    probs = torch.sigmoid(logits.float()).tolist()
    thresholds = spec.thresholds or [0.5] * len(spec.labels)
    above = [i for i, (p, t) in enumerate(zip(probs, thresholds)) if p >= t]
    limit = limit_of(spec, max_labels)
    if limit is not None and len(above) > limit:
        above = sorted(sorted(above, key=lambda i: -probs[i])[:limit])
    return {"labels": [spec.labels[i] for i in above],
            "scores": {lab: round(p, 6) for lab, p in zip(spec.labels, probs)}}


def limit_of(spec: TaskSpec, max_labels: int | None = None) -> int | None:
    """Labels a multilabel answer holds at most: the task's max_labels (task.json) and a call's, the
    smaller when both are given (a call may ask for fewer labels, never for more than the task allows).
    0 or None: no limit from that side."""
    limits = [n for n in (spec.max_labels, max_labels) if n]
    return min(limits) if limits else None


def labels_agree(spec: TaskSpec, ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Per row: does `got` give the same answer as `ref` (logits (N, num_outputs))?"""
    if spec.kind == "multiclass":
        return ref.argmax(-1) == got.argmax(-1)
    if spec.kind == "multilabel":
        return (label_mask(spec, ref) == label_mask(spec, got)).all(-1)
    spread = max((ref.max() - ref.min()).item(), 1.0)
    return ((ref - got).abs() <= REGRESSION_AGREEMENT * spread).all(-1)


def threshold_logits(spec: TaskSpec) -> torch.Tensor:
    t = torch.tensor(spec.thresholds or [0.5] * spec.num_outputs, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return torch.log(t / (1 - t)).float()  # sigmoid(x) >= t  <=>  x >= logit(t)


def label_mask(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """A multilabel task's answers to logits (N, C) as a bool mask: at its thresholds and max_labels."""
    pred = logits >= threshold_logits(spec)
    limit = limit_of(spec)
    if limit is not None and logits.shape[-1] > limit:
        top = torch.where(pred, logits, torch.full_like(logits, -torch.inf)).topk(limit, dim=-1).indices
        pred &= torch.zeros_like(pred).scatter_(-1, top, True)
    return pred
