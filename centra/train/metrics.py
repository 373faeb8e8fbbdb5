"""Dev metrics for each task kind (plain numpy; values in [0, 1] or [-1, 1], reported x100 as points)."""

from __future__ import annotations

import numpy as np

DEFAULT_METRIC = {"multiclass": "accuracy", "multilabel": "micro_f1", "regression": "pearson"}
METRICS = {"multiclass": ("accuracy", "macro_f1", "mcc"), "multilabel": ("micro_f1", "macro_f1"),
           "regression": ("pearson", "spearman")}


def compute(kind: str, logits: np.ndarray, targets: list, thresholds=None, max_labels: int | None = None) -> dict:
    """All metrics of a kind from raw logits (N, C) and targets; a multilabel task's at `thresholds` (one
    per label, or one row of them per example; None: 0.5) and its `max_labels`."""
    if kind == "multiclass":
        pred, gold = logits.argmax(-1), np.asarray(targets)
        return {"accuracy": float((pred == gold).mean()), "macro_f1": macro_f1(pred, gold, logits.shape[1]),
                "mcc": mcc(pred, gold, logits.shape[1])}
    if kind == "multilabel":
        probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
        pred = decide(probs, thresholds if thresholds is not None else [0.5] * logits.shape[1], max_labels)
        gold = np.asarray(targets) > 0.5
        tp, fp, fn = (pred & gold).sum(0), (pred & ~gold).sum(0), (~pred & gold).sum(0)
        return {"micro_f1": _f1(tp.sum(), fp.sum(), fn.sum()),
                "macro_f1": float(np.mean([_f1(a, b, c) for a, b, c in zip(tp, fp, fn)]))}
    pred, gold = logits[:, 0].astype(np.float64), np.asarray(targets, dtype=np.float64)
    return {"pearson": pearson(pred, gold), "spearman": pearson(_ranks(pred), _ranks(gold))}


def decide(probs: np.ndarray, thresholds, max_labels: int | None = None) -> np.ndarray:
    """A multilabel task's answers as a 0/1 array (N, C): p >= the label's threshold, and at most
    `max_labels` per row, the highest-scoring ones (ties to the earlier label), as core.answers.interpret
    answers one example."""
    probs = np.asarray(probs)
    pred = probs >= np.asarray(thresholds)
    if max_labels is not None and pred.shape[1] > max_labels:
        order = np.argsort(-np.where(pred, probs, -np.inf), axis=1, kind="stable")
        keep = np.zeros_like(pred)
        np.put_along_axis(keep, order[:, :max_labels], True, axis=1)
        pred &= keep
    return pred


BASELINES = {"multiclass": "the train set's majority class", "multilabel": "the train set's most frequent label",
             "regression": "the train set's mean"}


def baseline(kind: str, outputs: int, train_targets: list, dev_targets: list) -> dict:
    """Dev metrics of the constant answer of a model that learned nothing (BASELINES[kind]): what a
    trained task must beat. A constant regression output has no correlation (0 by convention)."""
    n = len(dev_targets)
    logits = np.full((n, outputs), -10.0)
    if kind == "multiclass":
        logits[:, int(np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=outputs).argmax())] = 10.0
    elif kind == "multilabel":
        logits[:, int((np.asarray(train_targets) > 0.5).sum(0).argmax())] = 10.0
    else:
        logits[:, 0] = float(np.mean(np.asarray(train_targets, dtype=np.float64)))
    return {"answer": BASELINES[kind], **compute(kind, logits, dev_targets)}


def by_segment(kind: str, logits: np.ndarray, targets: list, segments: list[str],
               thresholds: list[float] | None = None, max_labels: int | None = None) -> dict[str, dict]:
    """compute() on each segment's rows: {value: {"examples": n, metric: value}}, largest segment first."""
    rows: dict[str, list[int]] = {}
    for i, value in enumerate(segments):
        rows.setdefault(value, []).append(i)
    order = sorted(rows, key=lambda v: (-len(rows[v]), v))
    return {v: {"examples": len(rows[v]),
                **compute(kind, logits[rows[v]], [targets[i] for i in rows[v]], thresholds, max_labels)}
            for v in order}


def _f1(tp: float, fp: float, fn: float) -> float:
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray, classes: int) -> float:
    return float(np.mean([_f1(((pred == c) & (gold == c)).sum(), ((pred == c) & (gold != c)).sum(),
                              ((pred != c) & (gold == c)).sum()) for c in range(classes)]))


def mcc(pred: np.ndarray, gold: np.ndarray, classes: int) -> float:
    """Matthews correlation (multiclass form; equals the binary MCC for 2 classes)."""
    conf = np.zeros((classes, classes), dtype=np.float64)
    np.add.at(conf, (gold, pred), 1)
    t, p, c, s = conf.sum(1), conf.sum(0), np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return float((c * s - (t * p).sum()) / denom) if denom else 0.0


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    return (sums / counts)[inverse]
