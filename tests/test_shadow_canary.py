"""Canary heads (serve/shadow.py): a share of request ids, or calls that ask for it (a request field or a
header), get a task's candidate answers with the answering head named; the share is a hash of the request
id (one id, one head; raising the fraction only adds ids); the active answers stay those of a version
without the candidate, on centra.v1 gRPC and REST."""

from __future__ import annotations

import grpc
import pytest
from conftest import TEXTS
from test_rest import Served
from test_shadow_serve import answers_of, request, sample, versions  # noqa: F401 (the fixture)

from centra.client import Client
from centra.core.shadow import candidate_key
from centra.runtime.engine import Engine, Row
from centra.serve.server import CentraServer, ServeOptions
from centra.serve.shadow import Shadow, ShadowOptions, canary_point

IDS = [f"caller-{i}" for i in range(40)]


def test_canary_point_is_a_stable_hash():
    points = [canary_point(f"user-{i}") for i in range(4000)]
    assert points == [canary_point(f"user-{i}") for i in range(4000)]
    assert canary_point("user-0") == pytest.approx(0.5174428, abs=1e-7)  # not Python's per-process hash()
    share = sum(p < 0.25 for p in points) / len(points)
    assert 0.22 < share < 0.28
    assert {i for i, p in enumerate(points) if p < 0.1} <= {i for i, p in enumerate(points) if p < 0.3}


@pytest.fixture(scope="module")
def engines(versions):  # noqa: F811
    return Engine.load(versions[0]), Engine.load(versions[1])


@pytest.fixture
def canary_server(serve, engines):
    return serve(engines[1], shadow=Shadow(ShadowOptions(canary={"*": 0.5})))


def heads_of(response) -> list[set[str]]:
    return [{t.head for t in r.tasks} for r in response.results]


def test_one_request_id_sees_one_head(canary_server):
    seen = {}
    for rid in IDS:
        for _ in range(3):
            reply = canary_server.stub.Classify(request_with(TEXTS[:2], ["alpha", "beta"], request_id=rid))
            heads = heads_of(reply)
            assert len(set.union(*heads)) == 1  # one head for the whole call, every task
            seen.setdefault(rid, heads[0])
            assert heads[0] == seen[rid]
    chosen = {rid: next(iter(h)) for rid, h in seen.items()}
    assert chosen == {rid: "candidate" if canary_point(rid) < 0.5 else "active" for rid in IDS}
    assert 10 < sum(h == "candidate" for h in chosen.values()) < 30
    shadow = canary_server.server.classifier.shadow
    assert sample(shadow, "answered", task="alpha", head="candidate") == 3 * sum(h == "candidate"
                                                                                 for h in chosen.values())


def request_with(texts, tasks, **fields):
    message = request(texts, tasks)
    for key, value in fields.items():
        setattr(message, key, value)
    return message


def candidate_answers(engine: Engine, texts, tasks) -> list:
    """The candidate heads' answers computed here (the rows as the server runs them: each with its task and
    its candidate), in a v1 response's shape (as answers_of reads it)."""
    from centra.serve.v1 import centra_pb2 as pb

    rows = [Row(t, None, (*tasks, *(candidate_key(n) for n in tasks))) for t in texts]
    response = pb.ClassifyResponse()
    for result in engine.interpret_all(engine.run(rows)):
        entry = response.results.add()
        for task in tasks:
            result.answers[candidate_key(task)].to_v1(entry.tasks.add(task=task))
    return answers_of(response)


