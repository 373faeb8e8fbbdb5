"""Per-label decision thresholds of a multilabel task, tuned on dev to maximise each label's F1.

A fixed 0.5 never predicts a rare label whose probabilities stay low (GoEmotions' rare emotions), so
each label gets the cut point that maximises its own dev F1. A label with fewer than MIN_POSITIVES
positive dev examples keeps 0.5: a few examples say too little to move its threshold.
"""

from __future__ import annotations

import numpy as np

from centra.train.metrics import METRICS, compute
from centra.train.report import Thresholds

DEFAULT_THRESHOLD = 0.5
MIN_POSITIVES = 5  # positive dev examples a label needs before its threshold is tuned


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, min_positives: int = MIN_POSITIVES) -> list[float]:
    """Probabilities (N, C) and 0/1 targets (N, C) -> one threshold per label (predict p >= t)."""
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(targets) > 0.5
    if probs.shape != gold.shape or probs.ndim != 2:
        raise ValueError(f"probabilities {probs.shape} and targets {gold.shape} must both be (N, labels)")
    return [best_threshold(probs[:, c], gold[:, c]) if gold[:, c].sum() >= max(1, min_positives)
            else DEFAULT_THRESHOLD for c in range(probs.shape[1])]


def best_threshold(p: np.ndarray, gold: np.ndarray) -> float:
    """The cut with the best F1 for one label. Candidates: 0.5, half the lowest probability (all
    positive) and the midpoints between consecutive distinct probabilities. A cut between two
    probabilities, never on one, leaves a margin that the float32 sigmoid of an engine cannot cross.
    Ties go to the candidate nearest 0.5."""
    values = np.unique(p)
    cuts = np.unique(np.concatenate([(values[1:] + values[:-1]) / 2, values[:1] / 2, [DEFAULT_THRESHOLD]]))
    descending = np.sort(p)[::-1]
    hits = np.concatenate([[0], np.cumsum(gold[np.argsort(-p, kind="stable")])])
    predicted = np.searchsorted(-descending, -cuts, side="right")  # how many p >= cut
    tp = hits[predicted]
    f1 = 2 * tp / (predicted + gold.sum())  # 2tp / (2tp + fp + fn), with tp + fp = predicted
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - DEFAULT_THRESHOLD))]])


def tune_logits(logits: np.ndarray, targets: list) -> dict:
    """Per-label thresholds tuned on a multilabel branch's dev logits ("values") and the dev metrics at
    them ("tuned")."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    thresholds = tune_thresholds(probs, np.asarray(targets))
    return {"values": thresholds, "tuned": compute("multilabel", logits, targets, thresholds)}


def threshold_report(dev: dict, targets: list) -> Thresholds:
    """The report's record of a multilabel branch's thresholds, read off its dev entry (the scores
    finetune.dev_scores took when that epoch ended): values, dev metrics at 0.5 and tuned."""
    positives = (np.asarray(targets) > 0.5).sum(0)
    return Thresholds(dev["thresholds"], MIN_POSITIVES, [int(x) for x in positives],
                      {m: dev[m] for m in METRICS["multilabel"]}, dev["tuned"])
