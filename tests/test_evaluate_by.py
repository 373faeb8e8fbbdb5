"""`centra evaluate --by COLUMN`: per-segment counts sum to the whole, each segment's metrics are those
of its rows alone, the thresholds of a multilabel task apply per segment, and a missing value or an
unknown column is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXTS
from helpers import STANDARD_TASKS, make_tasks

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.merge import plan_merge, write_merged
from centra.runtime.engine import Engine
from centra.train.metrics import by_segment, compute

LABELS = ["neg", "neu", "pos"]
LANGUAGES = ["en", "de", "en", "fr", "de", "en"]
RIGHT = (0, 1, 3)  # rows whose gold label is the model's answer: accuracy 1/3 on en, 1/2 on de, 1 on fr


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("by")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks", STANDARD_TASKS[:2])
    write_merged(plan_merge([root / "tasks"]), root / "model")
    return root / "model"


def write_tsv(path: Path, rows: list[tuple[str, ...]], header: str = "text\tlabel\tlanguage") -> Path:
    path.write_text("\n".join([header, *("\t".join(r) for r in rows)]) + "\n", encoding="utf-8")
    return path


def evaluate(model: Path, data: Path, capsys, *extra: str) -> tuple[list[str], dict]:
    assert main(["evaluate", "--model", str(model), "--task", "alpha", "--data", str(data), "--text-column",
                 "text", "--label-column", "label", *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines, json.loads(lines[-1])


def gold_labels(model: Path) -> tuple[list[str], list[str]]:
    """The model's answers, and gold labels that agree with them on the rows of RIGHT only."""
    predicted = [a["label"] for a in Engine.load(model).predict(TEXTS, tasks=["alpha"])]
    other = {lab: LABELS[(i + 1) % 3] for i, lab in enumerate(LABELS)}
    return predicted, [p if i in RIGHT else other[p] for i, p in enumerate(predicted)]


def test_segments_sum_to_the_whole_and_equal_their_own_rows(model, tmp_path, capsys):
    predicted, gold = gold_labels(model)
    data = write_tsv(tmp_path / "dev.tsv", list(zip(TEXTS, gold, LANGUAGES)))
    lines, result = evaluate(model, data, capsys, "--by", "language")
    segments = result["segments"]
    assert list(segments) == ["en", "de", "fr"], "largest segment first"
    assert [s["examples"] for s in segments.values()] == [3, 2, 1]
    assert sum(s["examples"] for s in segments.values()) == result["examples"] == len(TEXTS)
    assert {v: s["accuracy"] for v, s in segments.items()} == pytest.approx({"en": 1 / 3, "de": 0.5, "fr": 1.0})
    for lang, scores in segments.items():
        rows = [i for i, x in enumerate(LANGUAGES) if x == lang]
        by_hand = sum(predicted[i] == gold[i] for i in rows) / len(rows)
        assert scores["accuracy"] == pytest.approx(by_hand, abs=1e-6), lang
        alone = write_tsv(tmp_path / f"{lang}.tsv", [(TEXTS[i], gold[i], lang) for i in rows])
        _, own = evaluate(model, alone, capsys)
        assert scores == {"examples": own["examples"], **{m: own[m] for m in ("accuracy", "macro_f1", "mcc")}}
    assert lines[0] == "task 'alpha' by 'language' (metrics x100)"
    table = [line.split() for line in lines[1:-1]]
    assert table[0] == ["language", "examples", "accuracy", "macro_f1", "mcc"]
    assert [(row[0], int(row[1]), float(row[2])) for row in table[1:]] == \
        [(v, s["examples"], round(100 * s["accuracy"], 2)) for v, s in segments.items()] + \
        [("(all)", 6, round(100 * result["accuracy"], 2))]
    _, plain = evaluate(model, data, capsys)
    assert "segments" not in plain and plain["accuracy"] == result["accuracy"]


def test_segments_of_a_jsonl_file(model, tmp_path, capsys):
    data = tmp_path / "dev.jsonl"
    _, gold = gold_labels(model)
    data.write_text("".join(json.dumps({"text": t, "label": g, "channel": c}) + "\n"
                            for t, g, c in zip(TEXTS, gold, ["app", "web", "app", 3, "web", "app"])))
    _, result = evaluate(model, data, capsys, "--by", "channel")
    assert {v: s["examples"] for v, s in result["segments"].items()} == {"app": 3, "web": 2, "3": 1}
    assert {v: s["accuracy"] for v, s in result["segments"].items()} == pytest.approx({"app": 1 / 3, "web": 0.5,
                                                                                      "3": 1.0})


def test_each_segment_reads_the_tasks_thresholds():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (40, 3)).astype(np.float32)
    targets = (rng.random((40, 3)) < 0.4).astype(float).tolist()
    segments = [rng.choice(["a", "b", "c"]) for _ in range(40)]
    thresholds = [0.2, 0.8, 0.5]
    parts = by_segment("multilabel", logits, targets, segments, thresholds)
    assert sum(p["examples"] for p in parts.values()) == 40
    for value, scores in parts.items():
        rows = [i for i, s in enumerate(segments) if s == value]
        assert scores == {"examples": len(rows), **compute("multilabel", logits[rows], [targets[i] for i in rows],
                                                           thresholds)}
    at_05 = by_segment("multilabel", logits, targets, segments)
    assert any(at_05[v] != parts[v] for v in parts), "thresholds must change some segment's F1"


ERRORS = {  # file name, its contents, --by, extra flags, what the error must say
    "unknown column": ("dev.tsv", "text\tlabel\tlanguage\nhi\tpos\ten\n", "country", (),
                       "dev.tsv:1: no column 'country' (columns: text, label, language)"),
    "missing value": ("dev.tsv", "text\tlabel\tlanguage\nhi\tpos\ten\nyo\tneg\t \nhey\tneu\tde\n", "language", (),
                      "dev.tsv:3: no value in column 'language'"),
    "short row": ("dev.tsv", "text\tlabel\tlanguage\nhi\tpos\ten\nyo\tneg\n", "language", (),
                  "dev.tsv:3: no value in column 'language'"),
    "index past every row": ("dev.tsv", "text\tlabel\tlanguage\nhi\tpos\ten\n", "7", (),
                             "dev.tsv: no column 7 (rows have at most 3 columns)"),
    "named column without a header": ("dev.tsv", "hi\tpos\ten\nyo\tneg\tde\n", "language", ("--header", "no"),
                                      "column 'language' is named but the file has no header"),
    "unknown JSONL key": ("dev.jsonl", '{"text": "hi", "label": "pos", "lang": "en"}\n', "language", (),
                          "dev.jsonl: no column 'language' (columns: text, label, lang)"),
    "JSONL null": ("dev.jsonl", '{"text": "hi", "label": "pos", "language": "en"}\n'
                                '{"text": "yo", "label": "neg", "language": null}\n', "language", (),
                   "dev.jsonl:2: no value in column 'language'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_by_is_one_line(model, tmp_path, capsys, case):
    name, text, by, extra, message = ERRORS[case]
    (tmp_path / name).write_text(text, encoding="utf-8")
    columns = ("0", "1") if "--header" in extra else ("text", "label")
    assert main(["evaluate", "--model", str(model), "--task", "alpha", "--data", str(tmp_path / name),
                 "--text-column", columns[0], "--label-column", columns[1], "--by", by, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("centra: error:") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == "", "nothing is evaluated"
