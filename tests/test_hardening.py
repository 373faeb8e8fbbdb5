"""A server that cannot be knocked over: work bounded before any check, refusals for size that do not say
"retry", queue space given back by callers that gave up, queued calls checked again against the model
that runs them, no wait on an idle engine, and a replaced model freed after its reload. Signals at every
stage are in test_serve_signals.py."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from helpers import make_task, make_tasks
from test_serve import Gated, Running, request, wait_until

import centra.serve.doors.v1 as v1_door
import centra.serve.server as server_module
from centra.client import Client, RemoteError
from centra.core.backbone import Backbone
from centra.core.merge import plan_merge, write_merged
from centra.runtime.engine import Engine, Row
from centra.serve.batcher import Batcher
from centra.serve.call import Limits
from centra.serve.guard import Guard
from centra.serve.server import CentraServer, ServeOptions
from centra.serve.v1 import centra_pb2 as pb
from centra.serve.v1 import centra_pb2_grpc
from centra.serve.wire import Unparsed, parser

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def flipped(tiny_models, tmp_path_factory) -> Engine:
    """Another model whose task 'alpha' reads text pairs and 'delta' single texts (the reverse of engine's)."""
    root = tmp_path_factory.mktemp("flipped")
    bb = Backbone.load(tiny_models["bert"])
    make_task(bb, root / "tasks", ("alpha", "multiclass", ["neg", "neu", "pos"], "pair", 1, 1, "mean"))
    make_task(bb, root / "tasks", ("delta", "multiclass", ["different", "same"], "single", 2, 1, "cls"), seed=3)
    write_merged(plan_merge([root / "tasks"]), root / "out")
    return Engine.load(root / "out")


@pytest.fixture
def serve():
    started: list[Running] = []
    yield lambda engine, **options: started.append(Running(engine, **options)) or started[-1]
    for running in started:
        running.close()


# --- bounded work before any check -------------------------------------------------------------------


def test_a_message_over_the_limit_is_refused_on_its_length_unparsed():
    class NeverParsed:
        class DESCRIPTOR:
            name = "ClassifyRequest"

        @staticmethod
        def FromString(data):
            raise AssertionError("parsed a message over the limit")

    refused = parser(NeverParsed, 100)(b"x" * 101)
    assert isinstance(refused, Unparsed) and "101 bytes; the limit is 100" in refused.message
    # Under the byte limit, but more inputs than allowed: counted by walking the top-level fields, unparsed
    empty = pb.ClassifyRequest(inputs=[pb.Input()] * 500_000, tasks=["alpha"]).SerializeToString()
    counted = parser(NeverParsed, len(empty), {1: (256, "inputs"), 2: (1024, "task names")})(empty)
    assert isinstance(counted, Unparsed) and counted.message == "more than 256 inputs in one call; the limit is 256"
    assert parser(pb.ClassifyRequest, None, {1: (256, "inputs")})(b"\n\x00" * 256).inputs  # 256 pass
    limits = Limits(max_inputs=4, max_bytes=1000, max_task_names=8)
    largest = pb.ClassifyRequest(inputs=[pb.Input(text="x" * 247, text_pair="y", id="z")] * 4, tasks=["t" * 1] * 8)
    assert len(largest.SerializeToString()) <= limits.wire_bytes, "a valid call always fits the wire limit"


def test_four_megabytes_of_empty_inputs_are_refused_by_size(serve, engine):
    run = serve(engine)
    flood = pb.ClassifyRequest(inputs=[pb.Input()] * 2_000_000)
    assert len(flood.SerializeToString()) == 4_000_000
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(flood, timeout=20)
    assert err.value.code() == CODE.INVALID_ARGUMENT, err.value.details()
    assert "the ClassifyRequest has 4,000,000 bytes; the limit is" in err.value.details()
    assert run.server.batcher.stats.calls == 0
    assert len(run.stub.Classify(request(["still serving"]), timeout=10).results) == 1


def test_beyond_the_receive_limit_grpc_refuses_and_the_client_says_it_is_too_large(serve, engine):
    options = ServeOptions(max_inputs_per_call=4, max_call_bytes=1000)
    assert options.receive_bytes == server_module.RECEIVE_FACTOR * options.limits.wire_bytes
    run = serve(engine, max_inputs_per_call=4, max_call_bytes=1000)
    with pytest.raises(grpc.RpcError) as err:  # over our limit, under gRPC's: ours, by length
        run.stub.Classify(request(["x" * (options.limits.wire_bytes + 10)]), timeout=10)
    assert err.value.code() == CODE.INVALID_ARGUMENT and "the limit is" in err.value.details()
    with pytest.raises(RemoteError, match="too large") as remote:  # over gRPC's own limit
        Client(run.target).classify(["x" * (options.receive_bytes + 10)])
    assert remote.value.code == "RESOURCE_EXHAUSTED" and "not retry" in str(remote.value)


def test_task_names_count_toward_the_bytes_and_their_number_is_bounded(serve, engine):
    run = serve(engine)
    texts = ["xy " * 33_000] * 10 + ["z" * 55_000]  # 1,045,000 bytes: under 1 MiB alone
    assert len(run.stub.Classify(request(texts, ["alpha"]), timeout=30).results) == 11
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(request(texts, ["alpha"] * 1000), timeout=30)
    assert err.value.code() == CODE.INVALID_ARGUMENT and "1,050,000 bytes" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(request(["a"], ["alpha"] * 1025), timeout=10)
    assert err.value.code() == CODE.INVALID_ARGUMENT and "more than 1,024 task names" in err.value.details()


def test_a_huge_task_name_is_not_found_in_a_short_message(serve, engine):
    run = serve(engine)
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(request(["a"], ["n" * 20_000]), timeout=10)
    assert err.value.code() == CODE.NOT_FOUND, err.value.details()
    assert "(20,000 characters): not a task name" in err.value.details() and len(err.value.details()) < 400


def test_a_caller_without_the_token_is_refused_before_its_message_is_parsed(engine, monkeypatch):
    parsed: list[int] = []

    def counting(message_type, *limits):
        parse = parser(message_type, *limits)
        return lambda data: parsed.append(len(data)) or parse(data)

    monkeypatch.setattr(v1_door, "parser", counting)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = CentraServer(engine, ServeOptions(port=0), guard=Guard(token="s3cret"))
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = centra_pb2_grpc.ClassifierStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(request(["x" * 500_000]), timeout=10, metadata=(("authorization", "Bearer nope"),))
            assert err.value.code() == CODE.UNAUTHENTICATED
            assert parsed == [], "the message of a caller without the token was parsed"
            stub.Classify(request(["fine"]), timeout=10, metadata=(("authorization", "Bearer s3cret"),))
            assert len(parsed) == 1
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_calls_in_progress_are_bounded(serve, engine):
    gated = Gated(engine)
    run = serve(gated, max_concurrent_rpcs=2)
    gated.gate.clear()
    held = [run.stub.Classify.future(request([f"held {i}"]), timeout=20) for i in range(2)]
    # both calls are in: one runs and one waits, or both arrived together and run in one batch
    wait_until(lambda: gated.entered.is_set() and len(gated.seen) + run.server.batcher.queued_rows == 2)
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(request(["third"]), timeout=10)
    assert err.value.code() == CODE.RESOURCE_EXHAUSTED  # busy: retrying later is right
    gated.gate.set()
    assert all(len(f.result(timeout=20).results) == 1 for f in held)


def test_an_engine_fault_is_internal_even_when_it_is_a_centra_error(serve, engine, caplog):
    from centra.errors import CentraError

    class Broken(Gated):
        def run(self, rows):
            raise CentraError("graph file vanished")  # a server fault, not the caller's

    run = serve(Broken(engine))
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(request(["fine text"]), timeout=10)
    assert err.value.code() == CODE.INTERNAL and "vanished" not in err.value.details()
    assert "graph file vanished" in caplog.text, "the fault goes to the server log"


# --- queue space and the model a queued call runs on --------------------------------------------------


def test_callers_that_gave_up_free_their_queue_space_at_once(engine):
    gated = Gated(engine)
    gated.gate.clear()

    async def scenario():
        batcher = Batcher(gated, max_batch=4, max_wait_ms=0, max_queue=4)
        await batcher.start()
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher.submit([Row("computing", None, ("alpha",))]))
        await asyncio.to_thread(gated.entered.wait, 10)
        late = asyncio.ensure_future(batcher.submit([Row("late", None, ("alpha",))] * 3, loop.time() + 0.2))
        gone = asyncio.ensure_future(batcher.submit([Row("gone", None, ("alpha",))]))
        await asyncio.sleep(0.05)
        assert batcher.queued_rows == 4
        gone.cancel()
        with pytest.raises(Exception, match="deadline passed"):
            await asyncio.wait_for(late, 5)  # answered at its deadline, while the engine is still busy
        assert batcher.queued_rows == 0 and not gated.gate.is_set()
        fresh = asyncio.ensure_future(batcher.submit([Row("fresh", None, ("alpha",))] * 4))  # fits now
        await asyncio.sleep(0.05)
        gated.gate.set()
        done = await asyncio.wait_for(fresh, 20)
        await asyncio.wait_for(first, 20)
        await batcher.close(5)
        return done, batcher.stats

    done, stats = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert len(done.results) == 4 and stats.expired == 1 and stats.cancelled == 1 and stats.rejected == 0
    assert "late" not in gated.seen and "gone" not in gated.seen


