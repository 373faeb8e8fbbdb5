"""Task folders: save/load equivalence and every refusal, each naming the offending file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXTS
from helpers import STANDARD_TASKS, make_task

from centra.core.backbone import Backbone, attention_bias
from centra.core.task import HEAD_FILE, TASK_FILE, init_task, load_task, save_task
from centra.errors import CentraError


@pytest.fixture
def bert(bert_path) -> Backbone:
    return Backbone.load(bert_path)


def branch_output(bb: Backbone, head, texts=TEXTS) -> torch.Tensor:
    enc = bb.tokenizer()(texts, padding=True, return_tensors="pt", return_token_type_ids=True)
    bias = attention_bias(enc["attention_mask"])
    hidden = bb.embeddings(enc["input_ids"], enc["token_type_ids"])
    for layer in bb.layers[: head.spec.attach_layer]:
        hidden = layer(hidden, bias)
    with torch.no_grad():
        return head(hidden, bias, enc["attention_mask"])


@pytest.mark.parametrize("row", STANDARD_TASKS, ids=[r[0] for r in STANDARD_TASKS])
def test_save_load_roundtrip_is_exact(bert, tmp_path, row):
    head = make_task(bert, tmp_path, row)
    spec, loaded = load_task(tmp_path / row[0], bert)
    assert spec.to_dict() == {**head.spec.to_dict(), "head_sha256": spec.head_sha256}
    assert spec.head_sha256.startswith("sha256:")
    assert torch.equal(branch_output(bert, head), branch_output(bert, loaded))


def test_init_only_copies_backbone_layers(bert):
    spec, head = init_task(bert, "t", "multiclass", ["a", "b", "c"], attach_layer=1, task_layers=2)
    for i in range(2):
        for (k, v), (k2, v2) in zip(head.layers[i].state_dict().items(), bert.layers[1 + i].state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    assert torch.equal(head.pooler.weight, bert.pooler.weight)
    assert head.classifier.weight.shape == (3, bert.cfg.hidden_size)
    assert spec.trained is False and spec.backbone["fingerprint"] == bert.fingerprint
    # Same seed, same classifier: --init-only is reproducible.
    _, again = init_task(bert, "t", "multiclass", ["a", "b", "c"], attach_layer=1, task_layers=2)
    assert torch.equal(head.classifier.weight, again.classifier.weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(attach_layer=3, task_layers=2), "exceeds the backbone's 4 layers"),
    (dict(kind="multiclass", labels=["only"]), "at least 2 labels"),
    (dict(kind="regression", labels=["a", "b"]), "exactly one label"),
    (dict(name="bad name"), "task name"),
    (dict(labels=["a", "a"]), "distinct"),
    (dict(max_length=1000), "position embeddings"),
])
def test_init_rejects_bad_specs(bert, kwargs, message):
    args = dict(name="t", kind="multiclass", labels=["a", "b"], attach_layer=1, task_layers=1) | kwargs
    with pytest.raises(CentraError, match=message):
        init_task(bert, **args)


def edit_json(folder, **changes):
    data = json.loads((folder / TASK_FILE).read_text())
    data.update(changes)
    (folder / TASK_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / TASK_FILE).write_text("{not json"), "malformed JSON"),
    (lambda f: (f / TASK_FILE).write_text("[1, 2]"), "expected a JSON object"),
    (lambda f: edit_json(f, kind="ranking"), "kind 'ranking'"),
    (lambda f: edit_json(f, attach_layer="2"), "'attach_layer' must be int"),
    (lambda f: edit_json(f, schema_version=99), "schema_version 99"),
    (lambda f: edit_json(f, name="other"), "does not match its folder"),
    (lambda f: edit_json(f, labels=["neg", "pos"]), "shape"),
    (lambda f: edit_json(f, task_layers=2), "sha256|layout"),
    (lambda f: (f / HEAD_FILE).write_bytes((f / HEAD_FILE).read_bytes()[:100]), "sha256 differs"),
    (lambda f: (f / HEAD_FILE).unlink(), "file not found"),
])
def test_load_refuses_damaged_folders(bert, tmp_path, damage, message):
    make_task(bert, tmp_path, STANDARD_TASKS[0])
    folder = tmp_path / "alpha"
    damage(folder)
    with pytest.raises(CentraError, match=message) as info:
        load_task(folder, bert)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_load_refuses_corrupt_weights_with_matching_hash(bert, tmp_path):
    """A head whose sha256 was updated to match but whose bytes are garbage or NaN is still refused."""
    from safetensors.torch import load_file, save_file

    from centra.io import sha256_file

    make_task(bert, tmp_path, STANDARD_TASKS[0])
    folder = tmp_path / "alpha"
    (folder / HEAD_FILE).write_bytes(b"\x00" * 64)
    edit_json(folder, head_sha256=sha256_file(folder / HEAD_FILE))
    with pytest.raises(CentraError, match="corrupt or truncated"):
        load_task(folder, bert)

    make_task(bert, tmp_path, STANDARD_TASKS[0])
    state = load_file(str(folder / HEAD_FILE))
    state["classifier.bias"][0] = float("nan")
    save_file(state, str(folder / HEAD_FILE))
    edit_json(folder, head_sha256=sha256_file(folder / HEAD_FILE))
    with pytest.raises(CentraError, match="NaN"):
        load_task(folder, bert)


def test_load_refuses_other_backbone(tiny_models, tmp_path):
    other = Backbone.load(tiny_models["bert-other"])
    make_task(other, tmp_path, STANDARD_TASKS[0])
    with pytest.raises(CentraError, match="trained on backbone 'tiny-bert-other'"):
        load_task(tmp_path / "alpha", Backbone.load(tiny_models["bert"]))


def test_save_is_atomic_when_interrupted(bert, tmp_path, monkeypatch):
    """A crash while writing a new version leaves the previous version intact and loadable."""
    import centra.core.task as task_module

    make_task(bert, tmp_path, STANDARD_TASKS[0])
    before = {p.name: p.read_bytes() for p in (tmp_path / "alpha").iterdir()}
    spec, head = init_task(bert, "alpha", "multiclass", ["neg", "neu", "pos"], 1, 1, seed=5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process is killed between the head and task.json

    monkeypatch.setattr(task_module, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_task(tmp_path / "alpha", spec, head)
    assert {p.name: p.read_bytes() for p in (tmp_path / "alpha").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["alpha"], "no temp folder left behind"
    load_task(tmp_path / "alpha", bert)


@pytest.mark.parametrize("field, default", [("thresholds", [0.5] * 4), ("pooling", "mean"), ("trained", False),
                                            ("metrics", {}), ("input", "single"), ("source", {})])
def test_optional_fields_take_their_default(bert, tmp_path, field, default):
    """A task.json without an optional field loads with its default, never a KeyError."""
    make_task(bert, tmp_path, STANDARD_TASKS[1])  # beta: multilabel, 4 labels, mean pooling
    path = tmp_path / "beta" / TASK_FILE
    data = json.loads(path.read_text())
    del data[field]
    path.write_text(json.dumps(data))
    spec, _ = load_task(tmp_path / "beta", bert)
    assert getattr(spec, field) == default


@pytest.mark.parametrize("field", ["name", "kind", "labels", "attach_layer", "task_layers", "backbone",
                                   "head_sha256"])
def test_missing_required_field_is_one_line(bert, tmp_path, field):
    make_task(bert, tmp_path, STANDARD_TASKS[1])
    path = tmp_path / "beta" / TASK_FILE
    data = json.loads(path.read_text())
    del data[field]
    path.write_text(json.dumps(data))
    with pytest.raises(CentraError, match=f"task.json: missing field '{field}'"):
        load_task(tmp_path / "beta", bert)
