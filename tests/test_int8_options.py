"""ONNX int8 with node groups kept in fp32 (`merge --int8-fp32 ffn-out`): the FFN output projections stay
float MatMuls and everything else is quantized as before; the check's report records the choice; the
choice is part of the int8 graphs' reuse key (a merge with the other choice quantizes again, one with the
same choice links); a graph with nothing left to quantize serves its fp32 graph; the option is refused
outside ONNX int8, and unknown groups by name.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from helpers import STANDARD_TASKS, make_tasks

from centra.cli import main
from centra.core import INT8_FP32
from centra.core.backbone import Backbone
from centra.core.versions import VERSIONS, read_manifest
from centra.errors import CentraError
from centra.export import int8
from centra.export.engines import check_int8_fp32, merge
from centra.export.onnx import export_onnx

# alpha (attach 1, 1 task layer) and gamma (attach 3, 1 task layer): a 1-layer and a 2-layer trunk segment
ROWS = [row for row in STANDARD_TASKS if row[0] in ("alpha", "gamma")]


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory) -> dict:
    """One OUT merged three times, ONNX int8: with --int8-fp32 ffn-out (through the CLI), without it, and
    with it again."""
    root = tmp_path_factory.mktemp("int8-fp32")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks", ROWS)
    out = root / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["merge", "--tasks-dir", str(root / "tasks"), "--out", str(out), "--engine", "onnx",
                     "--precision", "int8", "--int8-fp32", "ffn-out"]) == 0
    manifests = [read_manifest(out / VERSIONS / "v000001")]
    for groups in ((), ["ffn-out"]):
        manifests.append(merge(root / "tasks", out, engine="onnx", precision="int8", int8_fp32=groups,
                               progress=False))
    return {"root": root, "out": out, "printed": printed.getvalue(), "manifests": manifests}


def folder_of(merged: dict, manifest) -> Path:
    return merged["out"] / VERSIONS / manifest.version


def int8_graphs(merged: dict, manifest) -> dict:
    import onnx

    return {g["name"]: onnx.load(str(folder_of(merged, manifest) / g["int8"])).graph for g in manifest.engine.graphs
            if g["kind"] != "embeddings"}


def matmuls(graph) -> tuple[set[str], set[str], set[str]]:
    """The float weight MatMuls, the integer MatMuls and the tensors DynamicQuantizeLinear quantizes."""
    weights = {init.name for init in graph.initializer}
    float_ = {n.name for n in graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)}
    integer = {n.name for n in graph.node if n.op_type == "MatMulInteger"}
    quantized = {n.input[0] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    return float_, integer, quantized


def test_ffn_out_projections_stay_float_and_the_rest_is_int8(merged):
    kept, every = (int8_graphs(merged, m) for m in merged["manifests"][:2])
    assert set(kept) == {"layers_1-1", "layers_2-3", "task_alpha", "task_gamma"}
    for name, graph in kept.items():
        layers = sum(1 for n in graph.node if n.op_type == "QAttention")  # attention is quantized still
        assert layers == (2 if name == "layers_2-3" else 1), name
        fc2 = {f"layer{k}.fc2" for k in range(layers)}
        others = {f"layer{k}.{p}_quant" for k in range(layers) for p in ("o", "fc1")}
        others |= {"pooler_quant", "classifier_quant"} if name.startswith("task_") else set()
        float_, integer, quantized = matmuls(graph)
        assert float_ == fc2, name  # the projection's weight stays a float initializer
        assert integer == others, name
        assert not quantized & {f"layer{k}.act" for k in range(layers)}, name  # its input is not quantized either
        initializers = {init.name: init for init in graph.initializer}
        assert all(initializers[f"{n}.weight"].data_type == 1 for n in fc2), name  # onnx FLOAT
        # all-int8 (the default) quantizes the same projections
        float_, integer, quantized = matmuls(every[name])
        assert not float_ and integer == others | {f"{n}_quant" for n in fc2}, name
        assert {f"layer{k}.act" for k in range(layers)} <= quantized, name


def test_the_int8_report_records_the_choice(merged):
    kept, every, again = merged["manifests"]
    assert kept.engine.int8["int8_fp32"] == again.engine.int8["int8_fp32"] == ["ffn-out"]
    assert every.engine.int8["int8_fp32"] == []
    assert set(kept.engine.int8["tasks"]) == {"alpha", "gamma"}
    assert "onnx: int8 graphs keep ffn-out in fp32" in merged["printed"]


def test_a_merge_with_the_other_choice_quantizes_again(merged):
    kept, every, again = merged["manifests"]
    first, second, third = ({g["name"]: g for g in m.engine.graphs} for m in merged["manifests"])
    for name, graph in second.items():  # the all-int8 merge reuses nothing of the ffn-out version
        assert not graph.get("reused"), name
        assert graph["keys"]["int8"] != first[name]["keys"]["int8"], name
        path = folder_of(merged, every) / graph["int8"]
        assert path.stat().st_ino != (folder_of(merged, kept) / first[name]["int8"]).stat().st_ino, name
    assert {t: r["path_key"] for t, r in every.engine.int8["tasks"].items()} != \
        {t: r["path_key"] for t, r in kept.engine.int8["tasks"].items()}  # checked again, not carried over
    for name, graph in third.items():  # the same choice again: linked from the first version, check carried
        assert graph.get("reused") and graph["keys"] == first[name]["keys"], name
        assert (folder_of(merged, again) / graph["int8"]).stat().st_ino == \
            (folder_of(merged, kept) / first[name]["int8"]).stat().st_ino, name
    assert again.engine.int8["tasks"] == kept.engine.int8["tasks"]
    # the all-int8 key is the one versions before the option recorded: their graphs are still reused
    assert "fp32_nodes" not in int8.quantizer_identity() and "int8_fp32" not in int8.check_settings()
    assert int8.quantizer_identity(["ffn-out"])["fp32_nodes"] == ["ffn-out"]


def test_a_graph_with_every_quantizable_node_kept_serves_fp32(tmp_path):
    """Like the embeddings graph: nothing is left to quantize, so nothing is written."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "layer0.fc2.weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["hidden", "layer0.fc2.weight"], ["out"], name="layer0.fc2")],
                              "fc2", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10),
              str(tmp_path / "fc2.onnx"))
    assert not int8.quantize_graph(tmp_path / "fc2.onnx", tmp_path / "int8" / "kept.onnx", int8_fp32=["ffn-out"])
    assert not (tmp_path / "int8" / "kept.onnx").exists()
    assert int8.quantize_graph(tmp_path / "fc2.onnx", tmp_path / "int8" / "all.onnx")
    assert (tmp_path / "int8" / "all.onnx").is_file()


