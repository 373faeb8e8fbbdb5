"""The TensorRT engine: what runs without a GPU (the ONNX graphs TensorRT builds from, checked on ONNX
Runtime; profiles; calibration; one-line refusals) and, where tensorrt and a CUDA GPU are present, the
build, its parity check and serving through the engine interface.

Tolerances: fp16 ONNX vs PyTorch fp32, relative logit error <= centra.export.tensorrt.FP16_MAX_RELATIVE_ERROR;
int8 QDQ: the int8 check's bounds (centra.export.int8); TensorRT fp32: FP32_TOLERANCE.

The graphs are held to what TensorRT's ONNX parser takes (TENSORRT_ONNX_OPS, `tensorrt_problems`). The
TensorRT logger, the per-build/run error reset and the GPU check run against fakes of tensorrt in
test_tensorrt_fakes.py.
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
from centra.core.merge import plan_merge, write_merged
from centra.core.versions import MANIFEST, model_folder
from centra.errors import CentraError
from centra.export import tensorrt as export_trt
from centra.export.int8 import MAX_RELATIVE_ERROR
from centra.export.onnx import export_onnx
from centra.runtime import tensorrt as runtime_trt
from centra.runtime.engine import Engine
from centra.runtime.graphs import graph_layout

HAVE_GPU_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU_TRT, reason="needs tensorrt and a CUDA GPU")
CALIBRATION = (TEXTS * 4, list(zip(TEXTS, PAIRS)) * 4)

# The operators TensorRT's ONNX parser takes: the "Y" rows of onnx-tensorrt's docs/operators.md, branch
# 10.1-GA (github.com/onnx/onnx-tensorrt, "TensorRT 10.0 supports operators in the inclusive range of
# opset 9 to opset 20"). Its restrictions that centra's graphs could meet are checked in tensorrt_problems:
# DequantizeLinear reads INT8, FP8 or INT4 with a zero x_zero_point; QuantizeLinear's y_zero_point is 0.
TENSORRT_ONNX_OPS = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
    IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot
    Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
    ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
    Unsqueeze Upsample Where Xor""".split())
TENSORRT_OPSETS = range(9, 21)  # the same page: opsets 9 to 20


