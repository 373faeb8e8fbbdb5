"""`plan_tasks`: one kept candidate per task for the best average dev metric under a budget (layers per
request, or milliseconds converted at this machine's measured cost of a layer), after distilling, when
asked (`extra_attach`), the students below each teacher that a task folder lacks (`train_shallower`,
centra.train.shallower); `activate_plan` makes the choice the tasks' active heads (no retraining). The
allocation itself is centra.train.plan's."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from centra.core import DEFAULT_TASKS_DIR
from centra.errors import CentraError, FieldError, Name
from centra.train.plan import Option, Plan, best_plan, frontier

if TYPE_CHECKING:
    from centra.core.backbone import Backbone, EncoderLayer
    from centra.core.candidates import Candidate, TaskCandidates
    from centra.train.shallower import Widened

DEFAULT_LENGTH = 64  # tokens of a typical request (a review, an utterance) for a budget in milliseconds


@dataclass
class PlanResult:
    """The chosen plan and what it was chosen from: per task its candidates (`tasks`) and the candidate
    picked (`picks`); the frontier (`plans`, cheapest first); the budget in layers (`note`: how
    milliseconds became layers); reference points (layers, average dev) to compare with; `full`, the
    layers of one full-depth model per task; the students distilled first (`widened`: extra_attach), and
    `wider`: a line saying how to widen the frontier when some task keeps no students below its teacher."""

    tasks: list[TaskCandidates]
    backbone: Backbone
    budget: int
    note: str | None
    plans: list[Plan]
    chosen: Plan
    picks: dict[str, Candidate]
    points: dict[str, tuple[int, float]]
    full: int
    widened: list[Widened] = field(default_factory=list)
    wider: str | None = None


def plan_tasks(tasks_dir: Path | str = DEFAULT_TASKS_DIR, budget_layers: int | None = None,
               budget_ms: float | None = None, length: int | None = None,
               backbone: str | None = None, extra_attach: int = 0, progress: bool = True) -> PlanResult:
    """Choose one candidate per task of `tasks_dir` for the best average dev metric within one budget:
    `budget_layers` per request, or `budget_ms` at the cost of one layer measured now (batch 1, `length`
    tokens); `backbone`: the tasks' own when None. With `extra_attach` N, first distil the students at the
    N attach layers below each teacher that a task folder lacks (train_shallower: new candidates, the
    served heads untouched); else nothing is written (see activate_plan)."""
    from centra.core.candidates import read_candidates
    from centra.train.shallower import distil_missing

    if (budget_layers is None) == (budget_ms is None):
        raise FieldError("plan: give one budget: ", Name("budget_layers"), " N or ", Name("budget_ms"), " X",
                         ", not both" if budget_layers is not None else "")
    check_extra_attach(extra_attach)
    tasks, loaded = read_tasks(tasks_dir, backbone)
    widened = distil_missing(tasks, loaded, extra_attach, progress) if extra_attach else []
    if widened:
        tasks = [read_candidates(t.folder) for t in tasks]
    budget, note = budget_layers, None
    if budget_ms is not None:
        budget, note = ms_budget(budget_ms, loaded, length or min(DEFAULT_LENGTH, max(t.active.max_length
                                                                                    for t in tasks)))
    options = {t.name: [option(t.name, c, t.active_id) for c in t.options()] for t in tasks}
    plans = frontier(options)
    chosen = best_plan(options, budget)
    if chosen is None:
        raise CentraError(f"plan: a budget of {budget} layer{'s' if budget != 1 else ''}"
                          f"{f' ({budget_ms:g} ms)' if note else ''} is below the cheapest plan "
                          f"({plans[0].cost} layers, average dev {100 * plans[0].average:.2f})")
    full = loaded.cfg.num_layers * len(tasks)
    picks = {t.name: next(c for c in t.options() if c.id == chosen.choice[t.name].id) for t in tasks}
    return PlanResult(tasks, loaded, budget, note, plans, chosen, picks, reference_points(tasks, options, full), full,
                      widened, None if extra_attach else wider_note(tasks))


def train_shallower(tasks_dir: Path | str = DEFAULT_TASKS_DIR, extra_attach: int = 2, backbone: str | None = None,
                    progress: bool = True) -> list[Widened]:
    """Distil the students at the `extra_attach` attach layers below each teacher of `tasks_dir` that its
    folder lacks (what add-task's extra_attach trains; a folder that has them trains nothing) and publish
    each folder with them kept as candidates, its served head and every other file unchanged. Every task
    is checked first (its backbone, report, teacher file, data files present and unchanged)."""
    from centra.train.shallower import distil_missing

    check_extra_attach(extra_attach)
    tasks, loaded = read_tasks(tasks_dir, backbone)
    return distil_missing(tasks, loaded, extra_attach, progress)


def check_extra_attach(extra_attach: int) -> None:
    if isinstance(extra_attach, bool) or not isinstance(extra_attach, int) or extra_attach < 0:
        raise FieldError("plan: ", Name("extra_attach"), f" must be a whole number >= 0, not {extra_attach!r}")


def read_tasks(tasks_dir: Path | str, backbone: str | None) -> tuple[list[TaskCandidates], Backbone]:
    """The task folders' candidates and the backbone they share (`backbone`, or the one they name)."""
    from centra.core.backbone import Backbone
    from centra.core.candidates import read_candidates
    from centra.core.merge import backbone_hint
    from centra.core.task import task_dirs

    tasks = [read_candidates(folder) for folder in task_dirs(Path(tasks_dir))]
    check_trained(tasks, tasks_dir)
    loaded = Backbone.load(backbone or backbone_hint(tasks[0].active))
    for t in tasks:
        if t.active.backbone.get("fingerprint") != loaded.fingerprint:
            raise CentraError(f"{t.folder / 'task.json'}: trained on backbone {t.active.backbone.get('id')!r}, "
                              f"not on {loaded.backbone_id!r} (every task of a plan shares one backbone)")
    return tasks, loaded


def wider_note(tasks: list[TaskCandidates]) -> str | None:
    """One line when some task keeps no student below its teacher's attach layer (and has one below it):
    the frontier could be wider, and the flag that distils them."""
    narrow = [t.name for t in tasks if not t.has_shallower
              and max((c.spec.attach_layer for c in t.candidates if c.id.startswith("student-l")), default=0) > 0]
    if not narrow:
        return None
    names = ", ".join(narrow[:5]) + (f" and {len(narrow) - 5} more" if len(narrow) > 5 else "")
    return (f"the frontier could be wider: {len(narrow)} of {len(tasks)} tasks ({names}) keep no students below "
            "their teacher's attach layer; --extra-attach 2 distils those at the 2 layers below it first")


def check_trained(tasks: list[TaskCandidates], tasks_dir: Path | str) -> None:
    if not tasks:
        raise CentraError(f"{tasks_dir}: no task folders")
    if not any(t.candidates for t in tasks):
        raise CentraError(f"{tasks_dir}: no candidates in any task folder (add-task keeps them in "
                          "NAME/candidates/: train the tasks again with centra add-task)")
    for t in tasks:
        if not t.options():
            raise CentraError(f"{t.folder}: no candidates and no dev metric (an untrained task): train it with "
                              "centra add-task or remove it")


def activate_plan(result: PlanResult) -> list[str]:
    """Make each chosen candidate its task's active head (every chosen head loaded in full before any
    folder changes); the names of the tasks whose head changed."""
    from centra.core.candidates import activate, check_candidate

    for t in result.tasks:
        check_candidate(t, result.picks[t.name], result.backbone)
    return [t.name for t in result.tasks if activate(t, result.picks[t.name], result.backbone.cfg)]


def ms_budget(budget_ms: float, backbone: Backbone, length: int) -> tuple[int, str]:
    """Milliseconds -> layers at the cost of one encoder layer measured now (batch 1, `length` tokens)."""
    per_layer = layer_ms(backbone.layers[0], backbone.cfg.hidden_size, length)
    layers = math.floor(budget_ms / per_layer)
    return layers, (f"one layer costs {per_layer:.3f} ms here (batch 1 x {length} tokens, torch fp32, measured "
                    f"now): a budget of {budget_ms:g} ms is {layers} layer{'s' if layers != 1 else ''} per request")


def layer_ms(layer: EncoderLayer, hidden_size: int, length: int, batch: int = 1, seconds: float = 1.0) -> float:
    """Median milliseconds of one encoder layer on this machine (torch fp32, `batch` x `length` tokens):
    what one more layer per request costs, for budgets given in milliseconds."""
    import numpy as np
    import torch

    from centra.core.backbone import attention_bias

    hidden = torch.randn(batch, length, hidden_size)
    bias = attention_bias(torch.ones(batch, length, dtype=torch.long))
    layer = layer.eval()
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            layer(hidden, bias)
        start = time.perf_counter()
        while len(times) < 10 or (time.perf_counter() - start < seconds and len(times) < 10_000):
            begin = time.perf_counter()
            layer(hidden, bias)
            times.append(time.perf_counter() - begin)
    return float(np.median(times)) * 1000.0


def option(task: str, candidate: Candidate, active_id: str | None) -> Option:
    from centra.core.candidates import ACTIVE

    spec = candidate.spec
    return Option(task, candidate.id, spec.encoding_key, spec.attach_layer, spec.task_layers, candidate.score,
                  active=candidate.id in (active_id, ACTIVE))


def reference_points(tasks: list[TaskCandidates], options: dict, full: int) -> dict[str, tuple[int, float]]:
    """(layers, average dev) of the heads active now, of KD-l for every task (when each has it), and of
    full fine-tuning (when every task's report.json has its reference run)."""
    points = {}
    before = Plan({name: o for name, opts in options.items() for o in opts if o.active})
    if len(before.choice) == len(tasks):
        points["before"] = (before.cost, before.average)
    for layers in (1, 2, 3):
        picks = {name: [o for o in opts if o.id == f"student-l{layers}"] for name, opts in options.items()}
        if all(picks.values()):
            plan = Plan({name: found[0] for name, found in picks.items()})
            points[f"KD-{layers}"] = (plan.cost, plan.average)
    scores = [reference_score(t) for t in tasks]
    if None not in scores:
        points["full fine-tuning"] = (full, sum(scores) / len(scores))
    return points


def reference_score(task: TaskCandidates) -> float | None:
    """The task's full fine-tuning reference as served (a multilabel one at its tuned thresholds), from
    its report.json; None when it has none."""
    from centra.core.task import REPORT_FILE
    from centra.train.report import read_report

    try:
        reference = read_report(task.folder / REPORT_FILE).reference
        return None if reference is None else reference.served(task.metric)
    except (CentraError, KeyError, TypeError, ValueError):  # no report, or no score of the task's metric
        return None
