"""`centra bench-server`: one short run on a tiny merged model gives a complete, consistent JSON line;
bad options are one-line errors before the model loads. No timing assertions: speed is the script's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEXTS

from centra.cli import main
from centra.measure.bench_server import percentile, workload

KEYS = ("concurrency", "seconds", "calls_per_s", "inputs_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_batch_rows",
        "mean_batch_calls", "inprocess_inputs_per_s", "ratio", "model_version", "tasks")
SINGLE = ["alpha", "beta", "gamma", "epsilon"]  # helpers.STANDARD_TASKS taking one text (delta takes pairs)


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    return path


def test_a_short_run_gives_every_figure(model_out, texts_file, capsys):
    code = main(["bench-server", "--model", str(model_out), "--concurrency", "2", "--seconds", "1",
                 "--warmup", "0.2", "--texts", str(texts_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert all(key in figures for key in KEYS), set(KEYS) - set(figures)
    assert figures["concurrency"] == 2 and figures["seconds"] == 1
    assert figures["calls_per_s"] > 0 and figures["ratio"] > 0 and figures["inprocess_inputs_per_s"] > 0
    assert figures["mean_batch_calls"] >= 1 and figures["errors"] == 0
    # One text per call: inputs are calls, and a batch holds as many rows as calls.
    assert figures["inputs_per_s"] == figures["calls_per_s"]
    assert figures["mean_batch_rows"] == figures["mean_batch_calls"] <= 2
    assert figures["ratio"] == pytest.approx(figures["inputs_per_s"] / figures["inprocess_inputs_per_s"], rel=1e-3)
    assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    assert sorted(figures["tasks"]) == sorted(SINGLE) and len(figures["model_version"]) > 0
    assert "calls/s" in out and "in process" in out
    phases = [line for line in err.splitlines() if line.startswith("bench-server: ")]
    assert [line.split()[1] for line in phases] == ["loading", "server", "in"], err


@pytest.mark.parametrize("protocol", ["rest", "oip-grpc"])
def test_every_protocol_drives_the_same_batcher(model_out, texts_file, protocol, capsys):
    code = main(["bench-server", "--model", str(model_out), "--concurrency", "2", "--seconds", "1",
                 "--warmup", "0.2", "--texts", str(texts_file), "--protocol", protocol])
    out, err = capsys.readouterr()
    assert code == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["protocol"] == protocol and figures["errors"] == 0 and figures["calls_per_s"] > 0
    assert figures["mean_batch_calls"] >= 1, "the calls reached the server's batcher"
    assert f"({protocol} clients)" in out


def test_flood_calls_are_refused_by_size_and_counted(model_out, texts_file, capsys):
    code = main(["bench-server", "--model", str(model_out), "--concurrency", "1", "--seconds", "1",
                 "--warmup", "0.2", "--texts", str(texts_file), "--flood", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["flood_calls"] > 0 and figures["flood_senders"] == 2
    assert figures["flood_codes"] == {"INVALID_ARGUMENT": figures["flood_calls"]}  # by size, never "busy"
    assert figures["probe_p50_ms_before"] > 0 and figures["probe_p50_ms_during"] > 0
    assert figures["rss_mb_peak"] >= figures["rss_mb_before"] > 0
    assert "flood:" in out


def test_workload_varies_task_sets_and_is_seeded():
    mixed = workload(TEXTS, SINGLE, "mixed", seed=3, size=200)
    assert mixed == workload(TEXTS, SINGLE, "mixed", seed=3, size=200)
    assert {text for text, _ in mixed} == set(TEXTS)
    sets = {tasks for _, tasks in mixed}
    assert len(sets) > 5 and all(tasks and set(tasks) <= set(SINGLE) for tasks in sets)
    assert all(list(tasks) == [t for t in SINGLE if t in tasks] for tasks in sets), "tasks in the model's order"
    assert {tasks for _, tasks in workload(TEXTS, SINGLE, "all", size=50)} == {tuple(SINGLE)}


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 95) == 95


BAD = [  # extra arguments, part of the one-line message
    (["--concurrency", "0"], "--concurrency: must be >= 1"),
    (["--seconds", "0"], "--seconds: must be a finite number > 0"),
    (["--seconds", "nan"], "--seconds: must be a finite number > 0"),
    (["--seconds", "soon"], "--seconds: expected a number"),
    (["--warmup", "-1"], "--warmup: must be a finite number >= 0"),
    (["--max-batch", "0"], "--max-batch: must be >= 1"),
    (["--max-wait-ms", "-5"], "--max-wait-ms: must be a finite number >= 0"),
    (["--tasks-per-call", "some"], "--tasks-per-call: invalid choice: 'some'"),
    (["--protocol", "smoke"], "--protocol: invalid choice: 'smoke'"),
    (["--texts", "/nowhere/texts.txt"], "/nowhere/texts.txt: file not found"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(row[0]) for row in BAD])
def test_bad_options_are_one_line_errors_before_the_model_loads(extra, message, capsys):
    # The model does not exist: an option error must come first, and nothing is loaded.
    code = main(["bench-server", "--model", "/nowhere/model", *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("centra: error: ") and message in err, err


def test_bad_texts_and_model_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"fine\n\xff\xfe\n")
    for argv, message in [(["--texts", str(empty)], "no texts (one per line)"),
                          (["--texts", str(binary)], "not UTF-8 text"),
                          ([], "/nowhere/model: no such merged model folder")]:
        code = main(["bench-server", "--model", "/nowhere/model", *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
