"""`centra export-triton`: the Triton model repository of a merged model, checked without a Triton server.

Every config.pbtxt is parsed with Triton's own ModelConfig protobuf (tritonclient's model_config_pb2.py,
loaded from its file so grpc is not imported; tests/triton_repo.py); the ensemble's wiring is checked
tensor by tensor against the step models' configs, and the graph configs against the ONNX files. The
tokenizer model's plain function (and its `execute`, under a stand-in for triton_python_backend_utils)
must give the ids `centra predict` computes, and the ONNX graphs run on those ids must give the engine's
logits (1e-4). The repository for ONNX Runtime's TensorRT execution provider (--engine tensorrt) is
checked in test_triton_tensorrt.py.

Tolerance: 1e-4 (fp32 ONNX vs PyTorch, as tests/test_onnx.py); int8 graphs vs the version's int8 engine on
the same batch, 1e-4 too (the graphs are the version's own int8 graphs, composed).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch's dynamo exporter needs it
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient is not installed (pip install tritonclient)", allow_module_level=True)

from conftest import PAIRS, TEXTS, snapshot
from helpers import STANDARD_TASKS, make_tasks
from triton_repo import configs_of, data_type, parse_config, summary_of, wiring_problems

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.tokens import encode
from centra.errors import CentraError
from centra.export import triton
from centra.runtime.engine import Engine, Row

TOLERANCE = 1e-4
LONG = " ".join(TEXTS * 3)  # longer than any task's max_length (48): truncated
ONNX_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64"}


@pytest.fixture(scope="module")
def repos(bert_out, tiny_models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (merged model, Triton repository): bert fp32 and int8 (the version's graphs), and XLM-R
    with one token group, merged for torch only (graphs exported by export-triton)."""
    root = tmp_path_factory.mktemp("triton-repos")
    rows = [r for r in STANDARD_TASKS if r[0] in ("alpha", "epsilon")]
    make_tasks(Backbone.load(tiny_models["xlmr"]), root / "xtasks", rows)
    assert main(["merge", "--tasks-dir", str(root / "xtasks"), "--out", str(root / "xout")]) == 0
    found = {"fp32": (bert_out, root / "fp32"), "int8": (bert_out, root / "int8"), "xlmr": (root / "xout", root / "x")}
    for name, (out, repo) in found.items():
        extra = ["--precision", name] if name != "xlmr" else ["--max-batch", "8"]
        assert main(["export-triton", "--backend", "onnxruntime", "--model", str(out), "--repo", str(repo), *extra]) \
            == 0, name
    return found


def test_layout_and_every_config_parses(repos):
    fp32, int8, xlmr = (configs_of(repos[n][1]) for n in ("fp32", "int8", "xlmr"))
    assert set(fp32) == {"centra", "centra_tokenizer_single_48", "centra_graph_single_48",
                         "centra_tokenizer_pair_48", "centra_graph_pair_48"}
    assert set(xlmr) == {"centra", "centra_tokenizer", "centra_graph"}, "one token group: unsuffixed names"
    for configs, batch, name in ((fp32, 32, "fp32"), (int8, 32, "int8"), (xlmr, 8, "xlmr")):
        repo = repos[name][1]
        assert (repo / "centra" / "1").is_dir(), "an ensemble has an (empty) version folder"
        assert f"tritonserver --model-repository {repo}" in (repo / "README.md").read_text()
        for name, cfg in configs.items():
            assert cfg.max_batch_size == batch, name
            if name == "centra":
                assert cfg.platform == "ensemble" and not cfg.HasField("dynamic_batching")
            elif "tokenizer" in name:
                assert cfg.backend == "python" and cfg.HasField("dynamic_batching")
                assert (repo / name / "1" / "model.py").read_bytes() == triton.MODEL_SOURCE.read_bytes()
                assert (repo / name / "1" / "tokenizer" / "tokenizer.json").is_file()
            else:
                assert cfg.platform == "onnxruntime_onnx" and cfg.HasField("dynamic_batching")
    kinds = {c.kind for c in int8["centra_graph_single_48"].instance_group}
    assert kinds == {int8["centra_graph_single_48"].instance_group[0].KIND_CPU}, "int8 graphs are CPU graphs"
    assert summary_of(repos["xlmr"][1])["graphs_from"].endswith("exported from torch")
    assert summary_of(repos["fp32"][1])["graphs_from"] == "the version's fp32 ONNX graphs"


