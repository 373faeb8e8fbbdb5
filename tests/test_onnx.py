"""ONNX export and the ONNX Runtime engine: parity with PyTorch at export, the torch engine's row subsets and
early exits, int8 agreement, and refusals (a graph that differs, a published graph that was changed).

Tolerances: fp32 ONNX vs PyTorch, any graph's output and the composed engine's logits: 1e-4 (the
export's own FP32_TOLERANCE). int8 vs fp32: label agreement, floor centra.export.int8.MIN_AGREEMENT.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch's dynamo exporter needs it

import torch
from conftest import PAIRS, TEXTS, snapshot
from helpers import STANDARD_TASKS, make_tasks, perturb

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.manifest import EngineInfo
from centra.core.merge import plan_merge, write_merged
from centra.core.task import init_task, save_task
from centra.core.versions import MANIFEST, model_folder, read_manifest
from centra.errors import CentraError
from centra.export import int8
from centra.export import onnx as export_onnx
from centra.export.fused import fusions, total_fusions
from centra.runtime.engine import Engine, Row
from centra.runtime.graphs import graph_layout
from centra.runtime.onnx import OnnxRunner

TOLERANCE = 1e-4  # fp32, ONNX Runtime vs PyTorch


@pytest.fixture(scope="module")
def bert_onnx(tiny_models, tmp_path_factory) -> Path:
    """`centra merge --engine onnx` of the standard tasks (attach layers 0-3, a pair task) on tiny BERT."""
    root = tmp_path_factory.mktemp("onnx-bert")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks")
    assert main(["merge", "--tasks-dir", str(root / "tasks"), "--out", str(root / "out"), "--engine", "onnx"]) == 0
    return root / "out"


def manifest_of(out: Path) -> dict:
    return json.loads((model_folder(out) / MANIFEST).read_text())


def test_export_layout_parity_and_dynamic_axes(bert_onnx):
    import onnx

    info = manifest_of(bert_onnx)["engine"]
    assert info["name"] == "onnx" and info["precision"] == "fp32" and "int8" not in info
    names = [g["name"] for g in info["graphs"]]
    assert names == ["embeddings", "layers_1-1", "layers_2-2", "layers_3-3", "task_alpha", "task_beta",
                     "task_delta", "task_epsilon", "task_gamma"]  # tasks in the manifest's order
    assert set(info["parity"]) == {*names, "composed"}
    assert all(0 <= diff <= TOLERANCE for diff in info["parity"].values()), info["parity"]
    for graph in info["graphs"]:
        inputs = onnx.load(str(model_folder(bert_onnx) / graph["fp32"])).graph.input
        for tensor in inputs:  # dynamic batch and sequence axes, not the export example's 2 x 8
            assert [d.dim_param for d in tensor.type.tensor_type.shape.dim[:2]] == ["batch", "sequence"], graph


def test_the_engine_field_is_read_once_and_written_back_as_it_was(bert_onnx):
    folder = model_folder(bert_onnx)
    manifest = read_manifest(folder)
    assert json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n" == (folder / MANIFEST).read_text()
    info = manifest.engine
    assert info.name == "onnx" and info.precision == "fp32" and info.int8 is None and info.tensorrt is None
    assert info.files("fp32")["task_alpha"] == "onnx/fp32/task_alpha.onnx" and not info.has_files("int8")
    with pytest.raises(CentraError, match=r"malformed manifest \(engine 'graphs' must be list\)"):
        EngineInfo.from_dict({**manifest_of(bert_onnx)["engine"], "graphs": "onnx/"}, MANIFEST)


def test_onnx_engine_equals_torch_on_shapes_unlike_the_example(bert_onnx):
    onnx_engine, torch_engine = Engine.load(bert_onnx, batch_size=5), Engine.load(bert_onnx, engine="torch")
    assert onnx_engine.runtime == "onnxruntime fp32" and torch_engine.runtime == "torch fp32"
    for texts, pairs in ((TEXTS[:1], PAIRS[:1]), (TEXTS, PAIRS)):  # batch 1; a batch of 5 and one of 1
        got, expected = onnx_engine.logits(texts, pairs), torch_engine.logits(texts, pairs)
        assert set(got) == {row[0] for row in STANDARD_TASKS}
        for name in got:
            assert got[name].shape == expected[name].shape
            assert (got[name] - expected[name]).abs().max().item() <= TOLERANCE, name


def test_runner_runs_each_branch_on_its_rows_and_drops_rows_early(bert_onnx):
    onnx_engine, torch_engine = Engine.load(bert_onnx), Engine.load(bert_onnx, engine="torch")
    runner = onnx_engine.model
    assert isinstance(runner, OnnxRunner)
    calls: list[tuple[str, int]] = []
    run_graph = runner.run_graph

    def counting(name, **inputs):
        calls.append((name, next(iter(inputs.values())).shape[0]))
        return run_graph(name, **inputs)

    runner.run_graph = counting
    enc = onnx_engine.encode(TEXTS, None, 48)
    batch = enc.batch(list(range(len(TEXTS))), onnx_engine.tokenizer.pad_token_id)
    # epsilon attaches at 0, alpha at 1, beta at 2, gamma at 3
    wants = {"epsilon": [0, 1, 2, 3, 4, 5], "alpha": [0, 2], "beta": [1], "gamma": [0, 3]}
    wants = {k: torch.tensor(v) for k, v in wants.items()}
    got = runner.forward_rows(*batch, wants)
    expected = torch_engine.model.forward_rows(*batch, wants)
    for name in wants:
        assert got[name].shape == (len(wants[name]), torch_engine.specs[name].num_outputs)
        assert (got[name] - expected[name]).abs().max().item() <= TOLERANCE, name
    # rows leave the trunk once no task they asked for attaches deeper: 6 -> 4 -> 3 -> 2
    assert sorted(calls) == sorted([("embeddings", 6), ("task_epsilon", 6), ("layers_1-1", 4), ("task_alpha", 2),
                                    ("layers_2-2", 3), ("task_beta", 1), ("layers_3-3", 2), ("task_gamma", 2)])
    calls.clear()
    runner.forward_rows(*batch, {"alpha": torch.tensor([1, 4])})
    assert calls == [("embeddings", 6), ("layers_1-1", 2), ("task_alpha", 2)], "trunk stops at layer 1"

    # the Engine with a different task set per row (calls of a server batch) equals the torch engine
    rows = [Row(TEXTS[i], PAIRS[i], tasks) for i, tasks in enumerate(
        [("alpha",), ("beta", "delta"), ("gamma",), ("epsilon", "alpha"), ("delta",), ("beta", "gamma")])]
    for a, b in zip(onnx_engine.run(rows), torch_engine.run(rows)):
        assert set(a.logits) == set(b.logits)
        for name in a.logits:
            assert (a.logits[name] - b.logits[name]).abs().max().item() <= TOLERANCE


def test_cli_predict_with_the_manifest_engine_equals_torch(bert_onnx, capsys):
    args = ["predict", "--model", str(bert_onnx), *[x for p in PAIRS for x in ("--pair", p)], *TEXTS]
    assert main(args) == 0
    onnx_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*args, "--engine", "torch"]) == 0
    torch_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(onnx_lines) == len(torch_lines) == len(TEXTS) * len(STANDARD_TASKS)
    for a, b in zip(onnx_lines, torch_lines):
        assert (a["task"], a.get("label"), a.get("labels")) == (b["task"], b.get("label"), b.get("labels"))
        assert a["scores"].keys() == b["scores"].keys()
        assert all(abs(a["scores"][k] - b["scores"][k]) <= TOLERANCE for k in a["scores"])
    assert main(["verify", "--model", str(bert_onnx), "--engine", "onnx", "--tolerance", "1e-4"]) == 0
    assert "(onnxruntime fp32)" in capsys.readouterr().out


def test_fusions_are_counted(bert_onnx):
    folder = model_folder(bert_onnx)
    info = manifest_of(bert_onnx)["engine"]
    segment = fusions(folder / "onnx/fp32/layers_1-1.onnx")
    assert segment and all(isinstance(n, int) and n > 0 for n in segment.values()), segment
    # ORT fuses each residual Add + LayerNorm of a layer into SkipLayerNormalization
    assert segment.get("SkipLayerNormalization", 0) + segment.get("LayerNormalization", 0) >= 2, segment
    total = total_fusions(folder / g["fp32"] for g in info["graphs"])
    assert total == info["fusions"]["fp32"]


def test_int8_reports_agreement_and_refuses_below_the_floor(bert_onnx, tmp_path, monkeypatch):
    folder = shutil.copytree(model_folder(bert_onnx), tmp_path / "version")
    manifest = manifest_of(bert_onnx)
    fp32 = Engine.load(bert_onnx, batch_size=8)
    info = EngineInfo.from_dict(manifest["engine"], MANIFEST)
    info = int8.add_int8(folder, info, fp32.model.reference, fp32, progress=False)
    # nothing to quantize in the embeddings: the int8 file is the fp32 graph, linked (no second copy on disk)
    assert {g["name"]: g["int8"] for g in info.graphs}["embeddings"] == "onnx/int8/embeddings.onnx"
    assert (folder / "onnx/int8/embeddings.onnx").stat().st_ino == (folder / "onnx/fp32/embeddings.onnx").stat().st_ino
    assert all((folder / g["int8"]).is_file() for g in info.graphs)
    assert info.fusions["int8"].get("DynamicQuantizeMatMul", 0) + \
        info.fusions["int8"].get("MatMulIntegerToFloat", 0) > 0, info.fusions["int8"]
    report = info.int8["tasks"]
    assert set(report) == {row[0] for row in STANDARD_TASKS}
    for name, r in report.items():
        assert r["decided"] < int8.MIN_DECIDED or r["decided_agreement"] >= int8.MIN_AGREEMENT, (name, r)
        assert r["relative_error"] <= int8.MAX_RELATIVE_ERROR, (name, r)
        assert 0 < r["max_abs_diff"] < 0.5, (name, r)

    # a quantized graph that answers otherwise is refused, naming the task
    int8_engine = Engine(OnnxRunner.load(folder, info, fp32.model.reference, "int8"), fp32.tokenizer)
    forward = int8_engine.model.forward_rows
    monkeypatch.setattr(int8_engine.model, "forward_rows", lambda *a: {k: -v for k, v in forward(*a).items()})
    with pytest.raises(CentraError, match=r"int8 graphs of task '\w+': a mean error of \d+% of fp32's logit"):
        int8.check_int8(fp32, int8_engine)
    # even a task fp32 decides on no sample (delta, a two-class pair task here) is checked
    undecided = min(report, key=lambda n: report[n]["decided"])
    monkeypatch.setattr(int8_engine.model, "forward_rows",
                        lambda *a: {k: (-v if k == undecided else v) for k, v in forward(*a).items()})
    with pytest.raises(CentraError, match=f"int8 graphs of task '{undecided}': a mean error"):
        int8.check_int8(fp32, int8_engine)


def test_xlmr_int8_merge_two_max_lengths_and_attach_0(tiny_models, tmp_path, capsys):
    bb = Backbone.load(tiny_models["xlmr"])
    for i, (name, kind, labels, input_kind, attach, layers, pooling, max_length) in enumerate([
            ("one", "multiclass", ["a", "b", "c"], "single", 0, 1, "mean", 48),
            ("two", "multilabel", ["x", "y"], "pair", 2, 1, "cls", 24)]):
        spec, head = init_task(bb, name, kind, labels, attach, layers, input=input_kind, pooling=pooling,
                               max_length=max_length, seed=i)
        save_task(tmp_path / "tasks" / name, spec, perturb(head, i))
    assert main(["merge", "--tasks-dir", str(tmp_path / "tasks"), "--out", str(tmp_path / "out"), "--engine", "onnx",
                 "--precision", "int8", "--keep-fp32"]) == 0
    out = capsys.readouterr().out
    assert "onnx: int8 one: label agreement with fp32" in out and "onnx: fp32 graphs after ORT_ENABLE_ALL" in out
    info = manifest_of(tmp_path / "out")["engine"]
    assert [g["name"] for g in info["graphs"]] == ["embeddings", "layers_1-2", "task_one", "task_two"]
    assert max(info["parity"].values()) <= TOLERANCE and info["precision"] == "int8"
    assert set(info["int8"]["tasks"]) == {"one", "two"}

    folder = model_folder(tmp_path / "out")
    torch_engine = Engine.load(folder, batch_size=4, engine="torch")
    manifest = read_manifest(folder)
    fp32 = Engine(OnnxRunner.load(folder, manifest.engine, torch_engine.model, "fp32", files=manifest.files),
                  torch_engine.tokenizer, batch_size=4)
    expected, got = torch_engine.logits(TEXTS, PAIRS), fp32.logits(TEXTS, PAIRS)
    for name in expected:
        assert (got[name] - expected[name]).abs().max().item() <= TOLERANCE, name
    int8_engine = Engine.load(tmp_path / "out", batch_size=4)  # the manifest's precision
    assert int8_engine.runtime == "onnxruntime int8"
    assert int8_engine.logits(TEXTS, PAIRS)["one"].shape == (len(TEXTS), 3)


def test_a_graph_that_differs_is_refused_and_out_untouched(bert_path, tmp_path, monkeypatch, capsys):
    import onnx
    from onnx import numpy_helper

    make_tasks(Backbone.load(bert_path), tmp_path / "tasks", STANDARD_TASKS[:1])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")  # a published torch version
    before = snapshot(tmp_path / "out")
    export_graph = export_onnx.export_graph

    def broken(module, example, path, *args):  # one weight of the written graph moved by 1e-2
        export_graph(module, example, path, *args)
        model = onnx.load(str(path))
        init = next(t for t in model.graph.initializer if len(t.dims) == 2 and "word" in t.name)
        array = numpy_helper.to_array(init).copy()
        array[:, 0] += 1e-2
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        onnx.save(model, str(path))

    monkeypatch.setattr(export_onnx, "export_graph", broken)
    assert main(["merge", "--tasks-dir", str(tmp_path / "tasks"), "--out", str(tmp_path / "out"),
                 "--engine", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ONNX graph 'embeddings' differs from PyTorch by" in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_published_graphs_are_hashed_and_engine_choices_checked(bert_onnx, bert_path, tmp_path):
    out = shutil.copytree(bert_onnx, tmp_path / "out", symlinks=True)
    graph = model_folder(out) / "onnx/fp32/task_beta.onnx"
    data = bytearray(graph.read_bytes())
    data[-5] ^= 0x01
    graph.write_bytes(bytes(data))
    for engine in ("onnx", "torch"):
        with pytest.raises(CentraError, match=r"task_beta\.onnx: sha256 differs from the manifest"):
            Engine.load(out, engine=engine)

    make_tasks(Backbone.load(bert_path), tmp_path / "tasks", STANDARD_TASKS[:1])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "plain")
    assert Engine.load(tmp_path / "plain").runtime == "torch fp32"
    with pytest.raises(CentraError, match="no ONNX graphs"):
        Engine.load(tmp_path / "plain", engine="onnx")
    with pytest.raises(CentraError, match="no TensorRT plans"):
        Engine.load(tmp_path / "plain", engine="tensorrt")
    with pytest.raises(CentraError, match="unknown engine 'openvino'"):
        Engine.load(tmp_path / "plain", engine="openvino")
    assert main(["merge", "--tasks-dir", str(tmp_path / "tasks"), "--out", str(tmp_path / "o2"),
                 "--precision", "int8"]) == 2
    assert not (tmp_path / "o2").exists()


def test_serve_loads_the_engine_asked_for(bert_onnx):
    from centra.serve.app import load_engine

    assert load_engine(model_folder(bert_onnx), 4).runtime == "onnxruntime fp32"
    assert load_engine(model_folder(bert_onnx), 4, "torch").runtime == "torch fp32"


def test_layout_segments_end_at_every_attach_layer(bert_onnx):
    specs = Engine.load(bert_onnx, engine="torch").specs
    layout = graph_layout(specs)
    assert [(g["first"], g["last"]) for g in layout if g["kind"] == "segment"] == [(1, 1), (2, 2), (3, 3)]
    only_deep = graph_layout([specs["gamma"], specs["epsilon"]])
    assert [(g["first"], g["last"]) for g in only_deep if g["kind"] == "segment"] == [(1, 3)]


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_fused_graphs_equal_the_layer_code(act, pooling):
    """centra.export.fused writes each layer in ORT's fused ops; its maths must be EncoderLayer's and
    TaskHead's, for every activation and pooling, on a padded batch."""
    import dataclasses

    import onnxruntime as ort

    from centra.core.backbone import EncoderConfig, attention_bias
    from centra.core.task import TaskHead, TaskSpec
    from centra.export.fused import branch_model, segment_model

    cfg = EncoderConfig("bert", 50, 32, 2, 4, 48, 64, 2, 1e-12, 0, act)
    spec = TaskSpec(name="t", kind="multilabel", labels=["x", "y", "z"], attach_layer=1, task_layers=2,
                    backbone={}, pooling=pooling)
    torch.manual_seed(0)
    head = perturb(TaskHead(spec, cfg), seed=1).eval()
    hidden = torch.randn(4, 9, 32)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:], mask[2, 2:], mask[3, 8:] = 0, 0, 0
    feeds = {"hidden": hidden.numpy(), "attention_mask": mask.numpy()}
    with torch.no_grad():
        expected = {"segment": head.layers[1](head.layers[0](hidden, attention_bias(mask)), attention_bias(mask)),
                    "branch": head(hidden, attention_bias(mask), mask)}
        models = {"segment": segment_model(list(head.layers), cfg, "segment"),
                  "branch": branch_model(head, cfg, "branch")}
    for name, model in models.items():
        ops = {n.op_type for n in model.graph.node}
        assert {"Attention", "SkipLayerNormalization"} <= ops, ops
        assert {"gelu": "BiasGelu", "gelu_new": "FastGelu", "relu": "Relu"}[act] in ops
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, feeds)[0])
        assert got.shape == expected[name].shape
        assert (got - expected[name]).abs().max().item() <= TOLERANCE, name
    with pytest.raises(CentraError, match="no fused ONNX form for hidden_act 'silu'"):
        segment_model(list(head.layers), dataclasses.replace(cfg, hidden_act="silu"), "segment")


