"""UMSAB (the XLM-T sentiment benchmark: 8 languages, 3 labels, train/val/test) read from the data
folder into JSONL files with a language column, and the published figures it is compared with."""

from __future__ import annotations

import json
import os
from pathlib import Path

from centra.errors import CentraError

FOLDER = "xlm-t-sentiment"
LANGUAGES = {"arabic": "ar", "english": "en", "french": "fr", "german": "de", "hindi": "hi", "italian": "it",
             "portuguese": "pt", "spanish": "es"}
LABELS = ["negative", "neutral", "positive"]
SPLITS = ("train", "val", "test")
# UMSAB test macro-F1, average of the eight languages (Barbieri et al., 2022, XLM-T, Table 4)
PUBLISHED = {"XLM-R Mono (base, one model per language)": 64.8, "XLM-R Multi (base, all languages)": 66.8,
             "XLM-Tw Multi (base, Twitter-pretrained, all languages)": 69.4}
RUNS = {"a": "one task, all 8 languages", "b": "one task, English only (zero-shot to 7)",
        "c": "one task per language (8 branches)"}


def prepare(data: Path, out: Path) -> dict[str, dict[str, Path]]:
    """UMSAB as JSONL files {text, label, language}: every language together ("all") and each alone, per
    split. Read from the data folder as distributed (escape sequences in tweets kept)."""
    root = data / FOLDER
    if not root.is_dir():
        raise CentraError(f"{root}: not found (the UMSAB data of XLM-T; give --data)")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    rows_all: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for language, code in LANGUAGES.items():
        for split in SPLITS:
            texts = _lines(root / language / f"{split}_text.txt")
            labels = _lines(root / language / f"{split}_labels.txt")
            if len(texts) != len(labels):
                raise CentraError(f"{root / language}: {split} has {len(texts)} texts and {len(labels)} labels")
            if any(y.strip() not in ("0", "1", "2") for y in labels):
                raise CentraError(f"{root / language / f'{split}_labels.txt'}: labels must be 0, 1 or 2")
            rows = [{"text": t, "label": LABELS[int(y)], "language": code} for t, y in zip(texts, labels)]
            files.setdefault(code, {})[split] = _write_jsonl(out / f"{code}-{split}.jsonl", rows)
            rows_all[split] += rows
    files["all"] = {s: _write_jsonl(out / f"all-{s}.jsonl", rows) for s, rows in rows_all.items()}
    return files


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CentraError(f"{path}: file not found")
    return path.read_text(encoding="utf-8").splitlines()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Written only when it changed (its sha256 stays the recipe's), by rename (never a partial file)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; split on newlines only (a tweet may hold U+2028, which JSON keeps raw)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]

