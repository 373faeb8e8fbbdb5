"""Answers: one example's logits -> label (multiclass) / labels (multilabel) / value (regression); and
whether two outputs give the same answer (`labels_agree`: int8 against fp32, one engine against another)."""

from __future__ import annotations

import torch

from centra.core.task import TaskSpec

# A regression output "agrees" when within this fraction of the spread of fp32's outputs on the samples
# (at least one unit of the target: STS-B's 0..5 scale then allows 0.1, more on a wider spread); every
# regression sample counts.
REGRESSION_AGREEMENT = 0.1


def interpret(spec: TaskSpec, logits: torch.Tensor) -> dict:
    """Logits of one example -> label / labels / value and per-label scores."""
    if spec.kind == "regression":
        value = float(logits[0])
        return {"value": round(value, 6), "scores": {spec.labels[0]: round(value, 6)}}
    if spec.kind == "multiclass":
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": spec.labels[best], "scores": {lab: round(p, 6) for lab, p in zip(spec.labels, probs)}}
    probs = torch.sigmoid(logits.float()).tolist()
    thresholds = spec.thresholds or [0.5] * len(spec.labels)
    return {"labels": [lab for lab, p, t in zip(spec.labels, probs, thresholds) if p >= t],
            "scores": {lab: round(p, 6) for lab, p in zip(spec.labels, probs)}}


def labels_agree(spec: TaskSpec, ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Per row: does `got` give the same answer as `ref` (logits (N, num_outputs))?"""
    if spec.kind == "multiclass":
        return ref.argmax(-1) == got.argmax(-1)
    if spec.kind == "multilabel":
        cut = threshold_logits(spec)
        return ((ref >= cut) == (got >= cut)).all(-1)
    spread = max((ref.max() - ref.min()).item(), 1.0)
    return ((ref - got).abs() <= REGRESSION_AGREEMENT * spread).all(-1)


def threshold_logits(spec: TaskSpec) -> torch.Tensor:
    t = torch.tensor(spec.thresholds or [0.5] * spec.num_outputs, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return torch.log(t / (1 - t)).float()  # sigmoid(x) >= t  <=>  x >= logit(t)
