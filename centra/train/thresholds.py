"""Per-label decision thresholds of a multilabel task, tuned on dev, guarded, and scored held out.

A fixed 0.5 never predicts a rare label whose probabilities stay low (GoEmotions' rare emotions), so a
label may get the cut point that maximises its dev F1 (`objective` "label", which is also what maximises
macro-F1: it is a mean of per-label F1s) or, with `objective` "micro_f1", the cuts that maximise
micro-F1 over all labels together (coordinate ascent: a label's predictions are added only while their
precision pays for them against every other label's, which keeps weak labels quiet).

The guard. Tuning picks the best of thousands of cuts on the dev set, so a label with no signal still
finds a cut that looks good there: a very low one that predicts the label for many texts (the "spray" of
emotions the demo showed). A label is tuned only when it has MIN_POSITIVES positive dev examples and its
best cut's F1 beats the F1 of predicting it for every text (what any constant answer reaches at best) by
MARGIN. Otherwise it keeps 0.5, the rule the model was trained for: it is then predicted only where the
model itself is sure, never sprayed, and a frequent label the model learned modestly still answers.
(A simulation of random scores on 4,300 rows: the best cut beats the constant by >= 0.06 F1 in 5% of
labels with 10 positives and by <= 0.04 with 50 or more; 0.1 keeps chance out, a real signal passes.)

The defaults, by measurement (centra/measure/multilabel.py on GoEmotions, docs/results.md): objective
"micro_f1", and a task that does not set max_labels answers at most the fewest labels per text that cover
99% of its training texts' label counts (3 on GoEmotions). Per-label tuning of an under-confident model
moves most thresholds far below 0.5 and a neutral question collects four emotions; micro-F1's cuts keep
the held-out labels per text near gold's. A floor under tuned thresholds (0.1 to 0.25) stopped the spray
too, but took macro-F1 down by 12 to 20 points: rare labels never score that high, so it is not used.

Honest figures. Thresholds tuned on dev and scored on the same dev are optimistic by construction, so the
figure reported as "tuned" is cross-fitted: dev is split into FOLDS folds (seeded), each fold is scored
at thresholds tuned on the other folds only, and the pooled held-out decisions give the metrics and the
labels per text. The thresholds served are then tuned on all of dev ("values", scored in-sample as "fit").
A task's max_labels (keep the highest-scoring labels above their thresholds) applies to every figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from centra.train.metrics import METRICS, compute, decide
from centra.train.report import Thresholds
from centra.train.settings import DEFAULT_OBJECTIVE, THRESHOLD_OBJECTIVES

DEFAULT_THRESHOLD = 0.5
MIN_POSITIVES = 10  # positive dev examples (of the tuning rows) a label needs before its threshold is tuned
MARGIN = 0.1  # F1 a tuned cut must reach above the F1 of predicting the label for every text
FOLDS = 5  # cross-fitting folds of the dev set: each scored at thresholds tuned on the other four
OBJECTIVES = THRESHOLD_OBJECTIVES
NEUTRAL = "neutral"  # a label of this name (any case) is the neutral one of the tail figure
MAX_LABELS_COVERAGE = 0.99  # the default max_labels covers this share of the training texts' label counts
FLOOR = 0.0  # no tuned threshold goes below this (see the module's docstring)
PASSES = 3  # coordinate-ascent passes over the labels (micro_f1); it settles in two on GoEmotions

Tune = Callable[[np.ndarray, np.ndarray], list[float]]  # probabilities, 0/1 targets -> thresholds


@dataclass(frozen=True)
class Tuning:
    """How a multilabel branch's thresholds are tuned and scored: the objective, the task's max_labels."""

    objective: str = DEFAULT_OBJECTIVE
    max_labels: int | None = None
    folds: int = FOLDS
    seed: int = 0
    neutral: int | None = None  # the label named "neutral", if any (labels_per_text's tail figure)
    floor: float = FLOOR

    def tune(self, probs: np.ndarray, targets: np.ndarray) -> list[float]:
        return tune_thresholds(probs, targets, objective=self.objective, floor=self.floor)


def cut_table(p: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label's candidate cuts and, at each, the true positives and the texts predicted. Candidates:
    0.5, half the lowest probability (all positive) and the midpoints between consecutive distinct
    probabilities. A cut between two probabilities, never on one, leaves a margin that the float32
    sigmoid of an engine cannot cross."""
    values = np.unique(p)
    cuts = np.unique(np.concatenate([(values[1:] + values[:-1]) / 2, values[:1] / 2, [DEFAULT_THRESHOLD]]))
    descending = np.sort(p)[::-1]
    hits = np.concatenate([[0], np.cumsum(gold[np.argsort(-p, kind="stable")])])
    predicted = np.searchsorted(-descending, -cuts, side="right")  # how many p >= cut
    return cuts, hits[predicted], predicted


