"""What users of Triton, KServe and TEI look for on centra serve: /health, /info and /metrics on the HTTP
port; Allow on 405, WWW-Authenticate on 401, Retry-After on 429 and 503; server metadata on the spec's
terms (centra's version, the extensions implemented, a <project>_<format> platform); ModelReady of an
unknown model is `ready: false` over gRPC, as Triton answers."""

from __future__ import annotations

import http.client
import threading
import time

import grpc
from test_rest import Served

import centra
from centra.serve.guard import Guard
from centra.serve.inference import open_inference_grpc_pb2 as ip
from centra.serve.inference import open_inference_grpc_pb2_grpc as ip_grpc
from centra.serve.metrics import Metrics
from centra.serve.server import CentraServer, ServeOptions


def raw(running: Served, method: str, path: str, headers=None):
    host, port = running.http_target.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, headers=headers or {})
    reply = conn.getresponse()
    body = reply.read()
    conn.close()
    return reply.status, dict(reply.getheaders()), body


def test_health_info_and_metrics_on_the_http_port(engine):
    metrics = Metrics()
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0),
                                  guard=Guard(token="s3cret", metrics=metrics)))
    try:
        bearer = {"Authorization": "Bearer s3cret"}
        assert running.call("GET", "/health")[0] == 200, "health needs no token"
        status, got = running.call("GET", "/info")
        assert status == 401
        status, info = running.call("GET", "/info", headers=bearer)
        assert status == 200 and info["model_version"] == engine.version and info["model_id"] == engine.content_id
        assert [t["name"] for t in info["tasks"]] == list(engine.specs)
        assert info["tasks"][0]["labels"] == engine.specs[info["tasks"][0]["name"]].labels
        assert info["limits"]["max_inputs_per_call"] == 256 and info["doors"] == ["centra.v1", "rest", "oip", "info"]
        assert info["engine"] == engine.runtime
        status, _, body = raw(running, "GET", "/metrics", bearer)
        assert status == 200 and b'centra_calls_total{code="UNAUTHENTICATED",method="GET /info"} 1.0' in body
        running.server.classifier.ready = False  # draining
        assert running.call("GET", "/health")[0] == 503
        running.server.classifier.ready = True
    finally:
        running.close()
    bare = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    try:
        status, got = bare.call("GET", "/metrics")
        assert status == 404 and got["code"] == "NOT_FOUND", "no metrics kept: none served"
    finally:
        bare.close()


def test_http_status_headers(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0), guard=Guard(token="s3cret")))
    try:
        status, headers, _ = raw(running, "GET", "/v1/classify", {"Authorization": "Bearer s3cret"})
        assert status == 405 and headers.get("Allow") == "POST", headers
        status, headers, _ = raw(running, "POST", "/v1/classify")
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
        running.server.classifier.ready = False
        status, headers, _ = raw(running, "GET", "/v2/health/ready")
        assert status == 503
        running.server.classifier.ready = True
    finally:
        running.close()


def test_a_full_queue_says_when_to_retry(engine):
    from test_serve import Gated

    gated = Gated(engine)
    running = Served(CentraServer(gated, ServeOptions(port=0, http_port=0, drain_s=0, max_queue=1,
                                                      max_inputs_per_call=1, max_batch=1)))
    try:
        gated.gate.clear()
        body = {"inputs": [{"text": "x"}], "tasks": ["alpha"]}
        first = threading.Thread(target=running.call, args=("POST", "/v1/classify", body))
        first.start()
        assert gated.entered.wait(10)
        second = threading.Thread(target=running.call, args=("POST", "/v1/classify", body))
        second.start()
        deadline = time.monotonic() + 10
        while running.server.batcher.queued_rows < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        host, port = running.http_target.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/classify", body=b'{"inputs": [{"text": "y"}], "tasks": ["alpha"]}',
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 429 and reply.getheader("Retry-After") == "1"
        conn.close()
        gated.gate.set()
        first.join(20)
        second.join(20)
    finally:
        gated.gate.set()
        running.close()