def test_int8_fp32_is_refused_outside_onnx_int8_and_by_unknown_name(merged, tmp_path, capsys):
    args = ["merge", "--tasks-dir", str(merged["root"] / "tasks"), "--out", str(tmp_path / "out"),
            "--int8-fp32", "ffn-out"]
    for engine in (["--engine", "torch"], ["--engine", "onnx"], ["--engine", "onnx", "--precision", "fp32"],
                   ["--engine", "tensorrt", "--precision", "fp16"]):
        assert main([*args, *engine]) == 2, engine
        err = capsys.readouterr().err.strip()
        assert err == "centra: error: merge: --int8-fp32 applies to --engine onnx --precision int8", (engine, err)
    assert main([*args[:-1], "ffn-in", "--engine", "onnx", "--precision", "int8"]) == 2
    assert "ffn-in" in capsys.readouterr().err
    with pytest.raises(CentraError, match=r"^int8_fp32 'ffn-in' is unknown \(known: ffn-out\)$"):
        merge(merged["root"] / "tasks", tmp_path / "out", engine="onnx", precision="int8", int8_fp32=["ffn-in"])
    with pytest.raises(CentraError, match=r"^int8_fp32 applies to engine onnx precision int8$"):
        merge(merged["root"] / "tasks", tmp_path / "out", engine="torch", int8_fp32="ffn-out")
    assert not (tmp_path / "out").exists()
    # the groups are node names of the fused graphs: the portable ones (and fp32) are refused before any work
    for precision, style in (("int8", "portable"), ("fp32", "fused")):
        with pytest.raises(CentraError, match=f"applies to int8 graphs of the fused style, not {precision} {style}$"):
            export_onnx(None, tmp_path / "graphs", precision, tokenizer=object(), style=style, int8_fp32=["ffn-out"])
    assert not (tmp_path / "graphs").exists()


def test_the_groups_have_one_name_each():
    from centra.cli import build_parser
    from centra.measure.languages import LanguagesOptions

    assert set(int8.FP32_NODES) == set(INT8_FP32)
    assert check_int8_fp32(["ffn-out", "ffn-out"]) == check_int8_fp32("ffn-out") == ("ffn-out",)
    assert check_int8_fp32(None) == ()
    # `centra languages` merges its runs with the same choice
    assert build_parser().parse_args(["languages", "--int8-fp32", "ffn-out"]).int8_fp32 == ["ffn-out"]
    LanguagesOptions(int8_fp32=("ffn-out",)).check()
    with pytest.raises(CentraError, match="int8_fp32 'ffn' is unknown"):
        LanguagesOptions(int8_fp32=("ffn",)).check()
