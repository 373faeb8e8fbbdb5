"""The gRPC server: client == in-process engine, batching across calls, health, reflection, a failing call
failing alone, a swapped engine, draining at shutdown, the CLI, and the stubs. Refusals by status code,
admission control and deadlines are in test_serve_limits.py."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import CORPUS, PAIRS, TEXTS

from centra.cli import main
from centra.client import Client, RemoteError
from centra.runtime.engine import Engine, Row
from centra.serve.batcher import Batcher
from centra.serve.server import CentraServer, ServeOptions
from centra.serve.v1 import centra_pb2 as pb
from centra.serve.v1 import centra_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5  # scores and values, client vs in-process engine (other batch sizes: other padding)
CODE = grpc.StatusCode
LONG_TEXT = " ".join(CORPUS[:6])  # over the tasks' max_length of 48 tokens: truncated


@pytest.fixture(scope="module")
def reference(model_out) -> Engine:
    return Engine.load(model_out, batch_size=4)


class Running:
    """A CentraServer on a free loopback port, in its own event loop thread."""

    def __init__(self, engine, shadow=None, **options):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = CentraServer(engine, ServeOptions(port=0, **options), shadow=shadow)
        self.target = f"127.0.0.1:{self.do(self.server.start())}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = centra_pb2_grpc.ClassifierStub(self.channel)

    def do(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        self.do(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()


class Gated:
    """An engine that records the texts of every run and, while its gate is closed, waits in run()."""

    def __init__(self, engine: Engine, fail_on: str | None = None, version: str | None = None):
        self.engine, self.fail_on, self._version = engine, fail_on, version
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.seen: list[str] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    @property
    def version(self) -> str:
        return self._version or self.engine.version

    def run(self, rows: list[Row]):
        self.seen += [row.text for row in rows]
        self.entered.set()
        assert self.gate.wait(20), "the test never opened the gate"
        if self.fail_on in (row.text for row in rows):
            raise RuntimeError("poisoned row")
        return self.engine.run(rows)


def request(texts, tasks=(), pairs=None, ids=None) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(tasks=list(tasks), inputs=[
        pb.Input(text=t, text_pair=pairs[i] if pairs else "", id=ids[i] if ids else "") for i, t in enumerate(texts)])


def wait_until(condition, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def assert_same(got: list[dict], want: list[dict]) -> None:
    """The same answers: keys in order, labels equal, scores and values within TOLERANCE."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if "truncated" in w:
            assert g["truncated"] == w["truncated"]
        g, w = ({k: v for k, v in x.items() if k not in ("truncated", "id")} for x in (g, w))
        assert list(g) == list(w)
        assert {k: v for k, v in g.items() if k not in ("scores", "value")} == \
            {k: v for k, v in w.items() if k not in ("scores", "value")}
        assert abs(g.get("value", 0) - w.get("value", 0)) < TOLERANCE
        assert list(g["scores"]) == list(w["scores"])
        assert max(abs(g["scores"][k] - w["scores"][k]) for k in w["scores"]) < TOLERANCE


def test_round_trip_equals_engine_predict(running, reference):
    texts = [*TEXTS, LONG_TEXT]
    pairs = [*PAIRS, "a pair"]
    with Client(running.target, timeout=10) as client:
        for tasks, with_pairs in [(None, False), (None, True), (["gamma", "alpha"], False), (["delta", "beta"], True)]:
            got = client.classify(texts, tasks, pairs if with_pairs else None, ids=[f"id{i}" for i in range(7)])
            assert_same(got, reference.predict(texts, pairs if with_pairs else None, tasks))
            assert [a["truncated"] for a in got] == [a["text"] == LONG_TEXT for a in got]
            assert [a["id"] for a in got] == [f"id{texts.index(a['text'])}" for a in got]
        listed = client.list_tasks()
    assert [t["name"] for t in listed["tasks"]] == list(reference.specs)
    assert listed["tasks"][0] == {"name": "alpha", "kind": "multiclass", "labels": ["neg", "neu", "pos"],
                                  "input": "single", "max_length": 48, "attach_layer": 1, "task_layers": 1}
    manifest = reference.manifest
    assert (listed["model_version"], listed["backbone_fingerprint"], listed["overhead_layers"]) == \
        (manifest.version, manifest.backbone.fingerprint, manifest.overhead_layers)


