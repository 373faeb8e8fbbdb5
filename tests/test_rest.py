"""centra serve over HTTP: REST JSON == centra.v1 gRPC, the OpenAPI document, HTTP status per gRPC code
with a JSON error body, the byte limit before parsing, 429 when busy and 503 when shutting down; a reload
seen by every protocol; token, TLS and metrics through build(); the CLI's HTTP flags and `centra serve`
over HTTP. The Open Inference Protocol's own tests are in test_oip.py (Served, classify_json and
oip_inputs here are shared with it)."""

from __future__ import annotations

import asyncio
import http.client
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
                    pb.ListTasksResponse, pb.TaskInfo, pb.LabelScore):
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
        assert status == 400 and "more than 4 inputs in one call; the limit is 4" in got["error"]
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


def test_serve_flags_for_http():
    from centra.cli import build_parser
    from centra.cli.serve import http_port

    parse = build_parser().parse_args
    assert http_port(parse(["serve", "--model", "m"])) == 8000
    assert http_port(parse(["serve", "--model", "m", "--port", "0"])) == 0  # two such servers never share 8000
    assert http_port(parse(["serve", "--model", "m", "--port", "0", "--http-port", "8080"])) == 8080
    assert parse(["serve", "--model", "m", "--no-http"]).no_http


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
