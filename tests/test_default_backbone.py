"""The real default backbone (all-MiniLM-L6-v2 from its wheel): parity with transformers, merge, verify."""

from __future__ import annotations

import pytest
import torch
from conftest import PAIRS, TEXTS
from helpers import make_tasks

from centra.core.backbone import DEFAULT_BACKBONE_ID, Backbone, attention_bias
from centra.core.merge import plan_merge, write_merged
from centra.runtime.engine import Engine
from centra.runtime.verify import verify

pytestmark = pytest.mark.slow

TASKS = [  # a 6-layer backbone: attach layers 1..5
    ("sentiment", "multiclass", ["negative", "neutral", "positive"], "single", 4, 2, "mean"),
    ("topics", "multilabel", ["billing", "delivery", "app"], "single", 2, 1, "mean"),
    ("urgency", "regression", ["urgency"], "single", 5, 1, "cls"),
    ("same", "multiclass", ["no", "yes"], "pair", 1, 3, "mean"),
]


@pytest.fixture(scope="module")
def minilm() -> Backbone:
    return Backbone.load("default")


def test_default_backbone_matches_transformers(minilm):
    from transformers import AutoModel

    assert minilm.backbone_id == DEFAULT_BACKBONE_ID and minilm.cfg.num_layers == 6
    assert minilm.cfg.hidden_size == 384
    enc = minilm.tokenizer()(TEXTS, PAIRS, padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(str(minilm.path)).eval()
    with torch.no_grad():
        expected = ref(**enc).last_hidden_state
        bias = attention_bias(enc["attention_mask"])
        hidden = minilm.embeddings(enc["input_ids"], enc["token_type_ids"])
        for layer in minilm.layers:
            hidden = layer(hidden, bias)
    keep = enc["attention_mask"].bool()
    assert (hidden - expected)[keep].abs().max().item() < 1e-5


def test_default_backbone_merge_and_verify(minilm, tmp_path):
    make_tasks(minilm, tmp_path / "tasks", TASKS)
    manifest = write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    # the single-text pass runs to layer 5, the pair task's own pass to layer 1
    assert manifest.trunk_depth == 5 and manifest.overhead_layers == 5 + 1 + 7
    engine = Engine.load(tmp_path / "out")
    checks = verify(engine)
    assert checks[0].reference.startswith("backbone folder")
    assert {c.name for c in checks} == {row[0] for row in TASKS}
    for check in checks:
        assert check.max_abs_diff < 1e-5, check


def test_demo_untrained_runs(tmp_path, capsys):
    from centra.cli import main

    assert main(["demo", "--untrained", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # single-text pass to layer 5 + the pair task's pass to layer 4 + 6 task layers
    assert "UNTRAINED DEMO TASKS" in out and "overhead: 15 layers per request" in out
    assert "counted by forward hooks: 15 (equals the manifest's 15)" in out
    assert "merged graph, all 5 tasks" in out and (tmp_path / "model" / "current" / "manifest.json").is_file()
    assert "gRPC server on 127.0.0.1:" in out and "one Classify call for all texts and tasks" in out
    assert "the same answers as in process: yes; server stopped" in out
