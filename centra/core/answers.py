"""Answers: one example's logits -> label (multiclass) / labels (multilabel) / value (regression)."""

from __future__ import annotations

import torch

from centra.core.task import TaskSpec


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
