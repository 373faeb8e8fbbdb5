"""The Open Inference Protocol of centra serve, over HTTP and gRPC: tritonclient's calls == the engine
(logits and answers, one requested output, refusals per request), JSON tensors over HTTP, OIP, REST and
centra.v1 calls sharing one batch, infer's timeout parameter as the call's deadline, malformed tensors
refused with one line, and the OIP stubs matching their proto. The server and its helpers are
test_rest.py's."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import PAIRS, TEXTS
from test_rest import Served, classify_json, grpc_json, oip_inputs

from centra.serve.server import CentraServer, ServeOptions
from centra.serve.v1 import centra_pb2 as pb

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5  # logits and scores, server vs in-process engine (other batch sizes: other padding)


@pytest.fixture(scope="module")
def served(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    yield running
    running.close()



@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_oip_with_tritonclient_equals_the_engine(served, engine, protocol):
    module = tritonhttp if protocol == "http" else tritongrpc
    client = module.InferenceServerClient(served.http_target if protocol == "http" else served.grpc_target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("centra")
    meta = client.get_model_metadata("centra")
    meta = meta if isinstance(meta, dict) else grpc_json(meta)
    assert [t["name"] for t in meta["inputs"]] == ["TEXT", "TEXT_PAIR", "TASKS"]
    assert {t["name"] for t in meta["outputs"]} == {*(f"LOGITS_{t}" for t in engine.specs), "ANSWERS"}
    for texts, pairs, tasks in ((TEXTS, None, "alpha,gamma"), (TEXTS[:3], PAIRS[:3], "delta, beta"),
                                (TEXTS[:2], None, "")):
        result = client.infer("centra", oip_inputs(module, texts, pairs, tasks))
        names = [t.strip() for t in tasks.split(",") if t.strip()] or [s.name for s in engine.specs.values()
                                                                        if s.input == "single"]
        want = engine.logits(texts, pairs, names)
        outputs = result.get_response()
        outputs = outputs["outputs"] if isinstance(outputs, dict) else grpc_json(outputs)["outputs"]
        assert sorted(o["name"] for o in outputs) == sorted([*(f"LOGITS_{t}" for t in names), "ANSWERS"])
        for name in names:
            assert np.allclose(result.as_numpy(f"LOGITS_{name}"), want[name].numpy(), atol=TOLERANCE)
        answers = [json.loads(a[0]) for a in result.as_numpy("ANSWERS")]
        predicted = engine.predict(texts, pairs, names)
        for i, row in enumerate(answers):
            assert list(row) == names
            for name in names:
                line = predicted[i * len(names) + names.index(name)]
                got = {k: v for k, v in row[name].items() if k not in ("scores", "value")}
                assert got == {k: v for k, v in line.items() if k not in ("text", "pair", "task", "scores", "value")}
                assert abs(row[name].get("value", 0) - line.get("value", 0)) <= TOLERANCE + 1e-6  # + rounding
                assert np.allclose(list(row[name]["scores"].values()), list(line["scores"].values()), atol=TOLERANCE)
    # one requested output, over JSON (not binary) on HTTP
    kwargs = {"binary_data": False} if protocol == "http" else {}
    result = client.infer("centra", oip_inputs(module, TEXTS[:2], tasks="alpha"),
                          outputs=[module.InferRequestedOutput("LOGITS_alpha", **kwargs)])
    assert np.allclose(result.as_numpy("LOGITS_alpha"), engine.logits(TEXTS[:2], None, ["alpha"])["alpha"].numpy(),
                       atol=TOLERANCE)
    assert result.as_numpy("ANSWERS") is None
    # refusals: the servicer's messages, per request
    bad = [(oip_inputs(module, TEXTS[:1], tasks="nope"), "unknown task 'nope'"),
           (oip_inputs(module, TEXTS[:1], tasks="delta"), "takes text pairs"),
           (oip_inputs(module, [""], tasks="alpha"), "empty")]
    for inputs, words in bad:
        with pytest.raises(InferenceServerException, match=words):
            client.infer("centra", inputs)
    with pytest.raises(InferenceServerException, match="not asked for"):
        client.infer("centra", oip_inputs(module, TEXTS[:1], tasks="alpha"),
                     outputs=[module.InferRequestedOutput("LOGITS_beta")])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("other", oip_inputs(module, TEXTS[:1]))
    client.close()


def test_oip_json_tensors_over_http(served, engine):
    body = {"id": "call-1", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]},
                                       {"name": "TASKS", "datatype": "BYTES", "shape": [1], "data": ["alpha"]}]}
    status, got = served.call("POST", "/v2/models/centra/infer", body)
    assert status == 200 and got["id"] == "call-1" and got["model_version"] == engine.version
    logits = next(o for o in got["outputs"] if o["name"] == "LOGITS_alpha")
    assert logits["shape"] == [2, 3]
    assert np.allclose(np.reshape(logits["data"], (2, 3)), engine.logits(TEXTS[:2], None, ["alpha"])["alpha"].numpy(),
                       atol=TOLERANCE)
    body["inputs"][1]["data"] = ["alpha", "beta"]
    body["inputs"][1]["shape"] = [2]
    status, got = served.call("POST", "/v2/models/centra/infer", body)
    assert status == 400 and "one task set per request" in got["error"]
    assert served.call("GET", "/v2/health/live") == (200, {"live": True})
    assert served.call("GET", "/v2/models/centra/ready")[0] == 200


def test_oip_rest_and_centra_v1_calls_share_one_batch(served, engine):
    """Three protocols' calls queued behind a running batch run as one batch."""
    batcher = served.server.batcher
    gate, entered = threading.Event(), threading.Event()
    inner = engine

    class Gated:
        def __getattr__(self, name):
            return getattr(inner, name)

        def run(self, rows):
            entered.set()
            assert gate.wait(20)
            return inner.run(rows)

    records = []
    batcher.listeners.append(records.append)
    old = served.server.swap_engine(Gated())
    try:
        grpc_client = tritongrpc.InferenceServerClient(served.grpc_target)
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(served.stub.Classify, pb.ClassifyRequest(inputs=[pb.Input(text="first")]))
            assert entered.wait(10)
            calls = [pool.submit(served.stub.Classify, pb.ClassifyRequest(inputs=[pb.Input(text=TEXTS[0])],
                                                                          tasks=["alpha"])),
                     pool.submit(served.call, "POST", "/v1/classify", classify_json(TEXTS[1:2], ["beta"])),
                     pool.submit(grpc_client.infer, "centra", oip_inputs(tritongrpc, TEXTS[2:3], tasks="gamma"))]
            deadline = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), served.loop)
            deadline.result(5)
            for _ in range(200):
                if batcher.queued_rows >= 3:
                    break
                threading.Event().wait(0.02)
            assert batcher.queued_rows == 3
            gate.set()
            first.result(20)
            grpc_reply, (status, rest), oip = (c.result(20) for c in calls)
        assert status == 200 and rest["results"][0]["tasks"][0]["task"] == "beta"
        assert grpc_reply.results[0].tasks[0].task == "alpha"
        assert oip.as_numpy("LOGITS_gamma").shape == (1, 1)
        assert any(r.calls == 3 and r.tasks == {"alpha": 1, "beta": 1, "gamma": 1} for r in records), records
        grpc_client.close()
    finally:
        gate.set()
        served.server.swap_engine(old)
        batcher.listeners.remove(records.append)