def test_ensemble_wiring_is_consistent(repos):
    for name, (out, repo) in repos.items():
        configs = configs_of(repo)
        assert wiring_problems(configs) == [], name
        ens = configs["centra"]
        tasks = json.loads((Path(out) / "current" / "manifest.json").read_text())["tasks"]
        outputs = {t.name: list(t.dims) for t in ens.output}
        specs = Engine.load(out, engine="torch").specs
        assert outputs == {f"LOGITS_{t['name']}": [specs[t["name"]].num_outputs] for t in tasks}, name
        # the labels of Triton's classification extension: one file per output, in the ensemble's folder
        assert {t.name: t.label_filename for t in ens.output} == {f"LOGITS_{t}": f"labels_{t}.txt" for t in specs}
        for task, spec in specs.items():
            assert (repo / "centra" / f"labels_{task}.txt").read_text().splitlines() == spec.labels, (name, task)
        pair = any(t["input"] == "pair" for t in tasks)
        assert [t.name for t in ens.input] == (["TEXT", "TEXT_PAIR"] if pair else ["TEXT"])
        assert all(t.data_type == data_type("TYPE_STRING") and list(t.dims) == [1] for t in ens.input)


def test_the_wiring_check_catches_each_break(repos):
    """Each broken invariant is caught (so the test above can fail)."""
    configs = configs_of(repos["fp32"][1])
    cases = {
        "produced by no step": lambda c: c["centra"].ensemble_scheduling.step[1].output_map.__setitem__(
            "LOGITS_alpha", "LOGITS_beta"),  # an ensemble output wired to another task's tensor
        "neither an ensemble input": lambda c: c["centra"].ensemble_scheduling.step[1].input_map.__setitem__(
            "input_ids", "pair_48_input_ids"),  # read before the step that writes it
        "not an output of the model": lambda c: c["centra"].ensemble_scheduling.step[0].output_map.__setitem__(
            "ids", "single_48_ids"),
        "type/dims": lambda c: c["centra_graph_pair_48"].output[0].dims.__setitem__(0, 3),
        "no model": lambda c: setattr(c["centra"].ensemble_scheduling.step[2], "model_name", "centra_tokenizer"),
        "used by no step": lambda c: c["centra"].ensemble_scheduling.step[2].input_map.pop("TEXT_PAIR"),
        "max_batch_size": lambda c: setattr(c["centra_graph_single_48"], "max_batch_size", 4),
    }
    for message, breaking in cases.items():
        broken = {k: type(v)() for k, v in configs.items()}
        for k, v in configs.items():
            broken[k].CopyFrom(v)
        breaking(broken)
        assert any(message in p for p in wiring_problems(broken)), message


def test_graph_configs_match_the_onnx_files(repos):
    import onnx

    for name, (_, repo) in repos.items():
        for model, cfg in configs_of(repo).items():
            if cfg.platform != "onnxruntime_onnx":
                continue
            graph = onnx.load(str(repo / model / "1" / "model.onnx")).graph
            for declared, actual in ((cfg.input, graph.input), (cfg.output, graph.output)):
                assert [t.name for t in declared] == [t.name for t in actual], (name, model)
                for t, a in zip(declared, actual):
                    dims = [d.dim_value or -1 for d in a.type.tensor_type.shape.dim]
                    assert dims[0] == -1, "batch axis first"
                    assert (t.data_type, list(t.dims)) == (data_type(ONNX_TYPES[a.type.tensor_type.elem_type]),
                                                           dims[1:]), (name, model, t.name)


