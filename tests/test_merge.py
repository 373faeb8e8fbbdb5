"""The merged graph: equal to each standalone task model, subset calls, isolation, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, TEXTS, snapshot
from helpers import STANDARD_TASKS, make_task, make_tasks

from centra.core.backbone import Backbone, EncoderLayer
from centra.core.graph import StandaloneModel
from centra.core.manifest import content_id
from centra.core.merge import load_merged, plan_merge, write_merged
from centra.core.task import HEAD_FILE, TASK_FILE
from centra.core.versions import MANIFEST, model_folder, read_manifest
from centra.errors import CentraError
from centra.runtime.engine import Engine

TOLERANCE = 1e-5  # fp32, merged vs standalone, logits


def build(backbone: Backbone, root: Path, rows=STANDARD_TASKS, batch_size: int = 4) -> Engine:
    make_tasks(backbone, root / "tasks", rows)
    write_merged(plan_merge([root / "tasks"]), root / "out")
    return Engine.load(root / "out", batch_size=batch_size)


def standalone_logits(backbone: Backbone, engine: Engine, name: str, texts=TEXTS, pairs=PAIRS) -> torch.Tensor:
    """The task on its own: the original backbone's layers 1..k + its branch, each text unpadded."""
    spec = engine.specs[name]
    model = StandaloneModel(backbone.embeddings, list(backbone.layers), engine.model.heads[name]).eval()
    enc = engine.encode(texts, pairs if spec.input == "pair" else None, spec.max_length)
    with torch.no_grad():
        return torch.cat([model(*enc.batch([i], engine.tokenizer.pad_token_id)) for i in range(len(texts))])


def test_merged_equals_standalone(backbone_path, tmp_path):
    bb = Backbone.load(backbone_path)
    engine = build(bb, tmp_path)  # batch size 4 over 6 texts: padded batches of mixed lengths
    assert sorted({s.attach_layer for s in engine.specs.values()}) == [0, 1, 2, 3]
    merged = engine.logits(TEXTS, PAIRS)
    assert set(merged) == {row[0] for row in STANDARD_TASKS}
    for name, values in merged.items():
        expected = standalone_logits(bb, engine, name)
        assert values.shape == expected.shape == (len(TEXTS), engine.specs[name].num_outputs)
        assert values.abs().max() > 0.1, "logits too small for the comparison to mean anything"
        assert (values - expected).abs().max().item() < TOLERANCE, name


def count_layer_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    for module in model.modules():
        if isinstance(module, EncoderLayer):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_subset_call_equals_full_and_runs_fewer_layers(bert_path, tmp_path):
    bb = Backbone.load(bert_path)
    engine = build(bb, tmp_path, batch_size=len(TEXTS))  # one batch: layer calls == layers run
    calls = count_layer_calls(engine.model)
    full = engine.logits(TEXTS)  # no pairs: the 4 single-input tasks
    # trunk to layer 3 (gamma) + task layers 1 + 2 + 1 + 2
    assert calls[0] == 3 + 6
    calls[0] = 0
    subset = engine.logits(TEXTS, tasks=["alpha", "epsilon"])
    assert calls[0] == 1 + (1 + 2), "trunk stops at alpha's attach layer 1"
    assert list(subset) == ["alpha", "epsilon"]
    for name in subset:
        assert torch.equal(subset[name], full[name])
    calls[0] = 0
    engine.logits(TEXTS, tasks=["epsilon"])
    assert calls[0] == 2, "attached at the embeddings: no trunk layer at all"


