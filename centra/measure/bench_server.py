"""Load benchmark: the gRPC server under concurrent one-text calls against the same engine in process.

`bench_server` starts a CentraServer on a free loopback port in its own event-loop thread (no metrics, no
reload), runs `concurrency` client threads in a process of their own (measure/bench_clients.py: one channel
and one connection each, the raw stub) calling Classify with one text and a task set that varies between
calls, first for a warm-up and then for the measured window; then runs `engine.run` in process over
batches of the server's mean batch size (rows) on the same calls. The clients share the machine's cores
with the server: the figures are those of server and clients on one machine, a lower bound for a server
on its own.

`bench_server_model` loads the model as `centra serve` does and, with `triton`, then drives the same
clients (OIP gRPC) against tritonserver serving the version's python-backend repository. The caller gives
the texts and a progress callback (no CLI, no data files). grpc is imported inside the functions.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from centra.errors import CentraError, FieldError, Name
from centra.measure.memory import rss_mb
from centra.runtime.engine import Engine, Row
from centra.serve.background import BackgroundServer
from centra.serve.record import BatchRecord
from centra.serve.server import ServeOptions

MODES = ("mixed", "all")
PROTOCOLS = ("grpc", "rest", "oip-grpc")  # centra.v1 Classify; POST /v1/classify; OIP ModelInfer
WORKLOAD_CALLS = 1024  # distinct (text, task set) calls, cycled through by every client and in process
Call = tuple[str, tuple[str, ...]]  # one input's text, and the tasks it asks for


@dataclass(frozen=True)
class ServerBenchOptions:
    concurrency: int = 16
    seconds: float = 10.0
    warmup: float = 2.0
    max_batch: int = 32
    max_wait_ms: float = 0.0
    tasks_per_call: str = "mixed"  # mixed: random non-empty subsets of the single-text tasks; all: every one
    seed: int = 0
    call_timeout_s: float = 30.0
    flood: int = 0  # after the window: 4 MB calls, this many at once every second, beside one valid client
    protocol: str = "grpc"  # the clients' door (PROTOCOLS); the flood is always centra.v1

    def check(self) -> None:
        """One-line refusals, before anything is loaded."""
        if self.concurrency < 1:
            raise FieldError(Name("concurrency"), f" must be >= 1, not {self.concurrency}")
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise FieldError(Name("seconds"), f" must be a finite number > 0, not {self.seconds}")
        if not (self.warmup >= 0 and math.isfinite(self.warmup)):
            raise FieldError(Name("warmup"), f" must be a finite number >= 0, not {self.warmup}")
        if self.flood < 0:
            raise FieldError(Name("flood"), f" must be >= 0, not {self.flood}")
        if self.protocol not in PROTOCOLS:
            raise FieldError(Name("protocol"), f" must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        if self.tasks_per_call not in MODES:
            raise FieldError(Name("tasks_per_call"), f" must be one of {', '.join(MODES)}, not {self.tasks_per_call!r}")
        self.serve_options.check()

    @property
    def serve_options(self) -> ServeOptions:
        return ServeOptions(port=0, max_batch=self.max_batch, max_wait_ms=self.max_wait_ms,
                            http_port=0 if self.protocol == "rest" else None)


def single_tasks(engine: Engine) -> list[str]:
    names = [spec.name for spec in engine.specs.values() if spec.input == "single"]
    if not names:
        raise CentraError("the model has no single-text task: bench-server sends one text per call")
    return names


def workload(texts: list[str], tasks: list[str], mode: str, seed: int = 0, size: int = WORKLOAD_CALLS) -> list[Call]:
    """`size` calls (seeded): texts in a shuffled cycle, each with its task set (mixed: a random non-empty
    subset of `tasks` in their order; all: every one)."""
    if not texts or not tasks:
        raise CentraError("bench-server needs at least one text and one task")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    calls = []
    for i in range(size):
        chosen = tuple(tasks)
        if mode == "mixed":
            while True:
                chosen = tuple(t for t in tasks if rng.random() < 0.5)
                if chosen:
                    break
        calls.append((texts[order[i % len(order)]], chosen))
    return calls


@dataclass
class Window:
    """What the server did in the measured window."""

    seconds: float
    calls: int = 0  # answered within the window
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds, calls started within the window
    batches: int = 0
    rows: int = 0
    batch_calls: int = 0
    compute_s: float = 0.0  # engine time of the batches formed within the window
    queue_wait_s: float = 0.0  # summed over calls


def drive(running: BackgroundServer, calls: list[Call], options: ServerBenchOptions) -> Window:
    """`concurrency` client threads calling Classify back to back, in a process of their own
    (measure/bench_clients.py): a warm-up, then the measured window."""
    window = Window(options.seconds)
    batcher = running.server.batcher
    clock: dict[str, float] = {}

    def on_batch(record: BatchRecord) -> None:  # in the server's loop, right after the batch ran
        if clock and clock["start"] <= time.time() <= clock["end"]:
            window.compute_s += record.compute_s
            window.queue_wait_s += sum(record.waits)

    batcher.listeners.append(on_batch)
    try:
        result, counts, _rss = clients_process(running, calls, options.concurrency, options, clock)
    finally:
        batcher.listeners.remove(on_batch)
    window.calls, window.errors = result["calls"], result["errors"]
    window.first_error, window.latencies = result["first_error"], result["latencies"]
    window.batches, window.batch_calls, window.rows = counts
    return window


def clients_process(running: BackgroundServer | None, calls: list[Call], concurrency: int, options: ServerBenchOptions,
                    clock: dict[str, float], flood_senders: int = 0,
                    target: str = "") -> tuple[dict, tuple[int, ...], list[float]]:
    """Run measure/bench_clients.py against the server (or, with running None, an external server at
    `target`): warm-up, then the window (`clock` gets its wall-clock start and end). Returns the clients'
    result, the batcher's (batches, calls, rows) in the window, and this process's RSS sampled through it (MB)."""
    import json
    import subprocess
    import sys

    protocol = "grpc" if flood_senders else options.protocol
    target = target or running.target
    if protocol == "rest" and running is not None:
        target = f"127.0.0.1:{running.server.http.port}"
    job = {"target": target, "protocol": protocol, "concurrency": concurrency, "timeout": options.call_timeout_s,
           "calls": [[text, list(tasks)] for text, tasks in calls],
           "flood_senders": flood_senders, "flood_inputs": FLOOD_INPUTS}
    proc = subprocess.Popen([sys.executable, "-m", "centra.measure.bench_clients"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        if not proc.stdout.readline().strip():
            raise CentraError("bench-server: the client process did not start (see the log)")
        clock["start"] = time.time() + options.warmup
        clock["end"] = clock["start"] + options.seconds
        proc.stdin.write(json.dumps(clock) + "\n")
        proc.stdin.flush()
        time.sleep(max(0.0, clock["start"] - time.time()))
        before, rss = _counts(running), [rss_mb()]
        while time.time() < clock["end"]:
            time.sleep(min(0.05, max(0.0, clock["end"] - time.time())))
            rss.append(rss_mb())
        after = _counts(running)
        out = proc.stdout.readline()
        if not out.strip():
            raise CentraError("bench-server: the client process gave no figures (see the log)")
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(options.call_timeout_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return json.loads(out), tuple(a - b for a, b in zip(after, before)), rss


def _counts(running: BackgroundServer | None) -> tuple[int, int, int]:
    """The batcher's counters, read in its own loop (one consistent snapshot); zeros for an external server."""
    if running is None:
        return 0, 0, 0
    async def read() -> tuple[int, int, int]:
        stats = running.server.batcher.stats
        return stats.batches, stats.calls, stats.rows
    return asyncio.run_coroutine_threadsafe(read(), running.loop).result(30)


