"""`centra shadow report` over a server's metrics, `centra promote` and `centra drop-candidate`: the report's
agreement equals an offline comparison, promote publishes the candidate as the active head with every other
file byte-identical while a server reloads it under load without losing a call, drop-candidate removes it;
an ONNX int8 version is republished as int8, reusing every graph but the promoted branch."""

from __future__ import annotations

import shutil
import threading

import grpc
import pytest
import torch
from conftest import TEXTS, snapshot
from helpers import make_tasks
from test_serve_ops import App, apps  # noqa: F401 (the fixture)
from test_shadow_merge import ASKED, TASKS, make_candidates, rows_for
from test_shadow_serve import CALLS, offline, request, split_head

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.shadow import candidate_key
from centra.core.versions import read_manifest
from centra.export.engines import merge, promote
from centra.measure.shadow import report, shadow_figures
from centra.runtime.engine import Engine
from centra.serve.v1 import centra_pb2 as pb


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shadow-promote")
    bb = Backbone.load(tiny_models["bert"])
    make_tasks(bb, root / "tasks", TASKS)
    candidates = make_candidates(bb, root / "candidates")
    texts = [t for texts, _ in CALLS for t in texts]  # alpha's candidate disagrees on about half of them
    candidates["alpha"] = split_head(bb, root / "tasks" / "alpha", root / "candidates" / "alpha-split", texts)
    merge(root / "tasks", root / "out", progress=False)
    merge(root / "tasks", root / "out", candidates=candidates, progress=False)
    return {"root": root, "bb": bb, "candidates": candidates}


@pytest.fixture
def out(built, tmp_path):
    return shutil.copytree(built["root"] / "out", tmp_path / "out", symlinks=True)


def version(out, n: int):
    return out / "versions" / f"v{n:06d}"


def test_report_over_the_metrics_url_equals_an_offline_comparison(out, apps, capsys, tmp_path):  # noqa: F811
    app = apps(out)
    for texts, tasks in CALLS:
        app.stub.Classify(request(texts, tasks))
    url = f"http://127.0.0.1:{app.http.server_port}/metrics"
    expected = offline(Engine.load(version(out, 2)))
    assert main(["shadow", "report", "--metrics", url]) == 0
    printed = capsys.readouterr().out
    alpha = expected["agree", "alpha"] / expected["rows", "alpha"]
    assert 0 < alpha < 1
    assert f"task 'alpha' (multiclass): {expected['calls', 'alpha']:.0f} calls, {expected['rows', 'alpha']:.0f} rows" \
        in printed
    assert f"agreement (top label): {alpha:.1%}" in printed
    assert f"mean |active - candidate|: {expected['abs_diff', 'gamma'] / expected['rows', 'gamma']:.4g}" in printed
    assert "candidate cost: +1 layers per row asking for it (active head: 2 layers" in printed  # alpha's copy
    assert "candidate cost: +1 layers per row asking for it (active head: 4 layers" in printed  # beta: 1 layer
    assert "active \\ candidate" in printed and "active only" in printed  # the confusion and label tables
    figures = shadow_figures(app.scrape())
    assert figures["beta"].agreement == expected["agree", "beta"] / expected["rows", "beta"]
    (tmp_path / "metrics.txt").write_text(app.scrape())
    assert main(["shadow", "report", "--metrics", str(tmp_path / "metrics.txt"), "--task", "gamma"]) == 0
    assert "task 'gamma' (regression)" in capsys.readouterr().out
    assert "no shadowed task" in report({})
    assert main(["shadow", "report", "--metrics", str(tmp_path / "none.txt")]) == 2


def test_promote_under_load_loses_no_call(out, built, apps):  # noqa: F811
    app = apps(out, watch_interval=0.05)
    replies: list[pb.ClassifyResponse] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                replies.append(app.stub.Classify(request(TEXTS[:2], ["alpha", "beta"]), timeout=20))
            except grpc.RpcError as exc:
                failures.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert main(["promote", "alpha", "--model", str(out)]) == 0
        for _ in range(400):
            if replies and replies[-1].model_version == "v000003":
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert failures == [] and replies[0].model_version == "v000002" and replies[-1].model_version == "v000003"
    last = replies[-1].results[0].tasks
    assert not last[0].HasField("head") and last[1].head == "active"  # alpha has no candidate any more
    before, after = version(out, 2), version(out, 3)
    assert snapshot(after / "tasks" / "alpha") == snapshot(before / "candidates" / "alpha")
    for task in ("beta", "gamma"):
        assert snapshot(after / "tasks" / task) == snapshot(before / "tasks" / task)
        assert snapshot(after / "candidates" / task) == snapshot(before / "candidates" / task)
    manifest = read_manifest(after)
    assert [c.name for c in manifest.candidates] == ["beta", "gamma"]
    assert manifest.task("alpha").source == read_manifest(before).candidate("alpha").source
    old, new = Engine.load(before), Engine.load(after)
    was, now = old.run(rows_for(shadow=True)), new.run(rows_for())
    for row, a, b in zip(rows_for(ASKED), was, now):
        for task in row.tasks:
            if task == "alpha":  # the candidate's answers, now the task's (another walk: float rounding)
                assert torch.allclose(a.logits[candidate_key(task)], b.logits[task], atol=1e-5)
            else:
                assert torch.equal(a.logits[task], b.logits[task])


def test_drop_candidate_and_one_line_refusals(out, capsys):
    assert main(["drop-candidate", "beta", "--model", str(out)]) == 0
    assert "candidate head removed; published" in capsys.readouterr().out
    before, after = version(out, 2), version(out, 3)
    assert snapshot(after / "tasks") == snapshot(before / "tasks")
    assert snapshot(after / "candidates") == {k: v for k, v in snapshot(before / "candidates").items()
                                              if not k.startswith("beta/")}
    assert [c.name for c in read_manifest(after).candidates] == ["alpha", "gamma"]
    assert main(["promote", "beta", "--model", str(out)]) == 2
    assert "task 'beta' has no candidate head (tasks with one: alpha, gamma)" in capsys.readouterr().err
    assert main(["drop-candidate", "zeta", "--model", str(out)]) == 2
    assert "no task 'zeta'" in capsys.readouterr().err


def test_promote_keeps_the_onnx_int8_engine_and_reuses_graphs(built, tmp_path):
    out = tmp_path / "onnx"
    tasks = built["root"] / "tasks"
    merge(tasks, out, engine="onnx", precision="int8", candidates=built["candidates"], progress=False)
    manifest = promote(out, "gamma", progress=False)
    assert manifest.engine.name == "onnx" and manifest.engine.precision == "int8"
    assert {g["name"] for g in manifest.engine.graphs if not g.get("reused")} == {"task_gamma"}
    assert "candidate_gamma" not in {g["name"] for g in manifest.engine.graphs}
    old, new = Engine.load(version(out, 1)), Engine.load(version(out, 2))
    was, now = old.run(rows_for(shadow=True)), new.run(rows_for())
    for row, a, b in zip(rows_for(ASKED), was, now):
        for task in (t for t in row.tasks if t != "gamma"):
            assert torch.equal(a.logits[task], b.logits[task])