@pytest.mark.parametrize("texts,pairs,tasks,message", [
    (["single text"], None, ["alpha"], "input 0 has no text_pair; task 'alpha' takes text pairs"),
    (["first"], ["second"], ["delta"], "input 0 has a text_pair but no task asked for takes pairs"),
])
def test_a_queued_call_is_checked_again_against_the_model_that_runs_it(serve, engine, flipped, texts, pairs,
                                                                       tasks, message):
    gated = Gated(engine)
    run = serve(gated)
    gated.gate.clear()
    first = run.stub.Classify.future(request(["computing"]), timeout=20)
    assert gated.entered.wait(10)
    queued = run.stub.Classify.future(request(texts, tasks, pairs), timeout=20)
    wait_until(lambda: run.server.batcher.queued_rows == 1)
    run.server.swap_engine(flipped)  # a reload while the call waits
    gated.gate.set()
    first.result(timeout=20)
    with pytest.raises(grpc.RpcError) as err:
        queued.result(timeout=20)
    assert err.value.code() == CODE.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details() and "the served model changed" in err.value.details()


def test_a_queued_call_without_tasks_gets_the_tasks_of_the_model_that_runs_it(serve, engine, flipped):
    gated = Gated(engine)
    run = serve(gated)
    gated.gate.clear()
    first = run.stub.Classify.future(request(["computing"]), timeout=20)
    assert gated.entered.wait(10)
    queued = run.stub.Classify.future(request(["every task that fits"]), timeout=20)
    wait_until(lambda: run.server.batcher.queued_rows == 1)
    run.server.swap_engine(flipped)
    gated.gate.set()
    first.result(timeout=20)
    reply = queued.result(timeout=20)
    assert [t.task for t in reply.results[0].tasks] == ["delta"]  # flipped's only single-text task
    assert reply.model_version == flipped.version


