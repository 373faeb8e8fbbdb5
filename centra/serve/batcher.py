"""Dynamic batching: rows of concurrent calls merged into one engine run (asyncio, in the server's loop).

The shape of Ray Serve's `_BatchQueue`: each call waits on its own future; one loop task forms a batch
and runs `engine.run` on all its rows in one worker thread, so the event loop keeps accepting calls, and
hands each call its slice of the results. Batches form while the engine is busy, never by waiting on
an idle one: a call that arrives while the engine is idle runs at once; calls that arrive while a batch
runs queue, and form the next batch (up to `max_batch` rows) as soon as it ends. `max_wait_ms` (default
0) lets that next batch wait at most so long past the end of the one they queued behind, for more
company: a ceiling, never a floor, and never applied to a call that found the engine idle. Added to
that shape:
- admission control at enqueue: more than `max_queue` live queued rows -> RESOURCE_EXHAUSTED at once;
  a call that is cancelled, or whose deadline passes, gives its queue space back at that moment (a
  timer per deadline), not when the next batch forms;
- one error slot per call: when a batch of several calls fails, each call is re-run alone, so a bad call
  fails alone;
- a call checked against one engine that is bound to another (a reload in between) is checked again
  against the engine that will run it (`recheck`), before any compute;
- the loop catches everything and goes on (a dead loop would leave every caller waiting forever).
The loop sleeps on an asyncio.Event between calls; nothing polls.

`engine` is read once per batch, when the batch is formed: a reload swaps it with one assignment
(`batcher.engine = new`), batches formed before keep the engine they bound to.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from centra.core.shadow import is_candidate
from centra.errors import CentraError
from centra.runtime.engine import Engine, Row, RowResult
from centra.serve.call import ServeError
from centra.serve.record import BatchRecord

log = logging.getLogger("centra.serve")


@dataclass(frozen=True)
class Computed:
    """What a call gets back: its rows as they ran, their results, and the engine that computed them
    (labels, version)."""

    engine: Engine
    rows: list[Row]
    results: list[RowResult]


@dataclass
class BatchStats:
    """Counters since start (read them in tests and logs; the batch loop is their only writer)."""

    batches: int = 0
    calls: int = 0
    rows: int = 0
    max_batch_rows: int = 0
    queue_wait_s: float = 0.0  # summed over calls
    max_queue_wait_s: float = 0.0
    rejected: int = 0  # refused at enqueue: queue full
    expired: int = 0  # dropped before compute: deadline passed in the queue
    cancelled: int = 0  # dropped before compute: the caller went away
    retried_batches: int = 0
    failed_calls: int = 0


Recheck = Callable[[Engine], list[Row]]


@dataclass(eq=False)
class _Call:
    rows: list[Row]
    deadline: float | None  # on the loop's clock
    future: asyncio.Future
    enqueued: float
    checked: Engine | None  # the engine its rows were checked against
    recheck: Recheck | None  # the same check against another engine (a reload happened meanwhile)
    timer: asyncio.TimerHandle | None = None
    released: bool = False  # its rows no longer count as queued


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 0.0, max_queue: int = 1024):
        if max_batch < 1 or max_queue < 1 or not max_wait_ms >= 0:
            raise ValueError(f"bad batcher limits: max_batch={max_batch} max_queue={max_queue} "
                             f"max_wait_ms={max_wait_ms}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = BatchStats()
        self.listeners: list[Callable[[BatchRecord], None]] = []
        self._pending: deque[_Call] = deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._busy = False  # a batch is being run
        self._idle_since = 0.0  # loop time the last batch ended: calls queued before it waited on a busy engine
        # One worker: batches run one at a time (the engine is one model on shared cores).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="centra-engine")

    @property
    def queued_rows(self) -> int:
        """Rows of live queued calls (cancelled and expired ones are not counted)."""
        return self._queued_rows

    async def start(self) -> None:
        """Start the batch loop in the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="centra-batcher")

    async def submit(self, rows: list[Row], deadline: float | None = None, *, checked: Engine | None = None,
                     recheck: Recheck | None = None) -> Computed:
        """Queue one call's rows and wait for their results. `deadline`: on the event loop's clock.
        `checked`: the engine the rows were checked against (default: the one served now); `recheck(engine)`
        checks the call again and returns its rows for another engine (default: its tasks must exist there
        and take the inputs the rows carry)."""
        if self._task is None or self._closing:
            raise ServeError("the server is shutting down", "UNAVAILABLE")
        if not rows:
            raise ServeError("no inputs given")
        if self._queued_rows + len(rows) > self.max_queue:
            self.stats.rejected += 1
            raise ServeError(f"the server is busy ({self._queued_rows:,} rows queued, limit {self.max_queue:,}); "
                             f"retry later", "RESOURCE_EXHAUSTED")
        loop = asyncio.get_running_loop()
        call = _Call(list(rows), deadline, loop.create_future(), loop.time(), checked or self.engine, recheck)
        if deadline is not None:
            call.timer = loop.call_at(deadline, self._expire, call)
        call.future.add_done_callback(lambda _future: self._release(call))  # cancelled: its space is free
        self._pending.append(call)
        self._queued_rows += len(call.rows)
        self._wakeup.set()
        # If the caller is cancelled (client gone, deadline), awaiting cancels the future too.
        return await call.future

    def _release(self, call: _Call) -> None:
        """The call leaves the queue's count (taken into a batch, cancelled, expired, settled)."""
        if not call.released:
            call.released = True
            self._queued_rows -= len(call.rows)
            if call.future.cancelled():
                self.stats.cancelled += 1
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None

    def _expire(self, call: _Call) -> None:
        """Its deadline passed while queued: answered now, and its queue space freed now."""
        call.timer = None
        if not call.released and not call.future.done():
            self.stats.expired += 1
            self._settle(call, ServeError("the deadline passed while the call was queued", "DEADLINE_EXCEEDED"))

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new calls, run the queued ones (at most `timeout` seconds), stop the loop."""
        self._closing = True
        if self._task is None:
            return
        self._wakeup.set()
        if not self._pending and not self._busy:
            timeout = None  # idle: the loop ends at its next turn
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            self._task.cancel()
            log.warning("batcher: queued calls not done within %.1f s were cancelled", timeout)
        finally:
            while self._pending:
                self._settle(self._pending.popleft(), ServeError("the server is shutting down", "UNAVAILABLE"))
            self._executor.shutdown(wait=False)

    async def _loop(self) -> None:
        while True:
            calls: list[_Call] = []
            try:
                batch = await self._next_batch()
                if batch is None:
                    return
                calls = batch
                self._busy = True
                await self._run(calls)
            except asyncio.CancelledError:
                for call in calls:
                    self._settle(call, ServeError("the server is shutting down", "UNAVAILABLE"))
                raise
            except Exception as exc:  # a fault of the loop itself: fail this batch's calls, keep serving
                log.exception("batcher: batch failed outside the engine; its calls fail, the loop goes on")
                for call in calls:
                    self._settle(call, exc)
            finally:
                if self._busy:
                    self._idle_since = asyncio.get_running_loop().time()
                self._busy = False

    async def _next_batch(self) -> list[_Call] | None:
        """Wait for a live call. One that arrived at an idle engine runs at once, with whatever else is
        queued; calls that queued behind a running batch go as soon as it ended, or, with max_wait > 0,
        once max_batch rows are queued or max_wait has passed since it ended. None once closing with
        nothing queued."""
        loop = asyncio.get_running_loop()
        while True:
            while self._pending and self._pending[0].released:
                self._pending.popleft()  # cancelled or expired while queued: already answered
            if self._pending:
                break
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        if self.max_wait and self._pending[0].enqueued < self._idle_since:  # queued behind a batch
            end = self._idle_since + self.max_wait
            while self._queued_rows < self.max_batch and not self._closing:
                remaining = end - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
        return self._take(loop.time())

    def _take(self, now: float) -> list[_Call]:
        """Live calls from the head of the queue up to max_batch rows (the first always); a call whose
        deadline has passed is answered DEADLINE_EXCEEDED, never run."""
        calls: list[_Call] = []
        rows = 0
        while self._pending:
            call = self._pending[0]
            if call.released or call.future.done():  # cancelled, its release callback not run yet
                self._pending.popleft()
                self._release(call)
                continue
            if calls and rows + len(call.rows) > self.max_batch:
                break
            self._pending.popleft()
            if call.deadline is not None and now >= call.deadline:
                self._expire(call)
                continue
            self._release(call)
            calls.append(call)
            rows += len(call.rows)
        return calls

    async def _run(self, calls: list[_Call]) -> None:
        engine = self.engine  # bound once: a swap while this batch runs applies to the next batch
        calls = [call for call in calls if self._bind(call, engine)]
        if not calls:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        rows = [row for call in calls for row in call.rows]
        failed, retried = 0, False
        spent: dict[str, float] | None = {} if engine.candidates else None  # the candidate heads' detours
        try:
            results = await loop.run_in_executor(self._executor, _run_engine, engine, rows, spent)
        except Exception as exc:
            if len(calls) == 1:
                self._settle(calls[0], exc)
                failed = 1
            else:  # one error slot per call: find the bad call(s) by running each alone
                retried = True
                log.warning("batcher: a batch of %d calls failed (%s: %s); re-running each call alone",
                            len(calls), type(exc).__name__, exc)
                for call in calls:
                    if call.future.done():
                        continue
                    try:
                        alone = await loop.run_in_executor(self._executor, _run_engine, engine, call.rows, spent)
                    except Exception as call_exc:
                        self._settle(call, call_exc)
                        failed += 1
                    else:
                        self._settle(call, Computed(engine, call.rows, alone))
        else:
            offset = 0
            for call in calls:
                self._settle(call, Computed(engine, call.rows, results[offset:offset + len(call.rows)]))
                offset += len(call.rows)
        tasks: dict[str, int] = {}
        for row in rows:
            for task in (t for t in row.tasks if not is_candidate(t)):  # inputs of the tasks asked for
                tasks[task] = tasks.get(task, 0) + 1
        self._record(BatchRecord(len(calls), len(rows), tuple(started - c.enqueued for c in calls), tasks,
                                 loop.time() - started, failed, retried, dict(spent or {})))

    def _bind(self, call: _Call, engine: Engine) -> bool:
        """A call checked against another engine (a reload in between) is checked again against this one,
        the check its caller gave (or `fits`); refused calls are answered here, never run."""
        if call.checked is engine:
            return True
        try:
            rows = call.recheck(engine) if call.recheck is not None else fits(call.rows, engine)
        except ServeError as exc:
            self._settle(call, ServeError(f"{exc} (the served model changed while the call was queued)", exc.code))
            return False
        except Exception as exc:
            self._settle(call, exc)
            return False
        if len(rows) != len(call.rows):
            self._settle(call, RuntimeError(f"the recheck gave {len(rows)} rows for {len(call.rows)}"))
            return False
        call.rows, call.checked = rows, engine
        return True

    def _settle(self, call: _Call, outcome: Computed | BaseException) -> None:
        self._release(call)
        if call.future.done():  # the caller went away meanwhile
            return
        if isinstance(outcome, BaseException):
            call.future.set_exception(outcome)
        else:
            call.future.set_result(outcome)

    def _record(self, record: BatchRecord) -> None:
        s = self.stats
        s.batches += 1
        s.calls += record.calls
        s.rows += record.rows
        s.max_batch_rows = max(s.max_batch_rows, record.rows)
        s.queue_wait_s += sum(record.waits)
        s.max_queue_wait_s = max(s.max_queue_wait_s, record.queue_wait_s)
        s.retried_batches += record.retried
        s.failed_calls += record.failed_calls
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception:
                log.exception("batcher: a batch listener failed (ignored)")


def fits(rows: list[Row], engine: Engine) -> list[Row]:
    """The rows unchanged when every task they name exists in `engine` and takes the inputs they carry
    (a pair iff the task reads pairs); else a ServeError, as the servicer's check would give."""
    specs = engine.branches
    for i, row in enumerate(rows):
        for name in row.tasks:
            spec = specs.get(name)
            if spec is None:
                raise ServeError(f"unknown task {name!r}", "NOT_FOUND")
            if (spec.input == "pair") != (row.pair is not None):
                takes = "text pairs" if spec.input == "pair" else "single texts"
                raise ServeError(f"input {i}: task {name!r} takes {takes}")
    return rows


def _run_engine(engine: Engine, rows: list[Row], spent: dict[str, float] | None = None) -> list[RowResult]:
    """On the engine worker: run the rows and interpret their logits (no tensor work on the event loop);
    `spent` adds the seconds of each candidate head's detour.
    The rows were checked before they were queued: whatever fails here is the server's fault, so a
    CentraError (which the servicer would answer INVALID_ARGUMENT) becomes a server fault (INTERNAL,
    logged)."""
    try:
        results = engine.run(rows) if spent is None else engine.run(rows, spent=spent)
    except CentraError as exc:
        raise RuntimeError(f"the engine failed on checked rows: {exc}") from exc
    if len(results) != len(rows):
        raise RuntimeError(f"the engine returned {len(results)} results for {len(rows)} rows")
    return engine.interpret_all(results)
