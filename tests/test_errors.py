"""Bad input, command by command: exit 2, one stderr line `centra: error: ...`, no traceback, and the
destination untouched. Options are checked before any compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot
from helpers import STANDARD_TASKS, make_tasks

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.merge import plan_merge, write_merged
from centra.core.versions import MANIFEST, model_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A tasks folder, a merged model, data files and a user's files, built once."""
    root = tmp_path_factory.mktemp("errors")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks", STANDARD_TASKS[:3])
    write_merged(plan_merge([root / "tasks"]), root / "model")
    (root / "notes.txt").write_text("my notes\n")
    (root / "mydocs").mkdir()
    (root / "demo-work" / "model").mkdir(parents=True)
    (root / "demo-work" / "model" / "mine.txt").write_text("mine\n")
    (root / "mydocs" / "letter.txt").write_text("dear...\n")
    rows = [("great product", "pos"), ("the box was damaged", "neg")] * 8
    (root / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    (root / "latin1.tsv").write_bytes(b"text\tlabel\ngood\tpos\ncaf\xe9\tneg\n")
    (root / "logits.jsonl").write_text("[0.5, -0.5]\n" * len(rows))
    (root / "latin1.jsonl").write_bytes(b"[0.5, -0.5]\n\xe9\n")
    return {"root": root, "bert": tiny_models["bert"]}


def broken_model(world, damage: str) -> Path:
    """A copy of the merged model's current version with one defect."""
    import shutil

    dest = world["root"] / f"broken-{damage}"
    if not dest.exists():
        shutil.copytree(model_folder(world["root"] / "model"), dest)
        manifest = json.loads((dest / MANIFEST).read_text())
        if damage == "no-trunk":
            (dest / "trunk.safetensors").unlink()
        elif damage == "no-backbone":
            del manifest["backbone"]
            (dest / MANIFEST).write_text(json.dumps(manifest))
        elif damage == "bad-json":
            (dest / MANIFEST).write_text('{"format": "centra-merged", ')
        elif damage == "edited-task":
            path = dest / "tasks" / "alpha" / "task.json"
            path.write_text(path.read_text().replace('"attach_layer": 1', '"attach_layer": 0'))
    return dest


def train_args(world, *extra: str) -> list[str]:
    r = world["root"]
    return ["add-task", "--tasks-dir", str(r / "new-tasks"), "--name", "t", "--kind", "multiclass", "--train",
            str(r / "train.tsv"), "--dev", str(r / "train.tsv"), "--text-column", "text", "--label-column",
            "label", "--backbone", str(world["bert"]), "--layers", "1:1", *extra]


# (command line, text the error must hold, destination that must stay untouched)
CASES = {
    "merge over a user's file": (lambda w: ["merge", "--tasks-dir", str(w["root"] / "tasks"), "--out",
                                            str(w["root"] / "notes.txt")], "is not a folder", "notes.txt"),
    "merge over a user's folder": (lambda w: ["merge", "--tasks-dir", str(w["root"] / "tasks"), "--out",
                                              str(w["root"] / "mydocs")], "not a centra merged model", "mydocs"),
    "merge out under a file": (lambda w: ["merge", "--tasks-dir", str(w["root"] / "tasks"), "--out",
                                          str(w["root"] / "notes.txt" / "out")], "cannot be created", "notes.txt"),
    "merge no tasks folder": (lambda w: ["merge", "--tasks-dir", str(w["root"] / "none"), "--out",
                                         str(w["root"] / "model")], "no such tasks folder", "model"),
    "merge keep 0 versions": (lambda w: ["merge", "--out", str(w["root"] / "model"), "--keep-versions", "0"],
                              "--keep-versions: must be >= 1", "model"),
    "merge without --out": (lambda w: ["merge"], "required: --out", None),
    "predict batch size 0": (lambda w: ["predict", "--model", str(w["root"] / "model"), "--batch-size", "0", "hi"],
                             "--batch-size: must be >= 1", None),
    "predict missing trunk": (lambda w: ["predict", "--model", str(broken_model(w, "no-trunk")), "hi"],
                              "trunk.safetensors: file not found", None),
    "predict manifest without backbone": (lambda w: ["predict", "--model", str(broken_model(w, "no-backbone")),
                                                     "hi"], "missing 'backbone'", None),
    "predict malformed manifest": (lambda w: ["predict", "--model", str(broken_model(w, "bad-json")), "hi"],
                                   "manifest.json: malformed JSON", None),
    "predict edited task.json": (lambda w: ["predict", "--model", str(broken_model(w, "edited-task")), "hi"],
                                 "alpha/task.json: sha256 differs from the manifest", None),
    "predict unknown task": (lambda w: ["predict", "--model", str(w["root"] / "model"), "--task", "nope", "hi"],
                             "unknown task 'nope'", None),
    "predict empty text": (lambda w: ["predict", "--model", str(w["root"] / "model"), " "], "text 0 is empty", None),
    "verify negative tolerance": (lambda w: ["verify", "--model", str(w["root"] / "model"), "--tolerance", "-1"],
                                  "--tolerance must be >= 0", None),
    "evaluate non-UTF-8 data": (lambda w: ["evaluate", "--model", str(w["root"] / "model"), "--task", "alpha",
                                           "--data", str(w["root"] / "latin1.tsv"), "--text-column", "text",
                                           "--label-column", "label"], "latin1.tsv:3: not UTF-8", None),
    "add-task epochs 0": (lambda w: train_args(w, "--epochs", "0"), "--epochs must be >= 1", "new-tasks"),
    "add-task batch size 0": (lambda w: train_args(w, "--batch-size", "0"), "--batch-size must be >= 1",
                              "new-tasks"),
    "add-task max-length too long": (lambda w: train_args(w, "--max-length", "1000"),
                                     "--max-length 1000 must be in 4..64", "new-tasks"),
    "add-task attach layer too deep": (lambda w: train_args(w, "--teacher-logits", str(w["root"] / "logits.jsonl"),
                                                            "--attach-layer", "4"), "--attach-layer 4 must be in 0..3",
                                       "new-tasks"),
    "add-task non-UTF-8 teacher logits": (lambda w: train_args(w, "--teacher-logits", str(w["root"] / "latin1.jsonl")),
                                          "latin1.jsonl: not UTF-8", "new-tasks"),
    "add-task bad layers": (lambda w: train_args(w, "--layers", "a:b"), "expected MIN:MAX", "new-tasks"),
    "add-task non-UTF-8 train": (lambda w: [*train_args(w)[:7], "--train", str(w["root"] / "latin1.tsv"),
                                            *train_args(w)[9:]], "latin1.tsv:3: not UTF-8", "new-tasks"),
    "add-task tasks-dir is a file": (lambda w: [*train_args(w)[:1], "--tasks-dir", str(w["root"] / "notes.txt"),
                                                *train_args(w)[3:]], "notes.txt", "notes.txt"),
    "add-task over a user's folder": (lambda w: [*train_args(w)[:1], "--tasks-dir", str(w["root"]),
                                                 "--name", "mydocs", *train_args(w)[5:]],
                                      "not a centra task", "mydocs"),
    "add-task remove a user's folder": (lambda w: ["add-task", "--tasks-dir", str(w["root"]), "--remove", "mydocs"],
                                        "not a centra task", "mydocs"),
    "add-task unknown flag": (lambda w: ["add-task", "--nope"], "unrecognized arguments: --nope", None),
    "add-task unknown search": (lambda w: train_args(w, "--search", "fast"), "invalid choice: 'fast'", "new-tasks"),
    "plan without a budget": (lambda w: ["plan", "--tasks-dir", str(w["root"] / "tasks"), "--no-plot"],
                              "give one budget: --budget-layers N or --budget-ms X", "tasks"),
    "plan with two budgets": (lambda w: ["plan", "--tasks-dir", str(w["root"] / "tasks"), "--budget-layers", "4",
                                         "--budget-ms", "2", "--no-plot"], "X, not both", "tasks"),
    "plan without candidates": (lambda w: ["plan", "--tasks-dir", str(w["root"] / "tasks"), "--budget-layers", "4",
                                           "--no-plot"], "no candidates in any task folder", "tasks"),
    "plan budget 0": (lambda w: ["plan", "--tasks-dir", str(w["root"] / "tasks"), "--budget-ms", "0"],
                      "--budget-ms: must be a finite number > 0", "tasks"),
    "plan plot over a folder": (lambda w: ["plan", "--tasks-dir", str(w["root"] / "tasks"), "--budget-layers", "4",
                                           "--plot", str(w["root"] / "mydocs")], "the plot is a PNG file", "mydocs"),
    "demo over a user's model folder": (lambda w: ["demo", "--workdir", str(w["root"] / "demo-work"), "--untrained"],
                                        "not a centra merged model", "demo-work"),
    "demo workdir is a file": (lambda w: ["demo", "--workdir", str(w["root"] / "notes.txt"), "--untrained"],
                               "is not a folder", "notes.txt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_touches_nothing(world, capsys, case):
    argv, message, dest = CASES[case]
    args = argv(world)
    before = world["root"] / dest if dest else None
    kept = (before.read_bytes() if before.is_file() else snapshot(before)) if before else None
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("centra: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    if before is not None:
        assert (before.read_bytes() if before.is_file() else snapshot(before)) == kept
        assert not list(before.parent.glob(f".{before.name}.tmp-*")), "no staging folder left"


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(world):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["merge", "--tasks-dir", str(world["root"] / "tasks"), "--out", str(world["root"] / "notes.txt")]
    run = [sys.executable, "-m", "centra.cli", *args]
    done = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    debug = subprocess.run([*run, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("centra: error:")