def test_server_metadata_on_the_spec_and_model_ready_of_an_unknown_model(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    channel = grpc.insecure_channel(running.grpc_target)
    try:
        stub = ip_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ServerMetadata(ip.ServerMetadataRequest(), timeout=10)
        assert meta.name == "centra" and meta.version == centra.__version__
        assert list(meta.extensions) == ["binary_tensor_data", "classification", "parameters"]
        status, got = running.call("GET", "/v2")
        assert status == 200 and got["version"] == centra.__version__ and got["extensions"] == list(meta.extensions)
        model = stub.ModelMetadata(ip.ModelMetadataRequest(name="centra"), timeout=10)
        assert model.platform == f"centra_{engine.runtime}" and model.platform.count("_") == 1
        assert stub.ModelReady(ip.ModelReadyRequest(name="centra"), timeout=10).ready
        assert not stub.ModelReady(ip.ModelReadyRequest(name="nope"), timeout=10).ready
        assert not stub.ModelReady(ip.ModelReadyRequest(name="centra", version="v999999"), timeout=10).ready
    finally:
        channel.close()
        running.close()


def test_openapi_lists_every_route_served(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    try:
        status, doc = running.call("GET", "/openapi.json")
        served = {(r.method.lower(), r.resource.canonical) for r in running.server.http._runner.app.router.routes()
                  if r.method != "HEAD"}
        listed = {(method, path) for path, ops in doc["paths"].items() for method in ops}
        assert status == 200 and served <= listed, served - listed
    finally:
        running.close()


def test_metrics_help_says_what_is_counted(engine):
    """Each metric's HELP line names what it counts, and the counts agree: a gRPC call and an HTTP call
    both land in centra_calls_total, their inputs in centra_inputs_total."""
    from prometheus_client.parser import text_string_to_metric_families

    from centra.serve.v1 import centra_pb2 as pb

    metrics = Metrics()
    server = CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0), guard=Guard(metrics=metrics))
    server.batcher.listeners.append(
        lambda r: metrics.observe_batch(r.rows, r.calls, list(r.waits), r.compute_s, r.tasks))
    running = Served(server)  # as serve/app.py's build() wires it
    try:
        running.stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text="x")], tasks=["alpha"]), timeout=20)
        body = {"inputs": [{"text": "y"}, {"text": "z"}], "tasks": ["alpha"]}
        assert running.call("POST", "/v1/classify", body)[0] == 200
        status, _, body = raw(running, "GET", "/metrics")
    finally:
        running.close()
    assert status == 200
    helps = {line.split(" ", 3)[2]: line.split(" ", 3)[3] for line in body.decode().splitlines()
             if line.startswith("# HELP ")}
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(families) <= {name.removesuffix("_total") for name in helps} | set(helps)
    for name in ("centra_calls_total", "centra_call_seconds"):
        assert "gRPC" in helps[name] and "HTTP" in helps[name], helps[name]
    assert "every door" in helps["centra_inputs_total"] and "by task" in helps["centra_inputs_total"]
    calls = {(s.labels["method"], s.labels["code"]): s.value for s in families["centra_calls"].samples
             if s.name == "centra_calls_total"}
    assert calls[("Classify", "OK")] == 1 and calls[("POST /v1/classify", "OK")] == 1, calls
    inputs = {s.labels["task"]: s.value for s in families["centra_inputs"].samples if s.name == "centra_inputs_total"}
    assert inputs["alpha"] == 3, "one gRPC input and two REST inputs"


def test_openapi_validates_and_applies_its_security(engine):
    """The document validates (openapi-spec-validator); every operation has its own operationId and lists
    405; and its security says what the guard does: every operation not marked `security: []` is refused
    401 without the token, and every one marked open is not."""
    from openapi_spec_validator import validate

    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0), guard=Guard(token="s3cret")))
    try:
        status, doc = running.call("GET", "/openapi.json")
        assert status == 200
        validate(doc)
        assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        operations = [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()]
        ids = [op["operationId"] for _, _, op in operations]
        assert len(ids) == len(set(ids)) == len(operations), ids
        opened = set()
        for path, method, op in operations:
            assert "405" in op["responses"] and "Allow" in op["responses"]["405"]["headers"], (path, method)
            filled = path.replace("{model}", "centra").replace("{version}", engine.version)
            got, _, _ = raw(running, method.upper(), filled)
            secured = op.get("security", doc["security"]) != []
            assert (got == 401) == secured, (path, method, got)
            if secured:
                assert "401" in op["responses"], path
            else:
                opened.add(path)
        assert opened == {"/health", "/v2/health/live", "/v2/health/ready", "/openapi.json"}
        for path in ("/v1/classify", "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
            assert {"408", "429", "503", "504"} <= set(doc["paths"][path]["post"]["responses"]), path
    finally:
        running.close()
