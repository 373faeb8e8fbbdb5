"""The TensorRT engine: what runs without a GPU (the ONNX graphs TensorRT builds from, checked on ONNX
Runtime; profiles; calibration; one-line refusals) and, where tensorrt and a CUDA GPU are present, the
build, its parity check and serving through the engine interface.

Tolerances: fp16 ONNX vs PyTorch fp32, relative logit error <= centra.export.tensorrt.FP16_MAX_RELATIVE_ERROR;
int8 QDQ: the int8 check's bounds (centra.export.int8); TensorRT fp32: FP32_TOLERANCE.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch
from conftest import PAIRS, TEXTS
from helpers import STANDARD_TASKS, make_tasks

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.manifest import EngineInfo
from centra.core.merge import MANIFEST, model_folder, plan_merge, write_merged
from centra.errors import CentraError
from centra.export import tensorrt as export_trt
from centra.export.int8 import MAX_RELATIVE_ERROR
from centra.export.onnx import export_onnx
from centra.runtime.engine import Engine
from centra.runtime.graphs import graph_layout

HAVE_GPU_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU_TRT, reason="needs tensorrt and a CUDA GPU")
CALIBRATION = (TEXTS * 4, list(zip(TEXTS, PAIRS)) * 4)


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trt")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks")
    write_merged(plan_merge([root / "tasks"]), root / "out")
    return root


def test_profiles_cover_batch_and_length(merged):
    engine = Engine.load(merged / "out", engine="torch")
    layout = graph_layout(engine.specs)
    shapes = export_trt.profile_shapes(layout[0], 32, 64, 128)
    assert shapes == {"input_ids": ((1, 1), (32, 64), (64, 128)), "token_type_ids": ((1, 1), (32, 64), (64, 128))}
    shapes = export_trt.profile_shapes(layout[1], 32, 8, 20)  # opt never above max
    assert shapes["hidden"] == ((1, 1, 32), (8, 20, 32), (8, 20, 32))
    assert shapes["attention_mask"] == ((1, 1), (8, 20), (8, 20))


def test_calibration_batches_share_one_shape_and_feed_each_graph(merged):
    engine = Engine.load(merged / "out", engine="torch")
    model = engine.model
    batches = export_trt.calibration_batches(model, engine.tokenizer, *CALIBRATION)
    assert set(batches) == {s.encoding_key for s in model.specs.values()}
    shapes = {tuple(t.shape) for group in batches.values() for batch in group for t in batch}
    assert len(shapes) == 1, shapes  # the percentile calibrator stacks what it collects
    layout = {g["name"]: g for g in graph_layout(model.specs)}
    segment = export_trt.calibration_feeds(model, batches, layout["layers_1-1"])
    assert len(segment) == sum(len(g) for g in batches.values())  # a trunk segment sees every token group
    with torch.inference_mode():  # the hidden state entering layer 1: the embeddings' output
        ids, mask, types = batches[model.specs["alpha"].encoding_key][0]
        assert torch.allclose(torch.from_numpy(segment[0]["hidden"]), model.embeddings(ids, types))
    pair = export_trt.calibration_feeds(model, batches, layout["task_delta"])  # delta: a pair task
    assert len(pair) == len(batches[model.specs["delta"].encoding_key])
    with pytest.raises(CentraError, match="takes text pairs and no pairs were given"):
        export_trt.calibration_batches(model, engine.tokenizer, TEXTS, [])


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_graphs_tensorrt_builds_from_agree_with_pytorch(merged, tmp_path, precision):
    """fp16 (half precision inside, fp32 at the edges) and int8 (QDQ, calibrated) graphs, checked on
    ONNX Runtime against PyTorch fp32 before any TensorRT build."""
    import onnx

    engine = Engine.load(merged / "out", engine="torch")
    info = export_onnx(engine.model, tmp_path, "fp32", progress=False, style="portable")
    sources, checks = export_trt.precision_graphs(engine.model, engine.tokenizer, tmp_path, info, precision,
                                                  CALIBRATION, progress=False)
    report = checks[precision]
    assert set(report["tasks"]) == {row[0] for row in STANDARD_TASKS}
    bound = export_trt.FP16_MAX_RELATIVE_ERROR if precision == "fp16" else report["max_relative_error"]
    assert all(r["relative_error"] <= bound for r in report["tasks"].values()), report["tasks"]
    for name, rel in sources.items():
        model = onnx.load(str(tmp_path / rel))
        ops = {n.op_type for n in model.graph.node}
        io = [t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]]
        assert onnx.TensorProto.FLOAT16 not in io, name  # graphs chain in fp32 whatever is inside
        if precision == "fp16":
            assert rel == f"onnx/fp16/{name}.onnx"
            assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), name
        elif name == "embeddings":
            assert rel == "onnx/fp32/embeddings.onnx"  # no weight MatMul to quantize
        else:
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
            assert not {n.domain for n in model.graph.node} - {"", "ai.onnx"}, name  # TensorRT parses them


def test_merge_without_tensorrt_is_one_line_and_publishes_nothing(merged, tmp_path, capsys):
    if HAVE_GPU_TRT:
        pytest.skip("tensorrt and a GPU are present here")
    args = ["merge", "--tasks-dir", str(merged / "tasks"), "--out", str(tmp_path / "out")]
    assert main([*args, "--engine", "tensorrt", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TensorRT engine needs" in err, err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--engine", "onnx", "--precision", "fp16"]) == 2
    assert "--precision fp16 does not apply to --engine onnx" in capsys.readouterr().err
    assert main([*args, "--engine", "onnx", "--max-batch", "8"]) == 2
    assert "apply to --engine tensorrt" in capsys.readouterr().err
    assert main([*args, "--engine", "tensorrt", "--precision", "int8"]) == 2  # calibrated on what it is checked on
    assert "--precision int8 needs --calibration FILE" in capsys.readouterr().err
    (tmp_path / "texts.txt").write_text("a text\n")
    assert main([*args, "--engine", "tensorrt", "--calibration", str(tmp_path / "texts.txt")]) == 2  # fp16
    assert "--calibration applies to int8 only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_tensorrt_version_without_tensorrt_is_one_line(merged, tmp_path):
    if HAVE_GPU_TRT:
        pytest.skip("tensorrt and a GPU are present here")
    fake = {"name": "tensorrt", "precision": "fp16", "graphs": []}
    write_merged(plan_merge([merged / "tasks"]), tmp_path / "out",
                 extend=lambda stage, manifest: EngineInfo.from_dict(fake, MANIFEST))
    with pytest.raises(CentraError, match="TensorRT engine needs"):
        Engine.load(tmp_path / "out")
    assert Engine.load(tmp_path / "out", engine="torch").runtime == "torch fp32"  # the torch files still serve


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_merge_predict_and_slices(merged, tmp_path, precision, capsys):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("".join(f"{t}\t{p}\n" for t, p in zip(TEXTS * 4, PAIRS * 4)))
    extra = ["--calibration", str(calibration)] if precision == "int8" else []
    assert main(["merge", "--tasks-dir", str(merged / "tasks"), "--out", str(tmp_path / "out"), "--engine", "tensorrt",
                 "--precision", precision, "--max-batch", "4", *extra]) == 0
    assert f"{precision} plans" in capsys.readouterr().out
    info = json.loads((model_folder(tmp_path / "out") / MANIFEST).read_text())["engine"]
    assert info["name"] == "tensorrt" and info["precision"] == precision and info["max_batch"] == 4
    trt_engine = Engine.load(tmp_path / "out", batch_size=len(TEXTS))  # batches above 4 run in slices
    assert trt_engine.runtime == f"tensorrt {precision}"
    torch_engine = Engine.load(tmp_path / "out", engine="torch")
    got, expected = trt_engine.logits(TEXTS, PAIRS), torch_engine.logits(TEXTS, PAIRS)
    for name in expected:
        assert got[name].shape == expected[name].shape
        if precision == "fp32":
            assert (got[name] - expected[name]).abs().max().item() <= export_trt.FP32_TOLERANCE, name
        else:
            error = (got[name] - expected[name]).abs().mean() / expected[name].pow(2).mean().sqrt().clamp(min=1e-6)
            bound = export_trt.FP16_MAX_RELATIVE_ERROR if precision == "fp16" else MAX_RELATIVE_ERROR
            assert error.item() <= bound, name
