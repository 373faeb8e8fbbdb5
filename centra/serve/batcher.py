"""Dynamic batching: rows of concurrent calls merged into one engine run (asyncio, in the server's loop).

The shape of Ray Serve's `_BatchQueue`: each call waits on its own future; one loop task forms a batch
(calls until `max_batch` rows are queued or `max_wait_ms` has passed since the oldest queued call), runs
`engine.run` on all its rows in one worker thread, so the event loop keeps accepting calls, and hands
each call its slice of the results. Added to that shape:
- admission control at enqueue: more than `max_queue` queued rows -> RESOURCE_EXHAUSTED at once;
- calls cancelled by their caller, or past their deadline, are dropped when a batch is formed, before any
  compute (DEADLINE_EXCEEDED);
- one error slot per call: when a batch of several calls fails, each call is re-run alone, so a bad call
  fails alone;
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

from centra.runtime.engine import Engine, Row, RowResult
from centra.serve.convert import ServeError

log = logging.getLogger("centra.serve")


@dataclass(frozen=True)
class Computed:
    """What a call gets back: its results, and the engine that computed them (labels, version)."""

    engine: Engine
    results: list[RowResult]


@dataclass(frozen=True)
class BatchRecord:
    """One formed batch, as handed to listeners (metrics)."""

    calls: int
    rows: int
    waits: tuple[float, ...]  # per call: seconds from enqueue until its batch started
    tasks: dict[str, int]  # rows per task
    compute_s: float
    failed_calls: int
    retried: bool  # the merged run failed and each call was re-run alone

    @property
    def queue_wait_s(self) -> float:
        return max(self.waits)


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


@dataclass
class _Call:
    rows: list[Row]
    deadline: float | None  # on the loop's clock
    future: asyncio.Future
    enqueued: float


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024):
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
        # One worker: batches run one at a time (the engine is one model on shared cores).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="centra-engine")

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def start(self) -> None:
        """Start the batch loop in the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="centra-batcher")

    async def submit(self, rows: list[Row], deadline: float | None = None) -> Computed:
        """Queue one call's rows and wait for their results. `deadline`: on the event loop's clock."""
        if self._task is None or self._closing:
            raise ServeError("the server is shutting down", "UNAVAILABLE")
        if not rows:
            raise ServeError("no inputs given")
        if self._queued_rows + len(rows) > self.max_queue:
            self.stats.rejected += 1
            raise ServeError(f"the server is busy ({self._queued_rows:,} rows queued, limit {self.max_queue:,}); "
                             f"retry later", "RESOURCE_EXHAUSTED")
        loop = asyncio.get_running_loop()
        call = _Call(list(rows), deadline, loop.create_future(), loop.time())
        self._pending.append(call)
        self._queued_rows += len(call.rows)
        self._wakeup.set()
        # If the caller is cancelled (client gone, deadline), awaiting cancels the future too: the batch
        # loop sees it done and drops the call.
        return await call.future

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
            self._queued_rows = 0
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
                self._busy = False

    async def _next_batch(self) -> list[_Call] | None:
        """Wait for a call, then for more until max_batch rows are queued or the oldest call has waited
        max_wait; None once closing with nothing queued."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        end = self._pending[0].enqueued + self.max_wait
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
        """Calls from the head of the queue up to max_batch rows (the first always), dropping the ones
        whose caller is gone or whose deadline has passed."""
        calls: list[_Call] = []
        rows = 0
        while self._pending:
            call = self._pending[0]
            if calls and rows + len(call.rows) > self.max_batch:
                break
            self._pending.popleft()
            self._queued_rows -= len(call.rows)
            if call.future.done():
                self.stats.cancelled += 1
            elif call.deadline is not None and now >= call.deadline:
                self.stats.expired += 1
                self._settle(call, ServeError("the deadline passed while the call was queued", "DEADLINE_EXCEEDED"))
            else:
                calls.append(call)
                rows += len(call.rows)
        return calls

    async def _run(self, calls: list[_Call]) -> None:
        engine = self.engine  # bound once: a swap while this batch runs applies to the next batch
        calls = [call for call in calls if self._known_tasks(call, engine)]
        if not calls:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        rows = [row for call in calls for row in call.rows]
        failed, retried = 0, False
        try:
            results = await loop.run_in_executor(self._executor, _run_engine, engine, rows)
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
                        alone = await loop.run_in_executor(self._executor, _run_engine, engine, call.rows)
                    except Exception as call_exc:
                        self._settle(call, call_exc)
                        failed += 1
                    else:
                        self._settle(call, Computed(engine, alone))
        else:
            offset = 0
            for call in calls:
                self._settle(call, Computed(engine, results[offset:offset + len(call.rows)]))
                offset += len(call.rows)
        tasks: dict[str, int] = {}
        for row in rows:
            for task in row.tasks:
                tasks[task] = tasks.get(task, 0) + 1
        self._record(BatchRecord(len(calls), len(rows), tuple(started - c.enqueued for c in calls), tasks,
                                 loop.time() - started, failed, retried))

    def _known_tasks(self, call: _Call, engine: Engine) -> bool:
        """A call checked against an older engine may name a task the bound engine no longer has."""
        missing = sorted({t for row in call.rows for t in row.tasks} - set(engine.specs))
        if missing:
            self._settle(call, ServeError(f"unknown task {missing[0]!r} (the served model changed)", "NOT_FOUND"))
        return not missing

    @staticmethod
    def _settle(call: _Call, outcome: Computed | BaseException) -> None:
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


def _run_engine(engine: Engine, rows: list[Row]) -> list[RowResult]:
    """On the engine worker: run the rows and interpret their logits (no tensor work on the event loop)."""
    results = engine.run(rows)
    if len(results) != len(rows):
        raise RuntimeError(f"the engine returned {len(results)} results for {len(rows)} rows")
    return engine.interpret_all(results)