CALLS = [  # texts, tasks, pairs: different task sets, single and pair tokens
    (TEXTS[:2], ["alpha"], None), (TEXTS[2:5], ["beta", "gamma"], None), (TEXTS[1:3], None, None),
    (TEXTS[:3], ["delta"], PAIRS[:3]), (TEXTS[3:6], ["epsilon", "alpha"], None), (TEXTS[4:6], None, PAIRS[4:6]),
    ([LONG_TEXT], ["gamma"], None), (TEXTS, ["delta", "beta"], PAIRS)]


def test_concurrent_calls_share_batches_and_equal_one_by_one(serve, engine, reference):
    gated = Gated(engine)
    run = serve(gated, max_batch=64)
    records = []
    run.server.batcher.listeners.append(records.append)
    gated.gate.clear()  # the first call holds the engine, so the other seven queue behind it
    with Client(run.target, timeout=20) as client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.classify, CALLS[0][0], CALLS[0][1], CALLS[0][2])]
        assert gated.entered.wait(10)
        futures += [pool.submit(client.classify, texts, tasks, pairs) for texts, tasks, pairs in CALLS[1:]]
        queued = sum(len(texts) for texts, _, _ in CALLS[1:])
        wait_until(lambda: run.server.batcher.queued_rows == queued)
        gated.gate.set()
        together = [f.result(timeout=20) for f in futures]
        stats = run.server.batcher.stats
        assert (stats.calls, stats.batches, stats.max_batch_rows) == (8, 2, queued), "seven calls, one batch"
        for (texts, tasks, pairs), got in zip(CALLS, together):
            assert_same(got, client.classify(texts, tasks, pairs))
            assert_same(got, reference.predict(texts, pairs, tasks))
    assert stats.batches == 2 + len(CALLS)
    assert [(r.calls, r.rows, len(r.waits)) for r in records[:2]] == [(1, 2, 1), (7, queued, 7)]
    assert records[1].tasks["delta"] == 3 + 2 + 6 and records[1].tasks["alpha"] == 3 + 2 + 2


def test_health_and_reflection(running):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "centra.v1.Classifier"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(running.channel)
    assert "centra.v1.Classifier" in database.get_services()
    from google.protobuf.descriptor_pool import DescriptorPool
    methods = DescriptorPool(database).FindServiceByName("centra.v1.Classifier").methods_by_name
    assert set(methods) == {"Classify", "ListTasks"}


def test_batcher_loop_survives_a_fault_outside_the_engine(engine):
    """A fault of the loop itself (here: binding a call to the engine) fails that batch's calls, not the loop."""

    async def scenario():
        batcher = Batcher(engine, max_batch=8, max_wait_ms=0, max_queue=16)
        batcher.listeners.append(lambda record: 1 / 0)  # a failing listener is logged and ignored
        bind, faults = batcher._bind, [KeyError("task table gone")]

        def faulty_bind(call, bound):
            if faults:
                raise faults.pop()
            return bind(call, bound)

        batcher._bind = faulty_bind
        await batcher.start()
        with pytest.raises(KeyError):
            await asyncio.wait_for(batcher.submit([Row("first", None, ("alpha",))]), 20)
        after = await asyncio.wait_for(batcher.submit([Row("second", None, ("alpha",))]), 20)
        await batcher.close(5)
        return after, batcher.stats

    after, stats = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(after.results) == 1 and "alpha" in after.results[0].logits and stats.batches == 1


def test_engine_failure_fails_only_its_call(serve, engine, caplog):
    gated = Gated(engine, fail_on="poison")
    run = serve(gated, max_batch=64)
    gated.gate.clear()
    first = run.stub.Classify.future(request(["computing"]), timeout=20)
    assert gated.entered.wait(10)
    calls = [request(["fine one"]), request(["poison", "and a neighbour"]), request(["fine two"], ["beta"])]
    futures = [run.stub.Classify.future(call, timeout=20) for call in calls]
    wait_until(lambda: run.server.batcher.queued_rows == 4)
    with caplog.at_level(logging.ERROR, logger="centra.serve"):
        gated.gate.set()
        first.result(timeout=20)
        assert futures[0].result(timeout=20).results[0].tasks[0].task == "alpha"
        assert [t.task for t in futures[2].result(timeout=20).results[0].tasks] == ["beta"]
        with pytest.raises(grpc.RpcError) as err:
            futures[1].result(timeout=20)
    assert err.value.code() == CODE.INTERNAL
    assert "poisoned" not in err.value.details() and "Traceback" not in err.value.details()
    assert "poisoned row" in caplog.text, "the traceback goes to the server log"
    stats = run.server.batcher.stats
    assert (stats.batches, stats.retried_batches, stats.failed_calls) == (2, 1, 1)
    assert len(run.stub.Classify(request(["still serving"]), timeout=10).results) == 1


