"""centra: serve many BERT-family classifiers that share one frozen encoder."""

from __future__ import annotations

__version__ = "0.1.0"
