"""The HTTP and OIP doors held to centra.v1's standard: counts before parsing (REST JSON, OIP JSON, OIP
gRPC typed contents), deadlines for request heads and bodies, a concurrency slot only once the body is in,
a call whose client left dropped before it is computed, one-line 400s for malformed OIP JSON (never a
fault or a traceback), a budget for streams that need no token, versions only inside the model folder."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_rest import Served
from test_serve import Gated

import centra.serve.doors.rest as rest_door
import centra.serve.http as http_port
from centra.core.versions import CURRENT, VERSIONS, model_folder
from centra.errors import CentraError
from centra.serve import guard as guard_module
from centra.serve.inference import open_inference_grpc_pb2 as ip
from centra.serve.inference import open_inference_grpc_pb2_grpc as ip_grpc
from centra.serve.server import CentraServer, ServeOptions

ROOT = Path(__file__).resolve().parent.parent
CODE = grpc.StatusCode


def raw_connection(running: Served) -> socket.socket:
    host, port = running.http_target.split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Does the server close the connection (or answer and close it) within `within` seconds?"""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


@pytest.fixture
def served(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0, max_concurrent_rpcs=4)))
    yield running
    running.close()


def test_rest_counts_its_inputs_before_it_parses_the_body(served, monkeypatch):
    parsed: list[int] = []
    original = rest_door.parse_request
    monkeypatch.setattr(rest_door, "parse_request", lambda body: parsed.append(len(body)) or original(body))
    many = b'{"inputs": [' + b",".join([b"{}"] * 500_000) + b"]}"  # 1.5 MB, under the body cap
    assert len(many) < served.server.http.body_bytes
    status, got = served.call("POST", "/v1/classify", many)
    assert status == 400 and got["error"] == "more than 256 inputs in one call; the limit is 256", got
    assert parsed == [], "the body of a call over the input limit was parsed"
    braces = '{"inputs": [{"text": "' + "{" * 5000 + '"}], "tasks": ["alpha"]}'  # braces inside a string
    status, got = served.call("POST", "/v1/classify", braces.encode())
    assert status == 200 and len(got["results"]) == 1, got
    status, got = served.call("POST", "/v1/classify", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "not a ClassifyRequest" in got["error"], "deep nesting: refused in one line"


def test_slow_bodies_hold_connections_never_slots_and_meet_a_deadline(served, monkeypatch):
    monkeypatch.setattr(http_port, "BODY_BASE_S", 1.0)
    slow = []
    for _ in range(8):  # twice max_concurrent_rpcs
        sock = raw_connection(served)
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b'{"inputs": ')
        slow.append(sock)
    try:
        time.sleep(0.3)
        status, got = served.call("POST", "/v1/classify", {"inputs": [{"text": "still served"}], "tasks": ["alpha"]})
        assert status == 200, got
        assert served.server.http.inflight == 0, "a call without its body took a slot"
        answer = slow[0].recv(65536)  # the body's deadline: 1 s + 100 kB at 64 kB/s
        assert answer.startswith(b"HTTP/1.1 408") and b"DEADLINE_EXCEEDED" in answer, answer[:200]
        assert closed_by_server(slow[0], 5), "a connection this slow is closed after its answer"
    finally:
        for sock in slow:
            sock.close()


def test_an_idle_or_half_sent_request_head_is_closed(engine, monkeypatch):
    monkeypatch.setattr(http_port, "IDLE_S", 1.0)
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    try:
        idle, half = raw_connection(running), raw_connection(running)
        half.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-")
        assert closed_by_server(idle, 5) and closed_by_server(half, 5)
        assert running.call("GET", "/v1/tasks")[0] == 200
    finally:
        running.close()


