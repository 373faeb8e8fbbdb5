"""The gRPC server's refusals and limits: bad input gets its status code and the server goes on, bytes
that are not UTF-8, a full queue refused at once, calls expired or cancelled in the queue never computed,
and the batcher's own deadline check when it forms a batch. The server and its helpers are
test_serve.py's."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest
from test_serve import Gated, request, wait_until

from centra.client import Client
from centra.errors import CentraError
from centra.runtime.engine import Row
from centra.serve.batcher import Batcher
from centra.serve.call import Limits, ServeError
from centra.serve.doors.v1 import call_of

CODE = grpc.StatusCode


BAD = [  # name, request, code, part of the message
    ("no inputs", request([]), CODE.INVALID_ARGUMENT, "no inputs"),
    ("empty text", request([""]), CODE.INVALID_ARGUMENT, "text 0 is empty"),
    ("blank text", request(["fine", " \n "]), CODE.INVALID_ARGUMENT, "text 1 is empty"),
    ("huge text", request(["ab " * 40_000]), CODE.INVALID_ARGUMENT, "the limit is 100,000"),
    ("pair to a single-text task", request(["a"], ["alpha"], ["b"]), CODE.INVALID_ARGUMENT, "no task asked for"),
    ("no pair for a pair task", request(["a"], ["alpha", "delta"]), CODE.INVALID_ARGUMENT, "'delta' takes text pairs"),
    ("pairs on some inputs", request(["a", "b"], (), ["x", ""]), CODE.INVALID_ARGUMENT, "input 0 has a text_pair"),
    ("blank pair", request(["a"], ["delta"], [" "]), CODE.INVALID_ARGUMENT, "pair text 0 is empty"),
    ("unknown task", request(["a"], ["alpha", "nope"]), CODE.NOT_FOUND, "unknown task 'nope'"),
    ("too many inputs", request(["a"] * 257), CODE.INVALID_ARGUMENT, "more than 256 inputs in one call"),
    ("too many bytes", request(["xy " * 33_000] * 10 + ["z" * 60_000]), CODE.INVALID_ARGUMENT, "1,050,000 bytes"),
    ("too large a message", request(["xy " * 33_000] * 11), CODE.INVALID_ARGUMENT,
     "the ClassifyRequest has 1,089,"),
]


@pytest.mark.parametrize("name,bad,code,message", BAD, ids=[row[0] for row in BAD])
def test_bad_input_gets_its_code_and_the_server_goes_on(running, name, bad, code, message):
    with pytest.raises(grpc.RpcError) as err:
        running.stub.Classify(bad, timeout=10)
    assert err.value.code() == code and message in err.value.details(), err.value.details()
    assert "\n" not in err.value.details()
    assert len(running.stub.Classify(request(["still serving"]), timeout=10).results) == 1


def test_bytes_that_are_not_utf8_are_invalid_argument(running):
    raw = running.channel.unary_unary("/centra.v1.Classifier/Classify")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\n\x04\n\x02\xff\xfe", timeout=10)  # inputs[0].text = b"\xff\xfe"
    assert err.value.code() == CODE.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    surrogate = SimpleNamespace(inputs=[SimpleNamespace(text="ok \ud800", text_pair="", id="")], tasks=[], max_labels=0,
                                top_k=0, raw_scores=False, head="", request_id="")
    with pytest.raises(ServeError, match="input 0: text is not valid UTF-8") as refused:
        call_of(surrogate, Limits()).rows(running.server.engine, Limits())
    assert refused.value.code == "INVALID_ARGUMENT"
    with pytest.raises(CentraError, match="input 0"):
        Client(running.target).classify(["\ud800"])


def test_full_queue_is_refused_at_once(serve, engine):
    gated = Gated(engine)
    run = serve(gated, max_batch=4, max_queue=4, max_inputs_per_call=4)
    gated.gate.clear()
    first = run.stub.Classify.future(request(["computing"]), timeout=20)
    assert gated.entered.wait(10)
    queued = run.stub.Classify.future(request(["queued"] * 4), timeout=20)
    wait_until(lambda: run.server.batcher.queued_rows == 4)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Classify(request(["one too many"]), timeout=10)
    assert err.value.code() == CODE.RESOURCE_EXHAUSTED and "retry later" in err.value.details()
    assert time.monotonic() - start < 2 and not gated.gate.is_set(), "refused while the engine was still busy"
    gated.gate.set()
    assert len(first.result(timeout=20).results) == 1 and len(queued.result(timeout=20).results) == 4
    assert run.server.batcher.stats.rejected == 1 and "one too many" not in gated.seen


def test_calls_expired_or_cancelled_in_the_queue_are_never_computed(serve, engine):
    gated = Gated(engine)
    run = serve(gated)
    gated.gate.clear()
    first = run.stub.Classify.future(request(["computing"]), timeout=20)
    assert gated.entered.wait(10)
    late = run.stub.Classify.future(request(["deadline canary"]), timeout=0.3)
    gone = run.stub.Classify.future(request(["cancel canary"]), timeout=20)
    wait_until(lambda: run.server.batcher.queued_rows == 2)
    gone.cancel()
    with pytest.raises(grpc.RpcError) as err:
        late.result(timeout=10)
    assert err.value.code() == CODE.DEADLINE_EXCEEDED
    pending = run.server.batcher._pending  # the server sees the cancellation a moment later
    wait_until(lambda: all(call.future.done() for call in pending))
    gated.gate.set()
    first.result(timeout=20)
    stats = run.server.batcher.stats
    wait_until(lambda: stats.expired + stats.cancelled == 2)
    run.stub.Classify(request(["after"]), timeout=10)
    assert gated.seen == ["computing", "after"]


def test_batcher_checks_deadlines_when_it_forms_a_batch(engine):
    """Without grpc cancelling the caller: the batcher's own check drops the expired call."""
    gated = Gated(engine)
    gated.gate.clear()

    async def scenario():
        batcher = Batcher(gated, max_batch=8, max_wait_ms=0, max_queue=16)
        await batcher.start()
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher.submit([Row("computing", None, ("alpha",))]))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        late = asyncio.ensure_future(batcher.submit([Row("deadline canary", None, ("alpha",))], loop.time() + 0.05))
        await asyncio.sleep(0.2)
        gated.gate.set()
        assert len((await asyncio.wait_for(first, 20)).results) == 1
        with pytest.raises(ServeError) as err:
            await asyncio.wait_for(late, 20)
        await batcher.close(5)
        return err.value.code, batcher.stats

    code, stats = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert code == "DEADLINE_EXCEEDED" and stats.expired == 1 and gated.seen == ["computing"]