# --- batch when busy ----------------------------------------------------------------------------------


def test_a_call_at_an_idle_engine_runs_at_once_and_calls_queued_behind_a_batch_share_one(serve, engine):
    idle = serve(engine, max_wait_ms=60_000, max_batch=64)  # were it a floor, the call would time out
    assert len(idle.stub.Classify(request(["alone"]), timeout=20).results) == 1
    gated = Gated(engine)
    run = serve(gated, max_batch=64)
    gated.gate.clear()
    first = run.stub.Classify.future(request(["computing"]), timeout=30)
    assert gated.entered.wait(10)
    behind = [run.stub.Classify.future(request([f"behind {i}"]), timeout=30) for i in range(5)]
    wait_until(lambda: run.server.batcher.queued_rows == 5)
    batches = run.server.batcher.stats.batches
    gated.gate.set()
    first.result(timeout=30)
    assert all(len(f.result(timeout=30).results) == 1 for f in behind)
    wait_until(lambda: run.server.batcher.stats.batches == batches + 2)  # the first, then the five together


# --- memory that follows the served model -------------------------------------------------------------


def test_a_replaced_model_is_freed_after_its_reload(tiny_models, tmp_path, monkeypatch):
    """Refused calls leave reference cycles (exception, traceback, the frame that checked the call against
    the engine of the moment) that pin an old engine until a full collection; the watcher collects and
    trims a tick after each reload."""
    import gc
    import weakref

    from test_serve_ops import App
    from test_serve_ops import classify as classify_alpha

    import centra.serve.reload as reload_module

    released: list[bool] = []
    real = reload_module.release_memory
    monkeypatch.setattr(reload_module, "release_memory", lambda: released.append(True) or real())
    bb = Backbone.load(tiny_models["bert"])
    make_tasks(bb, tmp_path / "tasks", [("alpha", "multiclass", ["neg", "neu", "pos"], "single", 1, 1, "mean")])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    app = App(tmp_path / "out", watch_interval=0.05)
    try:
        gc.disable()  # only the watcher's collection may free what the refused calls pin
        old = weakref.ref(app.server.engine)
        for _ in range(5):
            with pytest.raises(grpc.RpcError):  # refused: checked against the engine of the moment
                app.stub.Classify(request([""], ["alpha"]), timeout=10)
        classify_alpha(app.stub)
        make_task(bb, tmp_path / "tasks", ("alpha", "multiclass", ["neg", "neu", "pos"], "single", 1, 1, "mean"),
                  seed=7)
        write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
        wait_until(lambda: app.server.engine.version == "v000002", 30)
        classify_alpha(app.stub)
        wait_until(lambda: released, 10)
        wait_until(lambda: old() is None, 10)
    finally:
        gc.enable()
        app.close()
