"""`centra export-triton --backend python` served by a REAL Triton server (the nvidia-pytriton wheel's
tritonserver, on loopback): tritonclient over HTTP and gRPC gets the engine's answers; concurrent requests
with different task sets are batched (Triton's statistics) and each gets only its tasks; a bad request
fails alone with centra serve's message; a new version loaded through the repository API while a client
calls loses no call. One server for the module; skipped, saying why, only where the binary cannot run."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import PAIRS, TEXTS
from helpers import make_tasks

from centra.cli import main
from centra.core.backbone import Backbone
from centra.errors import CentraError
from centra.export.triton_python import SUMMARY, PythonRepoOptions, export_triton_python
from centra.measure import tritonserver
from centra.runtime.engine import Engine

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOLERANCE = 1e-5  # logits and scores, Triton vs the in-process engine (same runtime, other batch padding)


@pytest.fixture(scope="module")
def model_out(tiny_models, tmp_path_factory):
    """The standard tasks, merged (torch), with beta (multilabel) answering billing and app for every text
    at least: thresholds 0 for those two, 0.5 for the others, so a limit of one label always bites."""
    from dataclasses import replace

    from centra.core.merge import plan_merge, write_merged
    from centra.core.task import load_task, save_task

    root = tmp_path_factory.mktemp("merged-triton")
    bert = Backbone.load(tiny_models["bert"])
    make_tasks(bert, root / "tasks")
    spec, head = load_task(root / "tasks" / "beta", bert)
    save_task(root / "tasks" / "beta", replace(spec, thresholds=[0.0, 0.5, 0.5, 0.0]), head)
    write_merged(plan_merge([root / "tasks"]), root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def triton(model_out, tmp_path_factory):
    try:
        tritonserver.find_install()
        tritonserver.stub_python()
    except CentraError as exc:
        pytest.skip(f"no Triton server can run here: {exc}")
    root = tmp_path_factory.mktemp("triton-run")
    repo = root / "repo"
    # a queue delay, so that calls arriving within a few ms of each other on a busy machine still batch
    export_triton_python(model_out, repo, PythonRepoOptions(queue_delay_us=20_000))
    server = tritonserver.TritonServer(repo, root / "work", explicit=True, models=("centra",))
    server.start()
    yield server, repo
    server.stop()


def inputs(module, texts, tasks="", pairs=None):
    rows = len(texts)
    out = []
    for name, values in (("TEXT", texts), ("TEXT_PAIR", pairs or [""] * rows), ("TASKS", [tasks] * rows)):
        tensor = module.InferInput(name, [rows, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=object))
        out.append(tensor)
    return out


def output_names(result) -> list[str]:
    response = result.get_response()
    return sorted(o["name"] for o in response["outputs"]) if isinstance(response, dict) else \
        sorted(o.name for o in response.outputs)


def check_answers(result, engine, texts, pairs, names) -> None:
    """Labels equal `centra predict`'s, logits and scores within TOLERANCE."""
    assert output_names(result) == sorted([*(f"LOGITS_{t}" for t in names), "ANSWERS"])
    want = engine.logits(texts, pairs, names)
    for name in names:
        assert np.allclose(result.as_numpy(f"LOGITS_{name}"), want[name].numpy(), atol=TOLERANCE)
    predicted = engine.predict(texts, pairs, names)
    for i, (row,) in enumerate(result.as_numpy("ANSWERS")):
        row = json.loads(row)
        assert list(row) == names
        for j, name in enumerate(names):
            line = predicted[i * len(names) + j]
            for key in ("label", "labels", "truncated"):
                assert row[name].get(key) == line.get(key)
            assert (row[name].get("value") is None) == (line.get("value") is None)  # regression: a value, close
            assert abs(row[name].get("value", 0) - line.get("value", 0)) <= TOLERANCE + 1e-6  # + rounding
            assert np.allclose(list(row[name]["scores"].values()), list(line["scores"].values()), atol=TOLERANCE)


