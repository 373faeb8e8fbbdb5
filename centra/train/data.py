"""Data: labelled examples from TSV, CSV or JSONL files, with one-line errors that give file:line.

* TSV (.tsv, .txt): tab-split lines, quoting off (GLUE files hold unbalanced quotes), BOM-safe.
* CSV (.csv): real CSV quoting, multi-line fields.
* JSONL (.jsonl, .json): one object per line; columns are keys.
Columns are header names or 0-based indices. Labels: class names or ints (multiclass), floats
(regression), and for multilabel a delimited list in one column or several 0/1 columns.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from centra.errors import CentraError

TRUE_VALUES, FALSE_VALUES = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


@dataclass
class Columns:
    """Which columns hold what: names or 0-based indices (as strings, from the command line)."""

    text: str
    labels: list[str]
    pair: str | None = None
    header: str = "auto"  # "yes", "no", "auto": a header when any column is named, else sniffed
    label_delimiter: str = ","


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    targets: list  # multiclass: int; multilabel: list[float] (0/1); regression: float
    lines: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: list[int]) -> Examples:
        return Examples([self.texts[i] for i in rows], [self.pairs[i] for i in rows] if self.pairs else None,
                        [self.targets[i] for i in rows], [self.lines[i] for i in rows], self.source)


def read_rows(path: Path) -> list[tuple[int, list[str] | dict]]:
    """(line number, row) for every non-blank row; rows are lists (TSV/CSV) or dicts (JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise CentraError(f"{path}: file not found")
    suffix = path.suffix.lower()
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig counts after the BOM
        line = raw[:start].count(b"\n") + 1
        raise CentraError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[start]:02x} at offset {start}); "
                          "save the file as UTF-8") from None
    rows: list[tuple[int, list[str] | dict]] = []
    if suffix in (".jsonl", ".json"):
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CentraError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise CentraError(f"{path}:{n}: expected a JSON object per line")
                rows.append((n, obj))
    elif suffix == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = csv.reader(text.splitlines(keepends=True))
        start = 1
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((start, row))
            start = reader.line_num + 1
    else:
        for n, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if line.strip():
                rows.append((n, line.split("\t")))
    if not rows:
        raise CentraError(f"{path}: empty file")
    return rows


def _cell(path: Path, n: int, row: list[str] | dict, col: int | str) -> str:
    """A text cell: a string (JSONL numbers become strings; lists and objects are refused)."""
    value = _raw(path, n, row, col)
    if isinstance(value, (list, dict)):
        raise CentraError(f"{path}:{n}: {col!r} holds a JSON {type(value).__name__}, expected text")
    return value if isinstance(value, str) else str(value)


def _label_cell(path: Path, n: int, row: list[str] | dict, col: int | str) -> str | list[str]:
    """A label cell: a string, or a JSONL list of label names (multilabel)."""
    value = _raw(path, n, row, col)
    if isinstance(value, list):
        if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in value):
            raise CentraError(f"{path}:{n}: {col!r} must be a list of label names")
        return [str(x).strip() for x in value]
    if isinstance(value, dict):
        raise CentraError(f"{path}:{n}: {col!r} holds a JSON object, expected a label")
    return (value if isinstance(value, str) else json.dumps(value)).strip()


def _raw(path: Path, n: int, row: list[str] | dict, col: int | str):
    if isinstance(row, dict):
        if col not in row:
            raise CentraError(f"{path}:{n}: missing key {col!r}")
        return row[col]
    if col >= len(row):
        raise CentraError(f"{path}:{n}: row has {len(row)} columns, column {col} is missing")
    return row[col]


def _resolve(path: Path, spec: str, header: list[str] | None, jsonl: bool) -> int | str:
    if jsonl:
        return spec
    if spec.isdigit():
        return int(spec)
    if header is None:
        raise CentraError(f"{path}: column {spec!r} is named but the file has no header (use an index)")
    names = [h.strip() for h in header]
    if spec not in names:
        raise CentraError(f"{path}:1: no column {spec!r} (columns: {', '.join(names)})")
    return names.index(spec)


