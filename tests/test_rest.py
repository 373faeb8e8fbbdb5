"""centra serve over HTTP and the Open Inference Protocol: REST JSON == centra.v1 gRPC, the OpenAPI
document, HTTP status per gRPC code with a JSON error body, the byte limit before parsing; OIP over HTTP
and gRPC with tritonclient == the engine; OIP, REST and centra.v1 calls sharing batches; token, TLS,
metrics and reload through build(); the OIP stubs match their proto."""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import shutil
import ssl
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import PAIRS, TEXTS

from centra.serve.app import AppOptions, build
from centra.serve.server import CentraServer, ServeOptions
from centra.serve.v1 import centra_pb2 as pb
from centra.serve.v1 import centra_pb2_grpc

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5  # logits and scores, server vs in-process engine (other batch sizes: other padding)


class Served:
    """A CentraServer (or build()'s) with HTTP on free loopback ports, in its own event loop thread."""

    def __init__(self, server: CentraServer, metrics=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.metrics = server, metrics
        self.grpc_target = f"127.0.0.1:{self.do(server.start())}"
        self.http_target = f"127.0.0.1:{server.http.port}"
        self.channel = grpc.insecure_channel(self.grpc_target)
        self.stub = centra_pb2_grpc.ClassifierStub(self.channel)

    def do(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, method: str, path: str, body=None, headers=None, https: ssl.SSLContext | None = None):
        """(status, JSON body) of one HTTP call; body: a dict (sent as JSON) or bytes."""
        host, port = self.http_target.split(":")
        conn = (http.client.HTTPSConnection(host, int(port), context=https, timeout=30) if https
                else http.client.HTTPConnection(host, int(port), timeout=30))
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        status, raw = reply.status, reply.read()
        conn.close()
        return status, json.loads(raw) if raw else None

    def close(self) -> None:
        self.channel.close()
        self.do(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    yield running
    running.close()


def grpc_json(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def classify_json(texts, tasks=(), pairs=None, ids=None) -> dict:
    return {"inputs": [{"text": t, **({"textPair": pairs[i]} if pairs else {}), **({"id": ids[i]} if ids else {})}
                       for i, t in enumerate(texts)], "tasks": list(tasks)}


def test_rest_classify_and_tasks_equal_grpc(served):
    for texts, tasks, pairs in ((TEXTS, ["alpha", "beta", "gamma"], None), (TEXTS[:3], ["delta", "alpha"], PAIRS[:3]),
                                (TEXTS[:2], [], None)):
        ids = [f"id-{i}" for i in range(len(texts))]
        status, got = served.call("POST", "/v1/classify", classify_json(texts, tasks, pairs, ids))
        assert status == 200, got
        want = grpc_json(served.stub.Classify(pb.ClassifyRequest(tasks=tasks, inputs=[
            pb.Input(text=t, text_pair=pairs[i] if pairs else "", id=ids[i]) for i, t in enumerate(texts)])))
        assert [r["id"] for r in got["results"]] == ids
        assert got["modelVersion"] == want["modelVersion"] and got["modelId"] == want["modelId"]
        for g, w in zip(got["results"], want["results"]):
            assert [t["task"] for t in g["tasks"]] == [t["task"] for t in w["tasks"]]
            for gt, wt in zip(g["tasks"], w["tasks"]):
                assert {k: v for k, v in gt.items() if k not in ("scores", "value")} == \
                    {k: v for k, v in wt.items() if k not in ("scores", "value")}
                assert abs(gt.get("value", 0) - wt.get("value", 0)) <= TOLERANCE + 1e-6  # rounded to 6 decimals
                assert np.allclose(gt["scores"], wt["scores"], atol=TOLERANCE)
    # snake_case field names (protobuf's JSON parser takes both)
    status, got = served.call("POST", "/v1/classify", {"inputs": [{"text": TEXTS[0], "text_pair": PAIRS[0]}],
                                                       "tasks": ["delta"]})
    assert status == 200 and got["results"][0]["tasks"][0]["task"] == "delta"
    status, tasks = served.call("GET", "/v1/tasks")
    assert status == 200 and tasks == grpc_json(served.stub.ListTasks(pb.ListTasksRequest()))


def test_openapi_document_is_served(served):
    status, doc = served.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in ("/v1/classify", "/v1/tasks", "/v2/health/ready", "/v2/models/{model}/infer"):
        assert path in doc["paths"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(doc["paths"]["/v1/classify"]["post"]["responses"])
    # every reference resolves
    refs = {ref.rsplit("/", 1)[-1] for ref in json.dumps(doc).split('"$ref": "')[1:] for ref in [ref.split('"')[0]]}
    assert refs <= set(doc["components"]["schemas"])
    # the REST schemas name every field of their centra.v1 messages (JSON names), so none drifts
    schemas = doc["components"]["schemas"]
    for message in (pb.ClassifyRequest, pb.Input, pb.ClassifyResponse, pb.InputResult, pb.TaskResult,
                    pb.ListTasksResponse, pb.TaskInfo):
        fields = {f.json_name for f in message.DESCRIPTOR.fields}
        assert set(schemas[message.DESCRIPTOR.name]["properties"]) == fields, message.DESCRIPTOR.name


def test_http_status_per_code_with_json_error(served, engine):
    cases = [({"inputs": []}, 400, "INVALID_ARGUMENT", "no inputs"),
             (classify_json(["x"], ["nope"]), 404, "NOT_FOUND", "unknown task 'nope'"),
             (classify_json(["x"], ["delta"]), 400, "INVALID_ARGUMENT", "takes text pairs"),
             (b'{"inputs": [', 400, "INVALID_ARGUMENT", "not a ClassifyRequest"),
             ({"inputs": [{"text": "x", "colour": 1}]}, 400, "INVALID_ARGUMENT", "not a ClassifyRequest")]
    for body, status, code, words in cases:
        got_status, got = served.call("POST", "/v1/classify", body)
        assert (got_status, got["code"]) == (status, code) and words in got["error"], got
        assert "\n" not in got["error"]
    status, got = served.call("GET", "/v1/nothing")
    assert status == 404 and got["code"] == "NOT_FOUND"
    status, got = served.call("GET", "/v2/models/other")
    assert status == 404 and "unknown model 'other'" in got["error"]


def test_body_over_the_limit_is_refused_before_it_is_read(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0, max_call_bytes=1000,
                                                       max_inputs_per_call=4, max_queue=4)))
    try:
        cap = running.server.http.body_bytes
        big = json.dumps(classify_json(["word " * (cap // 5)])).encode()
        status, got = running.call("POST", "/v1/classify", big)
        assert status == 413 and got["code"] == "INVALID_ARGUMENT" and f"{cap:,} bytes" in got["error"]
        # the Content-Length alone refuses it: a header claiming more than the cap, with no body sent
        host, port = running.http_target.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("POST", "/v1/classify")
        conn.putheader("Content-Length", str(cap + 1))
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["code"] == "INVALID_ARGUMENT"
        conn.close()
        # a chunked body (no Content-Length) is read with the cap
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/v1/classify", body=iter([big[:cap // 2], big[cap // 2:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        reply = conn.getresponse()
        assert reply.status == 413, reply.read()
        conn.close()
        # within the cap but over max_call_bytes: the servicer's own check and message
        status, got = running.call("POST", "/v1/classify", classify_json(["word " * 300]))
        assert status == 400 and "the limit is 1,000" in got["error"]
        status, got = running.call("POST", "/v1/classify", classify_json(["a"] * 5))
        assert status == 400 and "5 inputs in one call; the limit is 4" in got["error"]
    finally:
        running.close()


def oip_inputs(module, texts, pairs=None, tasks=""):
    rows = len(texts)
    out = []
    for name, values in (("TEXT", texts), ("TEXT_PAIR", pairs or [""] * rows), ("TASKS", [tasks] * rows)):
        tensor = module.InferInput(name, [rows, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=object))
        out.append(tensor)
    return out


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


def test_reload_is_seen_by_every_protocol(served, engine):
    class Renamed:
        def __getattr__(self, name):
            return getattr(engine, name)

        version = "v999999"

    old = served.server.swap_engine(Renamed())
    try:
        status, got = served.call("POST", "/v1/classify", classify_json(TEXTS[:1], ["alpha"]))
        assert status == 200 and got["modelVersion"] == "v999999"
        client = tritonhttp.InferenceServerClient(served.http_target)
        assert client.get_model_metadata("centra")["versions"] == ["v999999"]
        assert client.infer("centra", oip_inputs(tritonhttp, TEXTS[:1], tasks="alpha")).get_response()[
            "model_version"] == "v999999"
        assert client.is_model_ready("centra", "v999999") and not client.is_model_ready("centra", "v000001")
    finally:
        served.server.swap_engine(old)


def test_token_tls_and_metrics_over_http(model_out, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: no certificate to test TLS with")
    cert, key, token = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "token"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token.write_text("s3cret-token\n")
    server, metrics, _ = build(model_out, ServeOptions(port=0, http_port=0, drain_s=0),
                               AppOptions(metrics_port=None, watch=False, tls_cert=cert, tls_key=key,
                                          token_file=token))
    running = Served(server, metrics)
    try:
        https = ssl.create_default_context(cafile=str(cert))
        body = classify_json(TEXTS[:1], ["alpha"])
        with pytest.raises(ConnectionError):  # plaintext to a TLS port: the server hangs up
            running.call("GET", "/v2/health/live")
        status, got = running.call("POST", "/v1/classify", body, https=https)
        assert status == 401 and got == {"error": "missing or wrong bearer token", "code": "UNAUTHENTICATED"}
        status, _ = running.call("POST", "/v1/classify", body, {"Authorization": "Bearer wrong"}, https=https)
        assert status == 401
        status, got = running.call("POST", "/v1/classify", body, {"Authorization": "Bearer s3cret-token"}, https=https)
        assert status == 200 and got["results"][0]["tasks"][0]["task"] == "alpha"
        assert running.call("GET", "/v2/health/ready", https=https)[0] == 200  # health stays open
        status, _ = running.call("POST", "/v2/models/centra/infer", {"inputs": []}, https=https)
        assert status == 401
        scrape = metrics.render().decode()
        assert 'centra_calls_total{code="UNAUTHENTICATED",method="POST /v1/classify"} 2.0' in scrape
        assert 'centra_calls_total{code="OK",method="POST /v1/classify"} 1.0' in scrape
        assert 'centra_calls_total{code="OK",method="GET /v2/health/ready"} 1.0' in scrape
    finally:
        running.close()


def test_busy_and_shutting_down_answer_429_and_503(engine):
    gate, entered = threading.Event(), threading.Event()

    class Gated:
        def __getattr__(self, name):
            return getattr(engine, name)

        def run(self, rows):
            entered.set()
            assert gate.wait(20)
            return engine.run(rows)

    running = Served(CentraServer(Gated(), ServeOptions(port=0, http_port=0, drain_s=0, max_queue=2,
                                                        max_inputs_per_call=2)))
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(running.call, "POST", "/v1/classify", classify_json(TEXTS[:2], ["alpha"]))
            assert entered.wait(10)
            queued = pool.submit(running.call, "POST", "/v1/classify", classify_json(TEXTS[:2], ["alpha"]))
            for _ in range(200):
                if running.server.batcher.queued_rows == 2:
                    break
                threading.Event().wait(0.02)
            status, got = running.call("POST", "/v1/classify", classify_json(TEXTS[:1], ["alpha"]))
            assert status == 429 and got["code"] == "RESOURCE_EXHAUSTED" and "busy" in got["error"]
            gate.set()
            assert first.result(20)[0] == 200 and queued.result(20)[0] == 200
        running.server.classifier.ready = False  # draining: OIP readiness says so
        assert running.call("GET", "/v2/health/ready")[0] == 503
        running.do(running.server.batcher.close(1))
        status, got = running.call("POST", "/v1/classify", classify_json(TEXTS[:1], ["alpha"]))
        assert status == 503 and got["code"] == "UNAVAILABLE"
    finally:
        gate.set()
        running.close()


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


def test_serve_flags_for_http():
    from centra.cli import build_parser
    from centra.cli.serve import http_port

    parse = build_parser().parse_args
    assert http_port(parse(["serve", "--model", "m"])) == 8000
    assert http_port(parse(["serve", "--model", "m", "--port", "0"])) == 0  # two such servers never share 8000
    assert http_port(parse(["serve", "--model", "m", "--port", "0", "--http-port", "8080"])) == 8080
    assert parse(["serve", "--model", "m", "--no-http"]).no_http


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


def test_centra_serve_command_serves_http(model_out):
    """The CLI wires HTTP in (with --port 0, a free HTTP port too), and SIGTERM stops both doors."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "centra.cli", "serve", "--model", str(model_out), "--port", "0",
                             "--no-metrics", "--drain-s", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout.readline() for _ in range(2)), daemon=True)
        reader.start()
        reader.join(60)
        assert len(lines) == 2 and lines[0].startswith("serving 5 tasks"), proc.stderr.read() if proc.poll() else lines
        url = lines[1].split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":8000")
        host, port = url[len("http://"):].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/classify", body=json.dumps(classify_json(["hello"], ["alpha"])))
        reply = conn.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["results"][0]["tasks"][0]["task"] == "alpha"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


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