def in_process(engine: Engine, calls: list[Call], batch_rows: int, seconds: float, warmup: float) -> float:
    """Inputs per second of `engine.run` over batches of `batch_rows` of the calls, after a warm-up."""
    rows = [Row(text, None, tasks) for text, tasks in calls]
    batches = [[rows[(start + j) % len(rows)] for j in range(batch_rows)] for start in range(0, len(rows), batch_rows)]
    done, i = 0, 0
    for phase in (warmup, seconds):
        done, started = 0, time.perf_counter()
        end = started + phase
        while phase and time.perf_counter() < end:
            engine.run(batches[i % len(batches)])
            done, i = done + batch_rows, i + 1
        elapsed = time.perf_counter() - started
    return done / elapsed


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def bench_server(engine: Engine, texts: list[str], options: ServerBenchOptions,
                 progress: Callable[[str], None] = lambda line: None) -> dict:
    """Server, then in process; the figures of `centra bench-server`'s JSON line (and a few more)."""
    options.check()
    tasks = single_tasks(engine)
    calls = workload(texts, tasks, options.tasks_per_call, options.seed)
    with BackgroundServer(engine, options.serve_options) as running:
        progress(f"server on {running.target}: {options.concurrency} clients, {options.warmup:g} s warm-up, "
                 f"then {options.seconds:g} s measured")
        window = drive(running, calls, options)
        flooded = {}
        if options.flood:
            progress(f"flood: one client alone for {options.seconds:g} s, then beside {options.flood} 4 MB calls "
                     f"at once every second for {options.seconds:g} s")
            flooded = flood(running, calls, options.flood, options)
    if not window.calls:
        raise CentraError(f"no call was answered in {options.seconds:g} s"
                          + (f" ({window.errors} failed; first: {window.first_error})" if window.errors else ""))
    rows_per_batch = window.rows / window.batches if window.batches else float("nan")
    batch_rows = max(1, round(rows_per_batch)) if window.batches else 1
    progress(f"in process: engine.run over batches of {batch_rows} rows, {options.warmup:g} s warm-up, "
             f"then {options.seconds:g} s measured")
    local = in_process(engine, calls, batch_rows, options.seconds, options.warmup)
    inputs_per_s = window.calls / window.seconds  # one text per call
    return {"concurrency": options.concurrency, "seconds": options.seconds, "protocol": options.protocol,
            "calls_per_s": round(window.calls / window.seconds, 2), "inputs_per_s": round(inputs_per_s, 2),
            "p50_ms": round(percentile(window.latencies, 50) * 1000, 3),
            "p95_ms": round(percentile(window.latencies, 95) * 1000, 3),
            "p99_ms": round(percentile(window.latencies, 99) * 1000, 3),
            "mean_batch_rows": round(rows_per_batch, 3),
            "mean_batch_calls": round(window.batch_calls / window.batches, 3) if window.batches else float("nan"),
            "inprocess_batch_rows": batch_rows, "inprocess_inputs_per_s": round(local, 2),
            "ratio": round(inputs_per_s / local, 4), "model_version": engine.version, "tasks": tasks,
            "tasks_per_call": options.tasks_per_call, "max_batch": options.max_batch,
            "max_wait_ms": options.max_wait_ms, "errors": window.errors,
            "engine_busy": round(window.compute_s / window.seconds, 4),
            "mean_queue_wait_ms": round(window.queue_wait_s / max(window.batch_calls, 1) * 1000, 3), **flooded}