def _pick(cuts: np.ndarray, score: np.ndarray) -> int:
    """The best-scoring cut; ties go to the candidate nearest 0.5."""
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return int(best[np.argmin(np.abs(cuts[best] - DEFAULT_THRESHOLD))])


def best_threshold(p: np.ndarray, gold: np.ndarray) -> float:
    """The cut with the best F1 for one label (no guard)."""
    cuts, tp, predicted = cut_table(p, gold)
    return float(cuts[_pick(cuts, 2 * tp / (predicted + gold.sum()))])  # 2tp / (2tp + fp + fn)


def passes_guard(p: np.ndarray, gold: np.ndarray, min_positives: int = MIN_POSITIVES,
                 margin: float = MARGIN) -> bool:
    """May this label's threshold move from 0.5: enough positives, and a best F1 that beats the F1 of
    predicting it for every text (2p / (n + p)) by `margin`."""
    positives = int(gold.sum())
    if positives < max(1, min_positives):
        return False
    cuts, tp, predicted = cut_table(p, gold)
    return float((2 * tp / (predicted + positives)).max()) >= 2 * positives / (len(p) + positives) + margin


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, min_positives: int = MIN_POSITIVES,
                    objective: str = "label", margin: float = MARGIN, floor: float = 0.0) -> list[float]:
    """Probabilities (N, C) and 0/1 targets (N, C) -> one threshold per label (predict p >= t); labels
    that fail the guard keep 0.5; no tuned threshold goes below `floor`."""
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(targets) > 0.5
    if probs.shape != gold.shape or probs.ndim != 2:
        raise ValueError(f"probabilities {probs.shape} and targets {gold.shape} must both be (N, labels)")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} must be one of {', '.join(OBJECTIVES)}")
    tuned = [c for c in range(probs.shape[1]) if passes_guard(probs[:, c], gold[:, c], min_positives, margin)]
    thresholds = [DEFAULT_THRESHOLD] * probs.shape[1]
    if objective == "label":
        for c in tuned:
            thresholds[c] = max(best_threshold(probs[:, c], gold[:, c]), floor)
        return thresholds
    return _micro(probs, gold, tuned, thresholds, floor)


def neutral_of(labels: list[str]) -> int | None:
    """The index of the label named NEUTRAL (any case), or None."""
    return next((i for i, name in enumerate(labels) if name.lower() == NEUTRAL), None)


def label_count_limit(targets: np.ndarray, coverage: float = MAX_LABELS_COVERAGE) -> int:
    """The fewest labels per text that cover `coverage` of the texts' gold label counts (at least 1)."""
    counts = np.sort((np.asarray(targets) > 0.5).sum(1))
    if not len(counts):
        return 1
    return max(1, int(counts[min(len(counts) - 1, int(np.ceil(coverage * len(counts))) - 1)]))


def _micro(probs: np.ndarray, gold: np.ndarray, tuned: list[int], thresholds: list[float],
           floor: float = 0.0) -> list[float]:
    """Coordinate ascent on micro-F1: each guarded label's cut in turn (none below `floor`), the others held."""
    pred = probs >= np.asarray(thresholds)
    positives = int(gold.sum())
    tables = {}
    for c in tuned:
        cuts, tp, predicted = cut_table(probs[:, c], gold[:, c])
        keep = cuts >= floor
        if keep.any():  # 0.5 is always a candidate: empty only under a floor above it
            tables[c] = (cuts[keep], tp[keep], predicted[keep])
    tuned = list(tables)
    for _ in range(PASSES):
        moved = False
        for c in tuned:
            cuts, tp, predicted = tables[c]
            tp_rest = int((pred & gold).sum() - (pred[:, c] & gold[:, c]).sum())
            pred_rest = int(pred.sum() - pred[:, c].sum())
            denominator = np.maximum(pred_rest + predicted + positives, 1)
            best = float(cuts[_pick(cuts, 2 * (tp_rest + tp) / denominator)])
            if best != thresholds[c]:
                thresholds[c], moved = best, True
                pred[:, c] = probs[:, c] >= best
        if not moved:
            break
    return thresholds


