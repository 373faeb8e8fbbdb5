"""The command line: tools/*.py wrappers, predict's JSON lines, verify, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, TEXTS
from helpers import make_tasks

from centra.cli import main
from centra.core.answers import interpret
from centra.core.backbone import Backbone
from centra.core.manifest import content_id
from centra.core.merge import plan_merge, write_merged
from centra.core.task import TaskSpec
from centra.core.tokens import MAX_TEXT_CHARS
from centra.core.versions import MANIFEST, model_folder
from centra.runtime.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def merged(bert_path, tmp_path) -> Path:
    make_tasks(Backbone.load(bert_path), tmp_path / "tasks")
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    return tmp_path / "out"


def test_tools_add_task_and_merge(bert_path, tmp_path):
    tasks = tmp_path / "tasks"
    for name, kind, labels, attach, layers in [("mood", "multiclass", "sad,ok,happy", "1", "1"),
                                               ("tags", "multilabel", "x,y", "3", "1")]:
        done = run_tool("tools/add_task.py", "--tasks-dir", str(tasks), "--name", name, "--kind", kind,
                        "--labels", labels, "--init-only", "--attach-layer", attach, "--task-layers", layers,
                        "--backbone", str(bert_path))
        assert done.returncode == 0, done.stderr
    done = run_tool("tools/merge.py", "--tasks-dir", str(tasks), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "overhead: 5 layers per request (trunk passes: 3 [single, max_length 64]; task layers: 2) vs 8 as 2 " \
        "separate 4-layer models" in done.stdout
    assert "NO (untrained)" in done.stdout
    manifest = json.loads((model_folder(tmp_path / "out") / MANIFEST).read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["mood", "tags"]

    done = run_tool("tools/merge.py", "--tasks-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such tasks folder" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o2").exists()


def test_predict_prints_one_json_line_per_text_and_task(merged, capsys):
    assert main(["predict", "--model", str(merged), "--task", "alpha", "--task", "beta", "--task", "gamma",
                 TEXTS[0], TEXTS[1]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["text"], x["task"]) for x in lines] == [(t, n) for t in TEXTS[:2] for n in ("alpha", "beta", "gamma")]
    alpha = lines[0]
    assert alpha["label"] in ("neg", "neu", "pos") and abs(sum(alpha["scores"].values()) - 1) < 1e-5
    assert alpha["label"] == max(alpha["scores"], key=alpha["scores"].get)
    beta = lines[1]
    assert set(beta["scores"]) == {"billing", "delivery", "product", "app"}
    assert beta["labels"] == [k for k, v in beta["scores"].items() if v >= 0.5]
    assert isinstance(lines[2]["value"], float) and lines[2]["scores"] == {"score": lines[2]["value"]}


def test_predict_pairs_and_default_task_set(merged, capsys):
    assert main(["predict", "--model", str(merged), TEXTS[0]]) == 0
    tasks = [json.loads(line)["task"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(tasks) == ["alpha", "beta", "epsilon", "gamma"], "no pair given: single-input tasks only"
    assert main(["predict", "--model", str(merged), "--pair", PAIRS[0], TEXTS[0]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    delta = next(x for x in lines if x["task"] == "delta")
    assert delta["pair"] == PAIRS[0] and delta["label"] in ("different", "same")


def test_verify_passes_and_catches_a_bad_trunk(merged, capsys):
    assert main(["verify", "--model", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "reference: standalone models built from backbone folder" in out and "all 5 tasks within" in out
    # A trunk written wrong (its hash updated to match) is caught against the original backbone.
    from safetensors.torch import load_file, save_file

    from centra.io import sha256_file

    version = model_folder(merged)
    trunk = version / "trunk.safetensors"
    state = load_file(str(trunk))
    state["layers.0.fc2.weight"] = state["layers.0.fc2.weight"] * 1.5
    save_file(state, str(trunk))
    manifest = json.loads((version / MANIFEST).read_text())
    manifest["files"]["trunk.safetensors"] = sha256_file(trunk)
    manifest["content_id"] = content_id(manifest)  # a consistent manifest: only the numbers are wrong
    (version / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", "--model", str(merged)]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "differ from standalone" in captured.err


@pytest.mark.parametrize("args, message", [
    (["--task", "nope", "hello"], "unknown task 'nope'"),
    (["--task", "delta", "hello"], "task 'delta' takes text pairs"),
    (["   "], "text 0 is empty"),
    (["--pair", "a", "--pair", "b", "x", "y", "z"], "3 texts but 2 pair texts"),
    (["x" * (MAX_TEXT_CHARS + 1)], "the limit is"),
])
def test_predict_errors_are_one_line(merged, capsys, args, message):
    assert main(["predict", "--model", str(merged), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("centra: error:")


def test_predict_on_missing_model(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "none"), "hi"]) == 2
    assert "no such merged model folder" in capsys.readouterr().err


def test_add_task_errors(bert_path, tmp_path, capsys):
    base = ["add-task", "--tasks-dir", str(tmp_path), "--backbone", str(bert_path)]
    assert main([*base, "--name", "t", "--kind", "multiclass", "--labels", "a,b"]) == 2
    assert "needs --train, --dev" in capsys.readouterr().err
    assert main([*base, "--remove", "ghost"]) == 2
    assert "no such task" in capsys.readouterr().err
    assert main([*base, "--name", "t", "--kind", "multiclass", "--labels", "a,b", "--init-only",
                 "--attach-layer", "4", "--task-layers", "1"]) == 2
    assert "exceeds the backbone's 4 layers" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    init = [*base, "--name", "t", "--init-only", "--attach-layer", "1", "--task-layers", "1"]
    assert main([*init, "--kind", "multiclass", "--labels", "a,b", "--epochs", "3"]) == 2  # said, not dropped
    assert "--init-only trains nothing: --epochs would have no effect" in capsys.readouterr().err
    assert main([*init, "--kind", "multiclass", "--labels", "a,b", "--max-labels", "2"]) == 2
    assert "max_labels is for multilabel tasks only" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main([*init, "--kind", "multilabel", "--labels", "a,b,c", "--max-labels", "2"]) == 0
    assert json.loads((tmp_path / "t" / "task.json").read_text())["max_labels"] == 2


def test_batching_does_not_change_results(merged):
    one = Engine.load(merged, batch_size=1).logits(TEXTS, PAIRS)
    big = Engine.load(merged, batch_size=64).logits(TEXTS, PAIRS)
    for name in one:
        assert (one[name] - big[name]).abs().max().item() < 1e-5


def spec(kind: str, labels: list[str], thresholds=None) -> TaskSpec:
    return TaskSpec(name="t", kind=kind, labels=labels, attach_layer=0, task_layers=0,
                    backbone={"id": "x", "fingerprint": "sha256:0"}, thresholds=thresholds)


def test_interpret_each_kind():
    out = interpret(spec("multiclass", ["a", "b", "c"]), torch.tensor([0.0, 2.0, 1.0]))
    assert out.label == "b" and out.scores["b"] == pytest.approx(0.665241, abs=1e-6)
    out = interpret(spec("multilabel", ["a", "b", "c"], [0.5, 0.9, 0.1]), torch.tensor([0.0, 2.0, -2.0]))
    assert out.labels == ["a", "c"], "thresholds per label: 0.5>=0.5, 0.88<0.9, 0.12>=0.1"
    out = interpret(spec("regression", ["similarity"]), torch.tensor([3.25]))
    assert out.to_dict() == {"value": 3.25, "scores": {"similarity": 3.25}}


def test_evaluate_matches_engine_predictions(merged, tmp_path, capsys):
    gold = ["neg", "pos", "neu", "pos", "neg", "neu"]
    data = tmp_path / "dev.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{g}\n" for t, g in zip(TEXTS, gold)))
    assert main(["evaluate", "--model", str(merged), "--task", "alpha", "--data", str(data),
                 "--text-column", "text", "--label-column", "label"]) == 0
    result = json.loads(capsys.readouterr().out)
    engine = Engine.load(merged)
    predicted = [a["label"] for a in engine.predict(TEXTS, tasks=["alpha"])]
    expected = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    assert result["examples"] == 6 and result["accuracy"] == pytest.approx(expected, abs=1e-6)
    data.write_text("text\tlabel\nhello\tunknown\n")
    assert main(["evaluate", "--model", str(merged), "--task", "alpha", "--data", str(data),
                 "--text-column", "text", "--label-column", "label"]) == 2
    assert "dev.tsv:2: label 'unknown' is not among the training labels" in capsys.readouterr().err


def test_every_command_prints_its_help(capsys):
    """argparse formats help texts with %: a literal one in a setting's text once broke add-task --help."""
    from centra.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "add-task" in commands and "merge" in commands
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