def test_a_call_whose_client_left_is_dropped_before_it_is_computed(engine):
    gated = Gated(engine)
    running = Served(CentraServer(gated, ServeOptions(port=0, http_port=0, drain_s=0)))
    try:
        gated.gate.clear()
        first = threading.Thread(target=running.call, args=("POST", "/v1/classify",
                                                            {"inputs": [{"text": "first"}], "tasks": ["alpha"]}))
        first.start()
        assert gated.entered.wait(10)
        body = b'{"inputs": [{"text": "left early"}], "tasks": ["alpha"]}'
        sock = raw_connection(running)
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while running.server.batcher.queued_rows < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        sock.close()  # the client leaves while its call is queued
        while running.server.batcher.stats.cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.server.batcher.stats.cancelled == 1
        assert running.server.http.inflight <= 1, "the slot of the call whose client left was not freed"
        gated.gate.set()
        first.join(20)
        time.sleep(0.2)
        assert "left early" not in gated.seen, "the call whose client left was computed"
    finally:
        gated.gate.set()
        running.close()


MALFORMED = [
    b'{"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ' + b"[" * 50_000 + b"]" * 50_000
    + b"}]}",
    b'{"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}], "parameters": "x"}',
    b'{"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}], "outputs": 7}',
    b'{"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}], '
    b'"outputs": [{"name": "ANSWERS", "parameters": []}]}',
    b'{"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["a"], "parameters": 3}]}',
    b'{"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [{"x": 1}]}]}',
    b'{"inputs": [' + b",".join([b'{"name": "TEXT", "shape": [1], "data": ["a"]}'] * 40) + b"]}",
    b'{"inputs": [{"name": "TEXT", "shape": [400000, 1], "datatype": "BYTES", "data": ['
    + b",".join([b'""'] * 400_000) + b"]}]}",
]


def test_malformed_oip_json_gets_one_line_400s_and_no_traceback(served, caplog):
    caplog.set_level(logging.ERROR)
    for body in MALFORMED:
        status, got = served.call("POST", "/v2/models/centra/infer", body)
        assert status == 400 and got["code"] == "INVALID_ARGUMENT" and "\n" not in got["error"], (body[:120], got)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_oip_grpc_typed_contents_are_counted_before_they_are_parsed(served):
    channel = grpc.insecure_channel(served.grpc_target)
    stub = ip_grpc.GRPCInferenceServiceStub(channel)
    try:
        many = ip.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[300_000, 1])
        many.contents.bytes_contents.extend([b""] * 300_000)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(ip.ModelInferRequest(model_name="centra", inputs=[many]), timeout=20)
        assert err.value.code() == CODE.INVALID_ARGUMENT
        assert "elements in an input's contents" in err.value.details(), err.value.details()
        fine = ip.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[2, 1])
        fine.contents.bytes_contents.extend([b"good", b"bad"])
        reply = stub.ModelInfer(ip.ModelInferRequest(model_name="centra", inputs=[fine]), timeout=20)
        assert reply.outputs[-1].name == "ANSWERS" and reply.outputs[-1].shape == [2, 1]
    finally:
        channel.close()


def test_streams_without_a_token_cannot_take_the_slots_of_calls(engine):
    from centra.serve.guard import Guard

    limit = guard_module.MAX_STREAMS
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0,
                                                       max_concurrent_rpcs=limit + 4), guard=Guard(token="s3cret")))
    channel = grpc.insecure_channel(running.grpc_target)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        streams = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(limit + 10)]
        refused = 0
        for stream in streams:
            try:
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as exc:
                assert exc.code() == CODE.RESOURCE_EXHAUSTED, exc
                refused += 1
        assert refused == 10, refused
        status, got = running.call("POST", "/v1/classify", {"inputs": [{"text": "x"}]},
                                   headers={"Authorization": "Bearer s3cret"})
        assert status == 200, got
        call = running.stub.Classify
        from test_serve import request
        assert len(call(request(["x"]), timeout=10, metadata=(("authorization", "Bearer s3cret"),)).results) == 1
        for stream in streams:
            stream.cancel()
    finally:
        channel.close()
        running.close()


