"""`centra export-triton --engine tensorrt`, checked without a Triton server: the same repository with
standard-op fp16 graphs (fp32 in and out) for ONNX Runtime's TensorRT execution accelerator on KIND_GPU
instances, its wiring and accelerator parameters, the graphs held to what TensorRT's ONNX parser takes
(test_tensorrt.py's `tensorrt_problems`), and int8 refused in one line. The config checks are
tests/triton_repo.py's, as in test_triton.py.
"""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch's dynamo exporter needs it
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient is not installed (pip install tritonclient)", allow_module_level=True)

from helpers import STANDARD_TASKS
from triton_repo import configs_of, summary_of, wiring_problems

from centra.cli import main
from centra.export import triton


def test_tensorrt_repository_runs_standard_ops_through_the_tensorrt_provider(bert_out, tmp_path, capsys):
    """--engine tensorrt: the same repository with standard-op graphs and ONNX Runtime's TensorRT execution
    accelerator on KIND_GPU instances, fp16 by default: fp16 graphs (fp32 in and out), since TensorRT 11
    takes the precision from the graph, checked against PyTorch fp32 as centra's TensorRT build checks them."""
    import onnx
    from test_tensorrt import tensorrt_problems

    from centra.export.tensorrt import FP16_MAX_RELATIVE_ERROR

    repo = tmp_path / "trt"
    assert main(["export-triton", "--backend", "onnxruntime", "--model", str(bert_out), "--repo", str(repo), "--engine",
                 "tensorrt"]) == 0
    summary = summary_of(repo)
    assert summary["engine"] == "tensorrt" and summary["precision"] == "fp16"
    assert summary["graphs_from"] == "fp16 portable ONNX graphs (fp32 in and out) exported from torch"
    assert summary["reference"] == "onnxruntime fp16"  # the composed graphs match the checked fp16 graphs
    assert max(summary["parity"].values()) <= triton.TOLERANCE
    check = summary["onnx_checks"]["fp16"]["tasks"]
    assert set(check) == {row[0] for row in STANDARD_TASKS}
    assert all(r["relative_error"] <= FP16_MAX_RELATIVE_ERROR for r in check.values()), check
    configs = configs_of(repo)
    assert wiring_problems(configs) == []
    graphs = [name for name, cfg in configs.items() if cfg.platform == "onnxruntime_onnx"]
    assert len(graphs) == 2
    for name in graphs:
        cfg = configs[name]
        assert [g.kind for g in cfg.instance_group] == [cfg.instance_group[0].KIND_GPU]
        (accelerator,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
        length = summary["groups"][0]["max_length"]
        assert accelerator.parameters["trt_profile_max_shapes"] == ",".join(
            f"{n}:32x{length}" for n in ("input_ids", "attention_mask", "token_type_ids"))
        assert accelerator.parameters["trt_profile_min_shapes"].count(":1x1") == 3
        model = onnx.load(str(repo / name / "1" / "model.onnx"))
        assert tensorrt_problems(model) == [], name  # standard ops TensorRT's parser takes
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), name
        io = {t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]}
        assert io == {onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}, name  # fp32 logits out
    readme = (repo / "README.md").read_text()
    assert "TensorRT execution provider" in readme and "strongly typed" in readme
    capsys.readouterr()
    assert main(["export-triton", "--backend", "onnxruntime", "--model", str(bert_out), "--repo", str(tmp_path / "t2"),
                 "--engine", "tensorrt", "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "precision 'int8' does not apply to --engine tensorrt" in err, err
    assert not (tmp_path / "t2").exists()
