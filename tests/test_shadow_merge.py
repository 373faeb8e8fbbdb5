"""Candidate heads in a merged version (centra.core.shadow): `merge --candidate TASK=FOLDER` publishes a
task's second head; every other file stays byte-identical, the active answers stay bit-identical (torch,
ONNX fp32 and int8), the candidate equals its standalone model, and rows that do not ask for its task never
run it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, snapshot
from helpers import make_task, make_tasks

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.manifest import Manifest
from centra.core.shadow import candidate_key
from centra.core.versions import read_manifest
from centra.errors import CentraError
from centra.export.engines import merge
from centra.runtime.engine import Engine, Row
from centra.runtime.verify import verify

# alpha reads layer 1, beta and gamma layer 3: the trunk's segments are 1-1 and 2-3
TASKS = [("alpha", "multiclass", ["neg", "neu", "pos"], "single", 1, 1, "mean"),
         ("beta", "multilabel", ["billing", "delivery", "product", "app"], "single", 3, 1, "mean"),
         ("gamma", "regression", ["score"], "single", 3, 1, "cls")]
# deeper than its task (a detour through layer 2, which splits 2-3), shallower, and deeper than the trunk
CANDIDATES = [("alpha", "multiclass", ["neg", "neu", "pos"], "single", 2, 2, "cls"),
              ("beta", "multilabel", ["billing", "delivery", "product", "app"], "single", 2, 1, "mean"),
              ("gamma", "regression", ["score"], "single", 4, 0, "mean")]
ASKED = [("alpha",), ("beta", "gamma"), ("alpha", "beta", "gamma"), ("gamma",), ("beta",), ("alpha", "gamma")]


def make_candidates(bb: Backbone, root: Path, rows=CANDIDATES) -> dict[str, Path]:
    """Each candidate trained apart (another seed), in a folder not named after its task."""
    found = {}
    for i, row in enumerate(rows):
        make_task(bb, root / "tmp", row, seed=40 + i)
        found[row[0]] = root / f"{row[0]}-retrained"
        shutil.move(root / "tmp" / row[0], found[row[0]])
    return found


@pytest.fixture(scope="module")
def shadowed(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shadow-merge")
    bb = Backbone.load(tiny_models["bert"])
    make_tasks(bb, root / "tasks", TASKS)
    candidates = make_candidates(bb, root / "candidates")
    return {"root": root, "bb": bb, "tasks": root / "tasks", "candidates": candidates}


def rows_for(asked=ASKED, shadow: bool = False) -> list[Row]:
    return [Row(text, None, tasks + (tuple(candidate_key(t) for t in tasks) if shadow else ()))
            for text, tasks in zip(TEXTS, asked)]


def active_identical(plain: Engine, with_candidates: Engine) -> None:
    """Every active logit of mixed rows (different task sets in one batch, rows leaving the trunk early)
    bit-identical, whether the rows ask for the candidate heads or not."""
    before = plain.run(rows_for())
    for shadow in (False, True):
        after = with_candidates.run(rows_for(shadow=shadow))
        for row, a, b in zip(rows_for(), before, after):
            for task in row.tasks:
                assert torch.equal(a.logits[task], b.logits[task]), (task, shadow)
            assert all(candidate_key(t) in b.logits for t in row.tasks) == shadow


def versions(out: Path) -> tuple[Path, Path]:
    return out / "versions" / "v000001", out / "versions" / "v000002"


def test_torch_candidates_leave_active_answers_and_files_alone(shadowed):
    out = shadowed["root"] / "out-torch"
    merge(shadowed["tasks"], out, progress=False)
    manifest = merge(shadowed["tasks"], out, candidates=shadowed["candidates"], progress=False)
    first, second = versions(out)
    assert [c.name for c in manifest.candidates] == ["alpha", "beta", "gamma"]
    assert manifest.trunk_depth == 4 and read_manifest(first).trunk_depth == 3  # gamma's candidate reads layer 4
    assert "candidates" not in json.loads((first / "manifest.json").read_text())  # a version without: as before
    assert snapshot(first / "tasks") == snapshot(second / "tasks")  # every task's files byte-identical
    for name, folder in shadowed["candidates"].items():
        assert snapshot(second / "candidates" / name) == {k: v for k, v in snapshot(folder).items()
                                                           if k in ("task.json", "head.safetensors")}
    plain, shadow = Engine.load(first), Engine.load(second)
    assert list(shadow.specs) == list(plain.specs) == ["alpha", "beta", "gamma"]  # callers see the same tasks
    assert sorted(shadow.candidates) == ["alpha", "beta", "gamma"]
    active_identical(plain, shadow)
    checks = {c.name: c.max_abs_diff for c in verify(shadow)}  # each candidate == its standalone model
    assert set(checks) == {"alpha", "beta", "gamma", *(candidate_key(t) for t in ("alpha", "beta", "gamma"))}
    assert max(checks.values()) <= 1e-5


def test_rows_that_do_not_ask_pay_nothing(shadowed):
    out = shadowed["root"] / "out-torch"
    engine = Engine.load(versions(out)[1])
    ran: dict[str, int] = {}
    hooks = [engine.model.heads[k].register_forward_hook(lambda *_, k=k: ran.__setitem__(k, ran.get(k, 0) + 1))
             for k in engine.model.heads]
    layers = [0]
    hooks += [m.register_forward_hook(lambda *_: layers.__setitem__(0, layers[0] + 1)) for m in engine.model.trunk]
    try:
        engine.run([Row(TEXTS[0], None, ("alpha",))])
        assert ran == {"alpha": 1} and layers[0] == 1  # no candidate, and the trunk only to alpha's layer
        ran.clear()
        layers[0] = 0
        engine.run([Row(TEXTS[0], None, ("alpha", candidate_key("alpha")))])
        assert ran == {"alpha": 1, candidate_key("alpha"): 1} and layers[0] == 2  # + the detour's layer 2
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_candidates_leave_active_answers_alone(shadowed, precision):
    from centra.core.backbone import load_tokenizer
    from centra.core.versions import read_version
    from centra.runtime.onnx import OnnxRunner

    out = shadowed["root"] / "out-onnx"
    if not (out / "versions" / "v000002").is_dir():
        merge(shadowed["tasks"], out, engine="onnx", precision="int8", keep_fp32=True, progress=False)
        merge(shadowed["tasks"], out, engine="onnx", precision="int8", keep_fp32=True,
              candidates=shadowed["candidates"], progress=False)
    engines = []
    for folder in versions(out):
        version = read_version(folder)
        runner = OnnxRunner.load(folder, version.manifest.engine, version, precision=precision,
                                 files=version.manifest.files)
        engines.append(Engine(runner, load_tokenizer(folder / "tokenizer"), 4, version.manifest))
    plain, shadow = engines
    names = [g["name"] for g in shadow.model.layout]
    assert {"candidate_alpha", "candidate_beta", "candidate_gamma", "layers_4-4"} <= set(names)
    assert snapshot(versions(out)[0] / "tasks") == snapshot(versions(out)[1] / "tasks")
    active_identical(plain, shadow)
    graphs: list[str] = []
    run_graph = shadow.model.run_graph
    shadow.model.run_graph = lambda name, **inputs: graphs.append(name) or run_graph(name, **inputs)
    try:
        shadow.run(rows_for([("beta", "gamma")]))
        assert not any(name.startswith("candidate_") for name in graphs)
        shadow.run(rows_for([("alpha", "beta")], shadow=True))
        assert {"candidate_alpha", "candidate_beta"} <= set(graphs)
    finally:
        del shadow.model.run_graph
    if precision == "int8":  # the int8 check covered the candidate heads too
        assert {candidate_key("alpha"), candidate_key("gamma")} <= set(shadow.manifest.engine.int8["tasks"])


def test_refusals_name_the_file(shadowed, tmp_path):
    bb, tasks = shadowed["bb"], shadowed["tasks"]
    other = make_candidates(bb, tmp_path, [("alpha", "multiclass", ["neg", "pos", "neu"], "single", 2, 1, "mean")])
    with pytest.raises(CentraError, match=r"alpha-retrained/task.json: labels .* differs from task 'alpha'"):
        merge(tasks, tmp_path / "out", candidates=other, progress=False)
    with pytest.raises(CentraError, match="candidate for 'zeta': no such task"):
        merge(tasks, tmp_path / "out", candidates={"zeta": shadowed["candidates"]["alpha"]}, progress=False)
    with pytest.raises(CentraError, match=r"beta-retrained/task.json: name 'beta' does not match its folder 'alpha'"):
        merge(tasks, tmp_path / "out", candidates={"alpha": shadowed["candidates"]["beta"]}, progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["merge", "--tasks-dir", str(tasks), "--out", str(tmp_path / "out"), "--candidate", "alpha"]) == 2


def test_manifest_candidates_are_checked(shadowed):
    data = json.loads((versions(shadowed["root"] / "out-torch")[1] / "manifest.json").read_text())
    data.pop("content_id")
    assert Manifest.from_dict(data, "m").candidate("alpha").attach_layer == 2
    data["candidates"][0]["name"] = "zeta"
    with pytest.raises(CentraError, match="m: malformed manifest .candidate head for 'zeta'"):
        Manifest.from_dict(data, "m")


def test_shadow_bench_times_each_task_against_its_layer_share(shadowed):
    from centra.measure.bench_shadow import bench_lines, bench_shadow

    out = shadowed["root"] / "out-torch"
    results = bench_shadow(out, TEXTS, batch=4, repeats=1, progress=False)
    assert [(r.task, r.active_layers, r.extra_layers) for r in results] == [("alpha", 2, 3), ("beta", 4, 1),
                                                                             ("gamma", 4, 1)]
    assert all(r.active_s > 0 and r.shadowed_s > 0 and r.detour_s > 0 and r.batches == 2 for r in results)
    lines = bench_lines(results)
    assert "torch fp32, 2 batches" in lines and lines.count("\n") == 4
    with pytest.raises(CentraError, match="task 'zeta' has no candidate head"):
        bench_shadow(out, TEXTS, tasks=["zeta"], progress=False)
