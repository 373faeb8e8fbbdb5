"""Thresholds that hold up: the guard (a label with no signal keeps 0.5, a separable one gets its cut), the
micro-F1 objective, cross-fitting (no fold is scored at thresholds tuned on it), the labels per text, and
max_labels (task.json and per call) in every engine, in `Engine.predict` and in Classify."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import make_tasks

from centra.core.answers import interpret, label_mask
from centra.core.backbone import Backbone
from centra.core.task import load_task, save_task
from centra.train.metrics import compute, decide
from centra.train.thresholds import (
    DEFAULT_THRESHOLD,
    MARGIN,
    MIN_POSITIVES,
    Tuning,
    cross_fit,
    fold_of,
    labels_per_text,
    passes_guard,
    tune_logits,
    tune_thresholds,
)


def scores(rng: np.random.Generator, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Three labels: separable (positives in (0.2, 0.4), negatives in (0.01, 0.15): its best cut is near
    0.18 and 0.5 predicts nothing), no signal (random scores under 0.3, 30% positives) and rare with
    no signal (3% positives, random scores under 0.1: a low cut that predicts it everywhere finds some)."""
    gold = np.column_stack([rng.random(n) < 0.3, rng.random(n) < 0.3, rng.random(n) < 0.03])
    separable = np.where(gold[:, 0], 0.2 + 0.2 * rng.random(n), 0.01 + 0.14 * rng.random(n))
    probs = np.column_stack([separable, 0.3 * rng.random(n), 0.1 * rng.random(n)])
    return probs, gold.astype(np.float32)


@pytest.mark.parametrize("objective", ["label", "micro_f1"])
def test_guard_keeps_05_for_labels_without_signal_and_tunes_separable_ones(objective):
    probs, gold = scores(np.random.default_rng(0))
    separable, noise, rare = tune_thresholds(probs, gold, objective=objective)
    assert 0.15 < separable < 0.2, separable
    assert noise == rare == DEFAULT_THRESHOLD, (noise, rare)
    # without the guard, a noise label finds a cut that predicts it for many texts (per label, the rare one
    # too; micro-F1 keeps that one quiet by itself: its predictions would cost more than they bring)
    unguarded = tune_thresholds(probs, gold, objective=objective, margin=-1.0, min_positives=1)
    assert unguarded[1] < 0.3 and (objective == "micro_f1" or unguarded[2] < 0.1), unguarded
    assert (probs[:, 1] >= unguarded[1]).mean() > 0.5


def test_guard_floor_is_the_constant_answer_plus_the_margin():
    rng = np.random.default_rng(3)
    gold = rng.random(400) < 0.25
    constant = 2 * gold.sum() / (len(gold) + gold.sum())  # F1 of predicting the label for every text
    assert not passes_guard(rng.random(400), gold)  # no signal: at most chance above the constant
    weak = np.where(gold, rng.random(400) * 0.6 + 0.4, rng.random(400))  # some signal, not much
    best_f1 = max(2 * ((weak >= t) & gold).sum() / ((weak >= t).sum() + gold.sum()) for t in np.unique(weak))
    assert passes_guard(weak, gold) == (best_f1 >= constant + MARGIN)
    assert not passes_guard(np.where(gold, 0.9, 0.1)[: MIN_POSITIVES * 2], np.ones(MIN_POSITIVES * 2) > 0,
                            min_positives=MIN_POSITIVES * 3), "too few positives: never tuned"


def test_micro_objective_beats_per_label_tuning_on_micro_f1():
    rng = np.random.default_rng(1)
    n = 800
    gold = rng.random((n, 4)) < [0.4, 0.2, 0.1, 0.05]
    signal = [1.5, 0.8, 0.5, 0.4]  # weaker labels: per-label F1 wants low cuts, micro-F1 does not
    logits = rng.normal(0, 1, (n, 4)) + gold * signal - 1.5
    probs = 1 / (1 + np.exp(-logits))
    by_label = tune_thresholds(probs, gold, objective="label", margin=0.0)
    micro = tune_thresholds(probs, gold, objective="micro_f1", margin=0.0)
    f1 = {name: compute("multilabel", logits, gold.tolist(), cuts) for name, cuts in
          (("label", by_label), ("micro", micro))}
    assert f1["micro"]["micro_f1"] > f1["label"]["micro_f1"] + 0.005, f1
    assert f1["label"]["macro_f1"] >= f1["micro"]["macro_f1"], f1
    assert decide(probs, micro).sum() < decide(probs, by_label).sum()  # fewer labels answered


