"""One exception type for every user-facing failure: the CLI prints its message as one line."""

from __future__ import annotations


class CentraError(Exception):
    """A problem the user can fix (bad file, unknown task, bad input). Printed as one line, exit 2."""
