"""Texts to measure on (`centra bench`, `centra bench-server`): SST-2 dev sentences for single-text tasks
and MRPC dev pairs for pair tasks when they are under the data root, else the sample texts."""

from __future__ import annotations

from pathlib import Path

from centra.core.texts import SAMPLE_PAIRS, SAMPLE_TEXTS, Sequences
from centra.train.data import read_rows
from centra.train.recipe import data_root

SST2_DEV = Path("glue") / "SST-2" / "dev.tsv"
MRPC_DEV = Path("glue") / "MRPC" / "dev.tsv"


def default_sequences(root: Path | None = None) -> Sequences:
    """SST-2 dev sentences and MRPC dev pairs under the data root (data_root(root)) when they are there,
    else the sample texts and pairs."""
    root = data_root(root)
    sst2, mrpc = root / SST2_DEV, root / MRPC_DEV
    texts = [sentence for (sentence,) in column_values(sst2, "sentence")]
    pairs = column_values(mrpc, "#1 String", "#2 String")
    text_source = (f"{len(texts)} SST-2 dev sentences ({sst2})" if texts else
                   f"{len(SAMPLE_TEXTS)} sample texts (no {sst2})")
    pair_source = (f"{len(pairs)} MRPC dev pairs ({mrpc})" if pairs else
                   f"{len(SAMPLE_PAIRS)} sample pairs (no {mrpc})")
    return Sequences(texts or list(SAMPLE_TEXTS), pairs or list(zip(SAMPLE_TEXTS, SAMPLE_PAIRS)), text_source,
                    pair_source)


def column_values(path: Path, *names: str) -> list[tuple[str, ...]]:
    """Per row of a file with a header, its values in the named columns (stripped; rows with an empty one
    left out); [] when the file or a column is not there."""
    if not path.is_file():
        return []
    rows = read_rows(path)
    header = rows[0][1] if rows else None
    if not isinstance(header, list) or any(name not in header for name in names):
        return []
    columns = [header.index(name) for name in names]
    found = []
    for _, row in rows[1:]:
        if len(row) > max(columns):
            values = tuple(row[c].strip() for c in columns)
            if all(values):
                found.append(values)
    return found
