"""Bytes hashed and seconds of +1 task merges with the per-process hash memo (centra.io.sha256_file) off
and on, side by side: N synthetic tasks on the default backbone merged twice from scratch, then one task
added to each, twice.

    python tools/hash_reads.py N WORKDIR [merge options, e.g. --engine onnx --precision int8]
"""

import os
import shutil
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (puts the checkout on sys.path)

from centra import io
from centra.cli import main
from centra.core.backbone import Backbone
from centra.measure.scale import synthetic_tasks


class Forget(dict):
    def __setitem__(self, key, value):
        pass


def run(count: int, work: Path, merge: list[str]) -> None:
    shutil.rmtree(work, ignore_errors=True)
    backbone = Backbone.load("default")
    read = [0]
    real = io.sha256_files

    def counting(paths):
        read[0] += sum(os.path.getsize(p) for p in paths)
        return real(paths)

    io.sha256_files = counting

    def merge_into(mode: str) -> None:
        args = ["merge", "--tasks-dir", str(work / f"tasks-{mode}"), "--out", str(work / f"out-{mode}"), *merge]
        assert main(args) == 0

    for mode in ("off", "on"):
        synthetic_tasks(backbone, work / f"tasks-{mode}", count, seed=0)
        merge_into(mode)
    time.sleep(3)  # the versions' files settle (a file written within 2 s is never remembered)
    for rep in range(2):
        for mode in ("off", "on"):
            synthetic_tasks(backbone, work / f"tasks-{mode}", 1, seed=0, start=count + rep)
            io._memo = Forget() if mode == "off" else {}
            read[0] = 0
            start = time.perf_counter()
            merge_into(mode)
            print(f"memo {mode}: +1 merge {count + rep} -> {count + rep + 1} tasks "
                  f"{time.perf_counter() - start:.2f} s, {read[0] / 1e6:,.0f} MB hashed", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
