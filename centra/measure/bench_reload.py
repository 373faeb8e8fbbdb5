"""Reload at scale (`centra bench-scale`'s last measurement): a `centra serve` process on a merged model, then
a new version with one more task published into it: the seconds from the merge's start until the new task
answers a call, and the server's RSS before, at its peak and after (old + new is the bound: the new
version loads beside the old one, which is released when its last batch is done)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from centra.errors import CentraError
from centra.measure.memory import process_memory, reset_peak

START_TIMEOUT = 300.0  # seconds for the server to load the model, and for the new task to answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_reload(out: Path, add_task: Callable[[], str], merge: list[str],
                   progress: Callable[[str], None]) -> dict:
    """Serve OUT, then `add_task()` (the new task's name) and run `python merge...` (a merge into OUT)."""
    import grpc

    from centra.serve.v1 import centra_pb2 as pb
    from centra.serve.v1 import centra_pb2_grpc

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "centra.cli", "serve", "--model", str(out), "--port", str(port),
                               "--metrics-port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = centra_pb2_grpc.ClassifierStub(channel)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                stub.ListTasks(pb.ListTasksRequest(), timeout=5)
                break
            except grpc.RpcError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise CentraError(f"bench-scale: centra serve --model {out} did not start") from None
                time.sleep(0.5)
        stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text="warm")]), timeout=120)
        before, _ = process_memory(server.pid)
        reset_peak(server.pid)  # the peak from here on: the reload's, not the start's
        name = add_task()
        progress(f"reload: merging +1 task ({name}) into {out} while centra serve (pid {server.pid}) serves it")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *merge], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CentraError(f"bench-scale: the +1 merge failed: {last}")
        merged_s = time.perf_counter() - start
        while True:
            try:
                stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text="new task")], tasks=[name]), timeout=10)
                break
            except grpc.RpcError:
                if time.perf_counter() - start > START_TIMEOUT:
                    raise CentraError(f"bench-scale: the new task {name!r} never answered") from None
                time.sleep(0.05)
        answered_s = time.perf_counter() - start
        time.sleep(2.5)  # the watcher trims the heap a tick after a reload
        after, peak = process_memory(server.pid)
    finally:
        channel.close()
        server.terminate()
        server.wait(60)
    return {"rss_before_mb": round(before), "peak_mb": round(peak), "rss_after_mb": round(after),
            "merge_s": round(merged_s, 1), "merge_to_answer_s": round(answered_s, 1)}
