"""What the batcher hands its listeners after each batch (metrics, the shadow figures, benchmarks): a
module of its own, below both the batcher and the shadow part of the classify path that listens to it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchRecord:
    """One formed batch, as handed to listeners (metrics)."""

    calls: int
    rows: int
    waits: tuple[float, ...]  # per call: seconds from enqueue until its batch started
    tasks: dict[str, int]  # rows per task
    compute_s: float
    failed_calls: int
    retried: bool  # the merged run failed and each call was re-run alone
    candidate_s: dict[str, float] = field(default_factory=dict)  # seconds per candidate head's detour

    @property
    def queue_wait_s(self) -> float:
        return max(self.waits)
