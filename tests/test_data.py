"""Data loading: TSV/CSV/JSONL quirks of real files, label forms, and file:line errors."""

from __future__ import annotations

import json

import pytest

from centra.errors import CentraError
from centra.train.data import Columns, load_examples, parse_label_names, read_rows


def write(path, text: str, encoding: str = "utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_tsv_quoting_off_and_bom(tmp_path):
    # An unbalanced quote must not swallow the following rows (GLUE files hold such quotes).
    f = write(tmp_path / "t.tsv", '\ufeffsentence\tlabel\nhe said "hi\t1\nfine\t0\nlast one\t1', "utf-8")
    ex, labels = load_examples(f, "multiclass", Columns("sentence", ["label"]))
    assert ex.texts == ['he said "hi', "fine", "last one"] and labels == ["0", "1"]
    assert ex.targets == [1, 0, 1] and ex.lines == [2, 3, 4]


def test_headerless_tsv_by_index_is_sniffed(tmp_path):
    f = write(tmp_path / "cola.tsv", "gj04\t1\t\tgood one\ngj04\t0\t*\tbad one\ngj04\t1\t\tanother\n")
    ex, labels = load_examples(f, "multiclass", Columns("3", ["1"]))
    assert len(ex) == 3 and ex.texts[0] == "good one" and labels == ["0", "1"]
    g = write(tmp_path / "rte.tsv", "index\ts1\ts2\tlabel\n0\ta\tb\tyes\n1\tc\td\tno\n2\te\tf\tyes\n3\tg\th\tno\n")
    ex, labels = load_examples(g, "multiclass", Columns("1", ["3"], pair="2"))
    assert len(ex) == 4 and labels == ["no", "yes"] and ex.pairs[0] == "b"


def test_csv_with_quotes_and_multiline_fields(tmp_path):
    f = write(tmp_path / "r.csv", 'review,fuel,price\n"great car, ""fast""\nand cheap",positive,neutral\n'
                                  'meh,negative,negative\n"ok",neutral,positive\n')
    ex, labels = load_examples(f, "multiclass", Columns("review", ["price"]))
    assert ex.texts[0] == 'great car, "fast"\nand cheap' and ex.lines == [2, 4, 5]
    assert labels == ["negative", "neutral", "positive"] and ex.targets == [1, 0, 2]


def test_jsonl_and_regression(tmp_path):
    rows = [{"a": "x one", "b": "y", "score": 4.5}, {"a": "x two", "b": "z", "score": "1"}]
    f = write(tmp_path / "s.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    ex, labels = load_examples(f, "regression", Columns("a", ["score"], pair="b"))
    assert ex.targets == [4.5, 1.0] and ex.pairs == ["y", "z"] and labels == ["value"]
    t = write(tmp_path / "s.tsv", "s1\ts2\tscore\na\tb\t2.5\nc\td\tabc\n")
    with pytest.raises(CentraError, match=r"s.tsv:3: regression target 'abc' is not a number"):
        load_examples(t, "regression", Columns("s1", ["score"], pair="s2"))


def test_multilabel_forms(tmp_path):
    names = ["joy", "anger", "fear"]
    f = write(tmp_path / "g.tsv", "happy\t0\tid1\nmad and scared\t1,2\tid2\nboth\t0,1\tid3\n")
    ex, labels = load_examples(f, "multilabel", Columns("0", ["1"], header="no"), label_names=names)
    assert labels == names and ex.targets == [[1, 0, 0], [0, 1, 1], [1, 1, 0]]
    g = write(tmp_path / "cols.csv", "text,joy,anger\na,1,0\nb,0,1\nc,1,1\n")
    ex, labels = load_examples(g, "multilabel", Columns("text", ["joy", "anger"]))
    assert labels == ["joy", "anger"] and ex.targets == [[1, 0], [0, 1], [1, 1]]
    h = write(tmp_path / "bad.csv", "text,joy,anger\na,1,maybe\n")
    with pytest.raises(CentraError, match=r"bad.csv:2: multilabel column value 'maybe'"):
        load_examples(h, "multilabel", Columns("text", ["joy", "anger"]))


def test_errors_name_file_and_line(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\tpos\nb\tneg\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\nc\tpos\nd\tneutral\n")
    _, labels = load_examples(train, "multiclass", Columns("sentence", ["label"]))
    with pytest.raises(CentraError, match=r"dev.tsv:3: label 'neutral' is not among the training labels"):
        load_examples(dev, "multiclass", Columns("sentence", ["label"]), labels=labels)
    with pytest.raises(CentraError, match=r"train.tsv:1: no column 'text' \(columns: sentence, label\)"):
        load_examples(train, "multiclass", Columns("text", ["label"]))
    with pytest.raises(CentraError, match="empty file"):
        load_examples(write(tmp_path / "e.tsv", "\n\n"), "multiclass", Columns("0", ["1"]))
    with pytest.raises(CentraError, match=r"short.tsv:3: row has 1 columns, column 1 is missing"):
        load_examples(write(tmp_path / "short.tsv", "a\t0\nb\t1\nc\n"), "multiclass", Columns("0", ["1"]))
    with pytest.raises(CentraError, match=r"j.jsonl:2: malformed JSON"):
        read_rows(write(tmp_path / "j.jsonl", '{"a": 1}\n{"a": \n'))
    with pytest.raises(CentraError, match=r"m.tsv:2: empty text"):
        load_examples(write(tmp_path / "m.tsv", "s\tl\n \t1\nx\t0\n"), "multiclass", Columns("s", ["l"]))
    with pytest.raises(CentraError, match="file not found"):
        read_rows(tmp_path / "nope.tsv")


def test_label_names(tmp_path):
    assert parse_label_names("a, b,c") == ["a", "b", "c"]
    names = write(tmp_path / "names.txt", "neg\npos")
    assert parse_label_names(f"@{names}") == ["neg", "pos"]
    f = write(tmp_path / "t.tsv", "s\tl\nx\t1\ny\t0\nz\t2\n")
    with pytest.raises(CentraError, match=r"t.tsv:4: label id 2 has no name"):
        load_examples(f, "multiclass", Columns("s", ["l"]), label_names=["neg", "pos"])


def test_jsonl_keeps_a_line_separator_inside_a_string(tmp_path):
    """U+2028 inside a JSON string is not a line break (json.dumps(..., ensure_ascii=False) writes it)."""
    rows = [{"text": "first\u2028part", "label": "a"}, {"text": "second", "label": "b"}]
    f = write(tmp_path / "d.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ex, labels = load_examples(f, "multiclass", Columns("text", ["label"]))
    assert ex.texts == ["first\u2028part", "second"] and ex.lines == [1, 2]
