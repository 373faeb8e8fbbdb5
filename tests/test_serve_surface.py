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