def bench_target(target: str, engine: Engine, texts: list[str], options: ServerBenchOptions) -> dict:
    """The same clients and workload against an external server speaking options.protocol at `target`
    (a Triton server serving the python-backend repository: "oip-grpc"): calls/s, inputs/s, latency."""
    options.check()
    calls = workload(texts, single_tasks(engine), options.tasks_per_call, options.seed)
    clock: dict[str, float] = {}
    result, _, _ = clients_process(None, calls, options.concurrency, options, clock, target=target)
    latencies = result["latencies"]
    return {"calls_per_s": round(result["calls"] / options.seconds, 2),
            "inputs_per_s": round(result["calls"] / options.seconds, 2), "errors": result["errors"],
            "first_error": result["first_error"], "p50_ms": round(percentile(latencies, 50) * 1000, 3),
            "p99_ms": round(percentile(latencies, 99) * 1000, 3)}


FLOOD_INPUTS = 2_000_000  # empty inputs: a 4,000,000-byte ClassifyRequest


def flood(running: BackgroundServer, calls: list[Call], senders: int, options: ServerBenchOptions) -> dict:
    """Oversized calls against the running server while one client keeps sending valid one-text calls
    (both from the client process): a window of the valid calls alone, then one in which `senders` 4 MB
    ClassifyRequests (2,000,000 empty inputs each) arrive at once at the start of every second. Figures:
    how each flood call was answered and how fast, the valid calls' latency in both windows, and the
    server process's RSS."""
    alone, _, rss_alone = clients_process(running, calls, 1, options, {})
    beside, _, rss_beside = clients_process(running, calls, 1, options, {}, flood_senders=senders)
    refusals = beside["flood_latencies"]
    return {"flood_calls": len(refusals), "flood_codes": beside["flood_codes"], "flood_senders": senders,
            "flood_refusal_p50_ms": round(percentile(refusals, 50) * 1000, 2),
            "flood_refusal_max_ms": round(max(refusals, default=float("nan")) * 1000, 2),
            "probe_p50_ms_before": round(percentile(alone["latencies"], 50) * 1000, 3),
            "probe_p50_ms_during": round(percentile(beside["latencies"], 50) * 1000, 3),
            "probe_p99_ms_during": round(percentile(beside["latencies"], 99) * 1000, 3),
            "rss_mb_before": round(rss_alone[-1], 1), "rss_mb_peak": round(max(rss_beside), 1),
            "rss_mb_after": round(rss_mb(), 1)}


