"""Progress: a bar on a terminal; one line per stage or epoch everywhere else (CI, log files).

A log should read like a log: `progress_bar` is silent when stderr is not a terminal, and the figures
a person wants (an epoch's loss and dev metric, a cache layer's time) go through `progress_line`,
which prints them above a live bar or as a plain line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

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