def load_tokenizer_model(repo: Path, name: str):
    path = repo / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"centra_tests_{repo.name}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = {k: v.string_value for k, v in parse_config(repo / name / "config.pbtxt").parameters.items()}
    return module, module.load_tokenizer(repo / name / "1" / "tokenizer"), params


def groups_of(repo: Path) -> list[dict]:
    return summary_of(repo)["groups"]


def inputs_for(group: dict) -> tuple[list[str], list[str] | None]:
    return [*TEXTS, LONG], [*PAIRS, LONG] if group["input"] == "pair" else None


def test_tokenizer_model_gives_centra_predicts_ids(repos):
    for name, (out, repo) in repos.items():
        engine = Engine.load(out, engine="torch")
        for group in groups_of(repo):
            module, tokenizer, params = load_tokenizer_model(repo, group["tokenizer_model"])
            assert (params["input"], int(params["max_length"])) == (group["input"], group["max_length"])
            texts, pairs = inputs_for(group)
            got = module.tokenize(tokenizer, texts, pairs, int(params["max_length"]), int(params["type_vocab_size"]),
                                  int(params["pad_id"]))
            expected = encode(engine.tokenizer, engine.model.cfg.type_vocab_size, texts, pairs, group["max_length"])
            assert expected.truncated[-1], "the long text is cut"
            width = max(len(r) for r in expected.input_ids)
            assert {k: v.shape for k, v in got.items()} == {k: (len(texts), width) for k in triton.ID_TENSORS}
            assert all(v.dtype == np.int64 for v in got.values())
            for i, row in enumerate(expected.input_ids):
                n = len(row)
                assert got["input_ids"][i, :n].tolist() == row, (name, i)
                assert got["token_type_ids"][i, :n].tolist() == expected.token_type_ids[i]
                assert got["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
                assert set(got["input_ids"][i, n:].tolist()) <= {engine.tokenizer.pad_token_id}


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


def fake_pb_utils() -> types.ModuleType:
    """The few names of triton_python_backend_utils the tokenizer model uses."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = FakeTensor
    pb.TritonError = lambda message: ("error", message)
    pb.InferenceResponse = lambda output_tensors, error=None: {"tensors": {t.name: t.array for t in output_tensors},
                                                               "error": error}
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    return pb


def test_tokenizer_model_executes_a_dynamic_batch(repos, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    repo = repos["fp32"][1]
    name = "centra_tokenizer_pair_48"
    module, _, _ = load_tokenizer_model(repo, name)
    model = module.TritonPythonModel()
    config = json.dumps({"name": name, "parameters": {k: {"string_value": v.string_value} for k, v in
                                                      parse_config(repo / name / "config.pbtxt").parameters.items()}})
    model.initialize({"model_config": config, "model_repository": str(repo / name), "model_version": "1"})

    def strings(items):
        return np.array([[s.encode()] for s in items], dtype=object)

    requests = [{"TEXT": FakeTensor("TEXT", strings(TEXTS[:2])),
                 "TEXT_PAIR": FakeTensor("TEXT_PAIR", strings(PAIRS[:2]))},
                {"TEXT": FakeTensor("TEXT", np.array([[b"\xff"]], dtype=object)),
                 "TEXT_PAIR": FakeTensor("TEXT_PAIR", strings(["x"]))},
                {"TEXT": FakeTensor("TEXT", strings(["  "])), "TEXT_PAIR": FakeTensor("TEXT_PAIR", strings(["x"]))},
                {"TEXT": FakeTensor("TEXT", strings(["no pair"]))},
                {"TEXT": FakeTensor("TEXT", strings([LONG])), "TEXT_PAIR": FakeTensor("TEXT_PAIR", strings([LONG]))}]
    first, bad, empty, unpaired, last = model.execute(requests)
    assert bad["error"] == ("error", "TEXT row 0 is not UTF-8 text") and bad["tensors"] == {}
    assert empty["error"] == ("error", "TEXT row 0 is empty"), "refused like `centra predict` refuses it"
    assert unpaired["error"] == ("error", "input TEXT_PAIR is missing"), "each bad request fails alone"
    assert first["error"] is None and last["error"] is None
    assert first["tensors"]["input_ids"].shape == (2, 48) and last["tensors"]["input_ids"].shape == (1, 48), \
        "one dynamic batch is padded to one width, so Triton can batch the graph requests"
    alone = module.tokenize(model.tokenizer, TEXTS[:2], PAIRS[:2], 48, 2, 0)
    width = alone["input_ids"].shape[1]
    assert np.array_equal(first["tensors"]["input_ids"][:, :width], alone["input_ids"])


def test_graphs_give_the_engines_logits(repos):
    import onnxruntime as ort

    for name, (out, repo) in repos.items():
        # fp32: the torch engine; int8: the version's int8 engine, all rows in one batch (activation scales
        # are per batch, and the Triton graph sees the same rows padded to the same width)
        engine = Engine.load(out, batch_size=64, engine="torch" if name != "int8" else None)
        assert engine.runtime == ("onnxruntime int8" if name == "int8" else "torch fp32")
        for group in groups_of(repo):
            module, tokenizer, params = load_tokenizer_model(repo, group["tokenizer_model"])
            texts, pairs = inputs_for(group)
            feeds = module.tokenize(tokenizer, texts, pairs, int(params["max_length"]),
                                    int(params["type_vocab_size"]), int(params["pad_id"]))
            session = ort.InferenceSession(str(repo / group["graph_model"] / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
            tasks = list(group["tasks"])
            got = dict(zip(tasks, session.run([f"LOGITS_{t}" for t in tasks], feeds)))
            rows = [Row(t, pairs[i] if pairs else None, tuple(tasks)) for i, t in enumerate(texts)]
            results = engine.run(rows)
            for task in tasks:
                expected = np.stack([r.logits[task].numpy() for r in results])
                assert got[task].shape == expected.shape
                assert np.abs(got[task] - expected).max() <= TOLERANCE, (name, task)
            if "alpha" in tasks:  # answers too: the labels `centra predict` prints
                labels = [a["label"] for a in engine.predict(texts, None, ["alpha"])]
                assert labels == [engine.specs["alpha"].labels[int(i)] for i in got["alpha"].argmax(axis=1)]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_refuses_a_user_folder_and_replaces_its_own(repos, tmp_path, capsys):
    out, repo = repos["xlmr"]
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    before = snapshot(mine)
    assert main(["export-triton", "--model", str(out), "--repo", str(mine)]) == 2
    assert "'notes.txt'" in error_line(capsys) and snapshot(mine) == before
    assert main(["export-triton", "--model", str(out), "--repo", str(out)]) == 2  # a merged model: not a repository
    assert "holds a centra merged model" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"], "nothing staged beside it"
    # its own kind is replaced in one step; a refused export leaves it as it was
    assert main(["export-triton", "--backend", "onnxruntime", "--model", str(out), "--repo", str(repo), "--max-batch",
                 "8"]) == 0
    before = snapshot(repo)
    with pytest.MonkeyPatch.context() as mp:
        broken = tmp_path / "model.py"  # a tokenizer model that truncates one token short
        broken.write_text(triton.MODEL_SOURCE.read_text().replace("max_length=max_length", "max_length=max_length - 1"))
        mp.setattr(triton, "MODEL_SOURCE", broken)
        with pytest.raises(CentraError, match="tokenizes sample .* unlike centra"):
            triton.export_triton(out, repo, progress=False)
    assert snapshot(repo) == before and not list(repo.parent.glob(f".{repo.name}.*")), "no staging left behind"
