"""Recipes: tasks/NAME/recipe.json says how to train task NAME (data, columns, kind, settings).

A recipe is small and committed; the trained artifacts published beside it (task.json,
head.safetensors, report.json) are not. Data paths are relative to a data root (`--data`,
$CENTRA_DATA, or ../shared/data), or absolute. A trained task records the sha256 of its recipe,
of its data files and its backbone's fingerprint: when any of them changes, the task is stale.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from centra.core import KINDS
from centra.core.task import HEAD_FILE, RECIPE_FILE, TASK_FILE
from centra.errors import CentraError
from centra.io import read_json, sha256_bytes, sha256_file
from centra.publish import check_writable_parent
from centra.train.data import Columns, parse_label_names
from centra.train.job import TaskJob
from centra.train.settings import RECIPE_KEYS, Name, SettingError, Settings, recipe_block, settings_from

if TYPE_CHECKING:
    from centra.core.task import TaskHead
    from centra.train.report import TrainingReport

RECIPE_VERSION = 1
DATA_KEYS = {"train": str, "dev": str, "text_column": str, "pair_column": (str, type(None)),
             "label_column": list, "label_names": (str, type(None)), "header": str, "label_delimiter": str}


@dataclass(frozen=True)
class Recipe:
    """A task's recipe.json. `given`: its training block as written (null: not given); `training`: the
    settings it comes to (centra.train.settings)."""

    name: str
    kind: str
    data: dict
    given: dict = field(default_factory=dict)
    backbone: str = "default"

    def __post_init__(self) -> None:
        settings_from(self.given)  # every value type-checked (a SettingError naming it)

    @property
    def training(self) -> Settings:
        return settings_from(self.given)

    def with_settings(self, given: dict) -> Recipe:
        """The recipe with settings (by field name) set."""
        return replace(self, given={**self.given, **{RECIPE_KEYS.get(k, k): v for k, v in given.items()}})

    def to_dict(self) -> dict:
        return {"schema_version": RECIPE_VERSION, "kind": self.kind, "backbone": self.backbone,
                "data": self.data, "training": recipe_block(self.given)}

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
    given = data.get("training", {})
    if not isinstance(given, dict):
        raise bad("'training' must be an object")
    label_names = block.get("label_names")
    if isinstance(label_names, str) and label_names.startswith("@") and len(label_names) == 1:
        raise bad("data.label_names '@' names no file")
    try:
        return Recipe(Path(folder).name, data["kind"], block, given, data.get("backbone", "default"))
    except SettingError as exc:
        raise bad(exc.named(lambda name: f"training.{name}")) from None


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
        raise SettingError(f"{missing[0]}: file not found (data of recipe {recipe.name!r}; set the data root (",
                           Name("data"), ") or $CENTRA_DATA to the folder its paths are relative to)")
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
    d, files = recipe.data, data_files(recipe, root)
    columns = Columns(text=d["text_column"], labels=list(d["label_column"]), pair=d.get("pair_column"),
                      header=d.get("header", "auto"), label_delimiter=d.get("label_delimiter", ","))
    teacher = files.get("teacher_logits")
    settings = replace(recipe.training, teacher_logits=str(teacher) if teacher else None)
    return TaskJob.of(settings, name=recipe.name, kind=recipe.kind, train=files["train"], dev=files["dev"],
                      columns=columns, label_names=parse_label_names(d.get("label_names"), Path(root)),
                      source=source_of(recipe, root, fingerprint))


def recipe_from_settings(name: str, data: dict, given: dict, root: Path, backbone: str | None = None) -> Recipe:
    """A new recipe: `data` says the kind, the train and dev files, the columns (text_column,
    label_column, pair_column, header, label_delimiter) and label_names; `given` the settings set (by
    field name). Files are stored relative to the data root `root` when they lie under it."""
    missing = [key for key in ("kind", "train", "dev") if data.get(key) is None]
    if missing:
        names = [part for key in missing for part in (", ", Name(key))][1:]
        raise SettingError("a new recipe needs ", *names, " (or a recipe in the task folder)")
    if not data.get("text_column") or not data.get("label_column"):
        raise SettingError("give ", Name("text_column"), " and ", Name("label_column"))
    label_names = data.get("label_names")
    if label_names and label_names.startswith("@"):  # a names file: stored like the data files
        label_names = "@" + data_path(label_names[1:], root)
    block = {"train": data_path(data["train"], root), "dev": data_path(data["dev"], root),
             "text_column": data["text_column"], "pair_column": data.get("pair_column"),
             "label_column": data["label_column"], "label_names": label_names,
             "header": data.get("header") or "auto", "label_delimiter": data.get("label_delimiter") or ","}
    if given.get("teacher_logits"):
        given = {**given, "teacher_logits": data_path(given["teacher_logits"], root)}
    return Recipe(name, data["kind"], block, backbone=backbone or "default").with_settings(given)


def data_path(value: str, root: Path) -> str:
    """Stored relative to the data root when the file lies under it, else absolute."""
    path = Path(value).resolve()
    if not path.is_file():
        raise CentraError(f"{value}: file not found")
    try:
        return path.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def task_recipe(folder: Path, root: Path, data: dict | None = None, given: dict | None = None,
                backbone: str | None = None) -> tuple[Recipe, bool]:
    """The recipe task `folder` trains from, and whether it is new or changed (then it is published with
    the task): a new one when `data` is given (recipe_from_settings), else the folder's recipe.json with
    the settings `given` (by field name; None: not given) and the `backbone` set."""
    folder, given = Path(folder), {k: v for k, v in (given or {}).items() if v is not None}
    if data:
        return recipe_from_settings(folder.name, data, given, root, backbone), True
    if not (folder / RECIPE_FILE).is_file():
        raise SettingError(f"{folder / RECIPE_FILE}: file not found: give a recipe, or ", Name("kind"), ", ",
                           Name("train"), ", ", Name("dev"), ", ", Name("text_column"), " and ",
                           Name("label_column"), " (which write one)")
    recipe = read_recipe(folder).with_settings(given)
    if backbone is not None:
        recipe = replace(recipe, backbone=backbone)
    return recipe, bool(given) or backbone is not None


def add_task(tasks_dir: Path, name: str, *, data: dict | None = None, given: dict | None = None,
             backbone: str | None = None, root: Path | None = None) -> tuple[TrainingReport, TaskHead]:
    """Train task `name` in `tasks_dir` from its recipe (task_recipe: a new one from `data`, or the
    folder's with the settings `given`), with its data files under the data root (data_root(root)),
    and publish it; the training report and the chosen student (see pipeline.train_task)."""
    from centra.core.backbone import Backbone
    from centra.train.pipeline import train_task

    root = data_root(root)
    recipe, changed = task_recipe(Path(tasks_dir) / name, root, data, given, backbone)
    check_writable_parent(Path(tasks_dir) / name)
    loaded = Backbone.load(recipe.backbone)
    job = job_from(recipe, root, loaded.fingerprint)
    return train_task(replace(job, recipe=recipe.to_dict()) if changed else job, loaded, tasks_dir)