def test_asking_for_a_head_gets_it_and_names_it(canary_server, engines, serve, versions):  # noqa: F811
    plain = serve(engines[0])
    texts, tasks = TEXTS, ["alpha", "beta", "gamma"]
    active = canary_server.stub.Classify(request_with(texts, tasks, head="active", request_id=IDS[0]))
    assert all(h == {"active"} for h in heads_of(active))
    assert answers_of(active) == answers_of(plain.stub.Classify(request(texts, tasks)))
    candidate = canary_server.stub.Classify(request_with(texts, tasks, head="candidate"))
    assert all(h == {"candidate"} for h in heads_of(candidate))
    assert answers_of(candidate) == candidate_answers(Engine.load(versions[1]), texts, tasks)
    assert answers_of(candidate) != answers_of(active)
    # a header does what the field does; the field wins over it
    by_header = canary_server.stub.Classify(request(texts, tasks), metadata=(("x-centra-head", "candidate"),))
    assert answers_of(by_header) == answers_of(candidate)
    both = canary_server.stub.Classify(request_with(texts, tasks, head="active"),
                                       metadata=(("x-centra-head", "candidate"),))
    assert all(h == {"active"} for h in heads_of(both))
    # a version without candidates names no head, whatever is asked
    assert not any(t.HasField("head") for r in plain.stub.Classify(request_with(texts, tasks, head="candidate"))
                   .results for t in r.tasks)
    with pytest.raises(grpc.RpcError) as caught:
        canary_server.stub.Classify(request_with(texts, tasks, head="newest"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "head 'newest'" in caught.value.details()


def test_raw_scores_and_top_k_come_from_the_head_that_answered(canary_server, versions):  # noqa: F811
    import numpy as np

    texts, tasks = TEXTS, ["alpha", "beta"]
    engine = Engine.load(versions[1])
    rows = [Row(t, None, (*tasks, *(candidate_key(n) for n in tasks))) for t in texts]
    logits = [r.logits for r in engine.run(rows)]
    for head in ("active", "candidate"):
        raw = canary_server.stub.Classify(request_with(texts, tasks, head=head, raw_scores=True))
        top = canary_server.stub.Classify(request_with(texts, tasks, head=head, raw_scores=True, top_k=1))
        for i, (r, t) in enumerate(zip(raw.results, top.results)):
            for got, best in zip(r.tasks, t.tasks):
                key = got.task if head == "active" else candidate_key(got.task)
                assert np.allclose(list(got.scores), logits[i][key].tolist(), atol=1e-4), (head, got.task)
                assert best.top[0].score == max(got.scores)


def test_client_and_rest_carry_the_head(engines, versions):  # noqa: F811
    served = Served(CentraServer(engines[1], ServeOptions(port=0, http_port=0, drain_s=0),
                                 shadow=Shadow(ShadowOptions(canary={"alpha": 1.0}))))
    try:
        with Client(served.grpc_target) as client:
            answers = client.classify(TEXTS[:2], ["alpha", "beta"], request_id="anyone")
            assert [a.get("head") for a in answers] == ["candidate", "active"] * 2
            assert client.list_tasks()["tasks"][0]["has_candidate"] is True
        body = {"inputs": [{"text": t} for t in TEXTS[:2]], "tasks": ["alpha", "beta"]}
        status, reply = served.call("POST", "/v1/classify", body)
        assert status == 200 and [t["head"] for t in reply["results"][0]["tasks"]] == ["candidate", "active"]
        status, asked = served.call("POST", "/v1/classify", {**body, "head": "active"})
        assert [t["head"] for t in asked["results"][0]["tasks"]] == ["active", "active"]
        status, by_header = served.call("POST", "/v1/classify", body, headers={"X-Centra-Head": "active"})
        assert by_header["results"] == asked["results"]
    finally:
        served.close()
    plain = Served(CentraServer(engines[0], ServeOptions(port=0, http_port=0, drain_s=0)))
    try:
        status, reply = plain.call("POST", "/v1/classify", body)
        assert reply["results"] == [{**r, "tasks": [{k: v for k, v in t.items() if k != "head"} for t in r["tasks"]]}
                                    for r in asked["results"]]
        assert not any("head" in t for r in reply["results"] for t in r["tasks"])
    finally:
        plain.close()


@pytest.mark.parametrize("value, message", [("2", "--canary must be a fraction in [0, 1], not 2.0"),
                                            ("alpha=x", "--canary expects FRACTION or TASK=FRACTION"),
                                            ("=0.5", "--canary expects FRACTION or TASK=FRACTION")])
def test_bad_canary_flags_are_one_line(versions, value, message, capsys):  # noqa: F811
    from centra.cli import main

    assert main(["serve", "--model", str(versions[1]), "--port", "0", "--no-metrics", "--canary", value]) == 2
    assert message in capsys.readouterr().err


def test_a_canary_task_without_a_candidate_is_named_at_start(versions):  # noqa: F811
    import threading
    import time

    from test_serve_signals import start_serve

    proc = start_serve(versions[1], "--no-http", "--canary", "alpha=0.5", "--canary", "nosuch=0.5")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("no metrics" in line for line in lines):
            time.sleep(0.1)
        time.sleep(1.0)  # what the start prints after its summary line
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = "".join(lines)
    assert "serving " in text, text
    assert "warning: --canary nosuch=...: nosuch has no candidate head in version v000002" in text, text
    assert "--canary alpha" not in text