def test_export_writes_a_hashed_python_backend_repository(triton, model_out):
    _, repo = triton
    summary = json.loads((repo / SUMMARY).read_text())
    assert summary["backend"] == "python" and summary["parity"] <= summary["tolerance"]
    assert summary["queue_delay_us"] == 20_000 and summary["instances"] == 1
    config = (repo / "centra" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_queue_delay_microseconds: 20000" in config
    assert (repo / "centra" / "1" / "model.py").is_file()
    assert (repo / "centra" / "1" / "model" / "manifest.json").is_file()
    assert set(summary["files"]) >= {"centra/1/model.py", "centra/1/model/trunk.safetensors"}


def test_cli_options_and_refusals(model_out, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export-triton", "--model", str(model_out), "--repo", str(repo), "--instances", "2",
                 "--max-batch", "8", "--queue-delay-us", "100"]) == 0
    config = (repo / "centra" / "config.pbtxt").read_text()
    assert "count: 2" in config and "max_batch_size: 8" in config and "max_queue_delay_microseconds: 100" in config
    capsys.readouterr()
    assert main(["export-triton", "--model", str(model_out), "--repo", str(tmp_path / "r2"), "--engine",
                 "tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--backend onnxruntime" in err and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_equal_the_engine(triton, engine, protocol):
    server, _ = triton
    module = tritonhttp if protocol == "http" else tritongrpc
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    assert client.is_model_ready("centra")
    for texts, pairs, tasks in ((TEXTS, None, "alpha,beta,gamma"), (TEXTS[:3], PAIRS[:3], "delta,alpha"),
                                (TEXTS[:2], None, "")):
        names = [t for t in tasks.split(",") if t] or [s.name for s in engine.specs.values() if s.input == "single"]
        check_answers(client.infer("centra", inputs(module, texts, tasks, pairs)), engine, texts, pairs, names)
    with pytest.raises(InferenceServerException, match="unknown task 'nope'"):
        client.infer("centra", inputs(module, TEXTS[:1], "nope"))
    # the request parameter max_labels reaches the model (Triton passes it on) and limits ANSWERS
    unlimited = [a["labels"] for a in engine.predict(TEXTS, tasks=["beta"])]
    assert min(map(len, unlimited)) >= 2  # (the module's model) so that a limit of 1 bites on every row
    result = client.infer("centra", inputs(module, TEXTS, "beta"), parameters={"max_labels": 1})
    got = [json.loads(row[0])["beta"]["labels"] for row in result.as_numpy("ANSWERS")]
    assert got == [a["labels"] for a in engine.predict(TEXTS, tasks=["beta"], max_labels=1)]
    with pytest.raises(InferenceServerException, match="max_labels"):
        client.infer("centra", inputs(module, TEXTS[:1], "beta"), parameters={"max_labels": -1})
    client.close()


def test_concurrent_task_sets_batch_and_a_bad_request_fails_alone(triton, engine):
    server, _ = triton
    client = tritonhttp.InferenceServerClient(server.http_url, concurrency=16)
    before = batch_sizes(client)
    calls = [(TEXTS[i % 6: i % 6 + 2], ["alpha", "beta", "gamma", "epsilon", "alpha,gamma", "beta,epsilon"][i % 6])
             for i in range(24)]
    calls[5] = (["", "fine text"], "alpha")  # bad: an empty text
    calls[11] = (["fine text"], "no_such_task")  # bad: an unknown task
    pending = [client.async_infer("centra", inputs(tritonhttp, texts, tasks)) for texts, tasks in calls]
    for i, ((texts, tasks), call) in enumerate(zip(calls, pending)):
        if i in (5, 11):
            with pytest.raises(InferenceServerException, match="text 0 is empty" if i == 5 else "unknown task"):
                call.get_result()
            continue
        check_answers(call.get_result(), engine, texts, None, tasks.split(","))
    after = batch_sizes(client)
    grew = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert any(size > 2 and count > 0 for size, count in grew.items()), f"no batch of several requests: {grew}"
    client.close()


def batch_sizes(client) -> dict[int, int]:
    """Triton's statistics: executions by batch size (rows), of the model centra."""
    stats = client.get_inference_statistics("centra")["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for s in stats for b in s.get("batch_stats", [])}


def test_a_new_version_loaded_while_a_client_calls_loses_no_call(triton, engine):
    server, repo = triton
    client = tritongrpc.InferenceServerClient(server.grpc_url)
    versions, failures, stop = [], [], threading.Event()

    def call_loop():
        caller = tritongrpc.InferenceServerClient(server.grpc_url)
        while not stop.is_set():
            try:
                result = caller.infer("centra", inputs(tritongrpc, TEXTS[:2], "alpha"))
                versions.append(result.get_response().model_version)
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                failures.append(exc)
        caller.close()

    shutil.copytree(repo / "centra" / "1", repo / "centra" / "2")  # a new version (Triton serves the latest)
    with ThreadPoolExecutor(2) as pool:
        loops = [pool.submit(call_loop) for _ in range(2)]
        time.sleep(0.5)
        client.load_model("centra")  # the repository API: loads version 2, then unloads 1
        end = time.monotonic() + 60
        while time.monotonic() < end and (not versions or versions[-1] != "2"):
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for loop in loops:
            loop.result(30)
    assert failures == [], failures[:3]
    assert versions[0] == "1" and versions[-1] == "2" and len(versions) > 10, (versions[:3], versions[-3:])
    assert client.is_model_ready("centra", "2") and not client.is_model_ready("centra", "1")
    client.close()


def test_the_versions_onnx_int8_engine_runs_in_triton(triton, tiny_models, tmp_path):
    """A version merged with ONNX int8 is served by its own engine inside Triton: the answers of the same
    engine in process (the same rows in one batch: int8's activation scales are per batch)."""
    from helpers import STANDARD_TASKS

    make_tasks(Backbone.load(tiny_models["bert"]), tmp_path / "tasks", STANDARD_TASKS[:2])
    assert main(["merge", "--tasks-dir", str(tmp_path / "tasks"), "--out", str(tmp_path / "out"), "--engine", "onnx",
                 "--precision", "int8"]) == 0
    summary = export_triton_python(tmp_path / "out", tmp_path / "repo")
    assert summary["runtime"] == "onnxruntime int8"
    engine = Engine.load(tmp_path / "out")
    assert engine.runtime == "onnxruntime int8"
    with tritonserver.TritonServer(tmp_path / "repo", tmp_path / "work") as server:
        client = tritongrpc.InferenceServerClient(server.grpc_url)
        check_answers(client.infer("centra", inputs(tritongrpc, TEXTS, "alpha,beta")), engine, TEXTS, None,
                      ["alpha", "beta"])
        client.close()


def test_the_launcher_serves_a_repository_until_sigterm(triton, tmp_path):
    """`python -m centra.measure.tritonserver serve REPO`: what the repository's README tells users to run."""
    import signal
    import subprocess
    import sys
    import urllib.request

    _, repo = triton
    proc = subprocess.Popen([sys.executable, "-m", "centra.measure.tritonserver", "serve", str(repo), "--workdir",
                             str(tmp_path / "work")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("tritonserver serving"), line
        url = line.split("HTTP ", 1)[1].split(",", 1)[0]
        with urllib.request.urlopen(f"{url}/v2/models/centra/ready", timeout=30) as reply:
            assert reply.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "centra.measure.tritonserver serve" in (repo / "README.md").read_text()
    missing = subprocess.run([sys.executable, "-m", "centra.measure.tritonserver", "serve", str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such repository folder" in missing.stderr
