"""Students distilled at attach layers below their teacher's (plan candidates): kept with their own dev
figures, and once activated and merged beside deeper tasks, equal to their standalone models (trunk to
their attach layer + their branch, fp32, 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXTS
from helpers import make_tasks
from test_training import job_for

from centra.core.backbone import Backbone
from centra.core.candidates import activate, read_candidates
from centra.core.graph import StandaloneModel
from centra.core.merge import plan_merge, write_merged
from centra.core.task import load_task
from centra.core.tokens import encode
from centra.runtime.engine import Engine
from centra.train.data import load_examples
from centra.train.distill import shallower_attach_layers
from centra.train.metrics import compute
from centra.train.pipeline import train_task

TOLERANCE = 1e-5


def test_shallower_attach_layers_walk_down_and_stop_at_the_embeddings():
    assert shallower_attach_layers(5, 2) == [4, 3]
    assert shallower_attach_layers(1, 2) == [0]
    assert shallower_attach_layers(3, 0) == []


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A multiclass task whose teacher trains the top layer of 4 (attach 3), students l = 1 at 3, 2, 1."""
    root = tmp_path_factory.mktemp("shallower")
    bert = Backbone.load(tiny_models["bert"])
    job = job_for(root, "topic", "multiclass", False, layers=(1, 1), student_layers=1, extra_attach=2)
    report, _ = train_task(job, bert, root / "tasks")
    return root, bert, job, report


def test_students_below_the_teacher_are_kept_with_their_own_figures(trained):
    root, bert, job, report = trained
    folder = root / "tasks" / "topic"
    assert [(s.attach_layer, s.task_layers) for s in report.shallower_students] == [(2, 1), (1, 1)]
    assert "shallower_students" in report.seconds
    dev, _ = load_examples(job.dev, "multiclass", job.columns, labels=report.labels)
    for attach in (2, 1):
        spec, head = load_task(folder / "candidates" / f"student-a{attach}-l1", bert, name="topic")
        assert (spec.attach_layer, spec.task_layers) == (attach, 1)
        logged = next(s for s in report.shallower_students if s.attach_layer == attach)
        alone = StandaloneModel(bert.embeddings, list(bert.layers), head).eval()
        tok = bert.tokenizer()
        enc = encode(tok, bert.cfg.type_vocab_size, dev.texts, None, spec.max_length)
        with torch.no_grad():
            logits = torch.cat([alone(*enc.batch([i], tok.pad_token_id)) for i in range(len(dev.texts))]).numpy()
        # the figure recorded is the one of this head at this attach layer
        assert compute("multiclass", logits, dev.targets)["accuracy"] == pytest.approx(
            logged.log.dev["accuracy"], abs=1e-6) == pytest.approx(spec.metrics["accuracy"], abs=1e-6)


def test_a_student_at_a_second_attach_layer_equals_its_standalone_model_after_merge(trained):
    root, bert, _, _ = trained
    tasks = root / "tasks"
    make_tasks(bert, tasks)  # deeper tasks beside it (attach layers 0..3): the trunk runs past its layer
    task = read_candidates(tasks / "topic")
    chosen = next(c for c in task.candidates if c.id == "student-a1-l1")
    assert activate(task, chosen, bert.cfg)
    assert json.loads((tasks / "topic" / "task.json").read_text())["attach_layer"] == 1
    write_merged(plan_merge([tasks]), root / "out")
    engine = Engine.load(root / "out", batch_size=3)
    assert engine.specs["topic"].attach_layer == 1 and max(s.attach_layer for s in engine.specs.values()) == 3
    merged = engine.logits(TEXTS, None, ["topic", "gamma"])["topic"]
    # the candidate read on its own, independent of the merge
    _, head = load_task(tasks / "topic" / "candidates" / "student-a1-l1", bert, name="topic")
    alone = StandaloneModel(bert.embeddings, list(bert.layers), head).eval()
    enc = engine.encode(TEXTS, None, engine.specs["topic"].max_length)
    with torch.no_grad():
        expected = torch.cat([alone(*enc.batch([i], engine.tokenizer.pad_token_id)) for i in range(len(TEXTS))])
    assert merged.abs().max() > 0.05, "logits too small for the comparison to mean anything"
    assert (merged - expected).abs().max().item() < TOLERANCE
