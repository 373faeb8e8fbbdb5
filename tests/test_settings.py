"""Training settings are declared once (centra.train.settings): the add-task flags, a recipe's checks and
defaults, the job, the training loop's config and the README's table all come from the declaration, and
recipes written before it keep their sha256."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from centra.cli import build_parser
from centra.train.finetune import TrainConfig
from centra.train.job import TaskJob
from centra.train.recipe import read_recipe
from centra.train.settings import DECLARED, SettingError, Settings, flag_of, refused, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_table_is_the_declaration():
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- settings table: [^\n]*-->\n(.*?)\n<!-- end of settings table -->", text, re.S)
    assert found, "README.md has no generated settings table"
    assert found.group(1) == settings_table(), "regenerate it: python -c 'from centra.train.settings import " \
        "settings_table; print(settings_table())'"


def test_add_task_has_one_flag_per_setting_typed_as_declared():
    add_task = build_parser()._subparsers._group_actions[0].choices["add-task"]
    actions = {a.dest: a for a in add_task._actions}
    for d in DECLARED:
        action = actions[d.name]
        assert action.option_strings == [d.flag] and action.default is None, d.name  # None: not given
        assert (action.const is True) if d.type is bool else (action.type is d.type), d.name
        assert action.choices == d.choices and d.help in action.help, d.name


def test_a_job_is_its_settings_and_the_loop_takes_their_defaults():
    assert {f.name for f in fields(Settings)} <= {f.name for f in fields(TaskJob)}
    shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(Settings)}
    assert shared == {"epochs", "batch_size", "lr", "head_lr", "seed", "metric", "alpha", "temperature", "precision"}
    assert all(getattr(TrainConfig(), name) == getattr(Settings(), name) for name in shared)
    settings = Settings(epochs=5, lr=0.5)
    job = TaskJob.of(settings, name="t", kind="multiclass", train=Path("a"), dev=Path("b"), columns=None)
    assert job.settings == settings and job.train_config.epochs == 5 and job.train_config.lr == 0.5


@pytest.mark.parametrize("settings, message", [
    (Settings(epochs=0), "epochs must be >= 1, not 0"),
    (Settings(lr=float("nan")), "lr must be a positive number, not nan"),
    (Settings(search="fast"), "search 'fast' must be one of halving, full"),
    (Settings(layers="a:b"), "layers 'a:b': expected MIN:MAX, e.g. 1:5"),
    (Settings(first_rung=4), "first_rung must be in (0, epochs 2], not 4"),
    (Settings(attach_layer=1), "attach_layer is for students of an external teacher (teacher_logits)"),
    (Settings(cache_gb=-1), "cache_gb must be >= 0, not -1"),
])
def test_checks_name_the_field_and_the_cli_its_flag(settings, message):
    with pytest.raises(SettingError) as err:
        settings.check()
    assert str(err.value) == message
    flagged = err.value.named(flag_of)
    assert "--" + message.split(" ")[0].replace("_", "-") in flagged and "\n" not in flagged
    assert refused("text_column", "x").named(flag_of) == "--text-column x"  # inputs that are not settings too


# Computed by the recipe code before the declaration; again when the default epochs went from 3 to 2 (a recipe
# records the defaults it comes to, so one that leaves epochs unset changed, and its task is stale). With
# "epochs": 3 written, the first hashes as before: 3783805f43d29e66aed88ff3a353aa853990614a9d083d41e38b7f26a4f955ef.
@pytest.mark.parametrize("training, sha256", [
    ({}, "1225b6ea2c4e2ccd1e9090d771acb051e58f56b60668fbd53a02a10ac7244c98"),
    ({"epochs": 3}, "3783805f43d29e66aed88ff3a353aa853990614a9d083d41e38b7f26a4f955ef"),
    ({"temperature": 2, "threshold": None, "first_rung": 1, "search": None, "lr": 1},
     "49b81351018f3ba4a69e4c69a2fed3730a0bdd0089fa7c49561b5ed8a387a41a"),
    ({"search": "full", "student_layers": 1, "cache_gb": 8},
     "31c37da5552e3dd689b6b582a4933a397ff96d6a27f150fb396d2b1d61f4c389"),
])
def test_recipes_keep_their_sha256(tmp_path, training, sha256):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "recipe.json").write_text(json.dumps(
        {"schema_version": 1, "kind": "multiclass",
         "data": {"train": "a.tsv", "dev": "b.tsv", "text_column": "t", "label_column": ["l"]}, "training": training}))
    recipe = read_recipe(tmp_path / "t")
    assert recipe.sha256 == "sha256:" + sha256
    assert recipe.training.temperature == float(training.get("temperature", 2.0))
