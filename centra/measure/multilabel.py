"""Multilabel decision rules, measured: a trained multilabel task's logits on dev and test, its thresholds
tuned on dev by each rule (objective, a floor under tuned thresholds, the labels-per-text limit), and
what each rule answers on test: micro- and macro-F1, labels per text against gold, the tail (texts given
more labels than gold has; gold-neutral texts given another label) and a few neutral questions.

    python -m centra.measure.multilabel TASK_FOLDER TRAIN DEV TEST [--label-names FILE]

TSV files with the text in column 0 and comma-separated label ids in column 1 (GoEmotions' layout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEUTRAL_QUESTIONS = ("How do I change the billing address on my account?", "What time does the store open on Sunday?",
                     "Please send the invoice for order 1234 to my work email.")


@dataclass(frozen=True)
class Rule:
    name: str
    objective: str = "label"
    floor: float = 0.0
    max_labels: int | str | None = None  # "data": the default the training labels give
    margin: float | None = None  # the guard's (None: train/thresholds.py's)


def read_tsv(path: Path, labels: int) -> tuple[list[str], np.ndarray]:
    texts, targets = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        row = np.zeros(labels)
        row[[int(x) for x in parts[1].split(",") if x]] = 1
        texts.append(parts[0])
        targets.append(row)
    return texts, np.array(targets)


def measure(folder: Path, train: Path, dev: Path, test: Path, rules: list[Rule]) -> list[dict]:
    from centra.core.merge import plan_merge, write_merged
    from centra.runtime.engine import Engine
    from centra.train.metrics import compute, decide
    from centra.train.thresholds import label_count_limit, labels_per_text, neutral_of, tune_thresholds

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        write_merged(plan_merge([folder.parent]), Path(tmp) / "out")
        engine = Engine.load(Path(tmp) / "out")
        spec = engine.specs[folder.name]
        labels = len(spec.labels)
        _, train_gold = read_tsv(train, labels)
        (dev_texts, dev_gold), (test_texts, test_gold) = read_tsv(dev, labels), read_tsv(test, labels)
        dev_logits = engine.logits(dev_texts, tasks=[spec.name])[spec.name].numpy().astype(np.float64)
        test_logits = engine.logits(test_texts, tasks=[spec.name])[spec.name].numpy().astype(np.float64)
        questions = engine.logits(list(NEUTRAL_QUESTIONS), tasks=[spec.name])[spec.name].numpy()
    neutral = neutral_of(spec.labels)
    from_data = label_count_limit(train_gold)
    dev_probs, test_probs = 1 / (1 + np.exp(-dev_logits)), 1 / (1 + np.exp(-test_logits))
    q_probs = 1 / (1 + np.exp(-questions.astype(np.float64)))
    rows = []
    for rule in rules:
        k = from_data if rule.max_labels == "data" else rule.max_labels
        margin = {} if rule.margin is None else {"margin": rule.margin}
        thresholds = tune_thresholds(dev_probs, dev_gold, objective=rule.objective, floor=rule.floor, **margin)
        scores = compute("multilabel", test_logits, list(test_gold), thresholds, k)
        found = labels_per_text(test_probs, thresholds, test_gold, k, neutral)
        asked = decide(q_probs, thresholds, k)
        answers = [[spec.labels[c] for c in np.flatnonzero(row)] for row in asked]
        lowest = min((float(q_probs[i, c]) for i, row in enumerate(asked) for c in np.flatnonzero(row)
                      if c != neutral), default=None)
        rows.append({"rule": rule.name, "max_labels": k, "micro_f1": round(scores["micro_f1"], 2),
                     "macro_f1": round(scores["macro_f1"], 2), "labels_per_text": round(found["predicted"], 3),
                     "gold_per_text": round(found["gold"], 3), "more_than_gold": found["more_than_gold"],
                     "neutral_given_other": found.get("neutral_given_other"),
                     "questions": answers, "lowest_emotion_score": None if lowest is None else round(lowest, 3),
                     "thresholds_under_0.15": int(sum(t < 0.15 for t in thresholds))})
    return rows


RULES = [Rule("per-label F1 (before)"), Rule("per-label F1, k from data", max_labels="data"),
         Rule("micro-F1, k from data", "micro_f1", max_labels="data"),
         *[Rule(f"per-label F1, floor {f}, k from data", floor=f, max_labels="data") for f in (0.1, 0.15)],
         *[Rule(f"micro-F1, floor {f}, k from data", "micro_f1", floor=f, max_labels="data") for f in (0.1, 0.15)],
         *[Rule(f"{o}, margin {m}, k from data", o, margin=m, max_labels="data")
           for o in ("label", "micro_f1") for m in (0.15, 0.2, 0.25)]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", type=Path)
    parser.add_argument("train", type=Path)
    parser.add_argument("dev", type=Path)
    parser.add_argument("test", type=Path)
    args = parser.parse_args(argv)
    for row in measure(args.task, args.train, args.dev, args.test, RULES):
        print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
