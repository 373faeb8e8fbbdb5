"""What a Triton script expects of centra serve's Open Inference Protocol, and of the Triton repositories'
files, checked without a Triton server (tests/test_one_script.py runs one script against both servers):

- a version asked for by its number ("1" for v000001, as Triton numbers versions) over HTTP and gRPC;
  an unknown one NOT_FOUND (404);
- the `classification` output parameter (Triton's extension, tritonclient's `class_count`): over HTTP JSON,
  HTTP binary and gRPC, each row's top K logits as BYTES "value:index:label" (value as C's %f, labels in
  logit order); refused with one line on ANSWERS or a count that is not an integer >= 0;
- the request parameter `tasks` ("alpha,beta": every row's tasks, named once) over HTTP JSON and gRPC, the
  answers those of a TASKS input; refused with one line beside TASKS, when not a string, with an empty
  name or too many names; an unknown task refused as in TASKS;
- `centra export-triton`: TEXT_PAIR and TASKS optional in config.pbtxt, one label file per task named by
  its output, the version folder numbered as the exported version.
"""

from __future__ import annotations

import json
import re

import grpc
import numpy as np
import pytest
from conftest import TEXTS
from test_rest import Served, oip_inputs

from centra.core.versions import names_version
from centra.serve.server import CentraServer, ServeOptions

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOLERANCE = 1e-5  # logits, server vs in-process engine (other batch sizes: other padding)


@pytest.fixture(scope="module")
def served(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    yield running
    running.close()


def text_tensor(texts, tasks=None) -> list[dict]:
    out = [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}]
    if tasks is not None:
        out.append({"name": "TASKS", "datatype": "BYTES", "shape": [len(texts), 1], "data": [tasks] * len(texts)})
    return out


def expected_classes(engine, texts, task: str, count: int) -> list[list[str]]:
    """Triton's classification of the engine's logits: per row the top `count` as "%f:index:label"."""
    labels = engine.specs[task].labels
    out = []
    for row in engine.logits(texts, None, [task])[task].numpy():
        order = sorted(range(len(row)), key=lambda j: -row[j])[:count]
        out.append([f"{float(row[j]):f}:{j}:{labels[j]}" for j in order])
    return out


def same_classes(got, want) -> bool:
    """Equal indices and labels; values within TOLERANCE (and %f's rounding)."""
    got = [[g.decode() if isinstance(g, bytes) else g for g in row] for row in np.asarray(got, dtype=object)]
    if [len(r) for r in got] != [len(r) for r in want]:
        return False
    for row, wrow in zip(got, want):
        for g, w in zip(row, wrow):
            (gv, gi, gl), (wv, wi, wl) = g.split(":", 2), w.split(":", 2)
            if (gi, gl) != (wi, wl) or abs(float(gv) - float(wv)) > TOLERANCE + 1e-6:
                return False
    return True


def test_a_version_is_known_by_its_name_and_by_its_number(served, engine):
    assert engine.version == "v000001"
    for given in ("v000001", "1", "01", "000001"):
        assert names_version(given, "v000001"), given
    for given in ("2", "0", "", "v000002", "+1", " 1", "1 ", "1.0", "1_0", "\u0661", "9" * 5000):  # \u0661: Arabic 1
        assert not names_version(given, "v000001"), given
    assert not names_version("1", "v-new"), "a name that is not a version's has no number"
    body = {"inputs": text_tensor(TEXTS[:2])}
    for version in ("1", "01", "v000001"):
        status, got = served.call("POST", f"/v2/models/centra/versions/{version}/infer", body)
        assert status == 200 and got["model_version"] == "v000001", (version, got)
        assert served.call("GET", f"/v2/models/centra/versions/{version}")[0] == 200
        assert served.call("GET", f"/v2/models/centra/versions/{version}/ready")[0] == 200
    for version in ("2", "v000002", "0"):
        status, got = served.call("POST", f"/v2/models/centra/versions/{version}/infer", body)
        assert status == 404 and got["code"] == "NOT_FOUND", (version, got)
        assert "served: v000001, number 1" in got["error"]
        assert served.call("GET", f"/v2/models/centra/versions/{version}")[0] == 404
    client = tritongrpc.InferenceServerClient(served.grpc_target)
    try:
        assert client.is_model_ready("centra", "1") and not client.is_model_ready("centra", "2")
        result = client.infer("centra", oip_inputs(tritongrpc, TEXTS[:1], tasks="alpha"), model_version="1")
        assert result.get_response().model_version == "v000001"
        with pytest.raises(InferenceServerException) as refused:
            client.infer("centra", oip_inputs(tritongrpc, TEXTS[:1], tasks="alpha"), model_version="2")
        assert refused.value.status() == "StatusCode.NOT_FOUND" and "has no version '2'" in str(refused.value)
        assert client.get_model_metadata("centra", "1").versions == ["v000001"]
    finally:
        client.close()


