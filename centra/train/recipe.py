"""Recipes: tasks/NAME/recipe.json says how to train task NAME (data, columns, kind, settings).

A recipe is small and committed; the trained artifacts published beside it (task.json,
head.safetensors, report.json) are not. Data paths are relative to a data root (`--data`,
$CENTRA_DATA, or ../shared/data), or absolute. A trained task records the sha256 of its recipe,
of its data files and its backbone's fingerprint: when any of them changes, the task is stale.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from centra.core.task import HEAD_FILE, RECIPE_FILE, TASK_FILE
from centra.errors import CentraError
from centra.io import read_json, sha256_bytes, sha256_file
from centra.train.data import Columns, parse_label_names
from centra.train.finetune import TrainConfig
from centra.train.job import FIRST_RUNG
from centra.train.pipeline import KINDS, TaskJob

RECIPE_VERSION = 1
DATA_KEYS = {"train": str, "dev": str, "text_column": str, "pair_column": (str, type(None)),
             "label_column": list, "label_names": (str, type(None)), "header": str, "label_delimiter": str}


@dataclass
class Training:
    """The training settings a recipe may hold (None: the pipeline's default)."""

    layers: str | None = None  # teacher search MIN:MAX
    search: str | None = None  # teacher search: halving (None: the default) | full
    first_rung: float | None = None  # halving: epochs every L trains before the first cut (None: 1)
    student_layers: int | None = None
    threshold: float | None = None
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-3
    metric: str | None = None
    alpha: float = 1.0
    temperature: float = 2.0
    seed: int = 0
    max_train_examples: int | None = None
    max_length: int | None = None
    pooling: str = "mean"
    reference: bool = False
    teacher_logits: str | None = None
    attach_layer: int | None = None
    cache_gb: float = 4.0


# the JSON types each training setting takes (ints are accepted for floats; bools only where named)
SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "layers": (str,), "search": (str,), "first_rung": (int, float), "student_layers": (int,),
    "threshold": (int, float), "epochs": (int,), "batch_size": (int,),
    "lr": (int, float), "head_lr": (int, float), "metric": (str,), "alpha": (int, float),
    "temperature": (int, float), "seed": (int,), "max_train_examples": (int,), "max_length": (int,),
    "pooling": (str,), "reference": (bool,), "teacher_logits": (str,), "attach_layer": (int,),
    "cache_gb": (int, float),
}
OPTIONAL_SETTINGS = {name for name, value in vars(Training()).items() if value is None}
# settings added after schema 1: written only when set, so that a recipe written before them keeps its
# sha256 and the tasks trained from it stay up to date
LATER_SETTINGS = {"search", "first_rung"}


@dataclass
class Recipe:
    name: str
    kind: str
    data: dict
    training: Training = field(default_factory=Training)
    backbone: str = "default"

    def to_dict(self) -> dict:
        training = {f.name: getattr(self.training, f.name) for f in fields(Training)
                    if f.name not in LATER_SETTINGS or getattr(self.training, f.name) is not None}
        return {"schema_version": RECIPE_VERSION, "kind": self.kind, "backbone": self.backbone,
                "data": self.data, "training": training}

    @property
    def sha256(self) -> str:
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True).encode("utf-8"))


def read_recipe(folder: Path) -> Recipe:
    """folder/recipe.json, every field checked (one line naming the file)."""
    path = Path(folder) / RECIPE_FILE
    data = read_json(path)

    def bad(msg: str) -> CentraError:
        return CentraError(f"{path}: {msg}")

    if data.get("schema_version") != RECIPE_VERSION:
        raise bad(f"schema_version {data.get('schema_version')!r} is not supported (expected {RECIPE_VERSION})")
    unknown = set(data) - {"schema_version", "kind", "backbone", "data", "training"}
    if unknown:
        raise bad(f"unknown field {sorted(unknown)[0]!r}")
    if data.get("kind") not in KINDS:
        raise bad(f"kind {data.get('kind')!r} must be one of {', '.join(KINDS)}")
    if not isinstance(data.get("backbone", "default"), str):
        raise bad("backbone must be a string ('default' or a folder)")
    block = data.get("data")
    if not isinstance(block, dict):
        raise bad("missing 'data' object (train, dev, text_column, label_column...)")
    for key, typ in DATA_KEYS.items():
        if key in ("train", "dev", "text_column", "label_column") and key not in block:
            raise bad(f"data needs {key!r}")
        if key in block and not isinstance(block[key], typ):
            raise bad(f"data.{key} has the wrong type")
    if set(block) - set(DATA_KEYS):
        raise bad(f"unknown field data.{sorted(set(block) - set(DATA_KEYS))[0]}")
    settings = data.get("training", {})
    if not isinstance(settings, dict):
        raise bad("'training' must be an object")
    for key, value in settings.items():
        if key not in SETTING_TYPES:
            raise bad(f"unknown setting training.{key}")
        allowed = SETTING_TYPES[key]
        ok = value is None and key in OPTIONAL_SETTINGS or \
            isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            names = " or ".join(t.__name__ for t in allowed) + (" or null" if key in OPTIONAL_SETTINGS else "")
            raise bad(f"training.{key} must be {names}, not {json.dumps(value)}")
    label_names = block.get("label_names")
    if isinstance(label_names, str) and label_names.startswith("@") and len(label_names) == 1:
        raise bad("data.label_names '@' names no file")
    return Recipe(Path(folder).name, data["kind"], block, Training(**settings), data.get("backbone", "default"))


