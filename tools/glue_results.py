"""python tools/glue_results.py ... == centra results ... (see `centra results --help`)."""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401  (puts the checkout on sys.path)

from centra.cli import main

if __name__ == "__main__":
    sys.exit(main(["results", *sys.argv[1:]]))