def test_merge_writes_fused_graphs_and_int8_fuses_attention(bert_onnx, tmp_path):
    import onnx

    folder = model_folder(bert_onnx)
    info = manifest_of(bert_onnx)["engine"]
    assert info["style"] == "fused"
    for graph in info["graphs"][1:]:  # every layer stack; the embeddings are exported
        ops = {n.op_type for n in onnx.load(str(folder / graph["fp32"])).graph.node}
        if graph["kind"] == "segment" or graph["task"] != "epsilon" and graph["kind"] == "branch":
            assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= ops, (graph["name"], ops)
    assert info["fusions"]["fp32"]["Attention"] == 3 + sum(row[5] for row in STANDARD_TASKS)
    fp32 = Engine.load(bert_onnx, batch_size=8)
    version = shutil.copytree(folder, tmp_path / "version")
    quantized = int8.add_int8(version, EngineInfo.from_dict(info, MANIFEST), fp32.model.reference, fp32, progress=False)
    assert quantized.fusions["int8"].get("QAttention", 0) == quantized.fusions["fp32"]["Attention"], quantized.fusions


def test_portable_graphs_use_standard_ops_only(bert_path, tmp_path):
    """The "portable" style (for runtimes without ONNX Runtime's contrib ops, TensorRT) exports every graph
    and passes the same parity check."""
    import onnx

    make_tasks(Backbone.load(bert_path), tmp_path / "tasks", STANDARD_TASKS[:2])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    engine = Engine.load(tmp_path / "out", engine="torch")
    info = export_onnx.export_onnx(engine.model, tmp_path / "graphs", progress=False, style="portable")
    assert info.style == "portable" and max(info.parity.values()) <= TOLERANCE
    for graph in info.graphs:
        model = onnx.load(str(tmp_path / "graphs" / graph["fp32"]))
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, graph["name"]
    with pytest.raises(CentraError, match="unknown ONNX graph style 'fast'"):
        export_onnx.export_onnx(engine.model, tmp_path / "g2", progress=False, style="fast")