def test_adding_or_removing_a_task_leaves_others_identical(bert_path, tmp_path):
    bb = Backbone.load(bert_path)
    rows = STANDARD_TASKS[:2]  # alpha (attach 1), beta (attach 2)
    make_tasks(bb, tmp_path / "tasks", rows)
    files_before = snapshot(tmp_path / "tasks")
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    before = Engine.load(tmp_path / "out", batch_size=4).logits(TEXTS)

    make_task(bb, tmp_path / "tasks", STANDARD_TASKS[2], seed=9)  # gamma: deeper trunk (attach 3)
    added_files = snapshot(tmp_path / "tasks")
    assert {k: v for k, v in added_files.items() if not k.startswith("gamma")} == files_before
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    after_add = Engine.load(tmp_path / "out", batch_size=4).logits(TEXTS)
    assert json.loads((model_folder(tmp_path / "out") / MANIFEST).read_text())["trunk_depth"] == 3

    from centra.cli import main
    assert main(["add-task", "--tasks-dir", str(tmp_path / "tasks"), "--remove", "gamma"]) == 0
    assert snapshot(tmp_path / "tasks") == files_before
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    after_remove = Engine.load(tmp_path / "out", batch_size=4).logits(TEXTS)
    for name in ("alpha", "beta"):
        assert torch.equal(before[name], after_add[name]), name
        assert torch.equal(before[name], after_remove[name]), name


def test_manifest_contents(bert_path, tmp_path):
    bb = Backbone.load(bert_path)
    build(bb, tmp_path)
    manifest = json.loads((model_folder(tmp_path / "out") / MANIFEST).read_text())
    assert manifest["backbone"]["fingerprint"] == bb.fingerprint
    assert manifest["trunk_depth"] == 3
    # one trunk pass for the single-text tasks (to layer 3), one for the pair task delta (to layer 2)
    assert [(p["input"], p["depth"]) for p in manifest["trunk_passes"]] == [("single", 3), ("pair", 2)]
    assert manifest["overhead_layers"] == 3 + 2 + (1 + 2 + 1 + 1 + 2)
    assert manifest["single_task_layers"] == 4 * 5
    by_name = {t["name"]: t for t in manifest["tasks"]}
    assert by_name["delta"]["input"] == "pair" and by_name["gamma"]["kind"] == "regression"
    for name, entry in by_name.items():
        assert (model_folder(tmp_path / "out") / "tasks" / name / HEAD_FILE).read_bytes() == \
            (tmp_path / "tasks" / name / HEAD_FILE).read_bytes()
        assert entry["head_sha256"].startswith("sha256:")


def test_the_manifest_record_writes_the_file_it_reads(bert_path, tmp_path):
    """read_manifest -> Manifest -> to_dict gives back manifest.json key for key, in order, byte for byte."""
    build(Backbone.load(bert_path), tmp_path)
    folder = model_folder(tmp_path / "out")
    manifest = read_manifest(folder)
    text = (folder / MANIFEST).read_text()
    assert json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n" == text
    assert manifest.content_id == content_id(json.loads(text)) and manifest.engine is None
    assert [t.name for t in manifest.tasks] == [row[0] for row in sorted(STANDARD_TASKS)]
    assert manifest.backbone.num_layers == 4 and manifest.trunk_passes[0].tasks == ("alpha", "beta", "epsilon", "gamma")


def corrupt(path: Path, data: bytes) -> None:
    path.write_bytes(data)


