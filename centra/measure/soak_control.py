"""The soak's control thread and its server: re-merges into the served folder (good, corrupt, same-name
rebuild) and SIGHUPs, every few seconds, each followed by a check that the server still answers.

`ServerProcess` runs `centra serve` on the soak's folder as a child process (its own PID: SIGHUP, RSS).
`Control` publishes with the library's own merge (`plan_merge` + `write_merged`) from copies of the
version's task folders, and keeps a reference copy of every version it publishes (`References.add`) right
after publishing, before the folder can prune it. A corrupt publish flips a byte of one weight file (a
new file over it: earlier versions share unchanged files) the moment `write_merged` returns (a server
that read the pointer in that moment loaded good bytes, and `corrupt_served` counts it), so the
server's reload must refuse the version by its hashes.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from centra.core.merge import MODEL_KIND, plan_merge, write_merged
from centra.errors import CentraError
from centra.measure.memory import process_memory
from centra.measure.soak_calls import Tally
from centra.measure.soak_check import References
from centra.publish import remove_artifact

ACTIONS = ("merge", "sighup", "corrupt", "rebuild", "rebuild")  # twice: the second reuses the served name
WATCH_S = 1.0  # the server's watcher reads the pointer this often (centra.serve.reload.DEFAULT_INTERVAL)
READY = re.compile(r"^serving .* on (\S+)$")
READY_HTTP = re.compile(r"^REST and Open Inference Protocol at https?://(\S+) ")


class ServerProcess:
    """`centra serve` in a child process on free loopback ports (gRPC, HTTP); its log goes to a file."""

    def __init__(self, args: list[str], log_path: Path):
        self.cmd = [sys.executable, "-m", "centra.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.target = self.http_target = ""
        self._ready = threading.Event()

    def start(self, timeout: float) -> str:
        """Start it and wait for its "serving ... on HOST:PORT" line and its HTTP port's line after it;
        return the gRPC HOST:PORT (the HTTP one is `http_target`)."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                         env=env, text=True)
        threading.Thread(target=self._read, name="centra-soak-server-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                raise CentraError(f"soak: the server exited ({self.proc.returncode}) before serving: {self.last_log()}")
            if time.monotonic() > deadline:
                raise CentraError(f"soak: the server did not serve within {timeout:g} s: {self.last_log()}")
        return self.target

    def _read(self) -> None:
        for line in self.proc.stdout:
            found, http = READY.match(line.strip()), READY_HTTP.match(line.strip())
            if found and not self.target:
                self.target = found.group(1)
            if http and not self.http_target:
                self.http_target = http.group(1)
            if self.target and self.http_target:
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float | None:
        """Resident memory (VmRSS), MB; None once it has exited."""
        found = process_memory(self.pid)
        return found[0] if found else None

    def hup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then its exit code; None when it had to be killed after `timeout` seconds."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def last_log(self) -> str:
        lines = [line for line in self.log().splitlines() if line.strip()]
        return lines[-1] if lines else "(nothing logged)"

    def reloads(self) -> dict[str, int]:
        """Reloads the server logged: swapped in, and refused (it kept serving the one it had)."""
        text = self.log()
        return {"ok": text.count("centra: reloaded "), "failed": text.count("failed, still serving")}


@dataclass
class Served:
    """The soak's server and what it serves: the folder it follows, the task folders to merge from, the
    tasks as (name, input), the reference copies, and the ways in (gRPC and HTTP HOST:PORT, token)."""

    work: Path
    pool: Path
    tasks: list[tuple[str, str]]
    references: References
    server: ServerProcess
    target: str = ""
    token: str = ""
    http_target: str = ""
    _stub: object = None

    def list_tasks(self) -> tuple[str, str]:
        """ListTasks on a channel of its own: the served (version, model_id)."""
        import grpc

        from centra.serve.v1 import centra_pb2 as pb
        from centra.serve.v1 import centra_pb2_grpc

        if self._stub is None:
            self._stub = centra_pb2_grpc.ClassifierStub(grpc.insecure_channel(self.target))
        reply = self._stub.ListTasks(pb.ListTasksRequest(), timeout=10,
                                     metadata=(("authorization", f"Bearer {self.token}"),))
        return reply.model_version, getattr(reply, "model_id", "")


class Control:
    """Every `every` seconds one action of ACTIONS (in turn), then a ListTasks that must answer."""

    def __init__(self, served: Served, tally: Tally, extend: Callable | None, every: float, seed: int,
                 keep_versions: int = 3):
        self.served, self.server, self.references = served, served.server, served.references
        self.tally, self.extend, self.every, self.keep_versions = tally, extend, every, keep_versions
        self.rng = random.Random(seed)
        self.names = [name for name, _ in served.tasks]
        keep = {next((n for n, kind in served.tasks if kind == k), None) for k in ("single", "pair")}
        self.removable = [n for n in self.names if n not in keep]  # one task of each input kind stays
        self.last: tuple[str, ...] = tuple(self.names)
        self.counts = {action: 0 for action in dict.fromkeys(ACTIONS)}
        self.corrupt_served = 0  # loaded in the moment between publish and corruption (good bytes): allowed
        self._picks = itertools.count()

    def run(self, stop: threading.Event) -> None:
        for turn in itertools.count():
            if stop.wait(self.every):
                return
            action = ACTIONS[turn % len(ACTIONS)]
            try:
                getattr(self, action)()
            except Exception as exc:  # a step of the soak itself failed: counted, the soak goes on
                self.tally.unexpected(f"control {action}: {type(exc).__name__}: {' '.join(str(exc).split())}")
            self.counts[action] += 1
            self.answers(f"after {action}")

    def answers(self, when: str) -> tuple[str, str] | None:
        """The served (version, content id), or None and an unexpected event."""
        try:
            return self.served.list_tasks()
        except Exception as exc:  # grpc.RpcError, or a fault of the soak's own
            why = f"{exc.code().name}: {exc.details()}" if hasattr(exc, "details") else f"{type(exc).__name__}: {exc}"
            self.tally.unexpected(f"{when}: ListTasks failed ({why})")
            return None

    def subset(self, differ: bool = False) -> tuple[str, ...]:
        """Every task (half the time), or every task but one removable one; with `differ`, not the set
        published last."""
        every = tuple(self.names)
        options = [every] + [tuple(n for n in self.names if n != gone) for gone in self.removable]
        if differ and len(options) > 1:
            return self.rng.choice([o for o in options if o != self.last])
        return every if self.rng.random() < 0.5 else self.rng.choice(options)

    def publish(self, names: tuple[str, ...], corrupt: str | None = None) -> tuple[str, str]:
        """Merge these tasks into the served folder and copy the version aside; (version, content id).
        `corrupt`: a file of the version (relative path) to flip a byte of the moment it is published
        (its reference copy gets the published bytes back)."""
        pool = self.served.pool
        pick = pool.parent / "picks" / f"{next(self._picks):05d}"
        pick.mkdir(parents=True)
        for name in names:
            (pick / name).symlink_to(pool / name, target_is_directory=True)
        work = self.served.work
        manifest = write_merged(plan_merge([pick]), work, keep_versions=self.keep_versions, extend=self.extend)
        folder = work / "versions" / manifest.version
        flipped = flip_byte(folder / corrupt) if corrupt else None  # within moments of the pointer moving
        version, content, copy = self.references.add(folder)
        if flipped is not None:
            restore_byte(copy / corrupt, *flipped)
        self.last = names
        return version, content

    def merge(self) -> None:
        self.publish(self.subset())

    def sighup(self) -> None:
        self.server.hup()

    def corrupt(self) -> None:
        """Publish with a byte of one weight file flipped, let the server try it (and SIGHUP it to try
        again), check that it answers and from another version, then publish a good one."""
        names = self.subset()
        target = self.rng.choice(["trunk.safetensors", *(f"tasks/{n}/head.safetensors" for n in names)])
        published = self.publish(names, corrupt=target)
        time.sleep(WATCH_S + 0.5)
        self.server.hup()
        time.sleep(0.5)
        if self.answers("after a corrupt publish") == published:
            self.corrupt_served += 1
        self.publish(self.subset())

    def rebuild(self) -> None:
        """Delete the served folder and merge again: v000001 again, with other tasks than the last publish."""
        remove_artifact(self.served.work, MODEL_KIND)
        self.publish(self.subset(differ=True))


def flip_byte(path: Path) -> tuple[int, int]:
    """Invert the middle byte of a file, as a new file renamed over it: a version shares unchanged files
    with the versions before it (hard links), and they must stay as they were; (offset, the byte it had)."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2
    old = data[offset]
    data[offset] = old ^ 0xFF
    staged = path.with_name(f".{path.name}.flipped")
    staged.write_bytes(bytes(data))
    os.replace(staged, path)
    return offset, old


def restore_byte(path: Path, offset: int, value: int) -> None:
    """Put a byte back in a reference copy's file (a hard link to the flipped one): as a new file renamed
    over the link, so the served folder's file stays flipped."""
    data = bytearray(path.read_bytes())
    data[offset] = value
    staged = path.with_name(f".{path.name}.restored")
    staged.write_bytes(bytes(data))
    os.replace(staged, path)
