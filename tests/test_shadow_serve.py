"""Shadow serving (serve/shadow.py): rows asking for a task with a candidate head run both heads, callers get
the active head's answers bit for bit, the shadow figures equal an offline comparison of the two heads on
the same texts, rows that do not ask pay nothing, and the sample of disagreeing inputs is off unless
asked for and capped when on."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, TEXTS
from helpers import make_tasks
from test_shadow_merge import TASKS, make_candidates

from centra.core.backbone import Backbone, load_tokenizer
from centra.core.graph import StandaloneModel
from centra.core.shadow import candidate_key, extra_layers
from centra.core.task import load_task, save_task
from centra.core.tokens import encode
from centra.export.engines import merge
from centra.runtime.engine import Engine, Row
from centra.serve.shadow import Shadow, ShadowOptions, agree
from centra.serve.v1 import centra_pb2 as pb

CALLS = [(TEXTS[:3], ["alpha", "beta", "gamma"]), (TEXTS[3:], ["alpha"]), (CORPUS[:10], ["alpha", "beta"]),
         (CORPUS[10:16], ["gamma", "beta"]), (TEXTS, [])]


def split_head(bb: Backbone, task: Path, dest: Path, texts: list[str]) -> Path:
    """A copy of a multiclass task's head whose top class loses the median of its margin on `texts`: the
    two heads disagree on about half of them (a tiny random model gives every text nearly one answer)."""
    spec, head = load_task(task, bb)
    tokenizer = load_tokenizer(bb.path)
    enc = encode(tokenizer, bb.cfg.type_vocab_size, texts, None, spec.max_length)
    model = StandaloneModel(bb.embeddings, list(bb.layers), head).eval()
    with torch.no_grad():
        logits = torch.cat([model(*enc.batch([i], tokenizer.pad_token_id or 0)) for i in range(len(texts))])
        top = logits.topk(2, dim=-1)
        best = int(top.indices[:, 0].mode().values)
        head = copy.deepcopy(head)
        head.classifier.bias[best] -= (top.values[:, 0] - top.values[:, 1]).median()
    save_task(dest / spec.name, spec, head)
    return dest / spec.name


@pytest.fixture(scope="module")
def versions(tiny_models, tmp_path_factory) -> tuple:
    """A torch version without candidate heads, and one with a candidate for each task."""
    root = tmp_path_factory.mktemp("shadow-serve")
    bb = Backbone.load(tiny_models["bert"])
    make_tasks(bb, root / "tasks", TASKS)
    candidates = make_candidates(bb, root / "candidates")
    texts = [t for texts, _ in CALLS for t in texts]
    candidates["alpha"] = split_head(bb, root / "tasks" / "alpha", root / "candidates" / "alpha-split", texts)
    merge(root / "tasks", root / "out", progress=False)
    merge(root / "tasks", root / "out", candidates=candidates, progress=False)
    return root / "out" / "versions" / "v000001", root / "out" / "versions" / "v000002"


def request(texts, tasks) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(inputs=[pb.Input(text=t, id=str(i)) for i, t in enumerate(texts)], tasks=tasks)


def answers_of(response) -> list:
    """Every answer's fields, bit for bit (the answering head left out)."""
    return [[(t.task, t.label if t.HasField("label") else None, list(t.labels),
              t.value if t.HasField("value") else None, list(t.scores), t.truncated) for t in r.tasks]
            for r in response.results]


def sample(shadow: Shadow, name: str, **labels) -> float:
    return shadow.metrics.registry.get_sample_value(f"centra_shadow_{name}_total", labels) or 0.0


def test_callers_get_the_active_answers_bit_for_bit(serve, versions):
    plain, shadowed = (serve(Engine.load(v)) for v in versions)
    for texts, tasks in CALLS:
        assert answers_of(shadowed.stub.Classify(request(texts, tasks))) == \
            answers_of(plain.stub.Classify(request(texts, tasks)))
    # the candidate heads ran: every row asking for a task counted once per task
    shadow = shadowed.server.classifier.shadow
    assert sample(shadow, "rows", task="alpha") == 3 + 3 + 10 + 6


