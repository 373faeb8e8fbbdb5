"""One client script, unchanged, against `centra serve` and against a REAL Triton server (the
nvidia-pytriton wheel's tritonserver, on loopback) serving `centra export-triton` of the same version:
tritonclient over HTTP and gRPC, and raw HTTP JSON as curl sends it. It reads server and model metadata,
checks readiness, infers by the version's number, sends TEXT alone, names tasks per row and once (the
request parameter `tasks`), asks for top-K classes (`classification`), and returns what it saw; the two
servers' logits, classes and answers must agree. A single TASKS row for many texts is centra serve's
alone: Triton refuses it before its model runs (it checks that every input of a request has the same
rows). One Triton server for the module; skipped, saying why, only where the binary cannot run."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
from conftest import PAIRS, TEXTS
from test_rest import Served

from centra.errors import CentraError
from centra.export.triton_python import export_triton_python
from centra.measure import tritonserver
from centra.serve.server import CentraServer, ServeOptions

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOLERANCE = 1e-5  # logits, one server vs the other (the same engine; other batch padding)
VERSION = "1"  # what a Triton user writes: the model's version number


@pytest.fixture(scope="module")
def servers(model_out, engine, tmp_path_factory):
    """name -> (HTTP address, gRPC address): centra serve over model_out, and tritonserver over its export."""
    try:
        tritonserver.find_install()
        tritonserver.stub_python()
    except CentraError as exc:
        pytest.skip(f"no Triton server can run here: {exc}")
    root = tmp_path_factory.mktemp("one-script")
    export_triton_python(model_out, root / "repo")
    triton = tritonserver.TritonServer(root / "repo", root / "work").start()
    centra = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    yield {"centra serve": (centra.http_target, centra.grpc_target), "triton": (triton.http_url, triton.grpc_url)}
    centra.close()
    triton.stop()


# ------------------------------------------------------------------------------ the one script


def curl(address: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    status, raw = reply.status, reply.read()
    conn.close()
    return status, json.loads(raw) if raw else None


def bytes_input(module, name: str, values: list[str]):
    tensor = module.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=object))
    return tensor


def one_script(http_address: str, grpc_address: str) -> dict:
    """What a user writes once for model `centra`; it asserts only what any server must answer, and returns
    what it saw (logits, classes, answers) for the caller to compare."""
    seen: dict = {}
    # curl: metadata, readiness, and a JSON inference by version number with TEXT alone
    status, server = curl(http_address, "GET", "/v2")
    assert status == 200 and server["name"] and server["version"], server
    assert {"binary_tensor_data", "classification", "parameters"} <= set(server["extensions"])
    assert curl(http_address, "GET", "/v2/health/ready")[0] == 200
    assert curl(http_address, "GET", f"/v2/models/centra/versions/{VERSION}/ready")[0] == 200
    status, meta = curl(http_address, "GET", "/v2/models/centra")
    assert status == 200 and meta["name"] == "centra" and len(meta["versions"]) == 1, meta
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("TEXT", "BYTES"), ("TEXT_PAIR", "BYTES"),
                                                                      ("TASKS", "BYTES")]
    seen["outputs"] = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    texts = TEXTS[:3]
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3, 1], "data": texts}],
            "outputs": [{"name": "LOGITS_alpha"}, {"name": "LOGITS_beta", "parameters": {"classification": 2}}]}
    status, got = curl(http_address, "POST", f"/v2/models/centra/versions/{VERSION}/infer", body)
    assert status == 200 and got["model_name"] == "centra" and got["model_version"] in meta["versions"], got
    outputs = {o["name"]: o for o in got["outputs"]}
    assert set(outputs) == {"LOGITS_alpha", "LOGITS_beta"}
    assert outputs["LOGITS_alpha"]["datatype"] == "FP32" and outputs["LOGITS_alpha"]["shape"] == [3, 3]
    assert outputs["LOGITS_beta"]["datatype"] == "BYTES" and outputs["LOGITS_beta"]["shape"] == [3, 2]
    seen["curl logits alpha"] = np.reshape(outputs["LOGITS_alpha"]["data"], (3, 3))
    seen["curl classes beta"] = outputs["LOGITS_beta"]["data"]
    status, got = curl(http_address, "POST", "/v2/models/centra/versions/999/infer", body)
    assert status == 404, (status, got)
    # tritonclient, over HTTP and over gRPC
    for name, module, address in (("http", tritonhttp, http_address), ("grpc", tritongrpc, grpc_address)):
        client = module.InferenceServerClient(address)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("centra", VERSION) and not client.is_model_ready("centra", "999")
        meta = client.get_model_metadata("centra", VERSION, **({"as_json": True} if name == "grpc" else {}))
        assert meta["name"] == "centra" and [t["name"] for t in meta["inputs"]] == ["TEXT", "TEXT_PAIR", "TASKS"]
        # TEXT alone: every single-text task
        result = client.infer("centra", [bytes_input(module, "TEXT", texts)], model_version=VERSION)
        for task in ("alpha", "beta", "gamma", "epsilon"):
            seen[f"{name} text only {task}"] = result.as_numpy(f"LOGITS_{task}")
        assert result.as_numpy("LOGITS_delta") is None, "a pair task runs only on text pairs"
        seen[f"{name} text only answers"] = [json.loads(row[0]) for row in result.as_numpy("ANSWERS")]
        # tasks named once for every row: the request parameter `tasks`
        result = client.infer("centra", [bytes_input(module, "TEXT", texts)], model_version=VERSION,
                              parameters={"tasks": "beta,epsilon"})
        for task in ("beta", "epsilon"):
            seen[f"{name} tasks parameter {task}"] = result.as_numpy(f"LOGITS_{task}")
        assert result.as_numpy("LOGITS_alpha") is None, "only the tasks named"
        seen[f"{name} tasks parameter answers"] = [json.loads(row[0]) for row in result.as_numpy("ANSWERS")]
        assert [list(a) for a in seen[f"{name} tasks parameter answers"]] == [["beta", "epsilon"]] * 3
        with pytest.raises(InferenceServerException, match="name the tasks once"):  # not with TASKS too
            client.infer("centra", [bytes_input(module, "TEXT", texts[:1]), bytes_input(module, "TASKS", ["beta"])],
                         parameters={"tasks": "beta"})
        # tasks named on every row, with text pairs, and top-K classes
        rows = [texts[i % 3] for i in range(4)]
        inputs = [bytes_input(module, "TEXT", rows), bytes_input(module, "TEXT_PAIR", PAIRS[:4]),
                  bytes_input(module, "TASKS", ["delta,alpha"] * 4)]
        result = client.infer("centra", inputs, model_version=VERSION, outputs=[
            module.InferRequestedOutput("LOGITS_delta"), module.InferRequestedOutput("LOGITS_alpha", class_count=3)])
        seen[f"{name} pairs delta"] = result.as_numpy("LOGITS_delta")
        seen[f"{name} classes alpha"] = result.as_numpy("LOGITS_alpha")
        assert seen[f"{name} classes alpha"].shape == (4, 3) and result.as_numpy("ANSWERS") is None
        # a single text: one TASKS row is that text's
        result = client.infer("centra", [bytes_input(module, "TEXT", texts[:1]),
                                         bytes_input(module, "TASKS", ["gamma"])])
        seen[f"{name} one row gamma"] = result.as_numpy("LOGITS_gamma")
        with pytest.raises(InferenceServerException):  # an unknown version, not another one
            client.infer("centra", [bytes_input(module, "TEXT", texts[:1])], model_version="999")
        client.close()
    return seen


# ------------------------------------------------------------------------------------- the tests


def test_one_script_runs_unchanged_on_both_servers_and_they_agree(servers, engine):
    seen = {}
    for name, (http_address, grpc_address) in servers.items():
        try:
            seen[name] = one_script(http_address, grpc_address)
        except (AssertionError, InferenceServerException) as exc:
            raise AssertionError(f"the script failed on {name}: {exc}") from exc
    centra, triton = seen["centra serve"], seen["triton"]
    assert centra.keys() == triton.keys()
    assert centra["outputs"] == triton["outputs"]
    texts = TEXTS[:3]
    want = engine.logits(texts, None, ["alpha", "beta", "gamma", "epsilon"])
    for key in centra:
        if key == "outputs":
            continue
        a, b = centra[key], triton[key]
        if "classes" in key:
            for x, y in zip(np.asarray(a, dtype=object).reshape(-1), np.asarray(b, dtype=object).reshape(-1)):
                x, y = (v.decode() if isinstance(v, bytes) else v for v in (x, y))
                (xv, *xl), (yv, *yl) = x.split(":", 2), y.split(":", 2)
                assert xl == yl and len(xl) == 2 and abs(float(xv) - float(yv)) <= TOLERANCE + 1e-6, (key, x, y)
        elif "answers" in key:
            for x, y in zip(a, b):
                assert x.keys() == y.keys()
                for task in x:  # the same labels; values and scores within TOLERANCE (+ 6 decimals' rounding)
                    assert {k: v for k, v in x[task].items() if k not in ("scores", "value")} == \
                        {k: v for k, v in y[task].items() if k not in ("scores", "value")}, (key, task)
                    assert x[task].get("value", 0) == pytest.approx(y[task].get("value", 0), abs=TOLERANCE + 1e-6)
                    assert x[task]["scores"] == pytest.approx(y[task]["scores"], abs=TOLERANCE + 1e-6)
        else:
            assert np.asarray(a).shape == np.asarray(b).shape and np.allclose(a, b, atol=TOLERANCE), key
            task = key.rsplit(" ", 1)[1]
            if "text only" in key or "tasks parameter" in key:  # and both equal the engine in process
                assert np.allclose(a, want[task].numpy(), atol=TOLERANCE), key
    labels = engine.specs["beta"].labels
    top = [sorted(range(4), key=lambda j: -row[j])[:2] for row in want["beta"].numpy()]
    assert [c.split(":", 1)[1] for c in centra["curl classes beta"]] == \
        [f"{j}:{labels[j]}" for row in top for j in row], "the classes are the engine's top 2, labelled"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_single_tasks_row_for_many_texts_is_centra_serves_alone(servers, protocol):
    """centra serve applies one TASKS row to every text; Triton refuses the request before its model runs
    (every input of a request of a batching model must have its rows), so a script for both sends TASKS
    on every row, or the request parameter `tasks`
    (test_one_script_runs_unchanged_on_both_servers_and_they_agree)."""
    module = tritonhttp if protocol == "http" else tritongrpc
    inputs = [bytes_input(module, "TEXT", TEXTS[:3]), bytes_input(module, "TASKS", ["alpha"])]
    answers = {}
    for name, addresses in servers.items():
        client = module.InferenceServerClient(addresses[0] if protocol == "http" else addresses[1])
        try:
            answers[name] = client.infer("centra", inputs).as_numpy("LOGITS_alpha").shape
        except InferenceServerException as exc:
            answers[name] = str(exc)
        client.close()
    assert answers["centra serve"] == (3, 3)
    assert "batch size does not match" in answers["triton"], answers["triton"]
