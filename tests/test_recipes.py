"""tasks/NAME/recipe.json: add-task trains from it (or from flags, which write it), the trained task
records what it came from, and the demo trains only what is missing or stale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from test_training import synthetic, write_split

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.task import RECIPE_FILE, TASK_FILE, read_spec
from centra.core.versions import model_folder
from centra.errors import CentraError
from centra.train.recipe import read_recipe, stale_reason


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "mood").mkdir(parents=True)
    write_split(root / "mood" / "train.tsv", synthetic("multiclass", False, 48, 1), False)
    write_split(root / "mood" / "dev.tsv", synthetic("multiclass", False, 24, 2), False)
    (root / "same").mkdir()
    write_split(root / "same" / "train.tsv", synthetic("multiclass", True, 48, 3), True)
    write_split(root / "same" / "dev.tsv", synthetic("multiclass", True, 24, 4), True)
    return root


def recipe(bert_path: Path, folder: str, pair: bool = False) -> dict:
    return {"schema_version": 1, "kind": "multiclass", "backbone": str(bert_path),
            "data": {"train": f"{folder}/train.tsv", "dev": f"{folder}/dev.tsv", "text_column": "text",
                     "pair_column": "pair" if pair else None, "label_column": ["label"]},
            "training": {"layers": "1:1", "student_layers": 1, "epochs": 1, "batch_size": 8}}


def write_recipe(tasks: Path, name: str, content: dict) -> Path:
    (tasks / name).mkdir(parents=True, exist_ok=True)
    (tasks / name / RECIPE_FILE).write_text(json.dumps(content, indent=2) + "\n")
    return tasks / name


def test_flags_write_the_recipe_and_the_recipe_retrains(bert_path, data, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    args = ["add-task", "--tasks-dir", str(tasks), "--name", "mood", "--data", str(data), "--kind", "multiclass",
            "--train", str(data / "mood" / "train.tsv"), "--dev", str(data / "mood" / "dev.tsv"),
            "--text-column", "text", "--label-column", "label", "--backbone", str(bert_path), "--layers", "1:1",
            "--epochs", "1", "--student-layers", "1"]
    assert main(args) == 0
    written = read_recipe(tasks / "mood")
    assert written.data["train"] == "mood/train.tsv", "data paths are stored relative to the data root"
    assert written.training.epochs == 1 and written.training.layers == "1:1"
    spec = read_spec(tasks / "mood")
    assert spec.trained and spec.source["recipe_sha256"] == written.sha256
    bb = Backbone.load(bert_path)
    assert stale_reason(tasks / "mood", written, data, bb.fingerprint) is None
    recipe_bytes = (tasks / "mood" / RECIPE_FILE).read_bytes()
    head_before = (tasks / "mood" / "head.safetensors").read_bytes()

    assert main(["add-task", "--tasks-dir", str(tasks), "--name", "mood", "--data", str(data)]) == 0  # the recipe
    assert (tasks / "mood" / RECIPE_FILE).read_bytes() == recipe_bytes, "retraining keeps the recipe as it is"
    assert (tasks / "mood" / "head.safetensors").read_bytes() == head_before, "same recipe, same seed, same head"

    assert main(["add-task", "--tasks-dir", str(tasks), "--name", "mood", "--data", str(data), "--seed", "3"]) == 0
    assert read_recipe(tasks / "mood").training.seed == 3, "a setting given on the command line is saved"
    capsys.readouterr()


def test_stale_when_recipe_data_or_backbone_change(bert_path, tiny_models, data, tmp_path):
    tasks = tmp_path / "tasks"
    write_recipe(tasks, "mood", recipe(bert_path, "mood"))
    assert main(["add-task", "--tasks-dir", str(tasks), "--name", "mood", "--data", str(data)]) == 0
    bb = Backbone.load(bert_path)
    current = read_recipe(tasks / "mood")
    assert stale_reason(tasks / "mood", current, data, bb.fingerprint) is None
    edited = recipe(bert_path, "mood")
    edited["training"]["epochs"] = 2
    write_recipe(tasks, "mood", edited)
    assert stale_reason(tasks / "mood", read_recipe(tasks / "mood"), data, bb.fingerprint) == "recipe changed"
    write_recipe(tasks, "mood", recipe(bert_path, "mood"))
    original = (data / "mood" / "train.tsv").read_bytes()
    (data / "mood" / "train.tsv").write_bytes(original + b"one more row\tpos\n")
    assert stale_reason(tasks / "mood", read_recipe(tasks / "mood"), data, bb.fingerprint) == "data changed"
    (data / "mood" / "train.tsv").write_bytes(original)
    assert stale_reason(tasks / "mood", read_recipe(tasks / "mood"), data, bb.fingerprint) is None
    other = Backbone.load(tiny_models["bert-other"]).fingerprint
    assert stale_reason(tasks / "mood", read_recipe(tasks / "mood"), data, other) == "backbone changed"


def test_merge_refuses_a_recipe_that_is_not_trained(bert_path, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    write_recipe(tasks, "mood", recipe(bert_path, "mood"))
    assert main(["merge", "--tasks-dir", str(tasks), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mood/task.json: file not found: the task has a recipe but is not trained yet" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ({"schema_version": 1, "kind": "ranking", "data": {}}, "kind 'ranking'"),
    ({"schema_version": 1, "kind": "multiclass"}, "missing 'data'"),
    ({"schema_version": 1, "kind": "multiclass", "data": {"train": "a", "dev": "b", "text_column": "t"}},
     "data needs 'label_column'"),
    ({"schema_version": 1, "kind": "multiclass", "data": {"train": "a", "dev": "b", "text_column": "t",
                                                          "label_column": ["l"]}, "training": {"epochs": "2"}},
     "training.epochs must be int"),
    ({"schema_version": 1, "kind": "multiclass", "data": {"train": "a", "dev": "b", "text_column": "t",
                                                          "label_column": ["l"]}, "training": {"epoch": 2}},
     "unknown setting training.epoch"),
    ({"schema_version": 2}, "schema_version 2"),
    ({"schema_version": 1, "kind": "multiclass", "data": {"train": "a", "dev": "b", "text_column": "t",
                                                          "label_column": ["l"]}, "training": {"student_layers": "1"}},
     "training.student_layers must be int or null"),
    ({"schema_version": 1, "kind": "multiclass", "data": {"train": "a", "dev": "b", "text_column": "t",
                                                          "label_column": ["l"]}, "training": {"epochs": True}},
     "training.epochs must be int, not true"),
    ({"schema_version": 1, "kind": "multiclass", "data": {"train": "a", "dev": "b", "text_column": "t",
                                                          "label_column": ["l"]}, "training": {"teacher_logits": 5}},
     "training.teacher_logits must be str or null"),
    ({"schema_version": 1, "kind": "multiclass", "data": {"train": "a", "dev": "b", "text_column": "t",
                                                          "label_column": ["l"]}, "training": {"threshold": "x"}},
     "training.threshold must be int or float or null"),
])
def test_malformed_recipes_are_refused(tmp_path, content, message):
    write_recipe(tmp_path, "t", content)
    with pytest.raises(CentraError, match=message) as info:
        read_recipe(tmp_path / "t")
    assert str(tmp_path / "t" / RECIPE_FILE) in str(info.value)


def test_demo_trains_only_what_is_missing_or_stale(bert_path, data, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    write_recipe(tasks, "mood", recipe(bert_path, "mood"))
    write_recipe(tasks, "same", recipe(bert_path, "same", pair=True))
    args = ["demo", "--tasks-dir", str(tasks), "--workdir", str(tmp_path / "out"), "--data", str(data)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mood        not trained yet: training" in out and "same        not trained yet: training" in out
    assert "(equals the manifest's" in out
    # every task's dev metric beside its constant-answer baseline, read from report.json
    for name in ("mood", "same"):
        report = json.loads((tasks / name / "report.json").read_text())
        metric = report["chosen"]["metric"]
        line = next(x for x in out.splitlines() if x.startswith(f"  {name} ") and "baseline" in x)
        assert f"{100 * report['baseline'][metric]:5.1f} (the train set's majority class)" in line, line
        assert f"{metric} {100 * report['chosen'][metric]:5.1f}" in line, line
    # the shadow step: mood retrained as a candidate, shadowed on its dev texts, promoted
    assert "shadow and promote: mood retrained with layers 2:2, student_layers 2 as a candidate head" in out
    assert "every other task's files as they were: yes" in out
    dev_rows = len((data / "mood" / "dev.tsv").read_text().splitlines()) - 1
    assert f"{dev_rows} rows compared" in out and "agreement (top label):" in out
    current = model_folder(tmp_path / "out" / "model")
    assert current.name == "v000003" and "centra promote mood: version v000003" in out
    candidate = read_spec(tmp_path / "out" / "candidates" / "mood")
    promoted = read_spec(current / "tasks" / "mood")
    assert promoted.task_layers == candidate.task_layers == 2 and promoted.head_sha256 == candidate.head_sha256
    assert snapshot(current / "tasks" / "same") == snapshot(current.parent / "v000001" / "tasks" / "same")
    mood = snapshot(tasks / "mood")
    edited = recipe(bert_path, "same", pair=True)
    edited["training"]["seed"] = 4
    write_recipe(tasks, "same", edited)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mood        up to date, reused" in out and "same        recipe changed: training" in out
    assert snapshot(tasks / "mood") == mood, "an up-to-date task is not touched"
    assert (model_folder(tmp_path / "out" / "model") / "tasks" / "same" / TASK_FILE).is_file()
    assert f"{tmp_path / 'out' / 'candidates' / 'mood'} up to date, reused" in out
    assert model_folder(tmp_path / "out" / "model").name == "v000006"


def test_search_setting_is_saved_and_a_recipe_without_it_keeps_its_sha256(bert_path, data, tmp_path):
    from centra.train.recipe import job_from

    plain = write_recipe(tmp_path / "tasks", "mood", recipe(bert_path, "mood"))
    before = read_recipe(plain)
    assert "search" not in before.to_dict()["training"], "written only when set: older recipes hash as before"
    assert job_from(before, data, "fp").search == "halving"
    content = recipe(bert_path, "mood")
    content["training"]["search"] = "full"
    full = read_recipe(write_recipe(tmp_path / "other", "mood", content))
    assert full.to_dict()["training"]["search"] == "full" and full.sha256 != before.sha256
    assert job_from(full, data, "fp").search == "full"
    content["training"]["search"] = 1
    with pytest.raises(CentraError, match="training.search must be str or null"):
        read_recipe(write_recipe(tmp_path / "bad", "mood", content))


def test_baselines_are_the_constant_answers_of_a_model_that_learned_nothing():
    from centra.train.metrics import baseline, compute

    base = baseline("multiclass", 3, [2, 2, 1, 0, 2], [0, 2, 2, 1])  # train majority: class 2
    assert base["accuracy"] == 0.5 and base["answer"] == "the train set's majority class"
    assert base["mcc"] == 0.0
    gold = [[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 1]]
    base = baseline("multilabel", 3, [[0, 0, 1], [1, 0, 1], [0, 0, 1]], gold)  # most frequent: label 2
    # label 2 on every row: tp 3, fp 1, fn 3 (labels 0, 0 and 1 missed)
    assert base["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 3))
    assert base == {"answer": "the train set's most frequent label",
                    **compute("multilabel", np.array([[-9.0, -9.0, 9.0]] * 4), gold)}
    assert baseline("regression", 1, [1.0, 3.0], [0.5, 2.5, 4.0])["pearson"] == 0.0


def test_demo_flags_a_task_that_does_not_beat_its_baseline(tmp_path):
    from centra.cli.demo import quality_lines

    def report(name, value, base, **extra):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps(
            {"chosen": {"metric": "accuracy", "accuracy": value, **extra},
             "baseline": {"answer": "the train set's majority class", "accuracy": base}}))

    report("learned", 0.80, 0.51)
    report("stuck", 0.695, 0.695)
    report("tuned", 0.08, 0.02, tuned={"accuracy": 0.30})
    lines = quality_lines(tmp_path, ["learned", "stuck", "tuned", "missing"])
    assert "DOES NOT BEAT" not in lines[1] and "accuracy  80.0; baseline  51.0" in lines[1]
    assert lines[2].endswith("<- DOES NOT BEAT ITS BASELINE")
    assert "accuracy  30.0 (8.0 at 0.5, thresholds tuned on dev)" in lines[3] and "DOES NOT" not in lines[3]
    assert "no dev metric and baseline" in lines[4]
