"""Training precision: bf16 where the CPU computes it in hardware, fp32 otherwise or when asked.

On a CPU with AMX or AVX-512 BF16 (`amx_bf16`, `avx512_bf16` in /proc/cpuinfo) a bf16 matmul runs
several times as fast as fp32, so `auto` (the default) trains in bf16 there: the forward passes of
teachers, students and the reference run under autocast (matmuls in bf16, LayerNorm, softmax and the
losses in fp32, the weights and the optimizer in fp32), and the training set's trunk cache is stored in
bf16 (half the memory). The dev set is cached and scored in fp32, so every dev figure (epochs, teachers,
students, report.json, task.json) is what the fp32 engines that serve the task compute. Without such a
CPU `auto` is fp32; `fp32` forces it; `bf16` forces bf16 (emulated, and slower, where the CPU lacks it).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # what /proc/cpuinfo names for bf16 matmuls in hardware


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 flags this CPU reports (empty where it has none, or /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return tuple(f for f in BF16_FLAGS if f in flags)


def resolve(setting: str) -> str:
    """'auto' -> 'bf16' on a CPU with bf16 in hardware, else 'fp32'; 'bf16' and 'fp32' as given."""
    if setting == "auto":
        return "bf16" if cpu_bf16_flags() else "fp32"
    return setting


def notice(setting: str) -> str:
    """One line: which precision trains, and why."""
    precision, flags = resolve(setting), cpu_bf16_flags()
    if precision == "bf16":
        why = f"the CPU has {', '.join(flags)}" if flags else "as asked; this CPU has no bf16 in hardware: slower"
        return f"training in bf16 ({why}; dev scored in fp32; --precision fp32 forces fp32)"
    return f"training in fp32 ({'as asked' if flags else 'this CPU has no bf16 in hardware'})"


def storage_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """The context the forward passes run in: bf16 autocast on the CPU, or nothing."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_for(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast matching data stored in `dtype` (a bf16 cache is read in bf16)."""
    return autocast("bf16" if dtype == torch.bfloat16 else "fp32")
