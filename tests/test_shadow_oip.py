"""Candidate heads on the Open Inference Protocol (HTTP and gRPC) and in the Triton python-backend model:
the active outputs equal a version without the candidate bit for bit; the `head` parameter (or the
X-Centra-Head header) gives the candidate's answers, named in ANSWERS; CANDIDATE_LOGITS_<task> only when
asked; the Triton model runs a candidate only for a call that asks for it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXTS
from test_rest import Served, oip_inputs
from test_shadow_serve import versions  # noqa: F401 (the fixture)

import centra
from centra.core.shadow import candidate_key
from centra.runtime.engine import Engine, Row
from centra.serve.doors import triton as door
from centra.serve.server import CentraServer, ServeOptions

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")

TASKS = "alpha,beta,gamma"


@pytest.fixture(scope="module")
def served(versions):  # noqa: F811
    plain, shadowed = (Served(CentraServer(Engine.load(v), ServeOptions(port=0, http_port=0, drain_s=0)))
                       for v in versions)
    yield plain, shadowed
    plain.close()
    shadowed.close()


def infer(module, target, outputs=(), **parameters):
    client = (tritonhttp if module is tritonhttp else tritongrpc).InferenceServerClient(target)
    asked = [module.InferRequestedOutput(name) for name in outputs] or None
    headers = parameters.pop("headers", None)
    result = client.infer("centra", oip_inputs(module, TEXTS, tasks=TASKS), outputs=asked,
                          parameters=parameters or None, headers=headers)
    names = [o["name"] if isinstance(o, dict) else o.name for o in
             (result.get_response()["outputs"] if module is tritonhttp else result.get_response().outputs)]
    return {name: result.as_numpy(name) for name in names}


def answers(out) -> list[dict]:
    return [json.loads(row[0]) for row in out["ANSWERS"]]


def without_head(rows: list[dict]) -> list[dict]:
    return [{t: {k: v for k, v in a.items() if k != "head"} for t, a in row.items()} for row in rows]


def reference(versions, head: str) -> dict:  # noqa: F811
    """The logits computed here: each task's (head "active") or its candidate's."""
    engine = Engine.load(versions[1])
    names = TASKS.split(",")
    rows = [Row(t, None, (*names, *(candidate_key(n) for n in names))) for t in TEXTS]
    results = engine.run(rows)
    key = (lambda t: t) if head == "active" else candidate_key
    return {t: np.stack([r.logits[key(t)].numpy() for r in results]) for t in names}


@pytest.mark.parametrize("module", [tritonhttp, tritongrpc], ids=["http", "grpc"])
def test_oip_active_outputs_and_asked_candidates(served, versions, module):  # noqa: F811
    plain, shadowed = served
    target = "http_target" if module is tritonhttp else "grpc_target"
    before, after = infer(module, getattr(plain, target)), infer(module, getattr(shadowed, target))
    assert set(after) == set(before)  # the default outputs: no candidate logits
    for name in before:
        if name != "ANSWERS":
            assert np.array_equal(before[name], after[name]), name
    assert without_head(answers(after)) == answers(before)
    assert all(a["head"] == "active" for row in answers(after) for a in row.values())
    assert not any("head" in a for row in answers(before) for a in row.values())

    candidate = reference(versions, "candidate")
    asked = infer(module, getattr(shadowed, target), head="candidate")
    assert all(a["head"] == "candidate" for row in answers(asked) for a in row.values())
    for task, logits in candidate.items():
        assert np.array_equal(asked[f"LOGITS_{task}"], logits), task
    # a header does what the parameter does (gRPC metadata keys are lower case)
    header = infer(module, getattr(shadowed, target), headers={"x-centra-head": "candidate"})
    assert answers(header) == answers(asked)
    extra = infer(module, getattr(shadowed, target), outputs=["LOGITS_alpha", "CANDIDATE_LOGITS_alpha"])
    assert set(extra) == {"LOGITS_alpha", "CANDIDATE_LOGITS_alpha"}
    assert np.array_equal(extra["LOGITS_alpha"], before["LOGITS_alpha"])
    assert np.array_equal(extra["CANDIDATE_LOGITS_alpha"], candidate["alpha"])
    meta = tritonhttp.InferenceServerClient(shadowed.http_target).get_model_metadata("centra")
    assert {"CANDIDATE_LOGITS_alpha", "CANDIDATE_LOGITS_gamma"} <= {o["name"] for o in meta["outputs"]}


def triton_call(tasks=TASKS):
    rows = len(TEXTS)
    return {"TEXT": np.array([[t.encode()] for t in TEXTS], dtype=object),
            "TEXT_PAIR": np.array([[b""]] * rows, dtype=object), "TASKS": np.array([[tasks.encode()]] * rows,
                                                                                   dtype=object)}


def test_triton_model_runs_a_candidate_only_when_asked(versions):  # noqa: F811
    plain, _ = door.load(versions[0], {})
    engine, limits = door.load(versions[1], {})
    ran: list = []
    run = engine.run
    engine.run = lambda rows, **kw: ran.append([r.tasks for r in rows]) or run(rows, **kw)
    calls = [(triton_call(), [], {}), (triton_call(), [], {"head": "candidate"}),
             (triton_call("beta"), ["CANDIDATE_LOGITS_beta", "ANSWERS"], {}), (triton_call(), [], {"head": "x"})]
    default, asked, extra, bad = door.answer(engine, limits, calls)
    # one run for the three good calls; the candidate keys only on the rows of the calls that asked
    assert len(ran) == 1
    tasks = ran[0]
    assert tasks[:len(TEXTS)] == [("alpha", "beta", "gamma")] * len(TEXTS)
    assert tasks[len(TEXTS)] == ("alpha", "beta", "gamma", *(candidate_key(t) for t in ("alpha", "beta", "gamma")))
    assert tasks[-1] == ("beta", candidate_key("beta"))
    assert "head 'x'" in str(bad)
    # the same calls on the version without candidates (the same batch: the same rows and tasks)
    want = door.answer(plain, limits, [(triton_call(), [], {}), (triton_call(), [], {}),
                                       (triton_call("beta"), ["LOGITS_beta", "ANSWERS"], {})])
    for got, expected in ((default, want[0]), (extra[1:], want[2][1:])):
        assert [o.name for o in got] == [o.name for o in expected]
        for got_output, want_output in zip(got, expected):
            if want_output.name != "ANSWERS":
                assert np.array_equal(got_output.array, want_output.array), want_output.name
            else:
                assert without_head(answers({"ANSWERS": got_output.array})) == answers({"ANSWERS": want_output.array})
    assert [json.loads(row[0])["beta"]["head"] for row in extra[1].array] == ["active"] * len(TEXTS)
    candidate = reference(versions, "candidate")  # another batch: equal within float rounding
    assert np.allclose(next(o for o in asked if o.name == "LOGITS_gamma").array, candidate["gamma"], atol=1e-5)
    assert [o.name for o in extra] == ["CANDIDATE_LOGITS_beta", "ANSWERS"]
    assert np.allclose(extra[0].array, candidate["beta"], atol=1e-5)


def test_onnx_runtime_repository_leaves_candidates_out(versions, tmp_path):  # noqa: F811
    from centra.export.triton import export_triton

    export_triton(versions[1].parent.parent, tmp_path / "repo", progress=False)
    configs = "".join(p.read_text() for p in (tmp_path / "repo").rglob("config.pbtxt"))
    assert "LOGITS_alpha" in configs and "candidate" not in configs.lower()
    assert not [p.name for p in (tmp_path / "repo").rglob("*") if "@" in p.name]  # no candidate label files


def test_a_real_triton_server_gives_candidates_when_asked(versions, tmp_path):  # noqa: F811
    from centra.errors import CentraError
    from centra.export.triton_python import PythonRepoOptions, export_triton_python
    from centra.measure import tritonserver

    try:
        tritonserver.find_install()
        stub = tritonserver.stub_python()
    except CentraError as exc:
        pytest.skip(f"no Triton server can run here: {exc}")
    # the backend's embedded Python ignores PYTHONPATH: it imports the centra its environment installs
    found = subprocess.run([str(stub / "python3"), "-I", "-c", "import centra; print(centra.__file__)"],
                           capture_output=True, text=True, timeout=60).stdout.strip()
    if Path(found).resolve() != Path(centra.__file__).resolve():
        pytest.skip(f"Triton's python backend would import centra from {found}, not from this checkout")
    export_triton_python(versions[1].parent.parent, tmp_path / "repo", PythonRepoOptions())
    server = tritonserver.TritonServer(tmp_path / "repo", tmp_path / "work", explicit=True, models=("centra",))
    server.start()
    try:
        target = server.http_url
        default = infer(tritonhttp, target)
        assert "CANDIDATE_LOGITS_alpha" not in default
        assert all(a["head"] == "active" for row in answers(default) for a in row.values())
        asked = infer(tritonhttp, target, head="candidate")
        candidate = reference(versions, "candidate")
        assert all(a["head"] == "candidate" for row in answers(asked) for a in row.values())
        assert np.allclose(asked["LOGITS_beta"], candidate["beta"], atol=1e-5)
        extra = infer(tritonhttp, target, outputs=["CANDIDATE_LOGITS_gamma"])
        assert set(extra) == {"CANDIDATE_LOGITS_gamma"}
        assert np.allclose(extra["CANDIDATE_LOGITS_gamma"], candidate["gamma"], atol=1e-5)
    finally:
        server.stop()