def test_a_fused_graph_that_differs_is_refused(bert_path, tmp_path, monkeypatch, capsys):
    from centra.export import fused

    make_tasks(Backbone.load(bert_path), tmp_path / "tasks", STANDARD_TASKS[:1])  # alpha: attach 1, 1 layer
    add_layer = fused.add_layer

    def no_output_bias(b, layer, cfg, x, prefix):  # the attention output's bias left out
        saved = layer.o.bias.clone()
        with torch.no_grad():
            layer.o.bias.zero_()
        try:
            return add_layer(b, layer, cfg, x, prefix)
        finally:
            with torch.no_grad():
                layer.o.bias.copy_(saved)

    monkeypatch.setattr(fused, "add_layer", no_output_bias)
    assert main(["merge", "--tasks-dir", str(tmp_path / "tasks"), "--out", str(tmp_path / "out"),
                 "--engine", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
    assert err[-1].startswith("centra: error: ONNX graph 'task_alpha' differs from PyTorch by"), err
    assert not any("Traceback" in line for line in err)  # (the tiny trunk's biases are 0: its layers pass)
    assert not (tmp_path / "out").exists()


def test_evaluate_against_another_engine(bert_onnx, tmp_path, capsys, monkeypatch):
    """`evaluate --engine onnx --against torch`: both engines' metrics, the share of answers alike and the
    deltas; an engine that answers otherwise shows in the agreement."""
    data = tmp_path / "dev.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in zip(TEXTS, ["neg", "neu", "pos"] * 3)))
    args = ["evaluate", "--model", str(bert_onnx), "--task", "alpha", "--data", str(data), "--engine", "onnx",
            "--text-column", "text", "--label-column", "label"]
    assert main([*args, "--against", "torch"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    other = result["against"]
    assert other["engine"] == "torch fp32" and other["agreement"] == 1.0  # fp32 ONNX: parity 1e-4
    assert other["delta"]["accuracy"] == pytest.approx(result["accuracy"] - other["accuracy"], abs=1e-6)

    logits = OnnxRunner.forward_rows
    monkeypatch.setattr(OnnxRunner, "forward_rows", lambda self, *a: {k: -v for k, v in logits(self, *a).items()})
    assert main([*args, "--against", "torch"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["against"]["agreement"] < 0.5, result  # negated logits: the argmax moves on most rows
