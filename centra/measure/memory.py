"""Resident memory (RSS) of a process, read from Linux's /proc: what the benchmarks, the scale probes and
the soak report. Elsewhere than Linux there is no /proc: the readers say so (None, NaN) and measure on."""

from __future__ import annotations


def process_memory(pid: int | str = "self") -> tuple[float, float] | None:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in MB, from Linux's /proc; None
    where there is no /proc or the process is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return (found["VmRSS"], found.get("VmHWM", found["VmRSS"])) if "VmRSS" in found else None


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc), in MB; NaN where there is no /proc."""
    found = process_memory()
    return found[0] if found else float("nan")


def reset_peak(pid: int) -> None:
    """Start process `pid`'s peak RSS (VmHWM) afresh from its current RSS (Linux: clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")
