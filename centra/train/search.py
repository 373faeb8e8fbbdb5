"""The teacher search over L (trainable top layers): full, or by successive halving.

`full` trains every L in MIN..MAX for all epochs and keeps the best on dev. `halving` (the default)
trains every L for one epoch, keeps the better half on dev (multilabel tasks ranked at thresholds tuned
on dev: see `rung_score`), trains the survivors one more epoch each
(resumed: same optimizer, schedule and batch order, see finetune.BranchTrainer), and so on until one
remains, which then finishes its epochs; so the winner is exactly the teacher a full run of that L gives,
for a fraction of the search's epochs. Teachers run in order of attach layer so the trunk cache climbs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from centra.core.task import TaskHead
from centra.train.finetune import BranchTrainer
from centra.train.job import Run
from centra.train.thresholds import tune_head

SEARCHES = ("halving", "full")
MAX_CANDIDATE_LAYERS = 3  # teachers kept as plan candidates (centra plan): at most this many task layers


def successive_halving(arms: list[int], epochs: int, train_epoch: Callable[[int], float],
                       drop: Callable[[int], None] = lambda arm: None) -> tuple[int, list[dict]]:
    """Successive halving over `arms` (numbers of layers): train_epoch(arm) trains that arm one more
    epoch and returns its best dev score so far. After each epoch the better half of the arms (at least
    one) goes on, ties going to fewer layers; drop(arm) is called for each arm leaving. The last one
    trains to `epochs`. Returns the winner and one record per epoch (scores, kept arms)."""
    alive, rounds = list(arms), []
    for epoch in range(1, epochs + 1):
        scores = {arm: train_epoch(arm) for arm in alive}
        ranked = sorted(alive, key=lambda arm: (-scores[arm], arm))
        keep = set(ranked[: 1 if epoch == epochs else max(1, len(alive) // 2)])
        for arm in alive:
            if arm not in keep:
                drop(arm)
        rounds.append({"epoch": epoch, "scores": scores, "kept": [a for a in alive if a in keep]})
        alive = [a for a in alive if a in keep]
    return alive[0], rounds


@dataclass
class SearchResult:
    best: TaskHead
    logs: list[dict]  # one per L, MAX..MIN
    kept: dict[int, TaskHead] = field(default_factory=dict)  # trained teachers with L <= 3, by L
    cost: dict = field(default_factory=dict)  # method, epochs trained (and what the full search trains), seconds


def search_teachers(run: Run, method: str = "halving") -> SearchResult:
    """Teachers for L = MAX..MIN on the run's caches; the best on dev wins, ties going to fewer layers."""
    tc, n = run.checked.tc, run.backbone.cfg.num_layers
    arms = list(range(run.checked.hi, run.checked.lo - 1, -1))  # attach layer n - L rising: the cache climbs
    trainers: dict[int, BranchTrainer] = {}
    logs: dict[int, dict] = {}
    heads: dict[int, TaskHead] = {}  # teachers with L <= 3, and the best so far
    clock = time.perf_counter()

    def train(layers: int, epochs: int) -> float:
        for cache in run.caches:
            cache.advance_to(n - layers)
        if layers not in trainers:
            trainers[layers] = run.trainer(run.new_head(n - layers, layers), f"teacher L={layers}")
        return trainers[layers].run(epochs)

    def rung_score(layers: int, score_at_half: float) -> float:
        """What halving ranks after each epoch. A multilabel metric at 0.5 stays near 0 until the model's
        probabilities cross 0.5, which a slow starter has not done after one epoch (GoEmotions' best L
        scored 12 micro-F1 at 0.5 after one epoch, 39 after two): rank it at thresholds tuned on dev."""
        if run.checked.job.kind != "multilabel":
            return score_at_half
        return tune_head(trainers[layers].head, run.caches[1], run.dev.targets)["tuned"][tc.metric]

    def score(layers: int) -> tuple[float, int]:
        return logs[layers]["dev"][tc.metric], -layers

    def finish(layers: int) -> None:  # frees the optimizer at once; the head only when no longer needed
        heads[layers], logs[layers] = trainers.pop(layers).finish()
        run.times[f"teacher_L{layers}"] = logs[layers]["seconds"]
        best = max(logs, key=score)
        for other in [k for k in heads if k != best and k > MAX_CANDIDATE_LAYERS]:
            del heads[other]

    rounds = None
    if method == "full":
        for layers in arms:
            train(layers, tc.epochs)
            finish(layers)
    else:
        _, rounds = successive_halving(arms, tc.epochs, lambda layers: rung_score(layers, train(layers, 1)), finish)
        for layers in list(trainers):
            finish(layers)
    run.times["teacher_search"] = time.perf_counter() - clock
    best = max(logs, key=score)
    report = [{"trainable_layers": layers, "attach_layer": n - layers, "chosen": layers == best,
               "epochs_trained": len(logs[layers]["epochs"]), **logs[layers]} for layers in arms]
    return SearchResult(heads[best], report, {k: h for k, h in heads.items() if k <= MAX_CANDIDATE_LAYERS},
                        search_cost(method, arms, report, tc.epochs, run.times["teacher_search"], rounds))


def search_cost(method: str, arms: list[int], logs: list[dict], epochs: int, seconds: float,
                rounds: list[dict] | None) -> dict:
    """What the search cost, in epochs and layer-epochs (epochs x trainable layers, the measure of its
    compute), against what the full search trains."""
    trained = {log["trainable_layers"]: log["epochs_trained"] for log in logs}
    cost = {"method": method, "seconds": round(seconds, 2), "epochs_trained": sum(trained.values()),
            "epochs_full_search": epochs * len(arms),
            "layer_epochs": sum(layers * e for layers, e in trained.items()),
            "layer_epochs_full_search": epochs * sum(arms)}
    if rounds is not None:
        cost["rounds"] = [{"epoch": r["epoch"], "kept": r["kept"],
                           "scores": {str(k): round(v, 6) for k, v in r["scores"].items()}} for r in rounds]
    return cost
