"""Texts: the sample texts every check runs on (verify, the export checks, the demo, a bench without
data), and texts files (one text per line; text<TAB>second text for pair tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from centra.core.tokens import check_texts
from centra.errors import CentraError

SAMPLE_TEXTS = [
    "The delivery was late again and nobody answered my emails.",
    "great product, works as described",
    "How do I change the billing address on my account?",
    "I love it!",
    "The app crashes every time I open the settings page after the latest update, which makes it "
    "impossible to switch notifications off, and support has not replied for a week.",
    "Can you set an alarm for seven tomorrow morning?",
    "meh",
    "Refund please. The package arrived broken and the box was soaked.",
]
SAMPLE_PAIRS = [
    "Shipping took far longer than promised.",
    "The product is good.",
    "Where can I update my payment details?",
    "I hate it.",
    "Updating the app broke the settings screen.",
    "Wake me up at 7 am tomorrow.",
    "It is fine, I guess.",
    "The parcel was damaged on arrival, I want my money back.",
]


class Sequences(NamedTuple):
    """Single texts and text pairs to measure on, and where each came from (a line for a report)."""

    texts: list[str]
    pairs: list[tuple[str, str]]
    text_source: str
    pair_source: str


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; one line naming the file when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise CentraError(f"{path}: file not found")
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CentraError(f"{path}: not UTF-8 text") from None


def read_texts_file(path: Path) -> list[str]:
    """Texts, one per non-blank line (a tab is part of the text), each checked as an input."""
    texts = read_lines(path)
    if not texts:
        raise CentraError(f"{path}: no texts (one per line)")
    _checked(path, texts, [])
    return texts


def read_sequences_file(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every line's first field (the single-text tasks' inputs) and the lines holding a tab (text pairs)."""
    lines = read_lines(path)
    if not lines:
        raise CentraError(f"{path}: no texts (one per line; text<TAB>second text for pair tasks)")
    fields = [[part.strip() for part in line.split("\t", 1)] for line in lines]
    texts = [f[0] for f in fields]
    pairs = [(f[0], f[1]) for f in fields if len(f) == 2]
    _checked(path, texts, pairs)
    return texts, pairs


def _checked(path: Path, texts: list[str], pairs: list[tuple[str, str]]) -> None:
    try:
        check_texts(texts, None)
        if pairs:
            check_texts([a for a, _ in pairs], [b for _, b in pairs])
    except CentraError as exc:
        raise CentraError(f"{path}: {exc}") from None
