"""Rules of the training layer: the KD loss against hand-computed values, weight decay groups, no
mutation of the caller's job, options refused before compute, the run-wide cache cap, JSONL label
lists, non-UTF-8 data, and progress output when stderr is not a terminal."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time

import pytest
import torch
from test_training import job_for, synthetic

import centra.train.pipeline as pipeline
from centra.core.backbone import Backbone
from centra.core.task import init_task
from centra.core.tokens import encode
from centra.errors import CentraError
from centra.train.cache import ActivationCache, CacheBudget
from centra.train.data import Columns, load_examples
from centra.train.finetune import TrainConfig, loss_fn, param_groups
from centra.train.metrics import DEFAULT_METRIC
from centra.train.pipeline import train_task, validate_job

LOGITS = [[2.0, -1.0, 0.5], [0.1, 0.7, -0.3], [-1.2, 0.4, 1.5]]  # student
SOFT = [[0.3, 1.8, -0.6], [1.1, -0.4, 0.2], [0.0, -2.0, 2.5]]  # teacher
ALPHA, TEMP = 0.7, 2.5


@pytest.fixture(scope="module")
def bert(tiny_models) -> Backbone:
    return Backbone.load(tiny_models["bert"])


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    norm = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - norm for x in row]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_loss(kind: str, target: list, soft: list | None) -> float:
    """The loss by hand, in plain Python floats (no torch)."""
    n = len(LOGITS)
    if kind == "multiclass":
        hard = sum(-_log_softmax(p)[y] for p, y in zip(LOGITS, target)) / n
        if soft is None:
            return hard
        kl = 0.0
        for p, q in zip(LOGITS, soft):
            log_p, log_q = _log_softmax([x / TEMP for x in p]), _log_softmax([x / TEMP for x in q])
            kl += sum(math.exp(lq) * (lq - lp) for lp, lq in zip(log_p, log_q))  # KL(teacher || student)
        return hard + ALPHA * TEMP**2 * kl / n  # sum over classes, mean over examples
    if kind == "multilabel":
        cells = [(p, y) for prow, yrow in zip(LOGITS, target) for p, y in zip(prow, yrow)]
        hard = sum(-(y * math.log(_sigmoid(p)) + (1 - y) * math.log(1 - _sigmoid(p))) for p, y in cells) / len(cells)
        if soft is None:
            return hard
        pairs = [(_sigmoid(p / TEMP), _sigmoid(q / TEMP)) for prow, qrow in zip(LOGITS, soft)
                 for p, q in zip(prow, qrow)]
        kl = sum(q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)) for p, q in pairs) / len(pairs)
        return hard + ALPHA * TEMP**2 * kl
    values = [row[0] for row in LOGITS]
    hard = sum((v - t) ** 2 for v, t in zip(values, target)) / n
    if soft is None:
        return hard
    return hard + ALPHA * sum((v - s[0]) ** 2 for v, s in zip(values, soft)) / n  # no F^2 for a value


@pytest.mark.parametrize("kind, target", [
    ("multiclass", [0, 2, 1]),
    ("multilabel", [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
    ("regression", [1.5, -0.2, 0.9]),
])
def test_kd_loss_matches_hand_computed_values(kind, target):
    cols = 1 if kind == "regression" else 3
    logits = torch.tensor([row[:cols] for row in LOGITS], dtype=torch.float64)
    soft = torch.tensor([row[:cols] for row in SOFT], dtype=torch.float64)
    tgt = torch.tensor(target, dtype=torch.long if kind == "multiclass" else torch.float64)
    hard = loss_fn(kind, logits, tgt, None, ALPHA, TEMP).item()
    assert hard == pytest.approx(_hand_loss(kind, target, None), rel=1e-9, abs=1e-12)
    both = loss_fn(kind, logits, tgt, soft, ALPHA, TEMP).item()
    expected = _hand_loss(kind, target, [row[:cols] for row in SOFT])
    assert both == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert both > hard + 1e-3  # the teacher term is really there


def test_weight_decay_groups(bert):
    _, head = init_task(bert, "t", "multiclass", ["a", "b"], 1, 1)
    head.requires_grad_(True)
    cfg = TrainConfig(weight_decay=0.05, lr=1e-4, head_lr=1e-3)
    names = {id(p): n for n, p in head.named_parameters()}
    norms = {id(m.weight) for m in head.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert norms, "the head has LayerNorms"
    groups = param_groups(head, cfg)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in head.parameters() if p.requires_grad), "each param once"
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            if name.endswith("bias") or id(p) in norms:
                assert group["weight_decay"] == 0.0, name
            else:
                assert p.dim() >= 2 and group["weight_decay"] == cfg.weight_decay, name
            assert group["lr"] == (cfg.lr if name.startswith("layers.") else cfg.head_lr), name


def test_validate_job_leaves_the_callers_job_alone(bert, tmp_path):
    job = job_for(tmp_path, "t", "multilabel", False)
    assert job.train_config.metric is None
    before = copy.deepcopy(dataclasses.asdict(job))
    checked = validate_job(job, bert.cfg)
    assert job.train_config.metric is None and dataclasses.asdict(job) == before
    assert checked.tc.metric == DEFAULT_METRIC["multilabel"] and checked.job is not job


def _set_teacher(job, tmp_path):
    (tmp_path / "teacher.jsonl").write_text(json.dumps([0.5, -0.5]) + "\n")
    job.teacher_logits, job.attach_layer = tmp_path / "teacher.jsonl", 4


@pytest.mark.parametrize("change, message", [
    (lambda job, _: setattr(job, "epochs", 0), "epochs must be >= 1"),
    (lambda job, _: setattr(job, "batch_size", 0), "batch_size must be >= 1"),
    (lambda job, _: setattr(job, "max_length", 65), "max_length 65 must be in 4..64"),
    (_set_teacher, "attach_layer 4 must be in 0..3"),
])
def test_options_refused_before_compute(bert, tmp_path, monkeypatch, change, message):
    def no_compute(*_args, **_kwargs):
        raise AssertionError("compute started")

    monkeypatch.setattr(pipeline, "load_data", no_compute)
    monkeypatch.setattr(pipeline, "ActivationCache", no_compute)
    job = job_for(tmp_path, "t", "multiclass", False)
    change(job, tmp_path)
    start = time.perf_counter()
    with pytest.raises(CentraError) as err:
        train_task(job, bert, tmp_path / "tasks")
    assert time.perf_counter() - start < 5
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "tasks").exists()


def _encoded(bert, n: int, seed: int):
    texts = [" ".join(r) for r in synthetic("multiclass", False, n, seed)]
    return encode(bert.tokenizer(), bert.cfg.type_vocab_size, texts, None, 32)


def test_caches_share_one_budget(bert, tmp_path):
    small, big = _encoded(bert, 10, 1), _encoded(bert, 40, 2)
    pad = bert.tokenizer().pad_token_id
    probe = [ActivationCache(bert, e, pad, 1 << 30, None, progress=False) for e in (small, big)]
    a, b = (c.nbytes for c in probe)
    for c in probe:
        c.close()
    assert b > 2 * a
    budget = CacheBudget(2 * a + a // 2)  # the small cache and one snapshot of it; not the big one
    first = ActivationCache(bert, small, pad, budget, tmp_path, progress=False)
    second = ActivationCache(bert, big, pad, budget, tmp_path, progress=False)
    assert first.spilled is None and second.spilled is not None and budget.used == a
    for cache in (first, second):
        cache.build(0)
        for layer in (1, 2, 3, 0, 4):
            cache.advance_to(layer)
            assert budget.used <= budget.cap, (layer, budget.used, budget.cap)
    assert len(first.snapshots) == 1 and not second.snapshots  # one snapshot fit, the rest did not
    assert budget.peak <= budget.cap
    first.close()
    second.close()
    assert budget.used == 0 and not list(tmp_path.glob(".activations-*"))


def test_run_stays_under_the_cache_cap(bert, tmp_path):
    # fp32: the sizes below are 4 bytes a value (a bf16 training cache holds 2: tests/test_precision.py)
    job = job_for(tmp_path, "t", "multiclass", False, student_layers=1, cache_dir=tmp_path, precision="fp32")
    job.train, job.dev = job.dev, job.train  # train 32 examples, dev 64: the smaller cache comes first
    job.epochs = 1
    checked = validate_job(job, bert.cfg)
    sizes = []
    for path in (job.train, job.dev):
        ex, _ = load_examples(path, "multiclass", job.columns)
        enc = encode(bert.tokenizer(), bert.cfg.type_vocab_size, ex.texts, None, checked.max_length)
        sizes.append(sum(len(x) for x in enc.input_ids) * bert.cfg.hidden_size * 4)
    train_bytes, dev_bytes = sizes
    cap = (2 * train_bytes + train_bytes + dev_bytes) // 2  # train + a snapshot fit; dev spills
    assert 2 * train_bytes <= cap < train_bytes + dev_bytes
    job.cache_gb = cap / 2**30
    report, _ = train_task(job, bert, tmp_path / "tasks")
    cache = report.cache
    assert cache.cap_bytes == cap and cache.spilled_to_disk is True
    assert train_bytes <= cache.peak_memory_bytes <= cache.cap_bytes
    assert not list(tmp_path.glob(".activations-*"))


def test_jsonl_label_lists(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "refund please", "labels": ["billing", "app"]},
            {"text": "late", "labels": ["delivery, late"]},
            {"text": "crash", "labels": "app"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    ex, labels = load_examples(path, "multilabel", Columns("text", ["labels"]))
    assert labels == ["app", "billing", "delivery, late"]
    assert ex.targets == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    bad = tmp_path / "multiclass.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b", "label": ["x", "y"]})
                   + "\n", encoding="utf-8")
    with pytest.raises(CentraError) as err:
        load_examples(bad, "multiclass", Columns("text", ["label"]))
    assert str(err.value).startswith(f"{bad}:2:") and "\n" not in str(err.value)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_non_utf8_data_names_file_and_line(tmp_path, bom):
    path = tmp_path / "train.tsv"
    raw = bom + b"text\tlabel\nhello\t0\n\xe9cole\t1\n"  # latin-1 "ecole" on line 3 (a BOM must not shift it)
    path.write_bytes(raw)
    with pytest.raises(CentraError) as err:
        load_examples(path, "multiclass", Columns("text", ["label"]))
    message = str(err.value)
    assert f"{path}:3:" in message and "UTF-8" in message and "\n" not in message
    assert f"byte 0xe9 at offset {raw.index(0xE9)}" in message
    assert err.value.__suppress_context__ and err.value.__cause__ is None  # raised from None: no chained traceback


def test_progress_is_plain_lines_off_a_terminal(bert, tmp_path, capsys):
    job = job_for(tmp_path, "t", "multiclass", False, layers=(1, 1), student_layers=1, extra_attach=0)
    job.epochs, job.progress = 2, True
    capsys.readouterr()
    train_task(job, bert, tmp_path / "tasks")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(err.encode()) < 5000, err
    for epoch in (1, 2):  # one teacher and one student: one line per epoch each
        assert sum(f"epoch {epoch}/2" in line for line in lines) == 2, err
    assert sum("train loss" in line for line in lines) == 4
