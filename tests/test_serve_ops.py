"""Operating the server: zero-downtime reload under load, a bad reload keeps serving, Prometheus metrics,
the bearer token and TLS."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import TEXTS
from helpers import STANDARD_TASKS, make_task, make_tasks

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.manifest import content_id
from centra.core.merge import plan_merge, write_merged
from centra.core.versions import CURRENT, MANIFEST, VERSIONS, current_version
from centra.runtime.engine import Engine
from centra.serve.app import AppOptions, build
from centra.serve.server import ServeOptions
from centra.serve.v1 import centra_pb2 as pb
from centra.serve.v1 import centra_pb2_grpc

CODE = grpc.StatusCode


@pytest.fixture
def published(tiny_models, tmp_path) -> Path:
    make_tasks(Backbone.load(tiny_models["bert"]), tmp_path / "tasks", STANDARD_TASKS[:2])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    return tmp_path


class App:
    """build()'s server, metrics and watcher, running in their own event loop thread."""

    def __init__(self, model: Path, target_host: str = "127.0.0.1", credentials=None, **app):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        options = ServeOptions(port=0, max_wait_ms=1)
        self.server, self.metrics, self.watcher = build(model, options, AppOptions(metrics_port=0, **app))
        port = self.do(self.server.start())
        self.http = self.metrics.serve_http("127.0.0.1", 0)
        if self.watcher is not None:
            self.loop.call_soon_threadsafe(self.watcher.start)
        self.target = target = f"{target_host}:{port}"
        self.channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self.stub = centra_pb2_grpc.ClassifierStub(self.channel)

    def do(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.http.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.read().decode()

    def close(self) -> None:
        self.channel.close()
        if self.watcher is not None:
            self.do(self.watcher.stop())
        self.do(self.server.stop(0.5))
        self.http.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def apps():
    started: list[App] = []
    yield lambda *args, **kwargs: started.append(App(*args, **kwargs)) or started[-1]
    for app in started:
        app.close()


def classify(stub, text: str = TEXTS[0], **metadata) -> pb.ClassifyResponse:
    return stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text=text)], tasks=["alpha"]), timeout=20,
                         metadata=tuple(metadata.items()) or None)


def test_reload_under_load_loses_no_call_and_switches_version(published, tiny_models, apps):
    app = apps(published / "out", watch_interval=0.05)
    replies: list[tuple[str, float]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:  # calls throughout the reload
        while not stop.is_set():
            try:
                reply = classify(app.stub)
                replies.append((reply.model_version, reply.results[0].tasks[0].scores[0]))
            except grpc.RpcError as exc:
                failures.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        make_task(Backbone.load(tiny_models["bert"]), published / "tasks", STANDARD_TASKS[0], seed=7)  # retrain
        write_merged(plan_merge([published / "tasks"]), published / "out")  # all a user does
        deadline = threading.Event()
        for _ in range(400):
            if replies and replies[-1][0] == "v000002":
                break
            deadline.wait(0.05)
        count = len(replies)
        for _ in range(500):  # a few calls on the new version (bounded: a dead client fails, never hangs)
            if len(replies) >= count + 5 or not thread.is_alive():
                break
            deadline.wait(0.02)
    finally:
        stop.set()
        thread.join(30)
    assert failures == [], failures[:1]
    versions = [v for v, _ in replies]
    assert versions[0] == "v000001" and versions[-1] == "v000002"
    assert versions == sorted(versions), "never back to the old version once switched"
    new = Engine.load(published / "out").predict([TEXTS[0]], tasks=["alpha"])[0]
    assert abs(replies[-1][1] - list(new["scores"].values())[0]) < 1e-5, "answers come from the new version"
    assert 'centra_reloads_total{result="ok"} 1.0' in app.scrape()
    assert f'centra_model_version{{id="{app.server.engine.content_id}",version="v000002"}} 1.0' in app.scrape()


def test_a_bad_reload_keeps_the_old_version_serving(published, apps, caplog):
    app = apps(published / "out", watch_interval=0.05)
    out = published / "out"
    bad = out / VERSIONS / "v000002"
    shutil.copytree(out / VERSIONS / "v000001", bad)
    manifest = {**json.loads((bad / MANIFEST).read_text()), "version": "v000002"}
    (bad / MANIFEST).write_text(json.dumps({**manifest, "content_id": content_id(manifest)}))
    (bad / "trunk.safetensors").write_bytes(b"not weights")  # corrupt: its sha256 differs from the manifest
    (out / "next").symlink_to(f"{VERSIONS}/v000002")
    (out / "next").replace(out / CURRENT)
    assert current_version(out)[0] == "v000002"
    for _ in range(200):
        if 'centra_reloads_total{result="failed"} 1.0' in app.scrape():
            break
        threading.Event().wait(0.05)
    assert 'centra_reloads_total{result="failed"} 1.0' in app.scrape()
    assert classify(app.stub).model_version == "v000001", "the old version keeps serving"
    assert any("reload of v000002 (" in r.getMessage() and "failed, still serving v000001 (" in r.getMessage()
               and "trunk.safetensors: sha256 differs" in r.getMessage() for r in caplog.records)
    threading.Event().wait(0.3)
    assert 'centra_reloads_total{result="failed"} 1.0' in app.scrape(), "a failed version is not retried"
    app.loop.call_soon_threadsafe(app.watcher.poke)  # SIGHUP: retry now
    for _ in range(200):
        if 'centra_reloads_total{result="failed"} 2.0' in app.scrape():
            break
        threading.Event().wait(0.05)
    assert 'centra_reloads_total{result="failed"} 2.0' in app.scrape()


def test_metrics_count_calls_by_code_batches_and_inputs(published, apps):
    app = apps(published / "out", watch=False)
    assert app.watcher is None
    for _ in range(3):
        classify(app.stub)
    with pytest.raises(grpc.RpcError) as err:
        app.stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text="x")], tasks=["nope"]), timeout=10)
    assert err.value.code() == CODE.NOT_FOUND
    # a call is counted when its handler returns, which may be just after the caller got its answer
    for _ in range(100):
        text = app.scrape()
        if 'centra_call_seconds_count{method="Classify"} 4.0' in text:
            break
        threading.Event().wait(0.05)
    assert 'centra_calls_total{code="OK",method="Classify"} 3.0' in text
    assert 'centra_calls_total{code="NOT_FOUND",method="Classify"} 1.0' in text
    assert 'centra_inputs_total{task="alpha"} 3.0' in text
    assert "centra_batch_rows_count 3.0" in text and "centra_queue_seconds_count 3.0" in text
    assert 'centra_call_seconds_count{method="Classify"} 4.0' in text
    assert f'centra_model_version{{id="{app.server.engine.content_id}",version="v000001"}} 1.0' in text