def bench_server_model(folder: Path, texts: list[str], options: ServerBenchOptions, triton: bool = False,
                       progress: Callable[[str], None] = lambda line: None, source: str = "") -> dict:
    """`centra bench-server`'s figures: the model loaded as `centra serve` loads it, `bench_server` on it,
    then (`triton`) the same clients against tritonserver (`triton_figures`)."""
    from centra.serve.app import load_engine
    from centra.serve.reload import in_fresh_thread

    options.check()
    progress(f"loading {folder} (max batch {options.max_batch}); {source}")
    engine = in_fresh_thread(load_engine, folder, options.max_batch)  # as `centra serve` does
    figures = bench_server(engine, texts, options, progress)
    if triton:
        figures.update(triton_figures(folder, engine, texts, options, progress))
    return figures


def triton_figures(folder: Path, engine: Engine, texts: list[str], options: ServerBenchOptions,
                   progress: Callable[[str], None]) -> dict:
    """The same clients (OIP gRPC) and workload against a Triton server (nvidia-pytriton's tritonserver)
    serving the version's python-backend repository (its engine as the version's manifest names it)."""
    import tempfile

    from centra.export.triton_python import PythonRepoOptions, export_triton_python
    from centra.measure.tritonserver import TritonServer

    with tempfile.TemporaryDirectory(prefix="centra-bench-triton-") as tmp:
        progress("triton: exporting the python-backend repository, starting tritonserver")
        repo_options = PythonRepoOptions(max_batch=options.max_batch, queue_delay_us=int(options.max_wait_ms * 1000))
        export_triton_python(folder, Path(tmp) / "repo", repo_options)
        with TritonServer(Path(tmp) / "repo", Path(tmp) / "work") as server:
            progress(f"triton on {server.grpc_url}: {options.concurrency} OIP gRPC clients, {options.warmup:g} s "
                     f"warm-up, then {options.seconds:g} s measured")
            before = triton_counts(server.http_url)
            got = bench_target(server.grpc_url, engine, texts, replace(options, protocol="oip-grpc"))
            after = triton_counts(server.http_url)
    requests, executions = (a - b for a, b in zip(after, before))  # warm-up included: Triton counts since start
    got["mean_batch_calls"] = round(requests / executions, 3) if executions else float("nan")
    return {f"triton_{key}": value for key, value in got.items()}


def triton_counts(http_url: str) -> tuple[int, int]:
    """Triton's statistics of the model centra: (requests, executions) so far."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{http_url}/v2/models/centra/stats", timeout=10) as reply:
        stats = json.loads(reply.read())["model_stats"]
    return (sum(int(s.get("inference_count", 0)) for s in stats), sum(int(s.get("execution_count", 0)) for s in stats))
