"""Hundreds of tasks: an incremental merge reuses the unchanged graphs of earlier versions (hash-verified,
linked, never a corrupted one) and re-exports what changed; its answers equal a from-scratch merge's bit
for bit; an int8 version holds the graphs it serves; a served ONNX engine holds no torch weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch
from conftest import TEXTS
from helpers import STANDARD_TASKS, make_task, make_tasks

from centra.core import merge as core_merge
from centra.core import versions
from centra.core.backbone import Backbone
from centra.core.task import HEAD_FILE
from centra.core.versions import model_folder, read_manifest
from centra.export.engines import merge
from centra.runtime.engine import Engine

# alpha at layer 1 and gamma at layer 3 only: no task reads layer 2, so the trunk is one segment 2-3
FIRST = [row for row in STANDARD_TASKS if row[0] in ("alpha", "gamma")]
NEW_AT_2 = ("zeta", "multiclass", ["p", "q"], "single", 2, 1, "mean")  # splits segment 2-3 at layer 2


def graphs_of(out: Path) -> dict[str, dict]:
    return {g["name"]: g for g in read_manifest(model_folder(out)).engine.graphs}


@pytest.fixture(scope="module")
def grown(tiny_models, tmp_path_factory) -> dict:
    """One OUT merged three times (int8): two tasks; + a task at a new attach layer; then a retrained
    head. Beside it, a from-scratch merge of the final tasks."""
    root = tmp_path_factory.mktemp("incremental")
    bb = Backbone.load(tiny_models["bert"])
    tasks, out = root / "tasks", root / "out"
    make_tasks(bb, tasks, FIRST)
    first = merge(tasks, out, engine="onnx", precision="int8", progress=False)
    v1 = graphs_of(out)
    make_task(bb, tasks, NEW_AT_2, seed=7)
    second = merge(tasks, out, engine="onnx", precision="int8", progress=False)
    v2 = graphs_of(out)
    make_task(bb, tasks, FIRST[0], seed=11)  # alpha retrained: a new head
    third = merge(tasks, out, engine="onnx", precision="int8", progress=False)
    v3 = graphs_of(out)
    scratch = merge(tasks, root / "scratch", engine="onnx", precision="int8", progress=False)
    return {"root": root, "tasks": tasks, "out": out, "bb": bb, "manifests": (first, second, third, scratch),
            "graphs": (v1, v2, v3)}


def test_unchanged_graphs_are_linked_and_changed_ones_exported(grown):
    v1, v2, v3 = grown["graphs"]
    out = grown["out"]
    assert list(v1) == ["embeddings", "layers_1-1", "layers_2-3", "task_alpha", "task_gamma"]
    assert list(v2) == ["embeddings", "layers_1-1", "layers_2-2", "layers_3-3", "task_alpha", "task_gamma",
                        "task_zeta"]
    # the second merge: the new attach layer split 2-3; everything else is v1's, byte for byte (one file)
    assert {n for n, g in v2.items() if not g.get("reused")} == {"layers_2-2", "layers_3-3", "task_zeta"}
    folder1, folder2 = out / "versions" / "v000001", out / "versions" / "v000002"
    for name in ("embeddings", "layers_1-1", "task_alpha", "task_gamma"):
        assert v2[name]["keys"] == v1[name]["keys"]
        assert (folder1 / v1[name]["int8"]).stat().st_ino == (folder2 / v2[name]["int8"]).stat().st_ino
    for rel in ("tokenizer/tokenizer.json", "tasks/gamma/head.safetensors"):  # unchanged files: one copy on disk
        assert (folder1 / rel).stat().st_ino == (folder2 / rel).stat().st_ino, rel
    # the third: alpha's new head gets a new graph and a new key; nothing else changes
    assert {n for n, g in v3.items() if not g.get("reused")} == {"task_alpha"}
    assert v3["task_alpha"]["keys"] != v2["task_alpha"]["keys"]
    assert v3["task_gamma"]["keys"] == v1["task_gamma"]["keys"]
    # checks carried over for the tasks whose graphs were all reused, made anew for the others
    third = grown["manifests"][2].engine.int8["tasks"]
    second = grown["manifests"][1].engine.int8["tasks"]
    assert third["gamma"] == second["gamma"] and third["zeta"] == second["zeta"] and third["alpha"] != second["alpha"]


def test_an_incremental_merge_answers_exactly_as_a_merge_from_scratch(grown):
    third, scratch = grown["manifests"][2], grown["manifests"][3]
    assert [g["keys"] for g in third.engine.graphs] == [g["keys"] for g in scratch.engine.graphs]
    incremental = Engine.load(grown["out"], batch_size=4).logits(TEXTS)
    fresh = Engine.load(grown["root"] / "scratch", batch_size=4).logits(TEXTS)
    assert incremental.keys() == fresh.keys() == {"alpha", "gamma", "zeta"}
    for name in incremental:
        assert torch.equal(incremental[name], fresh[name]), name


def test_an_int8_version_holds_the_graphs_it_serves_unless_asked(grown, tmp_path):
    folder = model_folder(grown["out"])
    assert not (folder / "onnx" / "fp32").exists()
    assert all(set(g) >= {"int8", "keys"} and "fp32" not in g for g in graphs_of(grown["out"]).values())
    manifest = merge(grown["tasks"], tmp_path / "kept", engine="onnx", precision="int8", keep_fp32=True,
                     progress=False)
    assert manifest.engine.has_files("fp32", "int8")
    assert all((model_folder(tmp_path / "kept") / g["fp32"]).is_file() for g in manifest.engine.graphs)


def test_a_corrupted_earlier_graph_is_never_reused(grown, tmp_path):
    out = shutil.copytree(grown["out"], tmp_path / "out", symlinks=True)  # copies: no links to the fixture's
    graph = graphs_of(out)["task_gamma"]["int8"]
    path = model_folder(out) / graph
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = merge(grown["tasks"], out, engine="onnx", precision="int8", progress=False)
    fresh = {g["name"]: g for g in manifest.engine.graphs}
    assert not fresh["task_gamma"].get("reused") and fresh["task_alpha"].get("reused")
    new = model_folder(out) / fresh["task_gamma"]["int8"]
    assert new.stat().st_ino != path.stat().st_ino and new.read_bytes() != bytes(data)
    assert manifest.files[fresh["task_gamma"]["int8"]] == grown["manifests"][2].files[graph]  # the export is exact


def test_a_served_onnx_engine_holds_no_torch_weights(grown):
    engine = Engine.load(grown["out"])
    runner = engine.model
    assert not runner.reference_loaded
    assert not any(isinstance(v, torch.nn.Module) for v in vars(runner).values())
    assert engine.predict(["fine"], tasks=["alpha"])[0]["task"] == "alpha"
    assert not runner.reference_loaded, "answering loaded the torch weights"
    assert set(runner.heads) == {"alpha", "gamma", "zeta"}  # verify asks: the torch reference loads then
    assert runner.reference_loaded


def test_heads_an_earlier_version_validated_are_hashed_not_loaded(grown, monkeypatch):
    loaded: list[str] = []
    real = core_merge.load_task
    monkeypatch.setattr(core_merge, "load_task", lambda folder, *a, **k: loaded.append(Path(folder).name)
                        or real(folder, *a, **k))
    trusted = versions.earlier_heads(grown["out"])
    core_merge.plan_merge([grown["tasks"]], trusted=trusted)
    assert loaded == []
    # a head replaced after it was published is loaded (and refused when broken)
    head = grown["tasks"] / "gamma" / HEAD_FILE
    saved = head.read_bytes()
    try:
        head.write_bytes(saved[:-8])
        with pytest.raises(Exception, match="head.safetensors"):
            core_merge.plan_merge([grown["tasks"]], trusted=trusted)
        assert loaded == ["gamma"]
    finally:
        head.write_bytes(saved)


def test_bench_scale_measures_every_count_engine_and_a_reload(tiny_models, tmp_path, capsys):
    import json

    from centra.cli import main

    plot = tmp_path / "scale.png"
    args = ["bench-scale", "--tasks", "3", "--engines", "onnx-int8", "--texts", "6", "--backbone",
            str(tiny_models["bert"]), "--workdir", str(tmp_path / "work"), "--plot", str(plot)]
    assert main(args) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    rows = {(r["tasks"], r["engine"], r["layout"]): r for r in figures["rows"]}
    assert set(rows) == {(3, "onnx-int8", "merged"), (3, "onnx-int8", "separate")}  # torch: the same code
    for key, r in rows.items():
        assert r["texts_per_s"] > 0 and r["one_task_texts_per_s"] > 0 and r["rss_mb"] > 50, key
        if key[2] == "merged":
            assert r["merge_s"] > 0 and r["add_one_s"] > 0 and r["add_one_disk_mb"] > 0 and r["version_mb"] > 0, key
    # the +1 version links what it shares with the one before: it adds far less than a version holds
    assert rows[(3, "onnx-int8", "merged")]["add_one_disk_mb"] < rows[(3, "onnx-int8", "merged")]["version_mb"] / 2
    reload = figures["reload"]
    assert reload["tasks"] == 3 and reload["merge_to_answer_s"] >= reload["merge_s"] > 0
    assert reload["peak_mb"] >= reload["rss_before_mb"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reload: centra serve on 3 int8 tasks" in out


def test_a_merge_of_the_same_tasks_reuses_everything_and_reports_its_checks(grown, tmp_path, capsys):
    from centra.cli import main

    out = shutil.copytree(grown["out"], tmp_path / "out", symlinks=True)
    assert main(["merge", "--tasks-dir", str(grown["tasks"]), "--out", str(out), "--engine", "onnx",
                 "--precision", "int8"]) == 0
    printed = capsys.readouterr().out
    assert "0 exported, 7 reused" in printed and "onnx: int8 alpha: label agreement" in printed
    info = read_manifest(model_folder(out)).engine
    assert info.int8["min_agreement"] and info.int8["tasks"] == grown["manifests"][2].engine.int8["tasks"]


def test_a_spec_the_check_reads_changed_is_checked_again(grown, tmp_path):
    import json

    tasks = shutil.copytree(grown["tasks"], tmp_path / "tasks")
    out = shutil.copytree(grown["out"], tmp_path / "out", symlinks=True)
    spec = json.loads((tasks / "gamma" / "task.json").read_text())
    spec["max_length"] = 8  # the same head: every graph is reused, but the check tokenizes otherwise
    (tasks / "gamma" / "task.json").write_text(json.dumps(spec))
    manifest = merge(tasks, out, engine="onnx", precision="int8", progress=False)
    assert all(g.get("reused") for g in manifest.engine.graphs)
    before, after = grown["manifests"][2].engine.int8["tasks"], manifest.engine.int8["tasks"]
    assert after["gamma"]["path_key"] != before["gamma"]["path_key"]
    assert after["alpha"] == before["alpha"] and after["zeta"] == before["zeta"]


def test_an_old_head_on_a_split_trunk_is_checked_not_refused(grown, tmp_path):
    """x's first head comes back after y split x's trunk segment: every graph is cached (x's branch from
    v1, the segments from v2), but no version checked that head on those segments."""
    x = ("x", "multiclass", ["a", "b"], "single", 3, 1, "mean")
    y = ("y", "multiclass", ["a", "b"], "single", 1, 1, "mean")
    tasks, out = tmp_path / "tasks", tmp_path / "out"
    make_task(grown["bb"], tasks, x, seed=1)
    merge(tasks, out, engine="onnx", precision="int8", progress=False)
    make_task(grown["bb"], tasks, x, seed=2)
    make_task(grown["bb"], tasks, y, seed=3)
    merge(tasks, out, engine="onnx", precision="int8", progress=False)
    make_task(grown["bb"], tasks, x, seed=1)  # back to the first head
    manifest = merge(tasks, out, engine="onnx", precision="int8", progress=False)
    assert all(g.get("reused") for g in manifest.engine.graphs)
    assert set(manifest.engine.int8["tasks"]) == {"x", "y"}  # x checked again, y carried over
