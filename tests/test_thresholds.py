"""Per-label thresholds of multilabel tasks: tuned on dev where the best cut is known, the floor on
positives, the best F1 against brute force, and a trained task that carries and serves them.
(The guard, the micro-F1 objective, cross-fitting and max_labels: tests/test_thresholds_guard.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_training import job_for

from centra.cli import main
from centra.cli.tasks import summarize
from centra.core.backbone import Backbone
from centra.core.merge import plan_merge, write_merged
from centra.core.task import read_spec
from centra.runtime.engine import Engine
from centra.train.data import load_examples
from centra.train.metrics import compute
from centra.train.pipeline import train_task
from centra.train.thresholds import (
    FOLDS,
    MIN_POSITIVES,
    best_threshold,
    label_count_limit,
    labels_per_text,
    tune_thresholds,
)


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p)).astype(np.float32)


def separable(rng: np.random.Generator, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Two labels: one whose positives score in (0.25, 0.45) and negatives in (0.02, 0.15) (best cut
    near 0.2, 0.5 predicts nothing), one with positives in (0.85, 0.98), negatives in (0.55, 0.75)
    (best cut near 0.8, 0.5 predicts every negative too)."""
    gold = rng.random((n, 2)) < 0.3
    probs = np.where(gold, [0.25, 0.85], [0.02, 0.55]) + rng.random((n, 2)) * np.where(gold, [0.2, 0.13], [0.13, 0.2])
    return probs, gold.astype(np.float32)


def test_tuned_thresholds_separate_what_05_does_not():
    probs, gold = separable(np.random.default_rng(0))
    low, high = tune_thresholds(probs, gold)
    assert 0.15 < low < 0.25 and 0.75 < high < 0.85, (low, high)
    at_05 = compute("multilabel", logit(probs), gold.tolist())
    tuned = compute("multilabel", logit(probs), gold.tolist(), [low, high])
    assert tuned == {"micro_f1": 1.0, "macro_f1": 1.0}
    assert at_05["macro_f1"] < 0.7 and at_05["micro_f1"] < 0.9, at_05


def test_labels_under_the_floor_keep_05():
    rng = np.random.default_rng(1)
    probs, gold = separable(rng)
    rare = np.zeros(len(probs), dtype=np.float32)
    rare[: MIN_POSITIVES - 1] = 1.0  # separable at 0.1, one positive short of the floor
    probs = np.column_stack([probs, np.where(rare > 0, 0.12, 0.05)])
    gold = np.column_stack([gold, rare, np.zeros(len(probs))])
    probs = np.column_stack([probs, rng.random(len(probs))])  # a label no dev example has
    thresholds = tune_thresholds(probs, gold)
    assert thresholds[2:] == [0.5, 0.5] and thresholds[0] < 0.25 < 0.75 < thresholds[1]
    lowered = tune_thresholds(probs, gold, min_positives=MIN_POSITIVES - 1)
    assert 0.05 < lowered[2] < 0.12 and lowered[3] == 0.5, "no positives at all: never tuned"


def _f1(p: np.ndarray, gold: np.ndarray, cut: float) -> float:
    pred = p >= cut
    tp, fp, fn = (pred & gold).sum(), (pred & ~gold).sum(), (~pred & gold).sum()
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_reaches_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(60), 2)  # ties on purpose
    gold = rng.random(60) < np.clip(p + rng.normal(0, 0.3, 60), 0, 1)
    cut = best_threshold(p, gold)
    best = max(_f1(p, gold, t) for t in [*np.unique(p), 0.5, 1.1])
    assert _f1(p, gold, cut) == pytest.approx(best, abs=1e-12) and _f1(p, gold, cut) >= _f1(p, gold, 0.5)
    assert not np.isin(cut, p) or cut == 0.5, "a cut sits between probabilities, never on one"


