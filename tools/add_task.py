"""python tools/add_task.py ... == centra add-task ... (see `centra add-task --help`)."""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401  (puts the checkout on sys.path)

from centra.cli import main

if __name__ == "__main__":
    sys.exit(main(["add-task", *sys.argv[1:]]))