def test_a_version_that_links_outside_the_model_folder_is_refused(model_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(model_out, out, symlinks=True)
    current = os.readlink(out / CURRENT)
    version = out / VERSIONS / Path(current).name
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(version), str(elsewhere))
    version.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CentraError, match="not a version folder inside"):
        model_folder(out)


def test_sighup_soon_after_start_does_not_kill_serve(tmp_path):
    """From the first line centra runs (before that, only the interpreter starts: ~0.03 s here)."""
    for delay in (0.06, 0.1, 0.2):
        proc = subprocess.Popen([sys.executable, "-m", "centra.cli", "serve", "--model", str(tmp_path / "none"),
                                 "--port", "0", "--no-metrics"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 2, (delay, proc.stdout.read())  # the missing model's one-line error, not SIGHUP
        assert "no such merged model folder" in proc.stdout.read()


def test_out_of_file_descriptors_is_one_line_now_and_then(caplog):
    import errno

    from centra.serve.app import QuietAccept

    passed: list[dict] = []
    handler = QuietAccept(lambda loop, context: passed.append(context))
    caplog.set_level(logging.WARNING, logger="centra.serve")
    for _ in range(1000):
        handler(None, {"message": "socket.accept() out of system resource", "socket": object(),
                       "exception": OSError(errno.EMFILE, "Too many open files")})
    lines = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    handler(None, {"message": "something else", "exception": ValueError("x")})
    handler(None, {"message": "a callback failed", "exception": OSError(errno.EMFILE, "Too many open files")})
    assert len(passed) == 2, "other errors, and descriptors run out outside the accept loop, go to the previous one"


def test_counting_before_parsing_never_backtracks():
    """A body of escaped quotes made the string pattern scan to the end from every quote (hours for 2 MB)."""
    from centra.serve.http import objects_over, strings_over

    hostile = b'{"inputs": [' + b'\\"' * 500_000
    done = threading.Event()
    found: list[bool] = []

    def count() -> None:
        found.extend([objects_over(hostile, 257), strings_over(hostile, 1024)])
        done.set()

    threading.Thread(target=count, daemon=True).start()
    assert done.wait(30), "the count of a 1 MB body of escaped quotes did not end"
    assert found == [False, False]  # one object; one unterminated string running to the end
    assert strings_over(b'["a", "b\\"c", "d', 2) and not strings_over(b'["a", "b\\"c", "d', 3)
    assert objects_over(b'[{}, {"x": "{{{"}, {}]', 2) and not objects_over(b'[{}, {"x": "{{{"}, {}]', 3)


def test_grpc_groups_and_too_many_raw_elements_are_refused_unparsed():
    from centra.serve.call import ServeError
    from centra.serve.doors.oip_tensors import deserialize_bytes
    from centra.serve.wire import over_count

    assert "wire type 3" in over_count(b"\x7b\x7c" + b"\n\x00" * 300, {1: (256, "inputs")})
    with pytest.raises(ServeError, match="more than 256 elements"):
        deserialize_bytes(b"\x00\x00\x00\x00" * 100_000, "TEXT", 256)
    assert len(deserialize_bytes(b"\x01\x00\x00\x00a" * 256, "TEXT", 256)) == 256


def test_bodies_received_at_once_are_bounded(served, monkeypatch):
    monkeypatch.setattr(http_port, "MAX_READING_FACTOR", 1)  # 4 bodies at once (max_concurrent_rpcs 4)
    slow = []
    try:
        for _ in range(4):
            sock = raw_connection(served)
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            slow.append(sock)
        deadline = time.monotonic() + 10
        while served.server.http.reading < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, got = served.call("POST", "/v1/classify", {"inputs": [{"text": "x"}]})
        assert status == 503 and got["code"] == "UNAVAILABLE" and "bodies are being received" in got["error"], got
    finally:
        for sock in slow:
            sock.close()
    deadline = time.monotonic() + 10
    while served.server.http.reading and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served.server.http.reading == 0, "a body whose client left is no longer counted"
    assert served.call("POST", "/v1/classify", {"inputs": [{"text": "x"}]})[0] == 200
