"""Zero-downtime reload: follow the merged model's `current` pointer.

`centra merge` into the served folder is all a user does. The watcher reads the pointer every
`interval` seconds (a readlink; SIGHUP checks at once); on a new version it loads it beside the old one
in a worker thread, warms it up, and hands it over in one assignment (`swap`). Batches already formed
keep the engine they bound to, so in-flight calls finish on the old version. A version that fails to
load (corrupt, invalid) keeps the old one serving: one log line, a metric, and no retry until the
pointer moves again or SIGHUP asks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from centra.errors import CentraError
from centra.io import current_version

log = logging.getLogger("centra.serve")
DEFAULT_INTERVAL = 1.0


def in_fresh_thread(fn: Callable, *args):
    """fn(*args) on a new thread that exits when it is done. Torch gives every thread that computes its
    own OpenMP pool, and two live pools slow each forward pass by about a quarter on 2 cores: loading and
    warming a model here leaves only the batcher's worker with a pool."""
    import threading

    outcome: list = []

    def target() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="centra-load", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


class ModelWatcher:
    def __init__(self, model_dir: Path, version: str, load: Callable[[Path], object],
                 swap: Callable[[object, str], None], on_result: Callable[[str], None] | None = None,
                 interval: float = DEFAULT_INTERVAL):
        self.model_dir = Path(model_dir)
        self.version = version
        self.load, self.swap, self.on_result = load, swap, on_result or (lambda result: None)
        self.interval = interval
        self.failed: str | None = None  # a version that failed: not retried until asked
        self._wake = asyncio.Event()
        self._forced = False
        self._task: asyncio.Task | None = None
        self._last_error: str | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="centra-model-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def poke(self) -> None:
        """Check now, and retry a version that failed before (SIGHUP)."""
        self._forced = True
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watcher never dies; a fault it keeps hitting is logged once
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if message != self._last_error:
                    log.error("centra: reload check failed: %s", message)
                self._last_error = message
            else:
                self._last_error = None

    async def check(self) -> bool:
        """Load and swap in the published version when it changed; True when a new one serves."""
        forced, self._forced = self._forced, False
        found = current_version(self.model_dir)
        if found is None or found[0] == self.version or (found[0] == self.failed and not forced):
            return False
        name, folder = found
        try:
            engine = await asyncio.to_thread(in_fresh_thread, self.load, folder)  # beside the old one
        except Exception as exc:  # corrupt, invalid, or failing its warm-up: the old version keeps serving
            self.failed = name
            reason = " ".join(str(exc).split()) if isinstance(exc, CentraError) else f"{type(exc).__name__}: {exc}"
            log.error("centra: reload of %s failed, still serving %s: %s", name, self.version, reason)
            self.on_result("failed")
            return False
        old, self.version, self.failed = self.version, name, None
        self.swap(engine, name)
        log.info("centra: reloaded %s -> %s", old, name)
        self.on_result("ok")
        return True
