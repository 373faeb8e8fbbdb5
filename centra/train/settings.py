"""Training settings, each declared once: one field of `Settings` with its default, its type and
metadata (help, flag, recipe key, check), the way sentence-transformers declares its TrainingArguments.

Everything else derives from these fields: the add-task flags (`DECLARED`, read by centra.cli.tasks), a
recipe's `training` block (its types, what it records for a setting not given: `settings_from`,
`recipe_block`), the job the pipeline runs (`TaskJob` is a `Settings`; `TrainConfig` takes its fields),
the checks made before any compute (`Settings.check`, `Settings.resolve`) and the README's settings table
(`settings_table`). A refused setting raises `SettingError`, which names the field and its value; the
CLI writes the field's flag in its place (`flag_of`).

Adding a setting is one field here; the code that reads it takes it from the job (`job.NAME`).
This module imports nothing heavy: the CLI reads it while it builds its parsers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from types import NoneType, UnionType
from typing import Any, get_args, get_type_hints

from centra.core import POOLINGS
from centra.errors import FieldError, Name

SEARCHES = ("halving", "full")
# A quarter-epoch first rung cut the full search's winner on CoLA and RTE (2,500-8,500 examples: every L
# still near chance then; docs/results.md), so the default ranks after one epoch, as the search was designed.
FIRST_RUNG = 1.0
# multilabel thresholds: each label's own F1 (which is also what maximises macro-F1) or micro-F1 over all
# labels together (centra.train.thresholds)
THRESHOLD_OBJECTIVES = ("label", "micro_f1")
# training precision (centra.train.precision): auto = bf16 on a CPU with bf16 in hardware, else fp32
PRECISIONS = ("auto", "bf16", "fp32")
# the mixed allocation's students: one joint student with an exit per layer (centra.train.joint) or one each
STUDENTS = ("joint", "separate")
# micro_f1: on GoEmotions (4,000 examples, 2 epochs) per-label tuning gave 1.42 labels per text against gold's
# 1.17 and another emotion to 35% of neutral texts; micro-F1 with the default max_labels, 1.05, and 16%
# (centra/measure/multilabel.py; docs/results.md, "Multilabel defaults")
DEFAULT_OBJECTIVE = "micro_f1"
REFERENCE_EPOCHS = 3  # the full fine-tuning reference trains as the papers do: 3 epochs


class SettingError(FieldError):
    """A setting, or another named input of a job, refused before any compute. The message names it
    by its field name; `named` writes each name another way."""


def refused(name: str, detail: str) -> SettingError:
    return SettingError(Name(name), " ", detail)


Check = Callable[[Any], "str | None"]  # a value -> why it is refused (after the field's name), or None


def at_least(low: int, finite: bool = False) -> Check:
    def check(value: Any) -> str | None:
        return f"must be >= {low}, not {value}" if not value >= low or finite and not math.isfinite(value) else None
    return check


def positive(value: float) -> str | None:
    return f"must be a positive number, not {value}" if not value > 0 or not math.isfinite(value) else None


def layer_range(value: str) -> tuple[int, int] | None:
    """'MIN:MAX' (or 'N', meaning N:N) -> (MIN, MAX); None when it is neither."""
    lo, _, hi = value.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        return None


def min_max(value: str) -> str | None:
    return None if layer_range(value) else f"{value!r}: expected MIN:MAX, e.g. 1:5"


def setting(default: Any, help: str, *, shown: str | None = None, choices: tuple[str, ...] | None = None,
            check: Check | None = None, metavar: str | None = None, unset: str = "default",
            flag: str | None = None, recipe: str | None = None) -> Any:
    """A `Settings` field. shown: the default as help and docs write it (when the value alone says too
    little); unset: what a recipe that does not give the setting records: "default" (its default),
    "null" (as schema-1 recipes did where the pipeline applied the default) or "omitted" (a setting
    added later: older recipes keep their sha256); flag and recipe key default to the field's name."""
    return field(default=default, metadata={"help": help, "shown": shown, "choices": choices, "check": check,
                                            "metavar": metavar, "unset": unset, "flag": flag, "recipe": recipe})