def _has_header(rows: list, cols: Columns) -> bool:
    """auto: a header when any column is named; with indices only, sniff the first label cell: a
    header cell is not a number while the data is, or is a value that no other row repeats."""
    if cols.header != "auto":
        return cols.header == "yes"
    if any(s and not s.isdigit() for s in (cols.text, cols.pair, *cols.labels)):
        return True
    idx = int(cols.labels[0])
    values = [row[idx].strip() for _, row in rows[:2000] if idx < len(row)]
    if len(values) < 3:
        return False
    first, rest = values[0], values[1:]
    if not _is_number(first.split(",")[0]) and _is_number(rest[0].split(",")[0]):
        return True
    return first not in rest and len(set(rest)) <= len(rest) // 2


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def load_examples(path: Path, kind: str, cols: Columns, labels: list[str] | None = None,
                  label_names: list[str] | None = None) -> tuple[Examples, list[str]]:
    """Read one split. `labels` (from the train split) fixes the label set: a dev label outside it
    is an error. Returns the examples and the label list."""
    path = Path(path)
    rows = read_rows(path)
    jsonl = isinstance(rows[0][1], dict)
    header = None
    if not jsonl and _has_header(rows, cols):
        header, rows = rows[0][1], rows[1:]
        if not rows:
            raise CentraError(f"{path}: empty file (a header and no rows)")
    text_col = _resolve(path, cols.text, header, jsonl)
    pair_col = _resolve(path, cols.pair, header, jsonl) if cols.pair else None
    label_cols = [_resolve(path, c, header, jsonl) for c in cols.labels]
    if not label_cols:
        raise CentraError("give at least one label column")
    if kind != "multilabel" and len(label_cols) > 1:
        raise CentraError(f"a {kind} task takes one label column (several are for multilabel)")
    texts, pairs, raw, lines = [], [] if pair_col is not None else None, [], []
    for n, row in rows:
        text = _cell(path, n, row, text_col)
        if not text.strip():
            raise CentraError(f"{path}:{n}: empty text")
        texts.append(text)
        if pairs is not None:
            pairs.append(_cell(path, n, row, pair_col))
        raw.append([_label_cell(path, n, row, c) for c in label_cols])
        lines.append(n)
    lists = [n for n, values in zip(lines, raw) for v in values if isinstance(v, list)]
    if lists and not (kind == "multilabel" and len(label_cols) == 1):
        raise CentraError(f"{path}:{lists[0]}: a list of labels is for a multilabel task's one label column")
    if kind == "multilabel" and len(label_cols) > 1:
        names = label_names or [str(header[c]).strip() if header else str(c) for c in label_cols]
        targets = [[_flag(path, n, v) for v in values] for n, values in zip(lines, raw)]
        return Examples(texts, pairs, targets, lines, str(path)), list(labels or names)
    if kind == "regression":
        targets = []
        for n, (value,) in zip(lines, raw):
            try:
                targets.append(float(value))
            except ValueError:
                raise CentraError(f"{path}:{n}: regression target {value!r} is not a number") from None
        name = labels or [str(header[label_cols[0]]).strip() if header else "value"]
        return Examples(texts, pairs, targets, lines, str(path)), list(name)
    if kind == "multilabel":
        cells = [[x for x in values[0] if x] if isinstance(values[0], list) else
                 [x.strip() for x in values[0].split(cols.label_delimiter) if x.strip()] for values in raw]
    else:
        cells = [[values[0]] for values in raw]
    cells = [[_named(path, n, x, label_names) for x in row] for n, row in zip(lines, cells)]
    if labels is None:
        labels = _label_order({x for row in cells for x in row}, label_names)
    index = {lab: i for i, lab in enumerate(labels)}
    targets = []
    for n, row in zip(lines, cells):
        for x in row:
            if x not in index:
                raise CentraError(f"{path}:{n}: label {x!r} is not among the training labels "
                                  f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})")
        if kind == "multiclass":
            targets.append(index[row[0]])
        else:
            hot = [0.0] * len(labels)
            for x in row:
                hot[index[x]] = 1.0
            targets.append(hot)
    return Examples(texts, pairs, targets, lines, str(path)), labels


def read_segments(path: Path, cols: Columns, column: str) -> list[str]:
    """The value of `column` in every example row, in load_examples' order (the same header decision),
    to break a metric down by it (language, channel, product). Every row must hold a value."""
    path = Path(path)
    rows = read_rows(path)
    jsonl = isinstance(rows[0][1], dict)
    if jsonl:
        col: int | str = column
        if not any(column in row for _, row in rows):
            keys = list(dict.fromkeys(k for _, row in rows for k in row))
            raise CentraError(f"{path}: no column {column!r} (columns: {', '.join(keys)})")
    else:
        header = None
        if _has_header(rows, cols):
            header, rows = rows[0][1], rows[1:]
        col = _resolve(path, column, header, jsonl)
        widest = max((len(row) for _, row in rows), default=0)
        if col >= widest:
            raise CentraError(f"{path}: no column {col} (rows have at most {widest} columns)")
    values = []
    for n, row in rows:
        value = row.get(col) if jsonl else (row[col] if col < len(row) else None)
        if isinstance(value, (list, dict)):
            raise CentraError(f"{path}:{n}: column {column!r} holds a JSON {type(value).__name__}, expected a value")
        text = "" if value is None else str(value).strip()
        if not text:
            raise CentraError(f"{path}:{n}: no value in column {column!r} (every row needs one to be counted "
                              "in a segment)")
        values.append(text)
    return values


def _named(path: Path, n: int, value: str, label_names: list[str] | None) -> str:
    """Integer label ids become names when names are given (e.g. GoEmotions' emotions.txt)."""
    if label_names and value.lstrip("-").isdigit():
        i = int(value)
        if not 0 <= i < len(label_names):
            raise CentraError(f"{path}:{n}: label id {i} has no name ({len(label_names)} names given)")
        return label_names[i]
    return value


def _label_order(found: set[str], label_names: list[str] | None) -> list[str]:
    if label_names:
        return list(label_names)
    if all(x.lstrip("-").isdigit() for x in found):
        return sorted(found, key=int)
    return sorted(found)


def _flag(path: Path, n: int, value: str) -> float:
    low = value.lower()
    if low in TRUE_VALUES:
        return 1.0
    if low in FALSE_VALUES:
        return 0.0
    raise CentraError(f"{path}:{n}: multilabel column value {value!r} is not 0/1")


def parse_label_names(value: str | None, base: Path | None = None) -> list[str] | None:
    """'a,b,c' or '@file' (one name per line; relative to `base` when given) -> names."""
    if not value:
        return None
    if value.startswith("@"):
        path = Path(base or ".") / value[1:]
        if not path.is_file():
            raise CentraError(f"{path}: file not found")
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return [x.strip() for x in value.split(",") if x.strip()]