def guard_states(probs: np.ndarray, gold: np.ndarray, values: list[float], floor: float = FLOOR) -> list[str]:
    """Per label, what became of its threshold: "tuned", "kept 0.5" (the guard: too few positives, or no
    cut that beats predicting it for every text) or "floor" (tuned below the floor, raised to it)."""
    states = []
    for c, value in enumerate(values):
        if not passes_guard(probs[:, c], gold[:, c] > 0.5):
            states.append("kept 0.5")
        elif floor > 0 and value == floor and best_threshold(probs[:, c], gold[:, c] > 0.5) < floor:
            states.append("floor")
        else:
            states.append("tuned")
    return states


def fold_of(rows: int, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each dev row's fold (seeded, sizes differing by at most one)."""
    order = np.random.default_rng(seed).permutation(rows)
    fold = np.empty(rows, dtype=np.int64)
    fold[order] = np.arange(rows) % folds
    return fold


def cross_fit(probs: np.ndarray, targets: np.ndarray, tune: Tune, folds: int = FOLDS, seed: int = 0
              ) -> np.ndarray:
    """Held-out thresholds: (N, C), each row's the thresholds `tune` chose on the other folds only."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    fold = fold_of(len(probs), max(2, min(folds, len(probs))), seed)
    held_out = np.empty(probs.shape, dtype=np.float64)
    for k in np.unique(fold):
        rest = fold != k
        held_out[~rest] = tune(probs[rest], targets[rest])
    return held_out


def labels_per_text(probs: np.ndarray, thresholds: np.ndarray | list[float], targets: np.ndarray,
                    max_labels: int | None = None, neutral: int | None = None) -> dict[str, float]:
    """Mean labels predicted per text against the gold mean, and the tail a reader sees: the share of texts
    given more labels than gold has ("more_than_gold") and, when a label is named neutral, the share of
    texts whose only gold label is neutral that are given another label ("neutral_given_other")."""
    pred = decide(probs, thresholds, max_labels)
    gold = np.asarray(targets) > 0.5
    out = {"predicted": round(float(pred.sum(1).mean()), 4), "gold": round(float(gold.sum(1).mean()), 4),
           "more_than_gold": round(float((pred.sum(1) > gold.sum(1)).mean()), 4)}
    if neutral is not None:
        only = gold[:, neutral] & (gold.sum(1) == 1)
        if only.any():
            out["neutral_given_other"] = round(float(np.delete(pred, neutral, axis=1).any(1)[only].mean()), 4)
    return out


def tune_logits(logits: np.ndarray, targets: list, tuning: Tuning | None = None) -> dict:
    """A multilabel branch's dev logits -> the thresholds served ("values", tuned on all of dev), the
    held-out metrics and labels per text at cross-fitted thresholds ("tuned", "labels_per_text") and the
    in-sample metrics at the values ("fit")."""
    tuning = tuning or Tuning()
    logits = np.asarray(logits, dtype=np.float64)
    probs, gold = 1.0 / (1.0 + np.exp(-logits)), np.asarray(targets, dtype=np.float64)
    values = tuning.tune(probs, gold)
    held_out = cross_fit(probs, gold, tuning.tune, tuning.folds, tuning.seed)
    return {"values": values, "guard": guard_states(probs, gold, values, tuning.floor),
            "tuned": compute("multilabel", logits, targets, held_out, tuning.max_labels),
            "fit": compute("multilabel", logits, targets, values, tuning.max_labels),
            "labels_per_text": labels_per_text(probs, held_out, gold, tuning.max_labels, tuning.neutral)}


def threshold_report(dev: dict, targets: list, tuning: Tuning | None = None,
                     max_labels_from: str | None = None) -> Thresholds:
    """The report's record of a multilabel branch's thresholds, read off its dev entry (the scores
    finetune.dev_scores took when that epoch ended): values, dev metrics at 0.5, held out and in-sample."""
    tuning = tuning or Tuning()
    positives = (np.asarray(targets) > 0.5).sum(0)
    return Thresholds(dev["thresholds"], MIN_POSITIVES, [int(x) for x in positives],
                      {m: dev[m] for m in METRICS["multilabel"]}, dev["tuned"], dev.get("fit", {}),
                      dev.get("labels_per_text", {}), tuning.objective, tuning.folds, MARGIN, tuning.max_labels,
                      dev.get("guard"), tuning.floor or None, max_labels_from)