@dataclass(kw_only=True)
class Settings:
    """How a task trains: the settings a recipe's `training` block and the add-task flags may give."""

    layers: str | None = setting(None, "teacher search: trainable top layers MIN:MAX",
                                 shown="1:5 on 6 layers, 4:10 on 12", metavar="MIN:MAX", check=min_max)
    search: str = setting("halving", "teacher search: successive halving (every L one epoch, the better half "
                          "goes on, resumed, less any L a deeper one outscores) or every L for all epochs",
                          choices=SEARCHES, unset="omitted")
    first_rung: float = setting(FIRST_RUNG, "halving: epochs every L trains before the first cut (at most "
                                "all the epochs); later rungs double it. Below 1 only on large training sets",
                                metavar="EPOCHS", unset="omitted")
    student_layers: int | None = setting(None, "fix the student's task layers l (1-3): no mixed allocation",
                                         shown="mixed allocation")
    students: str = setting("joint", "mixed allocation: the students l = 1-3 trained as one (an exit after each "
                            "shared layer, each kept at its own best epoch: 3 layers' training, not 1 + 2, + 3 when "
                            "l = 2 gains) or each on its own (not with student_layers; extra_attach students train "
                            "apart)",
                            choices=STUDENTS, unset="omitted")
    threshold: float = setting(1.0, "mixed allocation: add a task layer while it gains >= c dev points",
                               unset="null")
    epochs: int = setting(2, "epochs of every branch trained (teachers and students)", check=at_least(1))
    batch_size: int = setting(32, "training examples per step", check=at_least(1))
    lr: float = setting(1e-4, "learning rate of transformer layers", check=positive)
    head_lr: float = setting(1e-3, "learning rate of pooler + classifier", check=positive)
    metric: str | None = setting(None, "dev metric that picks epochs, teachers and students",
                                 shown="by kind: accuracy, micro_f1, pearson")
    alpha: float = setting(1.0, "weight of the distillation loss", check=at_least(0, finite=True))
    temperature: float = setting(2.0, "distillation temperature F", check=positive)
    seed: int = setting(0, "seed of the heads, the batch order and the training subset")
    max_train_examples: int | None = setting(None, "random subset of the training file (seeded)", shown="all",
                                             check=at_least(1))
    max_length: int | None = setting(None, "tokens per input", shown="128 or the backbone's limit")
    pooling: str = setting("mean", "pooling of the branch's last hidden states", choices=POOLINGS)
    reference: bool = setting(False, "also fine-tune the whole model (embeddings and every layer, "
                              f"{REFERENCE_EPOCHS} epochs), to compare")
    teacher_logits: str | None = setting(None, "JSONL table of an external teacher's logits, one row per "
                                         "train row", metavar="FILE")
    attach_layer: int | None = setting(None, "the students' attach layer when an external teacher "
                                       "gives the logits", shown="N/2")
    cache_gb: float = setting(4.0, "memory cap of the run's trunk caches, then disk", check=at_least(0))
    precision: str = setting("auto", "training precision: bf16 where the CPU computes it in hardware (AMX, "
                             "AVX-512 BF16; the dev set still scored in fp32, as served), else fp32",
                             choices=PRECISIONS, unset="omitted")
    # 0: they cost 519 s of a 766 s GoEmotions job (docs/results.md) and serve only when a plan picks them
    extra_attach: int = setting(0, "students (l = 1-3, or student_layers) also distilled at this many attach "
                                "layers below the teacher's (k-1, k-2, ...): shallower candidates for "
                                "`centra plan`, never served unless a plan chooses them (`centra plan "
                                "--extra-attach N` trains them later, when a plan asks)", check=at_least(0),
                                unset="omitted")
    threshold_objective: str = setting(DEFAULT_OBJECTIVE, "multilabel: tune all labels' thresholds together "
                                       "for micro-F1 (a weak label's predictions must pay for themselves) or each "
                                       "for its own F1 (label: = macro-F1, more labels per text)",
                                       choices=THRESHOLD_OBJECTIVES, unset="omitted")
    max_labels: int | None = setting(None, "multilabel: answer at most this many labels per text, the "
                                     "highest-scoring above their thresholds (the number of labels: no limit)",
                                     shown="the fewest per text that cover 99% of the training texts' labels",
                                     check=at_least(1), unset="omitted")

    def check(self) -> None:
        """Every setting's own check (range, choices), then those between settings."""
        for d in DECLARED:
            value = getattr(self, d.name)
            why = None if value is None else d.why_not(value)
            if why:
                raise refused(d.name, why)
        if not 0 < self.first_rung <= self.epochs:
            raise SettingError(Name("first_rung"), " must be in (0, ", Name("epochs"),
                               f" {self.epochs}], not {self.first_rung}")
        if self.attach_layer is not None and self.teacher_logits is None:
            raise SettingError(Name("attach_layer"), " is for students of an external teacher (",
                               Name("teacher_logits"), ")")

    def resolve(self, kind: str, num_layers: int, positions: int) -> Resolved:
        """Every check, then the settings whose default depends on the task's kind or the backbone,
        checked against them (positions: the longest input the backbone takes)."""
        from centra.train.metrics import DEFAULT_METRIC, METRICS

        self.check()
        metric = self.metric or DEFAULT_METRIC[kind]
        if metric not in METRICS[kind]:
            raise refused("metric", f"{metric!r} does not fit a {kind} task ({', '.join(METRICS[kind])})")
        if kind != "multilabel":
            if self.max_labels is not None:
                raise refused("max_labels", "is for multilabel tasks only")
            if self.threshold_objective != DEFAULT_OBJECTIVE:
                raise refused("threshold_objective", "is for multilabel tasks only")
        lo, hi = layer_range(self.layers) if self.layers is not None else default_layer_range(num_layers)
        if not 1 <= lo <= hi <= num_layers:
            raise refused("layers", f"{lo}:{hi} must satisfy 1 <= MIN <= MAX <= {num_layers}")
        attach, most = None, min(3, lo)  # a student keeps at most 3 of its teacher's task layers
        if self.teacher_logits is not None:
            attach = self.attach_layer if self.attach_layer is not None else num_layers // 2
            if not 0 <= attach < num_layers:
                raise refused("attach_layer", f"{attach} must be in 0..{num_layers - 1} (the backbone has "
                              f"{num_layers} layers)")
            most = min(3, num_layers - attach)
        if self.student_layers is not None and not 1 <= self.student_layers <= most:
            raise refused("student_layers", f"must be in 1..{most}, not {self.student_layers}")
        max_length = self.max_length if self.max_length is not None else min(128, positions)
        if not 4 <= max_length <= positions:
            raise refused("max_length", f"{max_length} must be in 4..{positions} (the backbone's position "
                          "embeddings)")
        return Resolved(metric, lo, hi, max_length, attach)


