"""The teacher search: successive halving picks the best L on synthetic learning curves for a fraction of
the epochs, a branch trained in interleaved pieces ends exactly as one trained straight through, and a
real run records what its search cost."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_training import job_for, synthetic

from centra.core.backbone import Backbone
from centra.core.task import CANDIDATES_DIR, init_task
from centra.core.tokens import encode
from centra.errors import CentraError
from centra.train.cache import ActivationCache
from centra.train.finetune import BranchTrainer, TrainConfig, train_branch
from centra.train.pipeline import train_task
from centra.train.search import successive_halving


class Curves:
    """Injected training: arm L's dev score after e epochs is final[L] * (1 - 0.5 ** e) (every arm learns
    at the same pace, so the ranking after one epoch is the final one); records every epoch trained."""

    def __init__(self, final: dict[int, float]):
        self.final, self.epochs = final, {arm: 0 for arm in final}

    def __call__(self, arm: int) -> float:
        self.epochs[arm] += 1  # resumed: one more epoch on top of those it has
        return self.final[arm] * (1 - 0.5 ** self.epochs[arm])


def test_halving_picks_the_best_layers_for_fewer_epochs():
    curves = Curves({5: 0.85, 4: 0.80, 3: 0.90, 2: 0.70, 1: 0.60})
    dropped = []
    winner, rounds = successive_halving([5, 4, 3, 2, 1], 3, curves, dropped.append)
    assert winner == 3
    assert curves.epochs == {5: 2, 4: 1, 3: 3, 2: 1, 1: 1}, "5 arms -> 2 -> 1, the last one to the end"
    assert sorted(dropped) == [1, 2, 4, 5] and [r["kept"] for r in rounds] == [[5, 3], [3], [3]]
    assert sum(curves.epochs.values()) == 8 < 5 * 3


def test_halving_agrees_with_the_full_search_on_random_curves():
    rng = random.Random(4)
    for _ in range(200):
        arms = list(range(rng.randint(1, 10), 0, -1))
        final = {arm: round(rng.random(), rng.choice([1, 3])) for arm in arms}  # coarse: ties, fewer layers win
        epochs = rng.randint(1, 5)
        curves = Curves(final)
        winner, _ = successive_halving(arms, epochs, curves)
        full = max(arms, key=lambda arm: (final[arm], -arm))
        assert winner == full, (final, epochs)
        assert curves.epochs[winner] == epochs and all(0 < e <= epochs for e in curves.epochs.values())
        assert sum(curves.epochs.values()) <= min(len(arms) * epochs, 2 * len(arms) + epochs)


def test_halving_keeps_a_fast_starter_over_a_slow_one():
    """What halving gives up: an arm that is behind after one epoch is not trained further."""
    scores = {2: [0.6, 0.62, 0.63], 1: [0.5, 0.7, 0.9]}
    trained = {2: 0, 1: 0}

    def train(arm: int) -> float:
        trained[arm] += 1
        return max(scores[arm][: trained[arm]])

    assert successive_halving([2, 1], 3, train)[0] == 2 and trained == {2: 3, 1: 1}


@pytest.fixture(scope="module")
def bert(tiny_models) -> Backbone:
    return Backbone.load(tiny_models["bert"])


def test_a_branch_trained_in_pieces_equals_one_trained_straight(bert):
    tok = bert.tokenizer()
    rows = synthetic("multiclass", False, 40, 5)
    targets = [int(label == "pos") for _, label in rows]
    enc = encode(tok, bert.cfg.type_vocab_size, [text for text, _ in rows], None, 32)
    caches = [ActivationCache(bert, enc, tok.pad_token_id, 1 << 30, progress=False) for _ in range(2)]
    for cache in caches:
        cache.build(2)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-2, metric="accuracy", progress=False)

    def head(seed: int):
        return init_task(bert, "t", "multiclass", ["neg", "pos"], 2, 2, seed=seed)[1]

    straight, log = train_branch(head(1), caches[0], targets, caches[1], targets, cfg, "straight")
    pieces = BranchTrainer(head(1), caches[0], targets, caches[1], targets, cfg, "pieces")
    other = BranchTrainer(head(2), caches[0], targets, caches[1], targets, cfg, "other")
    pieces.run(1)
    other.run(2)  # draws from the batch order and dropout streams in between
    pieces.run(1)
    other.run(1)
    pieces.run(5)  # never past cfg.epochs
    resumed, log2 = pieces.finish()
    assert len(log2["epochs"]) == 3 and log2["losses"] == log["losses"] and log2["dev"] == log["dev"]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for cache in caches:
        cache.close()


def test_train_task_records_the_search_and_keeps_candidates(bert, tmp_path):
    job = job_for(tmp_path, "t", "multiclass", False, layers=(1, 3), threshold=-100.0)
    report, student = train_task(job, bert, tmp_path / "tasks")
    search = report["search"]
    assert search["method"] == "halving" and search["epochs_full_search"] == 9
    assert search["epochs_trained"] == 3 + 1 + 1 == sum(t["epochs_trained"] for t in report["teachers"])
    assert search["layer_epochs"] < search["layer_epochs_full_search"] == 18 and search["seconds"] > 0
    chosen = next(t for t in report["teachers"] if t["chosen"])
    assert chosen["epochs_trained"] == 3 and [r["epoch"] for r in search["rounds"]] == [1, 2, 3]
    kept = {p.name for p in (tmp_path / "tasks" / "t" / CANDIDATES_DIR).iterdir()}
    best = chosen["trainable_layers"]
    assert kept == {"teacher-L1", "teacher-L2", "teacher-L3"} | {f"student-l{x}" for x in range(1, best + 1)}
    for entry in report["candidates"]:
        spec = json.loads((tmp_path / "tasks" / "t" / CANDIDATES_DIR / entry["id"] / "task.json").read_text())
        assert spec["metrics"]["accuracy"] == entry["accuracy"] and spec["trained"]
        log = next(t for t in report["teachers"] + report["students"]
                   if entry["id"] in (f"teacher-L{t.get('trainable_layers')}", f"student-l{t.get('task_layers')}"))
        assert entry["accuracy"] == round(log["dev"]["accuracy"], 6)

    full = job_for(tmp_path, "u", "multiclass", False, layers=(1, 3), threshold=-100.0, search="full")
    report, _ = train_task(full, bert, tmp_path / "tasks")
    assert report["search"]["method"] == "full" and report["search"]["epochs_trained"] == 9
    assert all(t["epochs_trained"] == 3 for t in report["teachers"])
    with pytest.raises(CentraError, match="--search 'fast' must be one of halving, full"):
        train_task(job_for(tmp_path, "v", "multiclass", False, search="fast"), bert, tmp_path / "tasks")


def test_multilabel_rungs_are_ranked_at_tuned_thresholds(bert, tmp_path, monkeypatch):
    """A multilabel metric at 0.5 sits near 0 for a slow starter after one epoch; halving ranks multilabel
    arms by the metric at thresholds tuned on dev instead (here made to favour L = 1, the arm the scores
    at 0.5 would not keep)."""
    from centra.train import search

    tuned_calls = []

    def fake_tune(head, dev, targets):
        tuned_calls.append(head.spec.task_layers)
        return {"tuned": {"micro_f1": 1.0 / head.spec.task_layers}}  # fewer layers: better

    monkeypatch.setattr(search, "tune_head", fake_tune)
    job = job_for(tmp_path, "m", "multilabel", False, layers=(1, 3), student_layers=1)
    report, _ = train_task(job, bert, tmp_path / "tasks")
    first = report["search"]["rounds"][0]
    assert sorted(tuned_calls[:3]) == [1, 2, 3], tuned_calls  # every arm scored after its first epoch
    assert first["kept"] == [1] and first["scores"]["1"] == 1.0, first
    assert next(t for t in report["teachers"] if t["chosen"])["trainable_layers"] == 1
