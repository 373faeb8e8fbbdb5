"""`centra bench`: one short run on a tiny merged model gives every figure, the table and the plot; the
separate baseline really is each task's own full-depth model; bad options are one-line errors before
anything loads. No timing assertions: speed is the benchmark's to report, not the tests' to judge."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch's dynamo exporter needs it

import torch
from conftest import PAIRS, TEXTS
from helpers import make_tasks

from centra.cli import main
from centra.core.backbone import Backbone, load_safetensors
from centra.core.graph import StandaloneModel
from centra.core.merge import plan_merge, write_merged
from centra.core.task import HEAD_FILE, TaskHead
from centra.core.tokens import encode
from centra.core.versions import model_folder
from centra.measure.bench import ENGINES, disturbed_lines
from centra.measure.bench_batches import LENGTHS, EngineResult, make_batches, time_engines
from centra.measure.bench_engines import full_depth_model, runner_engine, standalone_engine
from centra.runtime.engine import Engine
from centra.train.texts import default_sequences

# A 4-layer tiny BERT: a shallow task, a pair task, and one at the last layer with no task layers.
TASKS = [
    ("first", "multiclass", ["neg", "neu", "pos"], "single", 1, 1, "mean"),
    ("pairwise", "multiclass", ["different", "same"], "pair", 2, 1, "cls"),
    ("last", "multiclass", ["no", "yes"], "single", 4, 0, "mean"),
]
TOLERANCE = 1e-4  # fp32, same weights, different batching


@pytest.fixture(scope="module")
def model_out(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks", TASKS)
    write_merged(plan_merge([root / "tasks"]), root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.tsv"
    path.write_text("".join(f"{t}\t{p}\n" for t, p in zip(TEXTS, PAIRS)) + "\n", encoding="utf-8")
    return path


def test_a_short_run_gives_every_figure_and_the_plot(model_out, texts_file, tmp_path, capsys):
    plot = tmp_path / "plots" / "bench.png"
    code = main(["bench", "--model", str(model_out), "--batch", "2", "--repeats", "1", "--texts", str(texts_file),
                 "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert code == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert all(figures[name] > 0 for name in ENGINES), figures
    assert figures["tasks"] == ["first", "last", "pairwise"]
    assert figures["overhead_layers"] == 2 + 4 + 1 + 1 + 0  # trunk passes: single to 4, pair to 2; task layers
    assert figures["single_task_layers"] == 3 * 4 and figures["batch"] == 2
    for name in ENGINES:  # both length settings in the table
        rows = [line.split() for line in out.splitlines() if len(line.split()) == 7 and line.split()[2] == name]
        assert sorted(row[0] for row in rows) == ["fixed", "realistic"], out
    assert "merged_onnx_int8 at batch 2" in out
    assert plot.is_file() == (importlib.util.find_spec("matplotlib") is not None)
    assert "exported" in err  # the exports' progress lines
    assert not list(model_folder(model_out).rglob("*.onnx"))  # exports went to a temp folder


def test_skip_separate_measures_only_the_merged_model(model_out, texts_file, capsys):
    code = main(["bench", "--model", str(model_out), "--batch", "3", "--repeats", "1", "--texts", str(texts_file),
                 "--skip-separate"])
    out, err = capsys.readouterr()
    assert code == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["separate_torch_fp32"] is None and figures["separate_onnx_int8"] is None
    assert figures["merged_torch_fp32"] > 0 and figures["merged_onnx_int8"] > 0


def independent_standalone(folder: Path, backbone: Backbone, name: str) -> StandaloneModel:
    """The task's full-depth model built here from the files: the backbone's N layers, then the task's
    pooler and classifier read from its head.safetensors."""
    engine_spec = Engine.load(folder, engine="torch").specs[name]
    spec = replace(engine_spec, attach_layer=backbone.cfg.num_layers, task_layers=0)
    head = TaskHead(spec, backbone.cfg)
    state = load_safetensors(model_folder(folder) / "tasks" / name / HEAD_FILE)
    head.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ("pooler", "classifier")})
    return StandaloneModel(backbone.embeddings, list(backbone.layers), head.eval()).eval()


@torch.inference_mode()
def test_separate_torch_is_each_tasks_own_full_depth_model(model_out, tiny_models):
    engine = Engine.load(model_out, engine="torch")
    backbone = Backbone.load(tiny_models["bert"])
    separate = {name: full_depth_model(backbone.embeddings, list(backbone.layers), head)
                for name, head in engine.model.heads.items()}
    for model in separate.values():  # its own weights, all N layers
        assert len(model.layers) == backbone.cfg.num_layers
        assert model.layers[0].q.weight.data_ptr() != backbone.layers[0].q.weight.data_ptr()
    run = standalone_engine(separate)
    texts, pairs = TEXTS[:4], list(zip(PAIRS[:4], TEXTS[:4]))  # pairs other than the single texts
    pad = engine.tokenizer.pad_token_id or 0
    for batch_index, batch in enumerate(make_batches(engine.tokenizer, engine.model.cfg, engine.specs, texts,
                                                           pairs, 2, "fixed")):  # fixed: sequences in input order
        assert all(t[0].shape == (2, 48) for t in batch.groups.values())  # padded to the tasks' max_length
        got = run(batch)
        assert set(got) == set(engine.specs)
        for name, spec in engine.specs.items():
            reference = independent_standalone(model_out, backbone, name)
            for row in range(2):  # each sequence alone, unpadded, its text or its pair
                i = 2 * batch_index + row
                first, second = (pairs[i][0], [pairs[i][1]]) if spec.input == "pair" else (texts[i], None)
                enc = encode(engine.tokenizer, engine.model.cfg.type_vocab_size, [first], second, spec.max_length)
                expected = reference(*enc.batch([0], pad))[0]
                assert (got[name][row] - expected).abs().max().item() <= TOLERANCE, (name, i)


@torch.inference_mode()
def test_separate_equals_merged_for_a_task_at_the_last_layer(model_out, tiny_models):
    engine = Engine.load(model_out, engine="torch")
    backbone = Backbone.load(tiny_models["bert"])
    separate = standalone_engine({name: full_depth_model(backbone.embeddings, list(backbone.layers), head)
                                        for name, head in engine.model.heads.items()})
    merged = runner_engine(engine.model)
    texts, pairs = TEXTS, list(zip(TEXTS, PAIRS))
    for lengths in LENGTHS:
        for batch in make_batches(engine.tokenizer, engine.model.cfg, engine.specs, texts, pairs, 3, lengths):
            got, expected = separate(batch), merged(batch)
            assert set(got) == set(expected) == {"first", "pairwise", "last"}
            assert (got["last"] - expected["last"]).abs().max().item() <= TOLERANCE
            assert (got["first"] - expected["first"]).abs().max().item() > TOLERANCE  # other depths: other models


def test_batches_and_measure(model_out):
    engine = Engine.load(model_out, engine="torch")
    texts, pairs = TEXTS, list(zip(TEXTS, PAIRS))
    realistic = make_batches(engine.tokenizer, engine.model.cfg, engine.specs, texts, pairs, 4, "realistic")
    assert len(realistic) == 1 and realistic[0].size == 4  # the remainder (2 of 6) is left out
    widths = [t[1].sum(1).tolist() for t in realistic[0].groups.values()]
    assert all(w == sorted(w) for w in widths)  # rows sorted by length, padded to the longest only
    assert all(t[0].shape[1] == max(t[1].sum(1)).item() for t in realistic[0].groups.values())
    batches = make_batches(engine.tokenizer, engine.model.cfg, engine.specs, texts, pairs, 2, "fixed")
    calls: list[str] = []

    def counted(name, engine):
        def run(batch):
            calls.append(name)
            return engine(batch)
        return run

    engines = {name: counted(name, runner_engine(engine.model)) for name in ("one", "two")}
    results = time_engines(engines, batches, "fixed", repeats=2, chunk=2)
    assert [r.engine for r in results] == ["one", "two"]
    for result in results:
        assert result.sequences == 2 * 3 * 2 and result.batch == 2 and result.lengths == "fixed"
        assert 0 < result.p50_ms <= result.p99_ms and result.sequences_per_s > 0
    # warm-up (2 each), then turns of 2 batches: chunks [b0 b1] [b2], the first engine alternating
    assert calls == ["one"] * 2 + ["two"] * 2 + (["one"] * 2 + ["two"] * 2 + ["two", "one"]) * 2
    with pytest.raises(Exception, match="fewer than one batch"):
        make_batches(engine.tokenizer, engine.model.cfg, engine.specs, texts, pairs, 7, "fixed")


def test_stalled_measurements_are_named():
    calm = EngineResult("merged_onnx_int8", 32, "fixed", 64, 1.0, 64.0, 10.0, 20.0)
    stalled = EngineResult("separate_torch_fp32", 1, "realistic", 64, 1.0, 64.0, 10.0, 60.0)
    assert disturbed_lines([calm]) == []
    lines = disturbed_lines([calm, stalled])
    assert len(lines) == 1 and "realistic/1/separate_torch_fp32" in lines[0] and "merged_onnx_int8" not in lines[0]


def test_default_texts_are_dev_sentences_and_pairs():
    texts, pairs, text_source, pair_source = default_sequences()
    assert texts and pairs and all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
    if "SST-2" in text_source:  # the data root is there: the real dev sets
        assert len(texts) == 872 and texts[0].startswith("it 's a charming")
    if "MRPC" in pair_source:
        assert len(pairs) == 408


@pytest.mark.parametrize("extra, message", [
    (["--batch", "0"], "--batch"),
    (["--seconds", "1", "--repeats", "1"], "not allowed with"),
    (["--seconds", "-1"], "--seconds"),
    (["--repeats", "x"], "--repeats"),
    (["--texts", "/nonexistent/texts.txt"], "file not found"),
    (["--plot", "bench.svg"], "PNG"),
    (["--unknown"], "unrecognized"),
])
def test_bad_options_are_one_line_errors_before_loading(model_out, extra, message, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(Engine, "load", no_load)
    assert main(["bench", "--model", str(model_out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("centra: error: ") and message in err, err


def test_missing_model_and_texts_without_pairs_are_one_line_errors(model_out, tmp_path, capsys):
    singles = tmp_path / "singles.txt"
    singles.write_text("\n".join(TEXTS), encoding="utf-8")
    for argv, message in ((["--model", str(tmp_path / "nope")], "no such merged model folder"),
                          (["--model", str(model_out), "--texts", str(singles)], "need text pairs")):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
