"""Training on tiny models: each kind and input type learns, artifacts are valid and reload exactly,
the trunk cache is exact, runs are reproducible, other tasks are never touched, bad input is refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot
from helpers import STANDARD_TASKS, make_task

from centra.cli import main
from centra.core.backbone import Backbone, attention_bias
from centra.core.task import load_task
from centra.core.tokens import encode
from centra.errors import CentraError
from centra.train.cache import ActivationCache
from centra.train.data import Columns
from centra.train.finetune import loss_fn
from centra.train.job import TaskJob
from centra.train.pipeline import train_task

POSITIVE = ["great product", "i love it", "very happy", "support answered quickly", "best purchase"]
NEGATIVE = ["the box was damaged", "the app crashes", "arrived broken", "the delivery was late", "refund please"]
TOPICS = {"billing": ["billing address", "refund please"], "delivery": ["delivery was late", "where is my order"],
          "app": ["the app crashes", "settings page"]}


def synthetic(kind: str, pair: bool, n: int, seed: int) -> list[list[str]]:
    """Rows [text, (pair,) label] whose label a small model can learn from keywords."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if kind == "multilabel":
            chosen = [t for t in TOPICS if rng.random() < 0.4] or ["app"]
            text = " and ".join(rng.choice(TOPICS[t]) for t in chosen)
            rows.append([text, ",".join(chosen)])
            continue
        good = rng.random() < 0.5
        text = rng.choice(POSITIVE if good else NEGATIVE) + " " + rng.choice(["today", "again", "now", ""])
        if not pair:
            rows.append([text.strip(), "pos" if good else "neg"])
            continue
        same = rng.random() < 0.5
        other = rng.choice(POSITIVE if good == same else NEGATIVE)
        label = f"{4.0 * same + rng.random():.3f}" if kind == "regression" else ("same" if same else "diff")
        rows.append([text.strip(), other, label])
    return rows


def write_split(path: Path, rows: list[list[str]], pair: bool) -> Path:
    header = ["text", "pair", "label"] if pair else ["text", "label"]
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def job_for(tmp_path: Path, name: str, kind: str, pair: bool, seed: int = 0, **kwargs) -> TaskJob:
    train = write_split(tmp_path / f"{name}-train.tsv", synthetic(kind, pair, 64, 1), pair)
    dev = write_split(tmp_path / f"{name}-dev.tsv", synthetic(kind, pair, 32, 2), pair)
    lo, hi = kwargs.pop("layers", (1, 2))
    return TaskJob(name=name, kind=kind, train=train, dev=dev,
                   columns=Columns("text", ["label"], pair="pair" if pair else None), layers=f"{lo}:{hi}",
                   **{"epochs": 3, "batch_size": 8, "lr": 1e-3, "head_lr": 1e-2, "seed": seed, "progress": False,
                      **kwargs})


@pytest.fixture(scope="module")
def bert(tiny_models) -> Backbone:
    return Backbone.load(tiny_models["bert"])


@pytest.mark.parametrize("kind, pair", [("multiclass", False), ("multilabel", False), ("regression", True),
                                        ("multiclass", True)])
def test_each_kind_trains_and_reloads_exactly(bert, tmp_path, kind, pair):
    report, student = train_task(job_for(tmp_path, "t", kind, pair), bert, tmp_path / "tasks")
    teacher = report.chosen_teacher  # trained all epochs (halving stops the rest)
    losses = teacher.log.losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), "training loss must fall"
    assert [t.trainable_layers for t in report.teachers] == [2, 1]
    assert sum(t.chosen for t in report.teachers) == 1
    assert report.students and report.cache.nbytes > 0
    assert {"data", "students", "teacher_logits"} <= set(report.seconds)
    spec, loaded = load_task(tmp_path / "tasks" / "t", bert)
    assert spec.trained and spec.input == ("pair" if pair else "single") and spec.metrics["metric"]
    assert spec.attach_layer + spec.task_layers <= bert.cfg.num_layers and 1 <= spec.task_layers <= 2
    on_disk = json.loads((tmp_path / "tasks" / "t" / "report.json").read_text())
    assert on_disk["chosen"] == report.chosen.to_dict()
    hidden = torch.randn(3, 7, bert.cfg.hidden_size)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad():
        assert torch.equal(student(hidden, attention_bias(mask), mask), loaded(hidden, attention_bias(mask), mask))


