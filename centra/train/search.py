"""The teacher search over L (trainable top layers): full, or by successive halving.

`full` trains every L in MIN..MAX for all epochs and keeps the best on dev. `halving` (the default)
ranks every L on dev after a first rung (one epoch, or the job's first_rung: a fraction stops mid-epoch),
keeps the better half less any L that a deeper kept L outscores (see `cut`), trains the survivors on to
the next rung (RUNG_GROWTH times as many epochs: resumed, with the same optimizer, schedule, batch order
and position in the epoch, see finetune.BranchTrainer), and so on until one remains, which then finishes its epochs;
so the winner is exactly the teacher a full run of that L gives, for a fraction of the search's epochs.
Rungs and the final choice compare finetune.selection_score (a multilabel task at thresholds tuned on
dev, as it is served). Teachers run in order of attach layer so the trunk cache climbs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from centra.core.task import TaskHead
from centra.train.finetune import BranchTrainer, selection_score
from centra.train.job import Run
from centra.train.report import BranchLog, SearchCost, Teacher
from centra.train.settings import FIRST_RUNG

MAX_CANDIDATE_LAYERS = 3  # teachers kept as plan candidates (centra plan): at most this many task layers
RUNG_GROWTH = 2  # each later rung trains its survivors to this many times the previous rung's epochs


def rungs(arms: int, epochs: int, first: float = FIRST_RUNG, growth: float = RUNG_GROWTH) -> list[float]:
    """The epochs (cumulative) at which halving ranks `arms` arms: first, first * growth, ... up to the
    cuts that leave one arm (keeping the better half each time), then `epochs`, where the last cut is made
    if arms remain. 5 arms over 3 epochs: [1, 2, 3]; with a first rung of 0.25 and growth 4: [0.25, 1, 3].
    A mark past the first epoch is rounded up to a whole epoch: a branch with an epoch behind it is ranked
    by its best epoch, so a part epoch more would be trained for nothing."""
    marks, alive, at = [], arms, first
    while alive > 1:
        mark = at if at <= 1 else math.ceil(at - 1e-9)
        if mark >= epochs:
            break
        if not marks or mark > marks[-1]:
            marks.append(mark)
            alive = max(1, alive // 2)
        at *= growth
    return marks + [epochs]


def cut(scores: dict[int, float], prune: bool = True) -> set[int]:
    """The arms (numbers of layers) that go on after a rung: the better half (at least one), ties going
    to fewer layers, less every arm that a deeper arm of that half outscores. A deeper branch has more
    to learn with: one that leads after a rung stays ahead of a shallower one it already beats (on GLUE
    L = 5 led L = 4 after one epoch and after two, on every task), while a deeper arm behind a shallower
    one can still overtake it (GoEmotions' L = 2 behind L = 1 after one epoch, ahead after two), so only
    the first is cut. prune=False keeps the whole better half (the job bar's costliest course)."""
    ranked = sorted(scores, key=lambda arm: (-scores[arm], arm))
    half = ranked[: max(1, len(ranked) // 2)]
    if not prune:
        return set(half)
    return {arm for arm in half if not any(other > arm and scores[other] > scores[arm] for other in half)}


def successive_halving(arms: list[int], marks: list[float], train_to: Callable[[int, float], float],
                       drop: Callable[[int], None] = lambda arm: None, prune: bool = True) -> tuple[int, list[dict]]:
    """Successive halving over `arms` (numbers of layers): train_to(arm, e) trains that arm on until it
    has trained e epochs and returns its dev score. At each mark the arms `cut` keeps go on; at the last
    mark one, the best (ties going to fewer layers). drop(arm) is called for each arm leaving. Returns the
    winner and one record per mark (epochs, scores, kept arms)."""
    alive, rounds = list(arms), []
    for i, mark in enumerate(marks):
        if len(alive) == 1 and i < len(marks) - 1:
            continue  # one arm left before the marks planned for more: it trains straight on to the last
        scores = {arm: train_to(arm, mark) for arm in alive}
        if i == len(marks) - 1:
            keep = {min(alive, key=lambda arm: (-scores[arm], arm))}
        else:
            keep = cut(scores, prune)
        for arm in alive:
            if arm not in keep:
                drop(arm)
        rounds.append({"epochs": mark, "scores": scores, "kept": [a for a in alive if a in keep]})
        alive = [a for a in alive if a in keep]
    return alive[0], rounds


@dataclass
class SearchResult:
    best: TaskHead
    teachers: list[Teacher]  # one per L, MAX..MIN
    cost: SearchCost  # method, epochs trained (and what the full search trains), seconds
    kept: dict[int, TaskHead] = field(default_factory=dict)  # trained teachers with L <= 3, by L


def search_teachers(run: Run) -> SearchResult:
    """Teachers for L = MAX..MIN on the run's caches, searched as the job says (its `search`): the best
    on dev wins (full) or the last one halving keeps, ties going to fewer layers."""
    tc, n, method = run.checked.tc, run.backbone.cfg.num_layers, run.job.search
    arms = list(range(run.checked.hi, run.checked.lo - 1, -1))  # attach layer n - L rising: the cache climbs
    trainers: dict[int, BranchTrainer] = {}
    logs: dict[int, dict] = {}
    heads: dict[int, TaskHead] = {}  # teachers with L <= 3, and the best so far
    clock = time.perf_counter()

    def train_to(layers: int, epochs: float) -> float:
        """Train teacher L on until it has trained `epochs` epochs; its dev score."""
        run.advance_to(n - layers)
        if layers not in trainers:
            trainers[layers] = run.trainer(run.new_head(n - layers, layers), f"teacher L={layers}")
        trainer = trainers[layers]
        return trainer.run(epochs - trainer.epochs_trained)

    def score(layers: int) -> tuple[float, int]:
        return selection_score(run.job.kind, logs[layers]["dev"], tc.metric), -layers

    def finish(layers: int) -> None:  # frees the optimizer at once; the head only when no longer needed
        heads[layers], logs[layers] = trainers.pop(layers).finish()
        run.times[f"teacher_L{layers}"] = logs[layers]["seconds"]
        leader = max(logs, key=score) if method == "full" else layers  # halving: the winner finishes last
        for other in [k for k in heads if k not in (leader, layers) and k > MAX_CANDIDATE_LAYERS]:
            del heads[other]

    rounds = None
    if method == "full":
        for layers in arms:
            train_to(layers, tc.epochs)
            finish(layers)
        best = max(logs, key=score)
    else:  # the winner, not the best score on record: an arm cut mid-epoch may have scored higher then
        marks = rungs(len(arms), tc.epochs, run.job.first_rung)
        best, rounds = successive_halving(arms, marks, train_to, finish)
        finish(best)
    run.times["teacher_search"] = time.perf_counter() - clock
    teachers = [Teacher(n - layers, layers, layers == best, BranchLog.from_dict(logs[layers])) for layers in arms]
    cost = search_cost(method, teachers, tc.epochs, run.times["teacher_search"], rounds)
    return SearchResult(heads[best], teachers, cost, {k: h for k, h in heads.items() if k <= MAX_CANDIDATE_LAYERS})


def search_cost(method: str, teachers: list[Teacher], epochs: int, seconds: float,
                rounds: list[dict] | None) -> SearchCost:
    """What the search cost, in epochs and layer-epochs (epochs x trainable layers, the measure of its
    compute), against what the full search trains."""
    trained = {t.trainable_layers: t.log.epochs_trained for t in teachers}
    recorded = None if rounds is None else [{"epochs": r["epochs"], "kept": r["kept"],
                                             "scores": {str(k): round(v, 6) for k, v in r["scores"].items()}}
                                            for r in rounds]
    return SearchCost(method, round(seconds, 2), round(sum(trained.values()), 4), epochs * len(trained),
                      round(sum(layers * e for layers, e in trained.items()), 4), epochs * sum(trained), recorded)