def tensorrt_problems(model) -> list[str]:
    """What in an ONNX model TensorRT's parser would refuse, one line each (empty: none found)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    dequantizable = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}  # IDequantizeLayer's inputs
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    problems = [f"opset {o.version}" for o in model.opset_import
                if o.domain in ("", "ai.onnx") and o.version not in TENSORRT_OPSETS]
    for node in model.graph.node:
        where = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_ONNX_OPS:
            problems.append(f"{where}: not an operator TensorRT parses ({node.domain or 'ai.onnx'})")
        if node.op_type == "DequantizeLinear" and types.get(node.input[0]) not in dequantizable:
            name = TensorProto.DataType.Name(types[node.input[0]]) if node.input[0] in types else "unknown"
            problems.append(f"{where}: dequantizes {name}, not int8/fp8/int4")
        point = node.input[2] if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 \
            else ""
        if point and (point not in constants or constants[point].any()):
            problems.append(f"{where}: a zero point that is not a constant zero")
    return problems


def shared_dequantized(model) -> list[str]:
    """DequantizeLinear outputs read by more than one quantized op (MatMul, Gemm): a Q/DQ pair shared
    between consumers. (ONNX Runtime also lets a residual Add read the pair of a tensor with one quantized
    consumer; that Add is no GEMM TensorRT fuses a pair into.)"""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input if node.op_type in ("MatMul", "Gemm") else ():
            readers[name] = readers.get(name, 0) + 1
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and readers.get(n.output[0], 0) > 1]


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
    sources, checks, runner = export_trt.precision_graphs(engine.model, engine.tokenizer, tmp_path, info,
                                                          precision, CALIBRATION, progress=False)
    assert runner.runtime == f"onnxruntime {precision}"  # the checked graphs, for Triton's repository
    report = checks[precision]
    assert set(report["tasks"]) == {row[0] for row in STANDARD_TASKS}
    bound = export_trt.FP16_MAX_RELATIVE_ERROR if precision == "fp16" else report["max_relative_error"]
    assert all(r["relative_error"] <= bound for r in report["tasks"].values()), report["tasks"]
    for name, rel in sources.items():
        model = onnx.load(str(tmp_path / rel))
        ops = {n.op_type for n in model.graph.node}
        io = [t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]]
        assert onnx.TensorProto.FLOAT16 not in io, name  # graphs chain in fp32 whatever is inside
        assert tensorrt_problems(model) == [], name
        if precision == "fp16":
            assert rel == f"onnx/fp16/{name}.onnx"
            assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), name
        elif name == "embeddings":
            assert rel == "onnx/fp32/embeddings.onnx"  # no weight MatMul to quantize
        else:
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
            assert shared_dequantized(model) == [], name  # Q, K and V each read their own pair


def biased_gemms(path: Path) -> Path:
    """A graph of two Gemm carrying their bias (C) and reading one input: what ONNX Runtime's default
    QuantizeBias would give an int32 bias behind a DequantizeLinear, and one shared Q/DQ pair."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    weights = [numpy_helper.from_array(torch.randn(shape, generator=g).numpy(), name)
               for name, shape in [("w1", (4, 8)), ("b1", (4,)), ("w2", (4, 8)), ("b2", (4,))]]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="gemm1", transB=1),
             helper.make_node("Gemm", ["x", "w2", "b2"], ["y2"], name="gemm2", transB=1),
             helper.make_node("Add", ["y1", "y2"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_qdq_keeps_biases_fp32_and_gives_each_consumer_its_pair(tmp_path):
    """qdq_graph on a hand-built graph whose Gemm carry their bias (the exporter's Gemm today do not):
    every DequantizeLinear reads int8, each bias reaches its Gemm in fp32, each Gemm has its own pair."""
    import numpy as np
    import onnx

    from centra.runtime.onnx import open_session

    src = biased_gemms(tmp_path / "biased.onnx")
    feeds = [{"x": torch.randn(16, 8, generator=torch.Generator().manual_seed(i)).numpy()} for i in range(4)]
    assert export_trt.qdq_graph(src, tmp_path / "qdq.onnx", feeds)
    model = onnx.load(str(tmp_path / "qdq.onnx"))
    assert tensorrt_problems(model) == []
    gemms = {n.name: n for n in model.graph.node if n.op_type == "Gemm"}
    assert [gemms["gemm1"].input[2], gemms["gemm2"].input[2]] == ["b1", "b2"]  # the fp32 initializers themselves
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 4  # two weights, two activations
    assert shared_dequantized(model) == []
    got = open_session(tmp_path / "qdq.onnx").run(None, feeds[0])[0]
    expected = open_session(src).run(None, feeds[0])[0]
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()  # int8 rounding, not a broken graph


def test_tensorrt_problems_names_what_the_parser_refuses(tmp_path):
    """The check itself: an int32 DequantizeLinear (ONNX Runtime's quantized bias), an ONNX Runtime
    contrib op and a shared pair are each found."""
    from onnx import TensorProto, helper, numpy_helper

    bias = numpy_helper.from_array(torch.arange(4, dtype=torch.int32).numpy(), "bias_quantized")
    scale = numpy_helper.from_array(torch.tensor(0.5).numpy(), "bias_scale")
    nodes = [helper.make_node("DequantizeLinear", ["bias_quantized", "bias_scale"], ["bias"], name="dq_bias"),
             helper.make_node("BiasGelu", ["x", "bias"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "bias"], ["h"], name="matmul1"),
             helper.make_node("MatMul", ["h", "bias"], ["y"], name="matmul2")]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              initializer=[bias, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    problems = tensorrt_problems(model)
    assert any("dq_bias" in p and "INT32" in p for p in problems), problems
    assert any("BiasGelu" in p and "com.microsoft" in p for p in problems), problems
    assert shared_dequantized(model) == ["dq_bias"]


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
    device = torch.device("cuda", torch.cuda.current_device())
    assert (info["device"], info["compute_capability"]) == runtime_trt.gpu_description(device)
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
