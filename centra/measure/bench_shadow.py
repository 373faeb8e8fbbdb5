"""`centra shadow bench`: what shadowing a task costs, against what its candidate branch's layers predict.

For each task of a version that has a candidate head (centra.core.shadow), the same batches of texts run
through the engine twice, interleaved: rows asking for the task alone (the active head: its trunk and
branch), and rows asking for it with its candidate (shadowed). The layers predict the cost: a row runs
`active` layers (the trunk to the task's attach layer, then its branch) and shadowing adds `extra` (the
candidate's task layers, and the trunk layers between the two attach layers when it attaches deeper), a
share of extra / active. The target: the measured overhead (shadowed / active - 1) within +10% of that
share (at most 1.1 x share). The time the candidate's detour itself took is reported beside it.

The figures are medians over the repeats (each repeat: every batch once, active then shadowed, so a
disturbance of the machine hits both). Tokenising is part of both runs, as in serving.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from centra.core.table import table
from centra.errors import CentraError, FieldError, Name

TARGET = 1.10  # measured overhead at most this times the layer share
DEFAULT_BATCH = 32
DEFAULT_REPEATS = 20


@dataclass(frozen=True)
class ShadowBench:
    """One task's figures: layers, medians in seconds per batch, the candidate detour's own time."""

    task: str
    active_layers: int
    extra_layers: int
    active_s: float
    shadowed_s: float
    detour_s: float
    batches: int
    runtime: str = ""

    @property
    def share(self) -> float:
        return self.extra_layers / self.active_layers if self.active_layers else float("inf")

    @property
    def overhead(self) -> float:
        return self.shadowed_s / self.active_s - 1.0

    @property
    def ok(self) -> bool:
        return self.overhead <= TARGET * self.share


def check_options(batch: int, repeats: int) -> None:
    if batch < 1:
        raise FieldError(Name("batch"), f" must be >= 1, not {batch}")
    if repeats < 1:
        raise FieldError(Name("repeats"), f" must be >= 1, not {repeats}")


def bench_shadow(model: Path, texts: list[str], engine: str | None = None, batch: int = DEFAULT_BATCH,
                 repeats: int = DEFAULT_REPEATS, tasks: list[str] | None = None,
                 progress: bool = True) -> list[ShadowBench]:
    """Time every shadowed task (or `tasks`) of `model`'s current version on `texts` (single-text tasks;
    pair tasks read each text as both texts)."""
    from centra.core.shadow import candidate_key, extra_layers
    from centra.progress import progress_bar
    from centra.runtime.engine import Engine, Row

    check_options(batch, repeats)
    if not texts:
        raise CentraError("shadow bench: no texts to time")
    loaded = Engine.load(Path(model), batch_size=batch, engine=engine)
    shadowed = loaded.candidates
    chosen = tasks or sorted(shadowed)
    if not chosen:
        raise CentraError(f"{model}: version {loaded.version} has no candidate head (merge with --candidate)")
    for task in chosen:
        if task not in shadowed:
            raise CentraError(f"{model}: task {task!r} has no candidate head (tasks with one: "
                              f"{', '.join(sorted(shadowed)) or 'none'})")
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    found = []
    for task in chosen:
        spec = loaded.specs[task]
        second = (lambda t: t) if spec.input == "pair" else (lambda t: None)
        plain = [[Row(t, second(t), (task,)) for t in chunk] for chunk in chunks]
        both = [[Row(t, second(t), (task, candidate_key(task))) for t in chunk] for chunk in chunks]
        for warm in (plain[0], both[0]):
            loaded.run(warm)
        active, shadow, detour = [], [], []
        for _ in progress_bar(range(repeats), desc=f"shadow bench {task}", enabled=progress):
            for a, b in zip(plain, both):
                started = time.perf_counter()
                loaded.run(a)
                active.append(time.perf_counter() - started)
                spent: dict[str, float] = {}
                started = time.perf_counter()
                loaded.run(b, spent=spent)
                shadow.append(time.perf_counter() - started)
                detour.append(spent.get(candidate_key(task), 0.0))
        found.append(ShadowBench(task, spec.attach_layer + spec.task_layers,
                                 extra_layers(spec, shadowed[task]), statistics.median(active),
                                 statistics.median(shadow), statistics.median(detour), len(chunks), loaded.runtime))
    return found


def bench_lines(results: list[ShadowBench]) -> str:
    """The table `centra shadow bench` prints, and the verdict per task."""
    rows = [("task", "layers", "+candidate", "share", "active ms", "shadowed ms", "overhead", "detour ms",
             "overhead/share", "target")]
    for r in results:
        rows.append((r.task, str(r.active_layers), str(r.extra_layers), f"{r.share:.1%}", f"{1000 * r.active_s:.2f}",
                     f"{1000 * r.shadowed_s:.2f}", f"{r.overhead:+.1%}", f"{1000 * r.detour_s:.2f}",
                     f"{r.overhead / r.share:.2f}" if r.share else "n/a", "ok" if r.ok else "MISSED"))
    runtime, batches = (results[0].runtime, results[0].batches) if results else ("", 0)
    head = (f"shadowing cost per batch ({runtime}, {batches} batches; medians): the candidate's layers predict "
            f"share = extra / active layers; target: overhead <= {TARGET:.2f} x share")
    return head + "\n" + table(rows, right=range(1, len(rows[0]) - 1))