def test_multiclass_learns_the_keywords(bert, tmp_path):
    job = job_for(tmp_path, "t", "multiclass", False, student_layers=1)
    job.epochs = 5
    report, _ = train_task(job, bert, tmp_path / "tasks")
    # Chance is about 0.5 on these 32 dev examples; a tiny random model is sensitive to float noise.
    assert report.chosen.scores["accuracy"] >= 0.7, report.chosen


def test_cache_equals_recomputed_states(bert, tmp_path):
    tok = bert.tokenizer()
    texts = [" ".join(r) for r in synthetic("multiclass", True, 20, 3)]
    enc = encode(tok, bert.cfg.type_vocab_size, texts, None, 32)

    def direct(layer: int, rows: list[int]) -> torch.Tensor:
        ids, mask, types = enc.batch(rows, tok.pad_token_id)
        with torch.no_grad():
            hidden = bert.embeddings(ids, types)
            for lay in bert.layers[:layer]:
                hidden = lay(hidden, attention_bias(mask))
        return hidden * mask.unsqueeze(-1)

    rows = [3, 0, 7, 19]
    for cap, spill in ((1 << 30, None), (0, tmp_path)):  # in memory, and spilled to a memory-mapped file
        cache = ActivationCache(bert, enc, tok.pad_token_id, cap, spill, progress=False)
        assert (cache.spilled is not None) == (spill is not None)
        cache.build(1)
        for layer in (1, 2, 3, 1, 4):  # climb, restore/rebuild below, climb again
            cache.advance_to(layer)
            hidden, mask = cache.batch(rows)
            assert (hidden - direct(layer, rows)).abs().max().item() < 1e-5, (layer, cap)
        cache.close()
        assert not list(tmp_path.glob(".activations-*"))


def test_seeded_runs_are_reproducible(bert, tmp_path):
    for out in ("a", "b"):
        train_task(job_for(tmp_path, "t", "multiclass", False, seed=3, student_layers=1), bert, tmp_path / out)
    assert (tmp_path / "a/t/head.safetensors").read_bytes() == (tmp_path / "b/t/head.safetensors").read_bytes()


def test_isolation_add_retrain_remove(bert, tmp_path):
    tasks = tmp_path / "tasks"
    make_task(bert, tasks, STANDARD_TASKS[0])
    before = snapshot(tasks / "alpha")
    train_task(job_for(tmp_path, "b", "multiclass", False, student_layers=1), bert, tasks)
    assert snapshot(tasks / "alpha") == before
    first = snapshot(tasks / "b")
    train_task(job_for(tmp_path, "b", "multiclass", False, seed=7, student_layers=1), bert, tasks)  # retrain
    assert snapshot(tasks / "alpha") == before and snapshot(tasks / "b") != first
    assert main(["add-task", "--tasks-dir", str(tasks), "--remove", "b"]) == 0
    assert sorted(p.name for p in tasks.iterdir()) == ["alpha"] and snapshot(tasks / "alpha") == before


