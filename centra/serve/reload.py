"""Zero-downtime reload: follow the merged model's `current` pointer.

`centra merge` into the served folder is all a user does. The watcher reads the pointer every
`interval` seconds (a readlink and a stat of that version's manifest, which is parsed for its content
id when the file is another one: no file hashed; SIGHUP checks at once). Versions are known by
content: a version rebuilt under the same name (`rm -rf out && centra merge --out out`) has another
content id and is loaded like a new one. A new version is loaded
beside the old one in a worker thread, warmed up, and handed over in one assignment (`swap`). Batches
already formed keep the engine they bound to, so in-flight calls finish on the old version. A version
that fails to load (corrupt, invalid, a manifest that does not check) keeps the old one serving: one log
line, a metric, and no retry until its name or content id changes or SIGHUP asks. A pointer to a version
folder without a manifest (being removed) is skipped quietly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from centra.core.manifest import short_id
from centra.core.versions import MANIFEST, current_version, read_manifest
from centra.errors import CentraError
from centra.io import sha256_file
from centra.serve.memory import release_memory

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


def published_id(folder: Path) -> tuple[str, CentraError | None]:
    """The content id of the version in `folder` (its manifest parsed and checked, no other file read),
    or, when the manifest does not check, a stand-in naming its bytes and the error."""
    try:
        return read_manifest(folder).content_id, None
    except CentraError as exc:
        try:
            return "unreadable:" + sha256_file(Path(folder) / MANIFEST), exc
        except (CentraError, OSError):
            return "unreadable", exc


def described(version: str, content_id: str) -> str:
    """"v000002 (0123456789ab)": a version's name and the first 12 hex digits of its content id."""
    return f"{version} ({short_id(content_id)})" if content_id.startswith("sha256:") else version


class ModelWatcher:
    def __init__(self, model_dir: Path, version: str, load: Callable[[Path], object],
                 swap: Callable[[object, str], None], on_result: Callable[[str], None] | None = None,
                 interval: float = DEFAULT_INTERVAL, content_id: str = ""):
        """`version` and `content_id`: what serves now; `load(folder)` returns an engine (its `content_id`,
        when it has one, is what served afterwards); `swap(engine, version)` puts it in service."""
        self.model_dir = Path(model_dir)
        self.version, self.content_id = version, content_id
        # the manifest file last parsed (folder, inode, mtime, size) and what it gave
        self._stamp: tuple[tuple, tuple[str, CentraError | None]] = ((), ("", None))
        self.load, self.swap, self.on_result = load, swap, on_result or (lambda result: None)
        self.interval = interval
        self.failed: tuple[str, str] | None = None  # (version, content id) that failed: not retried until asked
        self._wake = asyncio.Event()
        self._forced = False
        self._task: asyncio.Task | None = None
        self._last_error: str | None = None
        self._release_due = False

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
            if self._release_due:  # a model was loaded or refused a tick ago: its leftovers are garbage now
                self._release_due = False
                await asyncio.to_thread(release_memory)
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
        if found is None:
            return False
        name, folder = found
        if not (folder / MANIFEST).exists():  # not a published version (a folder being removed)
            return False
        try:
            st = (folder / MANIFEST).stat()
        except OSError:
            return False
        stamp = (str(folder), st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp[0] or forced:  # parsed once per manifest file, not every tick
            self._stamp = (stamp, await asyncio.to_thread(published_id, folder))
        content_id, error = self._stamp[1]
        key = (name, content_id)
        if key == (self.version, self.content_id) or (key == self.failed and not forced):
            return False
        serving = described(self.version, self.content_id)
        engine = None
        if error is None:
            try:
                engine = await asyncio.to_thread(in_fresh_thread, self.load, folder)  # beside the old one
            except Exception as exc:  # corrupt, invalid, or failing its warm-up: the old version keeps serving
                error = exc
            self._release_due = True
        if error is not None:
            self.failed = key
            reason = (" ".join(str(error).split()) if isinstance(error, CentraError)
                      else f"{type(error).__name__}: {error}")
            log.error("centra: reload of %s failed, still serving %s: %s", described(*key), serving, reason)
            self.on_result("failed")
            return False
        # what was loaded, should the folder have been rebuilt again between the manifest read and the load
        loaded = getattr(engine, "content_id", "") or content_id
        self.version, self.content_id, self.failed = name, loaded, None
        self.swap(engine, name)
        log.info("centra: reloaded %s -> %s", serving, described(name, loaded))
        self.on_result("ok")
        return True
