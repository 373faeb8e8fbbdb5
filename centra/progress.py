"""Progress: a bar on a terminal; one line per stage or epoch everywhere else (CI, log files).

A log should read like a log: `progress_bar` is silent when stderr is not a terminal, and the figures
a person wants (an epoch's loss and dev metric, a cache layer's time) go through `progress_line`,
which prints them above a live bar or as a plain line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on a terminal; a silent pass-through (no redraws) when stderr is not one."""
    return tqdm(iterable, desc=desc, disable=not (enabled and interactive()), leave=False, **kwargs)


def progress_line(line: str, enabled: bool = True) -> None:
    """One line of figures to stderr (above a live bar on a terminal)."""
    if not enabled:
        return
    if interactive():
        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


class JobBar:
    """One bar over a whole job (an add-task run: caches, search, students...) with its ETA, below the
    stages' own bars. Work is counted in units the stages report as they go (`work_done`), against a
    total planned up front; a plan is an estimate, so the bar ends where the work does."""

    def __init__(self, total: float, desc: str, enabled: bool = True):
        self.bar = tqdm(total=max(1.0, float(total)), desc=desc, disable=not (enabled and interactive()),
                        leave=False, position=0, unit="u", bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
        self.done = 0.0

    def add(self, units: float) -> None:
        self.done += units
        # a plan short of the work: the total grows with it, so the bar never overruns
        if self.done > self.bar.total:
            self.bar.total = self.done * 1.05
        self.bar.update(units)

    def replan(self, remaining: float) -> None:
        """The plan revised by a stage that knows more now (add-task, once its teacher is chosen): `remaining`
        units are left, so the bar's ETA follows the job the stages will run, not the costliest one planned."""
        self.bar.total = max(1.0, self.done + remaining)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


_JOB: ContextVar[JobBar | None] = ContextVar("centra_job_bar", default=None)


@contextmanager
def job_bar(total: float, desc: str, enabled: bool = True) -> Iterator[JobBar]:
    """The job's bar while the block runs: the stages inside report their work to it (`work_done`)."""
    bar = JobBar(total, desc, enabled)
    token = _JOB.set(bar)
    try:
        yield bar
    finally:
        _JOB.reset(token)
        bar.close()


def work_done(units: float) -> None:
    """Report work to the job bar of the running job, if there is one."""
    bar = _JOB.get()
    if bar is not None:
        bar.add(units)


def work_left(units: float) -> None:
    """Tell the job bar of the running job, if there is one, that `units` of work are left (JobBar.replan)."""
    bar = _JOB.get()
    if bar is not None:
        bar.replan(units)