def test_cross_fitting_never_scores_a_fold_it_tuned_on():
    rng = np.random.default_rng(2)
    probs, gold = scores(rng, 250)
    probs[:, 0] = (np.arange(250) + 0.5) / 250  # the first column names the row: a tuner can be traced
    tuned_on: list[set[int]] = []

    def spy(p: np.ndarray, g: np.ndarray) -> list[float]:
        rows = set(np.rint(p[:, 0] * 250 - 0.5).astype(int).tolist())
        tuned_on.append(rows)
        return [len(tuned_on) / 10, 0.5, 0.5]  # each tuning's thresholds say which tuning made them

    held_out = cross_fit(probs, gold, spy, folds=5, seed=7)
    fold = fold_of(250, 5, 7)
    assert len(tuned_on) == 5 and np.bincount(fold).tolist() == [50] * 5
    for row in range(250):
        tuning = round(held_out[row, 0] * 10) - 1  # the tuning whose thresholds scored this row
        assert row not in tuned_on[tuning], f"row {row} scored at thresholds tuned on it"
        assert tuned_on[tuning] == set(np.flatnonzero(fold != fold[row]).tolist())


def test_held_out_figures_are_cross_fitted_and_served_thresholds_use_all_of_dev():
    rng = np.random.default_rng(4)
    probs, gold = scores(rng)
    logits = np.log(probs / (1 - probs))
    found = tune_logits(logits, gold.tolist(), Tuning(max_labels=1))
    assert found["values"] == tune_thresholds(probs, gold)
    held_out = cross_fit(probs, gold, Tuning().tune)
    assert found["tuned"] == compute("multilabel", logits, gold.tolist(), held_out, 1)
    assert found["fit"] == compute("multilabel", logits, gold.tolist(), found["values"], 1)
    assert found["labels_per_text"] == labels_per_text(probs, held_out, gold, 1)
    assert found["labels_per_text"]["predicted"] <= 1 and found["labels_per_text"]["gold"] == \
        pytest.approx(gold.sum(1).mean(), abs=1e-4)


def test_decide_equals_interpret_and_label_mask(bert_spec):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (40, 4)).astype(np.float32)
    for limit in (None, 1, 2, 3):
        spec = replace(bert_spec, thresholds=[0.3, 0.4, 0.5, 0.6], max_labels=limit)
        probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
        mask = decide(probs, spec.thresholds, limit)
        assert limit is None or mask.sum(1).max() <= limit
        assert (label_mask(spec, torch.from_numpy(logits)).numpy() == mask).all()
        for row, want in zip(logits, mask):
            got = interpret(spec, torch.from_numpy(row)).labels
            assert got == [lab for lab, on in zip(spec.labels, want) if on]
            kept = interpret(spec, torch.from_numpy(row), max_labels=1).labels
            assert len(kept) <= 1 and set(kept) <= set(got)


@pytest.fixture(scope="module")
def bert_spec(limited_model):
    return load_task(limited_model[0] / "tasks" / "beta", Backbone.load(limited_model[2]))[0]


LIMIT = 2  # the multilabel task's own max_labels


@pytest.fixture(scope="module")
def limited_model(tiny_models, tmp_path_factory):
    """The standard tasks with beta (4 labels) answering every label (thresholds 0) but at most LIMIT,
    merged with ONNX graphs beside the torch weights."""
    from centra.cli import main

    root = tmp_path_factory.mktemp("max-labels")
    bert = Backbone.load(tiny_models["bert"])
    make_tasks(bert, root / "tasks")
    spec, head = load_task(root / "tasks" / "beta", bert)
    spec = replace(spec, thresholds=[0.0] * 4, max_labels=LIMIT)
    save_task(root / "tasks" / "beta", spec, head)
    assert main(["merge", "--tasks-dir", str(root / "tasks"), "--out", str(root / "out"), "--engine", "onnx"]) == 0
    return root, root / "out", tiny_models["bert"]


TEXTS = ["the bill was wrong", "the parcel came late and broken", "the app crashes on start", "fine"]


def top(answer: dict, k: int) -> list[str]:
    ranked = sorted(answer["scores"], key=lambda lab: -answer["scores"][lab])[:k]
    return [lab for lab in answer["scores"] if lab in ranked]


@pytest.mark.parametrize("engine_name", ["torch", "onnx"])
def test_max_labels_in_every_engine_and_predict(limited_model, engine_name):
    if engine_name == "onnx":
        pytest.importorskip("onnxruntime")
    from centra.runtime.engine import Engine

    engine = Engine.load(limited_model[1], engine=engine_name)
    assert engine.specs["beta"].max_labels == LIMIT
    for limit, expect in ((None, LIMIT), (1, 1), (LIMIT + 2, LIMIT)):  # a call never exceeds the task's
        answers = engine.predict(TEXTS, tasks=["beta", "alpha"], max_labels=limit)
        for answer in answers:
            if answer["task"] == "beta":
                assert answer["labels"] == top(answer, expect), (engine_name, limit, answer)
            else:
                assert "label" in answer  # other kinds unchanged