def test_oip_timeout_parameter_is_the_calls_deadline(engine):
    """tritonclient's infer(timeout=microseconds), over HTTP and gRPC: a call queued past it is answered
    DEADLINE_EXCEEDED (HTTP 504) at its deadline and never computed; a bad timeout is refused."""
    gate, entered, ran = threading.Event(), threading.Event(), []

    class Gated:
        def __getattr__(self, name):
            return getattr(engine, name)

        def run(self, rows):
            ran.append([r.text for r in rows])
            entered.set()
            assert gate.wait(20)
            return engine.run(rows)

    running = Served(CentraServer(Gated(), ServeOptions(port=0, http_port=0, drain_s=0)))
    clients = {"http": tritonhttp.InferenceServerClient(running.http_target),
               "grpc": tritongrpc.InferenceServerClient(running.grpc_target)}
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(running.call, "POST", "/v1/classify", classify_json(TEXTS[:1], ["alpha"]))
            assert entered.wait(10)
            for protocol, client in clients.items():
                module = tritonhttp if protocol == "http" else tritongrpc
                with pytest.raises(InferenceServerException, match="deadline") as late:
                    client.infer("centra", oip_inputs(module, ["never computed"], tasks="alpha"), timeout=200_000)
                assert protocol == "grpc" or late.value.status() == "504"
            gate.set()
            assert first.result(20)[0] == 200
        assert not any("never computed" in texts for texts in ran)
        for client in clients.values():  # a generous timeout answers; a bad one is refused
            module = tritonhttp if client is clients["http"] else tritongrpc
            assert client.infer("centra", oip_inputs(module, TEXTS[:1], tasks="alpha"), timeout=30_000_000)
        status, got = running.call("POST", "/v2/models/centra/infer", {
            "parameters": {"timeout": "soon"}, "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                                                           "data": ["hi"]}]})
        assert status == 400 and "timeout" in got["error"]
    finally:
        gate.set()
        for client in clients.values():
            client.close()
        running.close()


def test_oip_stubs_match_the_proto(tmp_path):
    from importlib.metadata import version

    pytest.importorskip("grpc_tools")
    committed = ROOT / "centra" / "serve" / "inference"
    made_by = next(line.split("'")[1] for line in (committed / "open_inference_grpc_pb2_grpc.py").read_text()
                   .splitlines() if line.startswith("GRPC_GENERATED_VERSION"))
    if version("grpcio-tools") != made_by:
        pytest.skip(f"stubs made by grpcio-tools {made_by}, {version('grpcio-tools')} installed")
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate_oip(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.OIP_OUTPUTS)
    for path in written:
        assert path.read_bytes() == (committed / path.name).read_bytes(), f"{path.name}: run tools/gen_protos.py"


def test_oip_malformed_tensors_are_refused_with_one_line(served):
    def tensor(name, data, shape=None, datatype="BYTES"):
        return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}

    cases = [({"inputs": [tensor("TEXT", ["a"]), tensor("COLOUR", ["red"])]}, "unknown input 'COLOUR'"),
             ({"inputs": [tensor("TEXT", ["a"], datatype="FP32")]}, "datatype 'FP32', expected BYTES"),
             ({"inputs": [tensor("TEXT", ["a", "b"], shape=[3])]}, "holds 3 elements, 2 given"),
             ({"inputs": [tensor("TEXT", ["a"], shape=[1, 2])]}, "expected [rows, 1] or [rows]"),
             ({"inputs": [tensor("TEXT", ["a", "b"]), tensor("TEXT_PAIR", ["x"])]}, "TEXT has 2 rows, TEXT_PAIR 1"),
             ({"inputs": [tensor("TEXT", [1])]}, "BYTES data must be strings"),
             ({"inputs": [tensor("TEXT_PAIR", ["a"])]}, "no TEXT input given"),
             ({"inputs": [tensor("TEXT", ["a"]), tensor("TEXT", ["b"])]}, "input TEXT given twice"),
             ({"inputs": "TEXT"}, "no list of inputs"),
             ({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                           "parameters": {"binary_data_size": 99}}]}, "binary_data_size 99 is outside the body")]
    for body, words in cases:
        status, got = served.call("POST", "/v2/models/centra/infer", body)
        assert status == 400 and got["code"] == "INVALID_ARGUMENT" and words in got["error"], (words, got)
    status, got = served.call("POST", "/v2/models/centra/infer", b"{}", {"Inference-Header-Content-Length": "x"})
    assert status == 400 and "is not a number" in got["error"]
    # one TASKS row for every row; outputs as JSON when binary is not asked for
    status, got = served.call("POST", "/v2/models/centra/infer", {"inputs": [
        tensor("TEXT", TEXTS[:3], [3, 1]), tensor("TASKS", ["beta"], [1, 1])]})
    assert status == 200 and {o["name"] for o in got["outputs"]} == {"LOGITS_beta", "ANSWERS"}
    answers = next(o for o in got["outputs"] if o["name"] == "ANSWERS")
    assert answers["shape"] == [3, 1] and list(json.loads(answers["data"][0])) == ["beta"]