def data_root(explicit: Path | None = None) -> Path:
    """--data, else $CENTRA_DATA, else ../shared/data beside the working folder or this checkout."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("CENTRA_DATA"):
        return Path(os.environ["CENTRA_DATA"])
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def data_files(recipe: Recipe, root: Path) -> dict[str, Path]:
    """Every file a recipe trains from, by role: train, dev, and the label-names and teacher-logits
    files when it names them (paths relative to the data root, or absolute)."""
    files = {split: Path(root) / recipe.data[split] for split in ("train", "dev")}
    names = recipe.data.get("label_names")
    if isinstance(names, str) and names.startswith("@"):
        files["label_names"] = Path(root) / names[1:]
    if recipe.training.teacher_logits:
        files["teacher_logits"] = Path(root) / recipe.training.teacher_logits
    return files


def source_of(recipe: Recipe, root: Path, fingerprint: str) -> dict:
    """What a trained task records to tell later whether it is stale."""
    files = data_files(recipe, root)
    missing = [p for p in files.values() if not p.is_file()]
    if missing:
        raise CentraError(f"{missing[0]}: file not found (data of recipe {recipe.name!r}; set --data or "
                          "$CENTRA_DATA to the folder its paths are relative to)")
    digest = sha256_bytes("".join(f"{role}={sha256_file(path)}\n" for role, path in sorted(files.items())).encode())
    return {"recipe_sha256": recipe.sha256, "data_sha256": digest, "backbone_fingerprint": fingerprint}


def stale_reason(folder: Path, recipe: Recipe, root: Path, fingerprint: str) -> str | None:
    """Why folder's trained task does not match its recipe now, or None when it is up to date."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        return "not trained yet"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "task.json unreadable"
    if not isinstance(spec, dict) or not spec.get("trained"):
        return "untrained"
    head = Path(folder) / HEAD_FILE
    if not head.is_file() or sha256_file(head) != spec.get("head_sha256"):
        return "head file missing or corrupt"
    recorded = spec.get("source") if isinstance(spec.get("source"), dict) else {}
    now = source_of(recipe, root, fingerprint)
    for key, what in (("recipe_sha256", "recipe"), ("data_sha256", "data"), ("backbone_fingerprint", "backbone")):
        if recorded.get(key) != now[key]:
            return f"{what} changed"
    return None


def job_from(recipe: Recipe, root: Path, fingerprint: str) -> TaskJob:
    """The training job a recipe describes, with its data paths resolved against `root`."""
    d, t = recipe.data, recipe.training
    if t.student_layers is not None and t.threshold is not None:
        raise CentraError("give --student-layers or --threshold, not both")
    files = data_files(recipe, root)
    columns = Columns(text=d["text_column"], labels=list(d["label_column"]), pair=d.get("pair_column"),
                      header=d.get("header", "auto"), label_delimiter=d.get("label_delimiter", ","))
    tc = TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, head_lr=t.head_lr, seed=t.seed,
                     metric=t.metric, alpha=t.alpha, temperature=t.temperature)
    return TaskJob(name=recipe.name, kind=recipe.kind, train=files["train"], dev=files["dev"], columns=columns,
                   label_names=parse_label_names(d.get("label_names"), Path(root)),
                   layers=parse_range(t.layers), search=t.search or "halving", student_layers=t.student_layers,
                   first_rung=FIRST_RUNG if t.first_rung is None else float(t.first_rung),
                   threshold=1.0 if t.threshold is None else float(t.threshold), reference=t.reference,
                   teacher_logits=files.get("teacher_logits"),
                   attach_layer=t.attach_layer, max_train_examples=t.max_train_examples, max_length=t.max_length,
                   pooling=t.pooling, cache_gb=t.cache_gb, source=source_of(recipe, root, fingerprint),
                   train_config=tc)


def parse_range(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        lo, _, hi = str(value).partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise CentraError(f"--layers {value!r}: expected MIN:MAX, e.g. 1:5") from None