def test_classification_over_http_json(served, engine):
    texts = TEXTS[:3]
    body = {"inputs": text_tensor(texts, "alpha,beta,gamma"), "outputs": [
        {"name": "LOGITS_alpha", "parameters": {"classification": 2}},
        {"name": "LOGITS_beta", "parameters": {"classification": 9}},  # more than its 4 labels: all 4
        {"name": "LOGITS_gamma", "parameters": {"classification": 1}},  # regression: its one value, its label
        {"name": "ANSWERS", "parameters": {"classification": 0}}]}  # 0: the tensor itself
    status, got = served.call("POST", "/v2/models/centra/infer", body)
    assert status == 200, got
    outputs = {o["name"]: o for o in got["outputs"]}
    for task, count, width in (("alpha", 2, 2), ("beta", 9, 4), ("gamma", 1, 1)):
        output = outputs[f"LOGITS_{task}"]
        assert output["datatype"] == "BYTES" and output["shape"] == [len(texts), width], output
        rows = np.reshape(np.array(output["data"], dtype=object), (len(texts), width))
        assert same_classes(rows, expected_classes(engine, texts, task, count)), (task, rows)
    assert outputs["ANSWERS"]["datatype"] == "BYTES" and list(json.loads(outputs["ANSWERS"]["data"][0])) == \
        ["alpha", "beta", "gamma"]
    assert outputs["LOGITS_gamma"]["data"][0].endswith(":0:score")
    # the value as Triton writes it (C's %f: six decimals), so that the two servers' strings look alike
    assert all(re.fullmatch(r"-?\d+\.\d{6}:\d+:\w+", c) for c in outputs["LOGITS_alpha"]["data"]), outputs


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classification_with_tritonclient(served, engine, protocol):
    """tritonclient's class_count: over HTTP as binary data (its default), over gRPC as int64_param."""
    module = tritonhttp if protocol == "http" else tritongrpc
    client = module.InferenceServerClient(served.http_target if protocol == "http" else served.grpc_target)
    try:
        texts = TEXTS[:4]
        result = client.infer("centra", oip_inputs(module, texts, tasks="alpha,epsilon"), outputs=[
            module.InferRequestedOutput("LOGITS_alpha", class_count=3),
            module.InferRequestedOutput("LOGITS_epsilon")])
        assert same_classes(result.as_numpy("LOGITS_alpha"), expected_classes(engine, texts, "alpha", 3))
        assert np.allclose(result.as_numpy("LOGITS_epsilon"),
                           engine.logits(texts, None, ["epsilon"])["epsilon"].numpy(), atol=TOLERANCE)
        with pytest.raises(InferenceServerException, match="classification is for the logits outputs"):
            client.infer("centra", oip_inputs(module, texts[:1], tasks="alpha"),
                         outputs=[module.InferRequestedOutput("ANSWERS", class_count=2)])
    finally:
        client.close()


def test_a_bad_classification_count_is_refused_with_one_line(served):
    for value in (-1, "2", 1.5, True, [2]):
        body = {"inputs": text_tensor(TEXTS[:1], "alpha"),
                "outputs": [{"name": "LOGITS_alpha", "parameters": {"classification": value}}]}
        status, got = served.call("POST", "/v2/models/centra/infer", body)
        assert status == 400 and got["code"] == "INVALID_ARGUMENT", (value, got)
        assert got["error"].startswith("output LOGITS_alpha: parameter classification must be an integer >= 0"), got
    from centra.serve.inference import open_inference_grpc_pb2 as ip
    from centra.serve.inference import open_inference_grpc_pb2_grpc as ip_grpc

    channel = grpc.insecure_channel(served.grpc_target)
    try:
        request = ip.ModelInferRequest(model_name="centra", inputs=[ip.ModelInferRequest.InferInputTensor(
            name="TEXT", datatype="BYTES", shape=[1], contents=ip.InferTensorContents(bytes_contents=[b"hi"]))])
        wanted = request.outputs.add(name="LOGITS_alpha")
        wanted.parameters["classification"].string_param = "2"
        with pytest.raises(grpc.RpcError) as refused:
            ip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameter classification must be an integer" in refused.value.details()
    finally:
        channel.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_tasks_parameter_names_every_rows_tasks(served, engine, protocol):
    module = tritonhttp if protocol == "http" else tritongrpc
    client = module.InferenceServerClient(served.http_target if protocol == "http" else served.grpc_target)
    try:
        texts = TEXTS[:3]
        text = module.InferInput("TEXT", [len(texts), 1], "BYTES")
        text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        result = client.infer("centra", [text], parameters={"tasks": " beta,alpha "})
        answers = [json.loads(row[0]) for row in result.as_numpy("ANSWERS")]
        assert [list(a) for a in answers] == [["beta", "alpha"]] * len(texts), answers
        for task in ("alpha", "beta"):
            assert np.allclose(result.as_numpy(f"LOGITS_{task}"),
                               engine.logits(texts, None, [task])[task].numpy(), atol=TOLERANCE)
        assert result.as_numpy("LOGITS_gamma") is None
        with pytest.raises(InferenceServerException) as refused:
            client.infer("centra", oip_inputs(module, texts, tasks="alpha"), parameters={"tasks": "alpha"})
        assert "both the TASKS input and the tasks parameter given" in str(refused.value)
        assert ("400" if protocol == "http" else "INVALID_ARGUMENT") in str(refused.value.status())
        with pytest.raises(InferenceServerException, match="parameter tasks must be a string"):
            client.infer("centra", [text], parameters={"tasks": 3})
    finally:
        client.close()


