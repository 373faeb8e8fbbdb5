"""The plots the CLI writes (bench, plan): the path checked before any work, matplotlib imported when it is
installed (a note when not), the PNG written through a temp file and a rename."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from centra.errors import CentraError


def check_plot(value: str | Path, command: str) -> Path:
    """A --plot path: a PNG file name whose folder can be written."""
    from centra.publish import check_writable_parent

    plot = Path(value)
    if plot.suffix.lower() != ".png":
        raise CentraError(f"{command}: --plot {plot}: the plot is a PNG file (name it *.png)")
    if plot.is_dir():
        raise CentraError(f"{command}: --plot {plot}: is a folder")
    check_writable_parent(plot)
    return plot


def pyplot():
    """matplotlib.pyplot on the Agg backend; None, with a note, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("centra: note: matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path) -> bool:
    """A matplotlib figure laid out and written as PNG through a temp file and a rename, so a killed run
    never leaves a half-written plot under the name asked for; the figure is closed either way. True."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(str(staged), dpi=120, format="png")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
        plt.close(fig)
    return True