def test_token_is_required_and_never_logged(published, apps, tmp_path, caplog, capsys):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    (tmp_path / "token").write_text("s3cret-token\n")
    app = apps(published / "out", token_file=tmp_path / "token", watch=False)
    for metadata in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"}):
        with pytest.raises(grpc.RpcError) as err:
            classify(app.stub, **metadata)
        assert err.value.code() == CODE.UNAUTHENTICATED
    assert classify(app.stub, authorization="Bearer s3cret-token").results[0].tasks[0].task == "alpha"
    health = health_pb2_grpc.HealthStub(app.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, "health checks need no token"
    assert 'centra_calls_total{code="UNAUTHENTICATED",method="Classify"} 3.0' in app.scrape()
    assert main(["classify", "--server", app.target, "--token-file", str(tmp_path / "token"), "--task", "alpha",
                 "hello"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "alpha"
    assert main(["classify", "--server", app.target, "--task", "alpha", "hello"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert "s3cret" not in caplog.text


def test_tls(published, apps, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: no certificate to test TLS with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    app = apps(published / "out", credentials=credentials, tls_cert=cert, tls_key=key, watch=False)
    assert classify(app.stub).results[0].tasks[0].task == "alpha"
    plain = centra_pb2_grpc.ClassifierStub(grpc.insecure_channel(app.target))
    with pytest.raises(grpc.RpcError) as err:
        classify(plain)
    assert err.value.code() == CODE.UNAVAILABLE, "a plaintext client cannot talk to a TLS server"
    assert main(["classify", "--server", app.target, "--tls-ca", str(cert), "--task", "alpha", "hello"]) == 0


class Slow:
    """An engine whose runs take `seconds` (a call's deadline passes while it is computed)."""

    def __init__(self, engine, seconds: float):
        self.engine, self.seconds = engine, seconds

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, rows):
        threading.Event().wait(self.seconds)
        return self.engine.run(rows)


def test_metrics_count_deadlines_and_cancelled_calls(published, apps):
    app = apps(published / "out", watch=False)
    # a warm call first, so the deadline below passes inside the handler (a deadline that passes before
    # grpc hands the call to the server never reaches the interceptor, on a loaded machine too)
    app.stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text="w")], tasks=["alpha"]), timeout=30)
    app.server.swap_engine(Slow(app.server.engine, 3.0))
    with pytest.raises(grpc.RpcError) as err:
        app.stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text="x")], tasks=["alpha"]), timeout=1.0)
    assert err.value.code() == CODE.DEADLINE_EXCEEDED
    call = app.stub.Classify.future(pb.ClassifyRequest(inputs=[pb.Input(text="y")], tasks=["alpha"]), timeout=30)
    threading.Event().wait(0.5)
    call.cancel()
    for _ in range(200):
        text = app.scrape()
        if 'code="CANCELLED"' in text and 'code="DEADLINE_EXCEEDED"' in text:
            break
        threading.Event().wait(0.05)
    calls = [line for line in text.splitlines() if line.startswith("centra_calls_total")]
    assert 'centra_calls_total{code="DEADLINE_EXCEEDED",method="Classify"} 1.0' in calls, calls
    assert 'centra_calls_total{code="CANCELLED",method="Classify"} 1.0' in calls, calls
    assert 'code="UNKNOWN"' not in text
