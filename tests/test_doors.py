"""The doors: every registered door opens on the server; a new protocol is one module (a Door) that gets
the one classify path, the token and the metrics without code of its own; typed answers survive each
door's wire form."""

from __future__ import annotations

import importlib

import grpc
import pytest
import torch
from conftest import TEXTS
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_rest import Served

from centra.client import answer_from_v1
from centra.core.answers import ClassAnswer, LabelsAnswer, ValueAnswer, answer_from_dict, interpret
from centra.serve.call import Call
from centra.serve.doors import DOORS, Door, doors
from centra.serve.guard import Guard
from centra.serve.metrics import Metrics
from centra.serve.server import CentraServer, ServeOptions
from centra.serve.v1 import centra_pb2 as pb


class EchoDoor(Door):
    """A protocol of its own: POST /echo/classify {"texts": [...], "task": name} -> {"labels": [...]}."""

    name = "echo"
    open_prefixes = ("/echo/health",)

    def http_routes(self, classifier, http) -> list:
        from aiohttp import web

        async def classify(request):
            body = await request.json()
            answered = await classifier.classify(Call(texts=body["texts"], tasks=[body["task"]]))
            return web.json_response({"labels": [answered.answer(i, body["task"]).label
                                                 for i in range(len(answered.rows))]})

        async def health(request):
            return web.json_response({"ok": True})

        return [web.post("/echo/classify", classify), web.get("/echo/health", health)]


def test_every_registered_door_is_a_module_with_a_door():
    opened = doors()
    assert [door.name for door in opened] == ["centra.v1", "rest", "oip", "info"]
    for name, door in zip(DOORS, opened):
        assert isinstance(door, Door) and importlib.import_module(f"centra.serve.doors.{name}").DOOR is door


def test_a_new_door_gets_the_classify_path_the_token_and_the_metrics(engine):
    metrics = Metrics()
    server = CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0),
                          guard=Guard(token="s3cret", metrics=metrics), doors=(*doors(), EchoDoor()))
    running = Served(server)
    try:
        bearer = {"Authorization": "Bearer s3cret"}
        body = {"texts": TEXTS[:3], "task": "alpha"}
        status, refused = running.call("POST", "/echo/classify", body)
        assert status == 401 and refused["code"] == "UNAUTHENTICATED"
        assert running.call("GET", "/echo/health")[0] == 200, "the door's open path needs no token"
        status, got = running.call("POST", "/echo/classify", body, headers=bearer)
        assert status == 200, got
        want = [a["label"] for a in engine.predict(TEXTS[:3], tasks=["alpha"])]
        assert got["labels"] == want
        status, error = running.call("POST", "/echo/classify", {"texts": [], "task": "alpha"}, headers=bearer)
        assert status == 400 and error["error"] == "no inputs given", "the call type's checks, the door's status"
        status, error = running.call("POST", "/echo/classify", {"texts": ["x"], "task": "nope"}, headers=bearer)
        assert status == 404 and "unknown task 'nope'" in error["error"]
        text = metrics.render().decode()
        assert 'centra_calls_total{code="UNAUTHENTICATED",method="POST /echo/classify"} 1.0' in text
        assert 'centra_calls_total{code="OK",method="POST /echo/classify"} 1.0' in text
        assert 'centra_calls_total{code="NOT_FOUND",method="POST /echo/classify"} 1.0' in text
        # the registered doors are still there, behind the same guard
        assert running.call("POST", "/v1/classify", {"inputs": [{"text": "x"}]})[0] == 401
        assert running.call("POST", "/v1/classify", {"inputs": [{"text": "x"}]}, headers=bearer)[0] == 200
    finally:
        running.close()


def test_health_and_reflection_name_every_door_service(engine):
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        for service in ("", "centra.v1.Classifier", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.close()


@pytest.mark.parametrize("answer", [ClassAnswer({"neg": 0.25, "pos": 0.75}, "pos"),
                                    LabelsAnswer({"a": 0.5, "b": 0.125, "c": 0.875}, ["a", "c"]),
                                    LabelsAnswer({"a": 0.25}, []),
                                    ValueAnswer({"similarity": 3.25}, 3.25)])
def test_a_typed_answer_survives_each_wire_form(answer):
    assert answer_from_dict(answer.to_dict()) == answer
    task = pb.TaskResult(task="t")
    answer.to_v1(task)
    assert answer_from_v1(list(answer.scores), task) == answer
    assert task.HasField("label") == isinstance(answer, ClassAnswer)
    assert task.HasField("value") == isinstance(answer, ValueAnswer)


def test_interpret_gives_the_record_of_the_task_kind(engine):
    kinds = {type(interpret(spec, torch.zeros(spec.num_outputs))) for spec in engine.specs.values()}
    want = {{"multiclass": ClassAnswer, "multilabel": LabelsAnswer, "regression": ValueAnswer}[s.kind]
            for s in engine.specs.values()}
    assert kinds == want