@dataclass(frozen=True)
class Resolved:
    """What the settings come to on one backbone for one kind of task."""

    metric: str
    lo: int  # teacher search range of trainable top layers
    hi: int
    max_length: int
    attach: int | None  # the students' attach layer under an external teacher (None: no external teacher)


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """1:5 on 6 layers, 4:10 on 12 (the paper's range), scaled for other depths."""
    if num_layers <= 6:
        return 1, max(1, num_layers - 1)
    return max(1, round(num_layers / 3)), num_layers - 2


@dataclass(frozen=True)
class Declared:
    """One setting as declared: its field, type and metadata, read once from `Settings`."""

    name: str
    type: type  # int, float, str or bool (a JSON int is taken for a float)
    nullable: bool  # a recipe may write null (the setting is then not given)
    default: Any
    help: str
    shown: str | None
    choices: tuple[str, ...] | None
    check: Check | None
    metavar: str | None
    unset: str
    flag: str
    recipe: str

    @property
    def default_text(self) -> str | None:
        """The default as help and docs show it; None when there is nothing to show."""
        if self.shown is not None:
            return self.shown
        return None if self.default is None or self.default is False else str(self.default)

    def why_not(self, value: Any) -> str | None:
        """Why a value of the right type is refused, or None."""
        if self.choices is not None and value not in self.choices:
            return f"{value!r} must be one of {', '.join(self.choices)}"
        return self.check(value) if self.check else None

    def parse(self, value: Any) -> Any:
        """A value read from JSON, type-checked (ints taken for floats, bools only where declared)."""
        allowed = (int, float) if self.type is float else (self.type,)
        if not isinstance(value, allowed) or isinstance(value, bool) and self.type is not bool:
            names = " or ".join(t.__name__ for t in allowed) + (" or null" if self.nullable else "")
            raise refused(self.name, f"must be {names}, not {json.dumps(value, default=str)}")
        return float(value) if self.type is float else value


def _declared() -> tuple[Declared, ...]:
    hints = get_type_hints(Settings)
    out = []
    for f in fields(Settings):
        hint, meta = hints[f.name], f.metadata
        args = get_args(hint) if isinstance(hint, UnionType) else (hint,)
        base = next(a for a in args if a is not NoneType)
        out.append(Declared(f.name, base, NoneType in args or meta["unset"] != "default", f.default, meta["help"],
                            meta["shown"], meta["choices"], meta["check"], meta["metavar"], meta["unset"],
                            meta["flag"] or "--" + f.name.replace("_", "-"), meta["recipe"] or f.name))
    return tuple(out)


DECLARED = _declared()
FLAGS = {d.name: d.flag for d in DECLARED}
RECIPE_KEYS = {d.name: d.recipe for d in DECLARED}


def flag_of(name: str) -> str:
    """The command-line flag of a setting (or of a job's other named inputs: --train, --text-column)."""
    return FLAGS.get(name) or "--" + name.replace("_", "-")


def settings_from(block: dict) -> Settings:
    """Settings from a recipe's `training` block (null: not given), every value type-checked."""
    by_key = {d.recipe: d for d in DECLARED}
    values = {}
    for key, value in block.items():
        if key not in by_key:
            raise SettingError("unknown setting ", Name(key))
        d = by_key[key]
        if value is None and d.nullable:
            continue
        values[d.name] = d.parse(value)
    for other in ("threshold", "students"):  # both set how the mixed allocation runs, which student_layers skips
        if values.get("student_layers") is not None and other in values:
            raise SettingError("give ", Name("student_layers"), " or ", Name(other), ", not both")
    return Settings(**values)


def recipe_block(given: dict) -> dict:
    """A recipe's `training` block as written: every setting, given or as a recipe records it unset."""
    block = {}
    for d in DECLARED:
        if given.get(d.recipe) is not None:
            block[d.recipe] = given[d.recipe]
        elif d.unset != "omitted":
            block[d.recipe] = None if d.unset == "null" else d.default
    return block


def settings_table() -> str:
    """The README's table of settings (a test checks the README against it)."""
    rows = ["| recipe key | flag | default | what it sets |", "|---|---|---|---|"]
    for d in DECLARED:
        choices = f" ({' or '.join(d.choices)})" if d.choices else ""
        default = d.default_text or ("off" if d.default is False else "-")
        rows.append(f"| `{d.recipe}` | `{d.flag}` | {default} | {d.help}{choices} |")
    return "\n".join(rows)