def test_max_labels_in_the_predict_command(limited_model, capsys):
    import json

    from centra.cli import main

    assert main(["predict", "--model", str(limited_model[1]), "--task", "beta", "--max-labels", "1", *TEXTS]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == len(TEXTS) and all(a["labels"] == top(a, 1) for a in answers)


def test_max_labels_in_classify(limited_model):
    pytest.importorskip("grpc")
    import grpc
    from test_serve import Running

    from centra.client import Client
    from centra.runtime.engine import Engine
    from centra.serve.v1 import centra_pb2 as pb

    engine = Engine.load(limited_model[1], engine="torch")
    server = Running(engine)
    try:
        with Client(server.target, timeout=20) as client:
            for limit in (None, 1, 9):
                got = client.classify(TEXTS, tasks=["beta"], max_labels=limit)
                local = engine.predict(TEXTS, tasks=["beta"], max_labels=limit)
                assert [a["labels"] for a in got] == [a["labels"] for a in local]
                assert all(len(a["labels"]) == (1 if limit == 1 else LIMIT) for a in got)
            with pytest.raises(Exception, match="max_labels"):
                client.classify(TEXTS, tasks=["beta"], max_labels=0)
        request = pb.ClassifyRequest(inputs=[pb.Input(text="hi")], tasks=["beta"], max_labels=-1)
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Classify(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_labels" in refused.value.details()
    finally:
        server.close()


def test_max_labels_over_rest_and_the_open_inference_protocol(limited_model):
    """REST's maxLabels and OIP's request parameter max_labels (HTTP and gRPC, with tritonclient) answer
    as Engine.predict with the same limit; a bad max_labels is refused with one line naming it."""
    import json

    tritonhttp = pytest.importorskip("tritonclient.http")
    tritongrpc = pytest.importorskip("tritonclient.grpc")
    from test_rest import Served, classify_json, oip_inputs
    from tritonclient.utils import InferenceServerException

    from centra.runtime.engine import Engine
    from centra.serve.server import CentraServer, ServeOptions

    engine = Engine.load(limited_model[1], engine="torch")
    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)))
    clients = {"http": tritonhttp.InferenceServerClient(running.http_target),
               "grpc": tritongrpc.InferenceServerClient(running.grpc_target)}
    try:
        for limit in (None, 0, 1, 9):  # 0 and none: the task's own limit
            want = [a["labels"] for a in engine.predict(TEXTS, tasks=["beta"], max_labels=limit)]
            assert all(len(labels) == (1 if limit == 1 else LIMIT) for labels in want)
            body = {**classify_json(TEXTS, ["beta"]), **({"maxLabels": limit} if limit is not None else {})}
            status, got = running.call("POST", "/v1/classify", body)
            assert status == 200, got
            assert [r["tasks"][0].get("labels", []) for r in got["results"]] == want, limit
            for protocol, client in clients.items():
                module = tritonhttp if protocol == "http" else tritongrpc
                result = client.infer("centra", oip_inputs(module, TEXTS, tasks="beta"),
                                      parameters={"max_labels": limit} if limit is not None else None)
                answers = [json.loads(row[0])["beta"]["labels"] for row in result.as_numpy("ANSWERS")]
                assert answers == want, (protocol, limit)
                # the logits are the task's, whatever the limit
                assert np.allclose(result.as_numpy("LOGITS_beta"), engine.logits(TEXTS, None, ["beta"])["beta"].numpy(),
                                   atol=1e-5)
        for protocol, client in clients.items():
            module = tritonhttp if protocol == "http" else tritongrpc
            for bad in (-1, "two"):
                with pytest.raises(InferenceServerException, match="max_labels"):
                    client.infer("centra", oip_inputs(module, TEXTS[:1], tasks="beta"), parameters={"max_labels": bad})
        status, got = running.call("POST", "/v1/classify", {**classify_json(TEXTS[:1], ["beta"]), "maxLabels": -1})
        assert status == 400 and "max_labels" in got["error"]
        status, got = running.call("POST", "/v2/models/centra/infer", {"parameters": [1], "inputs": []})
        assert status == 400 and "parameters" in got["error"]
    finally:
        for client in clients.values():
            client.close()
        running.close()


def test_the_demo_answers_at_most_3_emotions():
    """tasks/emotions (the demo's) caps its answers: no text gets more than 3 emotions."""
    import json
    from pathlib import Path

    from centra.train.settings import settings_from

    recipe = json.loads((Path(__file__).resolve().parent.parent / "tasks" / "emotions" / "recipe.json").read_text())
    assert recipe["kind"] == "multilabel" and settings_from(recipe["training"]).max_labels == 3