def test_killed_run_leaves_old_task_intact(bert_path, tmp_path):
    """kill -9 during a retrain: the task folder is the old version or the complete new one."""
    job = job_for(tmp_path, "t", "multiclass", False, student_layers=1)
    args = ["add-task", "--tasks-dir", str(tmp_path / "tasks"), "--name", "t", "--kind", "multiclass",
            "--train", str(job.train), "--dev", str(job.dev), "--text-column", "text", "--label-column", "label",
            "--backbone", str(bert_path), "--layers", "1:2", "--epochs", "2", "--student-layers", "1"]
    assert main(args) == 0
    old = snapshot(tmp_path / "tasks" / "t")
    code = "import sys; from centra.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--seed", "5", "--epochs", "5000"],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(6)
    proc.kill()
    proc.wait()
    assert snapshot(tmp_path / "tasks" / "t") == old, "a run killed mid-training must not change the task"
    load_task(tmp_path / "tasks" / "t", Backbone.load(bert_path))


def test_distillation_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    hard = loss_fn("multiclass", logits, target, None, 1.0, 2.0)
    assert torch.allclose(loss_fn("multiclass", logits, target, logits.clone(), 1.0, 2.0), hard, atol=1e-6)
    assert loss_fn("multiclass", logits, target, -logits, 1.0, 2.0) > hard
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    hard = loss_fn("multilabel", logits, multi, None, 1.0, 2.0)
    assert torch.allclose(loss_fn("multilabel", logits, multi, logits.clone(), 1.0, 2.0), hard, atol=1e-6)
    assert loss_fn("multilabel", logits, multi, -logits, 1.0, 2.0) > hard
    value = torch.tensor([[1.0], [2.0]])
    assert loss_fn("regression", value, torch.tensor([1.0, 3.0]), value + 1, 0.5, 2.0).item() == \
        pytest.approx(0.5 + 0.5 * 1.0)


def test_external_teacher_logits(bert, tmp_path):
    job = job_for(tmp_path, "t", "multiclass", False, student_layers=1)
    rows = len(job.train.read_text().splitlines()) - 1
    table = tmp_path / "teacher.jsonl"
    table.write_text("\n".join(json.dumps({"logits": [0.5, -0.5]}) for _ in range(rows)) + "\n")
    job.teacher_logits, job.attach_layer = table, 2
    report, student = train_task(job, bert, tmp_path / "tasks")
    assert student.spec.attach_layer == 2 and report.teachers[0].external == str(table)
    table.write_text(json.dumps([0.5, -0.5]) + "\n")
    with pytest.raises(CentraError, match="1 rows of logits but the training file has 64"):
        train_task(job, bert, tmp_path / "tasks")


def test_mixed_allocation_threshold(bert, tmp_path):
    job = job_for(tmp_path, "t", "multiclass", False, layers=(2, 2), threshold=1000.0)
    report, student = train_task(job, bert, tmp_path / "tasks")
    assert [s.task_layers for s in report.students] == [1, 2] and student.spec.task_layers == 1
    job = job_for(tmp_path, "u", "multiclass", False, layers=(2, 2), threshold=-1000.0)
    report, student = train_task(job, bert, tmp_path / "tasks")
    assert [s.task_layers for s in report.students] == [1, 2] and student.spec.task_layers == 2


@pytest.mark.parametrize("extra, message", [
    (["--layers", "0:9"], "--layers 0:9 must satisfy"),
    (["--layers", "a:b"], "expected MIN:MAX"),
    (["--metric", "pearson"], "metric 'pearson' does not fit a multiclass task"),
    (["--student-layers", "3"], "--student-layers must be in 1..2"),
    (["--student-layers", "1", "--threshold", "1"], "not both"),
    (["--student-layers", "1", "--students", "separate"], "give --student-layers or --students, not both"),
])
def test_add_task_bad_options(bert_path, tmp_path, capsys, extra, message):
    job = job_for(tmp_path, "t", "multiclass", False)
    args = ["add-task", "--tasks-dir", str(tmp_path / "tasks"), "--name", "t", "--kind", "multiclass",
            "--train", str(job.train), "--dev", str(job.dev), "--text-column", "text", "--label-column", "label",
            "--backbone", str(bert_path), "--epochs", "1", "--layers", "2:2", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "tasks" / "t").exists()