def test_swapped_engine_serves_from_the_next_batch(serve, engine):
    old, new = Gated(engine), Gated(engine, version="v-new")
    run = serve(old)
    old.gate.clear()
    first = run.stub.Classify.future(request(["computing"]), timeout=20)
    assert old.entered.wait(10)
    assert run.server.swap_engine(new) is old
    old.gate.set()
    assert first.result(timeout=20).model_version == engine.version, "a formed batch keeps its engine"
    assert run.stub.Classify(request(["next"]), timeout=10).model_version == "v-new"
    assert new.seen == ["next"]


def test_shutdown_drains(serve, engine):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gated = Gated(engine)
    run = serve(gated, drain_s=0.5)
    gated.gate.clear()
    in_flight = run.stub.Classify.future(request(["in flight"]), timeout=20)
    assert gated.entered.wait(10)
    stopping = asyncio.run_coroutine_threadsafe(run.server.stop(grace=10), run.loop)
    reply = health_pb2_grpc.HealthStub(run.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    gated.gate.set()
    assert len(in_flight.result(timeout=20).results) == 1, "an in-flight call finishes during the grace"
    stopping.result(timeout=20)
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(request(["too late"]), timeout=5)
    assert err.value.code() == CODE.UNAVAILABLE


def test_cli_classify_prints_the_lines_of_predict(running, model_out, capsys):
    for extra in ([], ["--task", "gamma", "--task", "beta"], ["--pair", PAIRS[0]]):
        assert main(["predict", "--model", str(model_out), *extra, *TEXTS[:3]]) == 0
        want = capsys.readouterr().out
        assert main(["classify", "--server", running.target, *extra, *TEXTS[:3]]) == 0
        assert capsys.readouterr().out == want and want.count("\n") >= 3


@pytest.mark.parametrize("argv,message", [
    (["classify", "--server", "127.0.0.1:1", "--timeout", "3", "hello"], "cannot reach the centra server"),
    (["serve", "--model", "nowhere", "--max-queue", "8"], "--max-queue (8) must be >= --max-inputs-per-call"),
    (["serve", "--model", "nowhere", "--port", "70000"], "must be in 0..65535"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("centra: error: ") and message in err and err.count("\n") == 1


def test_serve_on_a_port_in_use_is_one_line(running, model_out, capsys):
    port = running.target.rsplit(":", 1)[1]
    assert main(["serve", "--model", str(model_out), "--port", port, "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"centra: error: cannot listen on 127.0.0.1:{port} (address in use, or not this machine's?)\n"


def test_client_errors_name_the_code(running):
    with pytest.raises(RemoteError, match="NOT_FOUND: unknown task 'nope'") as err:
        Client(running.target, timeout=5).classify(["hi"], ["nope"])
    assert err.value.code == "NOT_FOUND"


def test_centra_serve_command_stops_on_sigterm(model_out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "centra.cli", "serve", "--model", str(model_out), "--port", "0",
                             "--metrics-port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert lines and lines[0].startswith("serving 5 tasks of "), proc.stderr.read() if proc.poll() else lines
        target = lines[0].split(" on ")[-1].strip()
        assert Client(target, timeout=10).classify(["hello"], ["alpha"])[0]["task"] == "alpha"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_client_module_does_not_import_torch():
    code = "import sys, centra.client, centra.serve.v1.centra_pb2_grpc; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_stubs_match_the_proto(tmp_path):
    from importlib.metadata import version

    pytest.importorskip("grpc_tools")

    committed = ROOT / "centra" / "serve" / "v1"
    made_by = next(line.split("'")[1] for line in (committed / "centra_pb2_grpc.py").read_text().splitlines()
                   if line.startswith("GRPC_GENERATED_VERSION"))
    if version("grpcio-tools") != made_by:
        pytest.skip(f"stubs made by grpcio-tools {made_by}, {version('grpcio-tools')} installed")
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.OUTPUTS)
    for path in written:
        assert path.read_bytes() == (committed / path.name).read_bytes(), f"{path.name}: run tools/gen_protos.py"
