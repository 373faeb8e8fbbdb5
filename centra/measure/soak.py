"""A bounded soak of `centra serve`: concurrent clients, bad input, cancellations, deadlines, re-merges and
SIGHUPs against one server on loopback for N minutes; then a count of what happened.

`run_soak` copies the merged model into a scratch folder it owns (the model given is never touched), serves
that copy with `centra serve` in a child process (a token required, small limits, short batching wait),
and runs for `minutes`:
- `clients` threads sending calls of every class (soak_calls.EXPECTED: valid calls, each bad-input class,
  cancellations, 1 ms deadlines), each through a door picked at random: centra.v1 gRPC, REST, OIP over
  HTTP or OIP over gRPC, in that door's wire form (soak_doors), each status code checked against what its
  class may get;
- a thread holding slow and idle HTTP connections open (half-sent heads, bodies at a byte a second),
  opening again what the server closes (soak_slow);
- a checker thread comparing every OK answer with in-process `Engine.predict` of the version that answered
  it, found by the response's `model_id` (its content id) or, without one (OIP), its version name
  (soak_check: a name published with more than one content is ambiguous, never counted wrong);
- a control thread re-merging into the served folder, publishing a corrupt version, rebuilding the folder so
  that a version name comes back with other content, and sending SIGHUP; after each, the server must answer
  (soak_control);
- the server's RSS sampled every RSS_EVERY_S: after a warm-up, at the peak and at the end.
The re-merges write ONNX graphs when ONNX Runtime serves the versions (`merge_extend`, export's own
extender). Then the server gets SIGTERM and must exit 0 within its grace, and the scratch folder is removed. The
result is one dict (the command prints it as its last line), with each door's calls, codes per class,
unexpected codes and checked, wrong and ambiguous answers; `ok` is no wrong answer and no unexpected code
on any door.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from centra.core.merge import MODEL_KIND
from centra.core.versions import CURRENT, VERSION_RE, VERSIONS, model_folder, read_manifest
from centra.errors import CentraError, FieldError, Name
from centra.io import write_json
from centra.measure.soak_calls import EXPECTED, Tally, Workload
from centra.measure.soak_check import Checker, References
from centra.measure.soak_control import ACTIONS, Control, Served, ServerProcess
from centra.measure.soak_doors import DOORS, client_loop
from centra.measure.soak_slow import SlowConnections
from centra.publish import ARTIFACT_FILE

RSS_EVERY_S = 0.5
DRAIN_S, GRACE_S = 0.5, 5.0  # the server's; on SIGTERM it must exit within their sum (plus some slack)
ENGINES = ("torch", "onnx")


@dataclass(frozen=True)
class SoakOptions:
    minutes: float
    clients: int = 8
    seed: int = 0
    engine: str | None = None  # the server's --engine and the references'; None: each version's manifest's
    action_every_s: float = 3.0  # at most; a short soak acts more often, so that it does every action once
    max_inputs_per_call: int = 64  # the server's limits, small so that over-limit calls are cheap to send
    max_call_bytes: int = 65536
    max_wait_ms: float = 2.0
    start_timeout_s: float = 300.0
    scratch: Path | None = None  # where the scratch folder goes (default: the system's temp folder)

    def check(self) -> None:
        if not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise FieldError(Name("minutes"), f" must be a finite number > 0, not {self.minutes}")
        if self.clients < 1:
            raise FieldError(Name("clients"), f" must be >= 1, not {self.clients}")
        if self.engine is not None and self.engine not in ENGINES:
            raise FieldError(Name("engine"), f" must be one of {', '.join(ENGINES)}, not {self.engine!r}")

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def every(self) -> float:
        return min(self.action_every_s, self.seconds / (len(ACTIONS) + 2))

    def server_args(self, work: Path, token_file: Path) -> list[str]:
        return ["--model", str(work), "--no-metrics", "--max-wait-ms", f"{self.max_wait_ms:g}",
                "--max-inputs-per-call", str(self.max_inputs_per_call), "--max-call-bytes", str(self.max_call_bytes),
                "--drain-s", f"{DRAIN_S:g}", "--grace-s", f"{GRACE_S:g}", "--token-file", str(token_file),
                *(["--engine", self.engine] if self.engine else [])]


def prepare(model: Path, scratch: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    """The served copy (a merged-model folder holding a copy of the model's current version), a pool of
    its task folders to merge from, and its tasks as (name, input)."""
    source = model_folder(model)
    manifest = read_manifest(source)
    if not (source / "tasks").is_dir():
        raise CentraError(f"{source}: no tasks/ folder to re-merge from")
    work = scratch / "served"
    name = source.name if VERSION_RE.match(source.name) else "v000001"
    (work / VERSIONS).mkdir(parents=True)
    write_json(work / ARTIFACT_FILE, {"kind": MODEL_KIND, "written_by": "centra"})  # what publishing writes
    shutil.copytree(source, work / VERSIONS / name)
    os.symlink(f"{VERSIONS}/{name}", work / CURRENT)
    shutil.copytree(source / "tasks", scratch / "tasks")
    return work, scratch / "tasks", [(t.name, t.input) for t in manifest.tasks]


def merge_extend(model: Path, engine: str | None) -> Callable | None:
    """write_merged's `extend` for the soak's re-merges: ONNX graphs when the versions are served by ONNX
    Runtime (by --engine onnx, or by the model's manifest), else none."""
    from centra.export.engines import extender

    info = read_manifest(model_folder(model)).engine
    name = engine or (info.name if info is not None else "torch")
    if name == "torch":
        return None
    if name != "onnx":
        raise CentraError(f"soak: the model is served by {name!r}; soak runs --engine torch or onnx")
    return extender("onnx", info.precision if info is not None else None, progress=False)


def run_soak(model: Path, options: SoakOptions, progress: Callable[[str], None] = lambda line: None) -> dict:
    """The soak; its re-merges write what the served engine needs (`merge_extend`)."""
    options.check()
    extend = merge_extend(Path(model), options.engine)
    source = model_folder(Path(model))  # one line before anything is copied
    scratch = Path(tempfile.mkdtemp(prefix="centra-soak-", dir=options.scratch))
    server = None
    try:
        work, pool, tasks = prepare(Path(model), scratch)
        references = References(scratch / "references", options.engine)
        references.add(model_folder(work))
        token, token_file = secrets.token_hex(16), scratch / "token"
        token_file.write_text(token + "\n", encoding="ascii")
        token_file.chmod(0o600)
        server = ServerProcess(options.server_args(work, token_file), scratch / "server.log")
        served = Served(work, pool, tasks, references, server, token=token)
        progress(f"starting centra serve on a copy of {source}")
        served.target = server.start(options.start_timeout_s)
        served.http_target = server.http_target
        progress(f"server {served.target}, HTTP {served.http_target} (pid {server.pid}): {options.clients} clients "
                 f"for {options.minutes:g} min, an action every {options.every:.1f} s "
                 f"({', '.join(dict.fromkeys(ACTIONS))})")
        return drive(Path(model), options, served, extend, progress)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class Parts:
    """What runs during a soak, besides the server."""

    tally: Tally
    checker: Checker
    control: Control
    workload: Workload
    slow: SlowConnections


def workload_of(served: Served, removable: set[str], options: SoakOptions) -> Workload:
    def of_kind(pair: bool) -> list[str]:  # the tasks never removed first: the bad-input calls name those
        return sorted((n for n, kind in served.tasks if (kind == "pair") == pair), key=lambda n: n in removable)

    return Workload(of_kind(False), of_kind(True), removable, options.max_inputs_per_call, options.max_call_bytes)


def drive(model: Path, options: SoakOptions, served: Served, extend: Callable | None,
          progress: Callable[[str], None]) -> dict:
    """Clients, checker and control for `options.minutes`, then everything stopped in order; the figures."""
    tally, stop = Tally(), threading.Event()
    control = Control(served, tally, extend, options.every, options.seed)
    parts = Parts(tally, Checker(served.references), control, workload_of(served, set(control.removable), options),
                  SlowConnections(served.http_target, served.token))
    targets = (served.target, served.http_target)
    threads = [threading.Thread(target=client_loop, name=f"centra-soak-client-{i}", daemon=True,
                                args=(i, targets, served.token, parts.workload, options.seed, tally,
                                      parts.checker.put, stop)) for i in range(options.clients)]
    threads.append(threading.Thread(target=control.run, args=(stop,), name="centra-soak-control", daemon=True))
    threads.append(threading.Thread(target=parts.slow.run, args=(stop,), name="centra-soak-slow", daemon=True))
    parts.checker.start()
    started = time.monotonic()
    for thread in threads:
        thread.start()
    samples = watch(served.server, options, started, parts, progress)
    stop.set()
    progress("stopping: clients, control, then the answers still to check")
    for thread in threads:
        thread.join(300)
    if not parts.checker.finish(300):
        tally.unexpected(f"{parts.checker.queue.qsize()} answers were left unchecked")
    limit = DRAIN_S + GRACE_S + 15
    code = served.server.stop(limit)
    if code != 0:
        tally.unexpected(f"the server exited {code} on SIGTERM" if code is not None else
                         f"the server did not exit within {limit:g} s of SIGTERM (killed)")
    return report(model, options, time.monotonic() - started, parts, served.server.reloads(), samples, code)


def watch(server: ServerProcess, options: SoakOptions, started: float, parts: Parts,
          progress: Callable[[str], None]) -> list[tuple[float, float]]:
    """Sample RSS until the time is up (or the server is gone), printing a progress line now and then."""
    samples: list[tuple[float, float]] = []
    every = max(5.0, min(30.0, options.seconds / 10))
    shown, tally = started, parts.tally
    while (now := time.monotonic()) < started + options.seconds:
        if not server.alive():
            tally.unexpected(f"the server exited ({server.proc.returncode}) during the soak: {server.last_log()}")
            break
        mb = server.rss_mb()
        if mb is not None:
            samples.append((now - started, mb))
        if now - shown >= every:
            shown, out = now, tally.outcomes
            progress(f"{now - started:.0f}/{options.seconds:.0f} s: {tally.calls} calls ({out['busy']} busy, "
                     f"{out['stale']} stale), {parts.checker.checked} checked, {parts.checker.wrong} wrong, "
                     f"{out['unexpected']} unexpected; RSS {mb or 0:.0f} MB; actions {parts.control.counts}")
        time.sleep(RSS_EVERY_S)
    return samples


def rss_figures(samples: list[tuple[float, float]], seconds: float) -> dict:
    """MB at the first sample, after the warm-up (a fifth of the run, at most 30 s), at the peak and at the
    end; the drift, end vs after the warm-up, in %. A reload holds two models for a while, so one sample
    may catch one in progress: the floors (the least RSS in the first and in the last window of a fifth
    of the run, at most 60 s, after the warm-up) and their drift say what stays."""
    if not samples:
        return {"first": None, "start": None, "peak": None, "end": None, "drift_pct": None, "warmup_s": None,
                "floor_first": None, "floor_last": None, "floor_drift_pct": None}
    warmup, window = min(30.0, seconds / 5), min(60.0, seconds / 5)
    start = next((mb for t, mb in samples if t >= warmup), samples[-1][1])
    end, last = samples[-1][1], samples[-1][0]
    first_floor = min((mb for t, mb in samples if warmup <= t <= warmup + window), default=start)
    last_floor = min((mb for t, mb in samples if t >= last - window), default=end)
    return {"first": round(samples[0][1], 1), "start": round(start, 1), "peak": round(max(mb for _, mb in samples), 1),
            "end": round(end, 1), "drift_pct": round((end - start) / start * 100, 2), "warmup_s": round(warmup, 1),
            "floor_first": round(first_floor, 1), "floor_last": round(last_floor, 1),
            "floor_drift_pct": round((last_floor - first_floor) / first_floor * 100, 2)}


def report(model: Path, options: SoakOptions, elapsed: float, parts: Parts, reloads: dict,
           samples: list[tuple[float, float]], code: int | None) -> dict:
    tally, checker, control = parts.tally, parts.checker, parts.control
    per_class = tally.by_class()
    classes = {name: {"calls": sum(per_class.get(name, {}).values()), "codes": per_class.get(name, {})}
               for name in EXPECTED if name in parts.workload.classes or name in per_class}
    codes: dict[str, int] = {}
    for counts in per_class.values():
        for name, count in counts.items():
            codes[name] = codes.get(name, 0) + count
    rss, out = rss_figures(samples, options.seconds), tally.outcomes
    return {"model": str(model), "minutes": options.minutes, "seconds": round(elapsed, 1), "clients": options.clients,
            "seed": options.seed, "engine": options.engine or "manifest", "calls": tally.calls,
            "classes": classes, "codes": dict(sorted(codes.items())), "doors": door_figures(parts),
            "checked": checker.checked, "wrong_answers": checker.wrong, "ambiguous_unchecked": checker.ambiguous,
            "wrong_examples": checker.examples,
            "unexpected_codes": out["unexpected"], "unexpected_examples": tally.examples, "busy": out["busy"],
            "stale_not_found": out["stale"], "slow_connections": parts.slow.figures(),
            "versions_answered": checker.versions, "reloads": reloads,
            "actions": control.counts, "corrupt_served": control.corrupt_served,
            "rss_mb": {k: rss[k] for k in ("first", "start", "peak", "end", "floor_first", "floor_last")},
            "rss_drift_pct": rss["drift_pct"], "rss_floor_drift_pct": rss["floor_drift_pct"],
            "rss_warmup_s": rss["warmup_s"], "server_exit_code": code,
            "ok": checker.wrong == 0 and out["unexpected"] == 0}


def door_figures(parts: Parts) -> dict:
    """Per door: calls, codes per class, outcomes (busy, stale, unexpected), answers checked, wrong, ambiguous."""
    tally, checker = parts.tally, parts.checker
    out = {}
    with tally.lock:
        for door in DOORS:
            classes = {name: dict(codes) for name, codes in tally.codes.get(door, {}).items()}
            outcomes = tally.door_outcomes.get(door, {})
            answers = checker.doors.get(door, {})
            out[door] = {"calls": sum(sum(c.values()) for c in classes.values()), "classes": classes,
                         "busy": outcomes.get("busy", 0), "stale_not_found": outcomes.get("stale", 0),
                         "unexpected_codes": outcomes.get("unexpected", 0),
                         **{k: answers.get(k, 0) for k in ("checked", "wrong", "ambiguous")}}
    return out