def test_trained_multilabel_task_carries_and_serves_tuned_thresholds(tiny_models, tmp_path, capsys):
    bert = Backbone.load(tiny_models["bert"])
    job = job_for(tmp_path, "topics", "multilabel", False, layers=(1, 1), student_layers=1, reference=True,
                  extra_attach=2)
    report, student = train_task(job, bert, tmp_path / "tasks")
    tuned = report.thresholds
    spec = read_spec(tmp_path / "tasks" / "topics")
    assert spec.thresholds == tuned.values == student.spec.thresholds
    assert spec.thresholds != [0.5] * len(spec.labels), "the tiny model's probabilities sit near 0.5"
    assert spec.metrics["tuned"] == report.chosen.tuned
    assert tuned.at_half["micro_f1"] == pytest.approx(report.chosen.scores["micro_f1"], abs=1e-6)
    assert tuned.fit["macro_f1"] >= tuned.at_half["macro_f1"]  # in-sample; "tuned" is held out
    assert set(tuned.labels_per_text) == {"predicted", "gold", "more_than_gold"} and tuned.folds == FOLDS
    reference = report.reference.thresholds
    assert len(reference.values) == len(spec.labels) and set(reference.to_dict()) == set(tuned.to_dict())
    assert reference.at_half == pytest.approx({m: report.reference.log.dev[m] for m in reference.at_half}, abs=1e-6)
    assert json.loads((tmp_path / "tasks" / "topics" / "report.json").read_text())["thresholds"] == tuned.to_dict()
    # every kept candidate (for `centra plan`) carries thresholds tuned for its own head
    kept = {p.name: json.loads((p / "task.json").read_text())
            for p in sorted((tmp_path / "tasks" / "topics" / "candidates").iterdir())}
    assert set(kept) == {"student-l1", "teacher-L1", "student-a2-l1", "student-a1-l1"}, kept  # extra_attach 2
    assert kept["student-l1"]["thresholds"] == spec.thresholds
    for cand in kept.values():
        assert len(cand["thresholds"]) == len(spec.labels) and "tuned" in cand["metrics"], cand
        assert cand["thresholds"] != [0.5] * len(spec.labels)
    printed = [line for line in summarize(report).splitlines() if "thresholds tuned on dev, held out: micro_f1" in line]
    assert [line.split(":")[0] for line in printed] == ["  full fine-tuning (4 layers and embeddings, 3 epochs)",
                                                        "chosen"]
    # served: the merged engine's logits, read against the task's thresholds, give the in-sample dev metrics
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "model")
    dev, _ = load_examples(job.dev, "multilabel", job.columns, labels=spec.labels)
    logits = Engine.load(tmp_path / "model").logits(dev.texts, None, ["topics"])["topics"].numpy()
    assert compute("multilabel", logits, dev.targets, spec.thresholds) == pytest.approx(tuned.fit, abs=1e-6)
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "topics", "--data", str(job.dev),
                 "--text-column", "text", "--label-column", "label"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {m: result[m] for m in tuned.fit} == pytest.approx(tuned.fit, abs=1e-6)
    assert result["labels_per_text"]["gold"] == tuned.labels_per_text["gold"]
    # max_labels not set: the training labels give it, recorded in task.json and the report
    train, _ = load_examples(job.train, "multilabel", job.columns, labels=spec.labels)
    assert spec.max_labels == label_count_limit(np.asarray(train.targets)) == tuned.max_labels
    assert tuned.max_labels_from == "data" and report.to_dict()["thresholds"]["max_labels_from"] == "data"
    assert len(tuned.guard) == len(spec.labels) and set(tuned.guard) <= {"tuned", "kept 0.5", "floor"}
    assert tuned.objective == "micro_f1", "the default objective"


def test_a_max_labels_set_is_kept(tiny_models, tmp_path):
    bert = Backbone.load(tiny_models["bert"])
    job = job_for(tmp_path, "topics", "multilabel", False, layers=(1, 1), student_layers=1, extra_attach=0,
                  max_labels=1, threshold_objective="label")
    report, _ = train_task(job, bert, tmp_path / "tasks")
    assert read_spec(tmp_path / "tasks" / "topics").max_labels == 1 == report.thresholds.max_labels
    assert report.thresholds.max_labels_from is None and report.thresholds.objective == "label"


def test_label_count_limit_covers_the_training_texts():
    targets = np.zeros((200, 6))
    targets[:, 0] = 1
    targets[:20, 1] = 1  # 10% have 2 labels
    targets[:2, 2] = 1  # 1% have 3
    assert label_count_limit(targets) == 2  # 99% of the texts have at most 2
    assert label_count_limit(targets, coverage=1.0) == 3
    assert label_count_limit(np.zeros((5, 3))) == 1, "never below one label"


def test_the_tail_figures_count_texts_over_gold_and_neutral_texts_given_another_label():
    gold = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1]])  # label 0: neutral
    probs = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.1], [0.1, 0.9, 0.9], [0.1, 0.9, 0.1]])
    found = labels_per_text(probs, [0.5, 0.5, 0.5], gold, neutral=0)
    assert found["more_than_gold"] == 0.5  # rows 0 and 2
    assert found["neutral_given_other"] == 0.5  # of rows 0-1 (neutral only), row 0
    assert "neutral_given_other" not in labels_per_text(probs, [0.5] * 3, gold)
