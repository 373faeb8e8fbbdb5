"""Answers: one example's logits -> label (multiclass) / labels (multilabel) / value (regression), as one
typed record per task kind; and whether two outputs give the same answer (`labels_agree`: int8 against
fp32, one engine against another)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from centra.core.task import TaskSpec

# A regression output "agrees" when within this fraction of the spread of fp32's outputs on the samples
# (at least one unit of the target: STS-B's 0..5 scale then allows 0.1, more on a wider spread); every
# regression sample counts.
REGRESSION_AGREEMENT = 0.1


@dataclass(frozen=True)
class Answer:
    """One task's answer to one input. `scores`: one per label, in the task's label order (softmax
    probabilities, sigmoid probabilities, or the value itself), rounded to 6 decimals."""

    scores: dict[str, float]

    def to_dict(self) -> dict:
        """The JSON form (`centra predict`, OIP's ANSWERS): {"label" | "labels" | "value", "scores"}."""
        raise NotImplementedError

    def to_v1(self, task) -> None:
        """Fill a centra.v1 TaskResult (task, truncated set by the caller)."""
        task.scores.extend(self.scores.values())


@dataclass(frozen=True)
class ClassAnswer(Answer):
    """Multiclass: the label of the highest score."""

    label: str

    def to_dict(self) -> dict:
        return {"label": self.label, "scores": self.scores}

    def to_v1(self, task) -> None:
        super().to_v1(task)
        task.label = self.label


@dataclass(frozen=True)
class LabelsAnswer(Answer):
    """Multilabel: the labels whose score reaches its threshold (at most the limit), in label order."""

    labels: list[str]

    def to_dict(self) -> dict:
        return {"labels": self.labels, "scores": self.scores}

    def to_v1(self, task) -> None:
        super().to_v1(task)
        task.labels.extend(self.labels)


@dataclass(frozen=True)
class ValueAnswer(Answer):
    """Regression: the predicted value."""

    value: float

    def to_dict(self) -> dict:
        return {"value": self.value, "scores": self.scores}

    def to_v1(self, task) -> None:
        super().to_v1(task)
        task.value = self.value


def answer_from_dict(data: dict) -> Answer:
    """The record of an answer's JSON form (to_dict's)."""
    scores = data["scores"]
    if "label" in data:
        return ClassAnswer(scores, data["label"])
    if "labels" in data:
        return LabelsAnswer(scores, list(data["labels"]))
    return ValueAnswer(scores, data["value"])


def interpret(spec: TaskSpec, logits: torch.Tensor, max_labels: int | None = None) -> Answer:
    """Logits of one example -> label / labels / value and per-label scores. A multilabel answer holds
    the labels whose score reaches its threshold, at most `limit_of(spec, max_labels)` of them (the
    highest-scoring, ties to the earlier label), in label order."""
    import torch

    if spec.kind == "regression":
        value = round(float(logits[0]), 6)
        return ValueAnswer({spec.labels[0]: value}, value)
    if spec.kind == "multiclass":
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return ClassAnswer({lab: round(p, 6) for lab, p in zip(spec.labels, probs)}, spec.labels[best])
    probs = torch.sigmoid(logits.float()).tolist()
    thresholds = spec.thresholds or [0.5] * len(spec.labels)
    above = [i for i, (p, t) in enumerate(zip(probs, thresholds)) if p >= t]
    limit = limit_of(spec, max_labels)
    if limit is not None and len(above) > limit:
        above = sorted(sorted(above, key=lambda i: -probs[i])[:limit])
    return LabelsAnswer({lab: round(p, 6) for lab, p in zip(spec.labels, probs)}, [spec.labels[i] for i in above])


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
    import torch

    t = torch.tensor(spec.thresholds or [0.5] * spec.num_outputs, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return torch.log(t / (1 - t)).float()  # sigmoid(x) >= t  <=>  x >= logit(t)


def label_mask(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """A multilabel task's answers to logits (N, C) as a bool mask: at its thresholds and max_labels."""
    import torch

    pred = logits >= threshold_logits(spec)
    limit = limit_of(spec)
    if limit is not None and logits.shape[-1] > limit:
        top = torch.where(pred, logits, torch.full_like(logits, -torch.inf)).topk(limit, dim=-1).indices
        pred &= torch.zeros_like(pred).scatter_(-1, top, True)
    return pred
