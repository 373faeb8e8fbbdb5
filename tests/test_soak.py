"""centra soak: the answer check catches a wrong answer; a short soak on a tiny model ends clean."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
from conftest import snapshot
from helpers import STANDARD_TASKS, make_tasks

from centra.cli import main
from centra.core.answers import ClassAnswer, LabelsAnswer, answer_from_dict
from centra.core.backbone import Backbone
from centra.core.merge import plan_merge, write_merged
from centra.core.versions import model_folder
from centra.measure.soak_calls import EXPECTED
from centra.measure.soak_check import Checker, References, SoakAnswer, answered_from_pb, compare_task
from centra.measure.soak_doors import DOORS
from centra.runtime.engine import Engine
from centra.serve.v1 import centra_pb2 as pb


@pytest.fixture
def merged(tiny_models, tmp_path) -> Path:
    """A tiny merged model of four tasks: multiclass, multilabel, regression, and a text-pair task."""
    make_tasks(Backbone.load(tiny_models["bert"]), tmp_path / "tasks", STANDARD_TASKS[:4])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    return tmp_path / "out"


def answered(engine: Engine, texts: list[str], tasks: list[str], pairs: list[str] | None = None) -> SoakAnswer:
    """A call answered exactly as in-process predict answers it, as the soak reads it off the wire."""
    expected = engine.predict(texts, pairs, tasks)
    names = list(dict.fromkeys(a["task"] for a in expected))
    results = []
    for i in range(len(texts)):
        row = {}
        for a in expected[i * len(names):(i + 1) * len(names)]:
            answer_from_dict(a).to_v1(task := pb.TaskResult(task=a["task"], truncated=a["truncated"]))
            row[a["task"]] = task
        results.append(row)
    ids = tuple(f"id-{i}" for i in range(len(texts)))
    return SoakAnswer(engine.content_id, engine.version, tuple(texts),
                    tuple(pairs) if pairs else None, tuple(tasks), ids, ids, tuple(results))


def test_checker_flags_a_wrong_answer(merged, tmp_path):
    references = References(tmp_path / "refs")
    references.add(model_folder(merged))
    references.add(model_folder(merged))  # the same content again (a rebuild can bring it back): a copy of its own
    engine = Engine.load(model_folder(merged))
    good = answered(engine, ["great product", "where is my order"], ["alpha", "beta", "gamma"])
    pair = answered(engine, ["great product"], ["delta"], ["the product is great"])
    wrong_label = answered(engine, ["great product"], ["alpha"])
    got = wrong_label.results[0]["alpha"]
    got.label = next(label for label in ("neg", "neu", "pos") if label != got.label)
    wrong_score = answered(engine, ["i love it"], ["gamma"])
    wrong_score.results[0]["gamma"].scores[0] += 1e-3
    unknown = dataclasses.replace(good, model_id="sha256:" + "0" * 64)  # a version the soak never published
    checker = Checker(references)
    checker.start()
    for item in (good, pair, wrong_label, wrong_score, unknown):
        checker.put(item)
    assert checker.finish(120)
    assert (checker.checked, checker.wrong) == (5, 3), checker.examples
    assert any("label" in line for line in checker.examples)
    assert any("scores" in line for line in checker.examples)
    assert any("never published" in line for line in checker.examples)


def test_an_answer_by_a_name_with_two_contents_is_never_wrong(merged, tmp_path):
    """OIP answers name their version only: after a rebuild brought the name back with other tasks, an
    answer of the earlier content is counted ambiguous (unchecked), or checked when a loaded one agrees."""
    pick = tmp_path / "pick"
    pick.mkdir()
    for name in ("alpha", "beta"):
        (pick / name).symlink_to(tmp_path / "tasks" / name, target_is_directory=True)
    write_merged(plan_merge([pick]), tmp_path / "rebuilt")
    old, new = Engine.load(model_folder(merged)), Engine.load(model_folder(tmp_path / "rebuilt"))
    assert old.version == new.version and old.content_id != new.content_id
    references = References(tmp_path / "refs")
    references.add(model_folder(merged))
    references.add(model_folder(tmp_path / "rebuilt"))
    by_old = dataclasses.replace(answered(old, ["great product"], ["alpha", "gamma"]), model_id="", door="oip_http")
    by_new = dataclasses.replace(answered(new, ["great product"], ["alpha"]), model_id="", door="oip_grpc")
    wrong = dataclasses.replace(answered(new, ["i love it"], ["beta"]), model_id="", door="oip_grpc")
    wrong.results[0]["beta"].scores[0] += 0.5
    checker = Checker(references)
    checker.start()
    for item in (by_old, by_new, wrong):
        checker.put(item)
    assert checker.finish(120)
    assert (checker.checked, checker.wrong, checker.ambiguous) == (1, 0, 2), checker.examples
    assert checker.doors["oip_http"]["ambiguous"] == 1 and checker.doors["oip_grpc"]["checked"] == 1


def test_compare_task_tolerates_ties_only(merged):
    engine = Engine.load(model_folder(merged))
    spec = engine.specs["alpha"]
    ref = ClassAnswer({"neg": 0.1, "neu": 0.45, "pos": 0.45}, "pos")
    got = ClassAnswer({"neg": 0.1, "neu": 0.45, "pos": 0.45}, "neu")
    assert compare_task(spec, ref, got) is None  # tied within the tolerance: either label is right
    ref = ClassAnswer({"neg": 0.1, "neu": 0.3, "pos": 0.6}, "pos")
    got = ClassAnswer({"neg": 0.1, "neu": 0.3, "pos": 0.6}, "neu")
    assert "label" in compare_task(spec, ref, got)
    assert "scores" in compare_task(spec, ref, ClassAnswer({"neg": 0.1, "pos": 0.6}, "pos"))
    assert "label" in compare_task(spec, ref, LabelsAnswer(ref.scores, ["pos"])), "another kind of answer"


def test_soak_refuses_bad_options_in_one_line(tmp_path, capsys):
    assert main(["soak", "--model", str(tmp_path / "missing"), "--minutes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such merged model folder" in err
    assert main(["soak", "--model", str(tmp_path), "--minutes", "0"]) == 2
    assert "--minutes" in capsys.readouterr().err


@pytest.mark.slow
def test_short_soak_is_clean(merged, tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = snapshot(merged)
    code = main(["soak", "--model", str(merged), "--minutes", "0.3", "--clients", "4", "--json-only"])
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    assert len(out) == 1  # --json-only: the JSON line alone
    assert set(figures["classes"]) == set(EXPECTED)
    assert all(entry["calls"] > 0 for entry in figures["classes"].values()), figures["classes"]
    assert figures["checked"] > 0 and figures["wrong_answers"] == 0, figures["wrong_examples"]
    assert figures["unexpected_codes"] == 0, figures["unexpected_examples"]
    assert set(figures["doors"]) == set(DOORS)
    for door, entry in figures["doors"].items():  # every door got calls, answered valid ones, and each was checked
        assert entry["calls"] > 0 and entry["unexpected_codes"] == 0 and entry["wrong"] == 0, (door, entry)
        assert entry["classes"].get("valid", {}).get("OK", 0) + entry["classes"].get("valid_pair", {}).get("OK", 0) > 0
        assert entry["checked"] > 0, (door, entry)
    slow = figures["slow_connections"]
    assert slow["heads"]["opened"] >= 4 and slow["bodies"]["opened"] >= 4, slow
    assert all(figures["actions"][action] > 0 for action in ("merge", "sighup", "corrupt", "rebuild"))
    assert figures["reloads"]["failed"] >= 1  # the corrupt version was refused
    assert len(figures["versions_answered"]) >= 2
    assert figures["rss_mb"]["peak"] >= figures["rss_mb"]["start"] > 0
    assert figures["server_exit_code"] == 0 and figures["ok"] and code == 0
    assert snapshot(merged) == before  # the model given is never touched
    assert list(scratch.iterdir()) == []  # the scratch folder is gone


def test_door_translations_keep_texts_pairs_and_tasks():
    """A ClassifyRequest in each door's wire form, read by that door's own parser, is the same call; each
    door's answer, read back, is what the checker reads off centra.v1 (no server needed)."""
    from google.protobuf import json_format

    from centra.measure.soak_doors import (
        answered_from_oip,
        answered_from_rest,
        http_code,
        huge_http,
        oip_json,
        oip_pb,
        rest_body,
    )
    from centra.serve.call import Limits
    from centra.serve.doors import oip, oip_tensors, rest, v1
    from centra.serve.http import objects_over
    from centra.serve.inference import open_inference_grpc_pb2 as ip

    limits = Limits()
    request = pb.ClassifyRequest(inputs=[pb.Input(text="¿Dónde está?", text_pair="配送 \"x\"", id="a"),
                                         pb.Input(text="ok 👍", text_pair="y", id="b")], tasks=["alpha", "delta"])
    want = (["¿Dónde está?", "ok 👍"], ["配送 \"x\"", "y"], ["alpha", "delta"])

    def seen(call):
        return call.texts, call.pairs, call.tasks

    assert seen(v1.call_of(rest.parse_request(rest_body(request)), limits)) == want
    parsed = oip_tensors.parse_infer(oip_json(request, 1000), None, limits.max_inputs)
    assert seen(oip_tensors.call_of(parsed.tensors, limits, parsed.doc["parameters"])) == want
    assert list(parsed.outputs) == ["ANSWERS"] and parsed.doc["parameters"] == {"timeout": 1000}
    for raw in (False, True):
        message = ip.ModelInferRequest.FromString(oip_pb(request, 1000, raw).SerializeToString())
        parameters = oip.parameters_from_pb(message.parameters)
        assert seen(oip_tensors.call_of(oip.tensors_from_pb(message, limits.max_inputs), limits, parameters)) == want
        assert parameters == {"timeout": 1000}
    single = pb.ClassifyRequest(inputs=[pb.Input(text="meh")])  # no pair, no tasks: TEXT alone
    assert [t["name"] for t in json.loads(oip_json(single))["inputs"]] == ["TEXT"]
    assert len(huge_http("rest", 1000)) == len(huge_http("rest", 2000)) - 3000  # 3 bytes an input
    assert objects_over(huge_http("rest", 1000), 1000) and not objects_over(huge_http("rest", 1000), 1001)

    # answers: REST's JSON reads as centra.v1's message; OIP's ANSWERS rows as the same TaskResults
    response = pb.ClassifyResponse(model_version="v000002", model_id="sha256:ab", results=[
        pb.InputResult(id="a", tasks=[pb.TaskResult(task="alpha", label="pos", scores=[0.125, 0.25, 0.625])]),
        pb.InputResult(id="b", tasks=[pb.TaskResult(task="alpha", label="neg", scores=[0.5, 0.25, 0.25],
                                                    truncated=True)])])
    by_rest = answered_from_rest(request, json_format.MessageToJson(response).encode())
    assert by_rest == dataclasses.replace(answered_from_pb(request, response), door="rest")
    rows = [json.dumps({"alpha": {"label": "pos", "scores": {"neg": 0.125, "neu": 0.25, "pos": 0.625},
                                  "truncated": False}}),
            json.dumps({"alpha": {"label": "neg", "scores": {"neg": 0.5, "neu": 0.25, "pos": 0.25},
                                  "truncated": True}})]
    by_oip = answered_from_oip(request, "v000002", rows, "oip_http")
    assert (by_oip.model_id, by_oip.version, by_oip.texts, by_oip.pairs, by_oip.tasks) == \
        ("", "v000002", by_rest.texts, by_rest.pairs, by_rest.tasks)
    assert len(by_oip.got_ids) == len(by_oip.ids) == 2 and not any(by_oip.ids)
    assert by_oip.results == by_rest.results
    assert http_code(413, b'{"error": "too large", "code": "INVALID_ARGUMENT"}') == ("INVALID_ARGUMENT", "too large")
    assert http_code(401, b"not json")[0] == "UNAUTHENTICATED" and http_code(200, b"{}") == ("OK", "")


def test_rss_floors_see_through_a_reload_in_progress():
    from centra.measure.soak import rss_figures

    # 100 s: 400 MB at rest, 800 MB whenever a reload holds two models (every 10th sample), the last one too
    samples = [(t * 0.5, 800.0 if t % 10 == 0 or t == 199 else 400.0) for t in range(200)]
    rss = rss_figures(samples, 100.0)
    assert rss["start"] == 800.0 and rss["end"] == 800.0 and rss["drift_pct"] == 0.0
    assert rss["floor_first"] == rss["floor_last"] == 400.0 and rss["floor_drift_pct"] == 0.0
    grown = [(t, mb + (50.0 if t >= 55 else 0.0)) for t, mb in samples]  # 50 MB that stays
    assert rss_figures(grown, 100.0)["floor_drift_pct"] == 12.5