def test_a_bad_tasks_parameter_is_refused_with_one_line(served):
    def refusal(tasks, inputs=None) -> tuple[int, dict]:
        body = {"inputs": inputs or text_tensor(TEXTS[:2]), "parameters": {"tasks": tasks}}
        return served.call("POST", "/v2/models/centra/infer", body)

    for value, message in ((["alpha"], "must be a string of comma-separated task names"), (True, "must be a string"),
                           ("", "has an empty task name"), ("alpha,,beta", "has an empty task name"),
                           ("alpha,", "has an empty task name"), (",".join(["alpha"] * 1025),
                                                                  "1,025 task names in one call; the limit is 1,024")):
        status, got = refusal(value)
        assert status == 400 and got["code"] == "INVALID_ARGUMENT", (value, got)
        assert message in got["error"] and "\n" not in got["error"], (value, got)
    status, got = refusal("alpha", text_tensor(TEXTS[:2], "alpha"))
    assert status == 400 and "name the tasks once" in got["error"], got
    status, got = refusal("alpha,nope")
    same = served.call("POST", "/v2/models/centra/infer", {"inputs": text_tensor(TEXTS[:2], "alpha,nope")})
    assert status == same[0] == 404 and got == same[1] and "unknown task 'nope'" in got["error"], (got, same)


def test_the_python_repository_marks_optional_inputs_labels_and_numbers_its_version(model_out, engine, tmp_path):
    from triton_repo import parse_config

    from centra.core.task import TaskSpec
    from centra.errors import CentraError
    from centra.export.triton_config import label_lines
    from centra.export.triton_python import export_triton_python

    summary = export_triton_python(model_out, tmp_path / "repo")
    model = tmp_path / "repo" / "centra"
    assert summary["model_version"] == "1" and (model / "1" / "model.py").is_file()
    cfg = parse_config(model / "config.pbtxt")
    assert [(t.name, t.optional) for t in cfg.input] == [("TEXT", False), ("TEXT_PAIR", True), ("TASKS", True)]
    labelled = {t.name: t.label_filename for t in cfg.output}
    assert labelled.pop("ANSWERS") == ""
    assert labelled == {f"LOGITS_{t}": f"labels_{t}.txt" for t in engine.specs}
    for task, spec in engine.specs.items():
        assert (model / f"labels_{task}.txt").read_text().split("\n") == [*spec.labels, ""]
    assert "centra/labels_alpha.txt" in summary["files"], "label files are hashed with the repository"
    spec = next(iter(engine.specs.values()))
    with pytest.raises(CentraError, match="has a newline"):
        label_lines(TaskSpec(**{**spec.__dict__, "labels": ["one", "two\nthree", "four"]}))


def test_a_later_version_is_exported_under_its_number(model_out, tmp_path):
    """v000002 of a model is folder 2 of its Triton repository (and `centra serve` answers to 2)."""
    import shutil

    from centra.core.manifest import content_id
    from centra.core.versions import CURRENT, VERSIONS
    from centra.export.triton_python import export_triton_python

    out = tmp_path / "out"
    shutil.copytree(model_out, out, symlinks=True)
    shutil.copytree(out / VERSIONS / "v000001", out / VERSIONS / "v000002")
    manifest = {**json.loads((out / VERSIONS / "v000001" / "manifest.json").read_text()), "version": "v000002"}
    (out / VERSIONS / "v000002" / "manifest.json").write_text(json.dumps({**manifest,
                                                                          "content_id": content_id(manifest)}))
    (out / CURRENT).unlink()
    (out / CURRENT).symlink_to(f"{VERSIONS}/v000002")
    summary = export_triton_python(out, tmp_path / "repo")
    assert summary["model_version"] == "2" and summary["source_version"] == "v000002"
    assert sorted(p.name for p in (tmp_path / "repo" / "centra").iterdir() if p.is_dir()) == ["2"]