def offline(engine: Engine) -> dict:
    """The shadow figures computed here: each call's rows run alone (as the server runs them one by one),
    both heads' answers compared."""
    figures: dict = {}

    def add(key, amount=1.0):
        figures[key] = figures.get(key, 0.0) + amount

    for texts, tasks in CALLS:
        names = tuple(tasks or engine.specs)
        rows = [Row(t, None, names + tuple(candidate_key(n) for n in names)) for t in texts]
        for name in names:
            add(("calls", name))
        for result in engine.interpret_all(engine.run(rows)):
            for name in names:
                active, candidate = result.answers[name], result.answers[candidate_key(name)]
                add(("rows", name))
                add(("agree", name), float(bool(agree(active, candidate))))
                if engine.specs[name].kind == "regression":
                    add(("abs_diff", name), abs(active.value - candidate.value))
                elif engine.specs[name].kind == "multiclass":
                    add(("confusion", name, active.label, candidate.label))
                    add(("labels", name, "candidate", candidate.label))
                else:
                    for label in engine.specs[name].labels:
                        add(("pairs", name, label, str(int(label in active.labels)),
                             str(int(label in candidate.labels))))
                    for label in candidate.labels:
                        add(("labels", name, "candidate", label))
    return figures


def test_shadow_figures_equal_an_offline_comparison(serve, versions):
    engine = Engine.load(versions[1])
    running = serve(engine)
    for texts, tasks in CALLS:
        running.stub.Classify(request(texts, tasks))
    shadow = running.server.classifier.shadow
    expected = offline(Engine.load(versions[1]))
    disagreed = 0
    for key, value in expected.items():
        what, task, *rest = key
        if what in ("calls", "rows", "agree"):
            assert sample(shadow, what, task=task) == value, key
        elif what == "abs_diff":
            assert sample(shadow, what, task=task) == pytest.approx(value, rel=1e-9), key
        elif what == "confusion":
            assert sample(shadow, what, task=task, active=rest[0], candidate=rest[1]) == value, key
            disagreed += (rest[0] != rest[1]) * value
        elif what == "labels":
            assert sample(shadow, what, task=task, head=rest[0], label=rest[1]) == value, key
        else:
            assert sample(shadow, "label_pairs", task=task, label=rest[0], active=rest[1], candidate=rest[2]) == value
    assert 0 < disagreed < expected["rows", "alpha"]  # the comparison saw both disagreement and agreement
    layers = shadow.metrics.registry.get_sample_value
    for task in ("alpha", "beta", "gamma"):
        assert layers("centra_shadow_layers", {"task": task, "head": "candidate"}) == \
            extra_layers(engine.specs[task], engine.candidates[task])
        spent = sample(shadow, "candidate_seconds", task=task)
        assert 0 < spent <= sample(shadow, "batch_seconds", task=task)
    assert layers("centra_shadow_layers", {"task": "beta", "head": "candidate"}) == 1  # its one layer only


def test_rows_that_do_not_ask_pay_nothing(serve, versions):
    running = serve(Engine.load(versions[1]))
    running.stub.Classify(request(TEXTS, ["alpha"]))
    shadow = running.server.classifier.shadow
    assert sample(shadow, "rows", task="alpha") == len(TEXTS)
    for task in ("beta", "gamma"):
        assert sample(shadow, "rows", task=task) == 0 and sample(shadow, "candidate_seconds", task=task) == 0
    assert running.server.batcher.stats.rows == len(TEXTS)


def test_disagreement_sample_is_off_by_default_and_capped(serve, versions, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    assert ShadowOptions().sample_file is None
    running = serve(Engine.load(versions[1]))
    for texts, tasks in CALLS:
        running.stub.Classify(request(texts, tasks))
    shadow = running.server.classifier.shadow
    assert sample(shadow, "rows", task="alpha") > sample(shadow, "agree", task="alpha")  # some disagreed
    assert sample(shadow, "sampled", task="alpha") == 0 and not list(tmp_path.iterdir())
    assert not any(text in record.getMessage() for record in caplog.records for text in TEXTS + CORPUS)

    path = tmp_path / "sample.jsonl"
    capped = Shadow(ShadowOptions(sample_file=path, sample_size=3, sample_chars=12))
    running = serve(Engine.load(versions[1]), shadow=capped)
    for texts, tasks in CALLS:
        running.stub.Classify(request(texts, tasks))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 and sum(sample(capped, "sampled", task=t) for t in ("alpha", "beta")) == 3
    assert all(len(line["text"]) <= 12 for line in lines)
    assert all(line["active"] != line["candidate"] for line in lines)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