REFUSALS = {
    "other backbone": ("other", "trained on backbone 'tiny-bert-other'"),
    "truncated head": (lambda d: corrupt(d / "beta" / HEAD_FILE, (d / "beta" / HEAD_FILE).read_bytes()[:-50]),
                       "beta/head.safetensors: sha256 differs"),
    "corrupt head": (lambda d: corrupt(d / "beta" / HEAD_FILE, b"garbage" * 40), "beta/head.safetensors"),
    "malformed task.json": (lambda d: corrupt(d / "alpha" / TASK_FILE, b'{"name": "alpha",'),
                            "alpha/task.json: malformed JSON"),
    "duplicate names": ("duplicate", "duplicate task name 'alpha'"),
    "empty tasks dir": ("empty", "no task folders to merge"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_merge_refusals_leave_out_untouched(tiny_models, tmp_path, case):
    bb = Backbone.load(tiny_models["bert"])
    make_tasks(bb, tmp_path / "tasks", STANDARD_TASKS[:2])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    out_before = snapshot(tmp_path / "out")
    damage, message = REFUSALS[case]
    dirs = [tmp_path / "tasks"]
    if damage == "other":
        make_task(Backbone.load(tiny_models["bert-other"]), tmp_path / "tasks", STANDARD_TASKS[2])
    elif damage == "duplicate":
        make_task(bb, tmp_path / "more", STANDARD_TASKS[0])
        dirs.append(tmp_path / "more")
    elif damage == "empty":
        (tmp_path / "none").mkdir()
        dirs = [tmp_path / "none"]
    else:
        damage(tmp_path / "tasks")
    with pytest.raises(CentraError, match=message) as info:
        write_merged(plan_merge(dirs), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert snapshot(tmp_path / "out") == out_before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "no temp folder left"


def test_load_merged_refuses_tampered_output(bert_path, tmp_path):
    bb = Backbone.load(bert_path)
    build(bb, tmp_path, rows=STANDARD_TASKS[:2])
    version = model_folder(tmp_path / "out")
    trunk = version / "trunk.safetensors"
    data = trunk.read_bytes()
    trunk.write_bytes(data[:-10])
    with pytest.raises(CentraError, match="trunk.safetensors: sha256 differs"):
        load_merged(tmp_path / "out")
    trunk.write_bytes(data)
    shutil.copyfile(version / "tasks" / "alpha" / HEAD_FILE, version / "tasks" / "beta" / HEAD_FILE)
    with pytest.raises(CentraError, match="beta/head.safetensors: sha256 differs from the manifest"):
        load_merged(tmp_path / "out")
    with pytest.raises(CentraError, match="no such merged model folder"):
        load_merged(tmp_path / "nothing")


def test_rows_with_different_task_sets_share_one_trunk_pass(bert_path, tmp_path):
    """Rows of several calls, each with its own tasks: one pass per token group, each branch only on the
    rows that asked for it, rows leaving the trunk when no deeper task wants them; answers equal one-by-one."""
    from centra.runtime.engine import Row

    engine = build(Backbone.load(bert_path), tmp_path, batch_size=64)
    wanted = [("alpha",), ("gamma", "beta"), ("delta",), ("alpha", "delta", "epsilon"), ("epsilon",), ("gamma",)]
    rows = [Row(TEXTS[i], PAIRS[i], tasks) for i, tasks in enumerate(wanted)]
    head_rows: dict[str, list[int]] = {name: [] for name in engine.specs}
    for name, head in engine.model.heads.items():
        head.register_forward_hook(lambda m, args, out, name=name: head_rows[name].append(args[0].shape[0]))
    trunk_rows: list[tuple[int, int]] = []
    for k, layer in enumerate(engine.model.trunk, 1):
        layer.register_forward_hook(lambda m, args, out, k=k: trunk_rows.append((k, args[0].shape[0])))
    results = engine.run(rows)
    assert head_rows == {"alpha": [2], "beta": [1], "gamma": [2], "delta": [2], "epsilon": [2]}
    # single-text pass: rows 0,1,3,4,5 enter; 0,1,3,5 reach layer 1; 1,5 go on (beta at 2, gamma at 3);
    # the pair pass: rows 2,3 to layer 2 (delta)
    assert sorted(trunk_rows) == sorted([(1, 4), (2, 2), (3, 2), (1, 2), (2, 2)])
    for row, result in zip(rows, results):
        assert set(result.logits) == set(row.tasks)
        for task in row.tasks:
            alone = engine.logits([row.text], [row.pair], [task])[task][0]
            assert (result.logits[task] - alone).abs().max().item() < 1e-5, (row, task)
            assert result.truncated[task] is False


def test_truncated_rows_are_flagged(bert_path, tmp_path):
    from centra.runtime.engine import Row

    engine = build(Backbone.load(bert_path), tmp_path, rows=STANDARD_TASKS[:1])
    long_text = " ".join(TEXTS) * 3  # far over alpha's max_length of 48 tokens
    results = engine.run([Row(long_text, None, ("alpha",)), Row(TEXTS[0], None, ("alpha",))])
    assert [r.truncated["alpha"] for r in results] == [True, False]
