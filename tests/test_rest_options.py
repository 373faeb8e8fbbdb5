"""REST's (and centra.v1's) `topK` and `rawScores`: the k highest scores with their labels, highest first,
in `top`; the logits instead of probabilities; the answers themselves unchanged; bad values refused with
one-line 400s. The gRPC call takes the same fields (one call type for every door)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEXTS
from test_rest import TOLERANCE, Served, classify_json, grpc_json

from centra.serve.server import CentraServer, ServeOptions
from centra.serve.v1 import centra_pb2 as pb

TASKS = ["alpha", "beta", "gamma"]  # the fixture's single-text tasks: every kind


@pytest.fixture(scope="module")
def served(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    yield running
    running.close()


def rest(served, **options) -> dict:
    status, got = served.call("POST", "/v1/classify", {**classify_json(TEXTS[:4], TASKS), **options})
    assert status == 200, got
    return got


def per_task(response) -> list[dict]:
    return [task for result in response["results"] for task in result["tasks"]]


def test_raw_scores_are_the_logits(served, engine):
    plain, raw = rest(served), rest(served, rawScores=True)
    logits = engine.logits(TEXTS[:4], tasks=TASKS)
    for i, result in enumerate(raw["results"]):
        for task, before in zip(result["tasks"], plain["results"][i]["tasks"]):
            assert np.allclose(task["scores"], logits[task["task"]][i].tolist(), atol=TOLERANCE), task["task"]
            assert {k: v for k, v in task.items() if k != "scores"} == {k: v for k, v in before.items()
                                                                        if k != "scores"}, "the answers stay"
    kinds = {s.name: s.kind for s in engine.specs.values()}
    probabilities = [t for t in per_task(plain) if kinds[t["task"]] != "regression"]
    assert all(0 <= p <= 1 for t in probabilities for p in t["scores"])
    assert any(not 0 <= x <= 1 for t in per_task(raw) if kinds[t["task"]] != "regression" for x in t["scores"]), \
        "some logit outside [0, 1]: these are not probabilities"


@pytest.mark.parametrize("raw", [False, True])
def test_top_k_keeps_the_highest_scores_with_their_labels(served, engine, raw):
    full = rest(served, rawScores=raw)
    for k in (1, 2, 50):
        top = rest(served, topK=k, rawScores=raw)
        for got, want in zip(per_task(top), per_task(full)):
            labels = engine.specs[got["task"]].labels
            assert got["scores"] == [], "top_k: the scores are in top only"
            best = sorted(zip(labels, want["scores"]), key=lambda item: -item[1])[:k]
            assert [e["label"] for e in got["top"]] == [label for label, _ in best]
            assert np.allclose([e["score"] for e in got["top"]], [score for _, score in best], atol=1e-6)
            assert len(got["top"]) == min(k, len(labels))
            assert {k: v for k, v in got.items() if k not in ("scores", "top")} == \
                {k: v for k, v in want.items() if k not in ("scores", "top")}
    assert all(t["top"] == [] for t in per_task(full)), "no top without top_k"


def test_grpc_takes_the_same_fields(served):
    request = pb.ClassifyRequest(inputs=[pb.Input(text=t) for t in TEXTS[:4]], tasks=TASKS, top_k=2, raw_scores=True)
    got = grpc_json(served.stub.Classify(request))
    want = rest(served, topK=2, rawScores=True)
    assert [t["top"] for t in per_task(got)] == [t["top"] for t in per_task(want)]


@pytest.mark.parametrize("options,words", [({"topK": -1}, "top_k must be >= 0 and < 2^31"),
                                           ({"topK": "three"}, "not a ClassifyRequest"),
                                           ({"topK": 2**31}, "not a ClassifyRequest"),
                                           ({"rawScores": "yes"}, "not a ClassifyRequest")])
def test_bad_options_are_one_line_400s(served, options, words):
    status, got = served.call("POST", "/v1/classify", {**classify_json(TEXTS[:1], TASKS), **options})
    assert status == 400 and got["code"] == "INVALID_ARGUMENT" and words in got["error"], got
    assert "\n" not in got["error"]
