"""`centra serve` and signals at every stage: SIGHUP while loading and while draining kills nothing and
every call sent before SIGTERM is answered; signals while the model loads are handled by serve_model, a
SIGTERM then stops it before it listens, and the handlers in place before are restored."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from test_serve import request

from centra.serve.server import ServeOptions
from centra.serve.v1 import centra_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CODE = grpc.StatusCode


def start_serve(model: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "centra.cli", "serve", "--model", str(model), "--port", "0",
                             "--no-metrics", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def serving_target(proc: subprocess.Popen, during=None) -> str:
    """Read the server's output until its 'serving ... on HOST:PORT' line; `during()` runs between lines."""
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("serving "):
                found.append(line.rsplit(" on ", 1)[1].strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    begin = time.monotonic()  # no program handles a signal before its interpreter has started (~0.1 s)
    while reader.is_alive() and time.monotonic() < begin + 60:
        if during is not None and proc.poll() is None and time.monotonic() > begin + 0.4:
            during()
        reader.join(0.2)
    assert found, f"the server never served (exit code {proc.poll()})"
    return found[0]


def test_sighup_while_loading_and_while_draining_kills_nothing(model_out):
    proc = start_serve(model_out, "--drain-s", "1", "--grace-s", "5")
    try:
        target = serving_target(proc, during=lambda: proc.send_signal(signal.SIGHUP))  # every 0.2 s of start-up
        stop = threading.Event()
        started_before_term: list[float] = []
        outcomes: list[tuple[float, str]] = []

        def caller() -> None:
            with grpc.insecure_channel(target) as channel:
                stub = centra_pb2_grpc.ClassifierStub(channel)
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        stub.Classify(request(["in flight"]), timeout=20)
                        outcomes.append((began, "OK"))
                    except grpc.RpcError as exc:
                        outcomes.append((began, exc.code().name))
                        if exc.code() == CODE.UNAVAILABLE:
                            return

        with ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(caller)
            time.sleep(1.0)
            started_before_term.append(time.monotonic())
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.send_signal(signal.SIGHUP)  # while draining
            time.sleep(0.3)
            proc.send_signal(signal.SIGHUP)
            assert proc.wait(timeout=30) == 0, proc.stdout.read()
            stop.set()
        before = [code for began, code in outcomes if began < started_before_term[0]]
        assert len(before) > 8 and set(before) == {"OK"}, "calls sent before SIGTERM must all be answered"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_signals_while_loading_are_handled_and_sigterm_stops_before_listening(model_out, monkeypatch):
    import centra.serve.app as app_module
    from centra.serve.metrics import Metrics

    outer: list[int] = []  # what the process would do without serve_model's handlers (here: record)
    record = lambda signum, frame: outer.append(signum)  # noqa: E731
    before = {sig: signal.signal(sig, record) for sig in (signal.SIGHUP, signal.SIGTERM)}
    started: list[bool] = []

    class NeverStarted:
        async def start(self):
            started.append(True)

        async def stop(self, grace=None):
            pass

    def slow_build(*args):  # the load, on its own thread
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGHUP):
            time.sleep(0.3)
            os.kill(os.getpid(), sig)
        time.sleep(0.3)
        return NeverStarted(), Metrics(), None

    monkeypatch.setattr(app_module, "build", slow_build)
    try:
        asyncio.run(asyncio.wait_for(app_module.serve_model(model_out, ServeOptions(port=0),
                                                            app_module.AppOptions(metrics_port=None)), 30))
        assert outer == [] and started == []
        assert signal.getsignal(signal.SIGHUP) is record, "the handlers in place before are restored"
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
