"""The joint student (train/joint.py): students l = 1..n of one teacher trained as one, an exit after each
shared layer. Each exit starts as the separate student would and computes what it would; a lone exit trains
exactly as a separate student; in the pipeline the mixed allocation picks among the exits, each published as
an ordinary student, within a stated tolerance of the separate students on dev; the cost is counted once."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_training import job_for

from centra.core.backbone import Backbone, attention_bias
from centra.core.task import load_task
from centra.train import joint as joint_module
from centra.train import pipeline
from centra.train.distill import joint_student, mixed_layers, student_from
from centra.train.finetune import dev_scores, predict_cache, selection_score, train_branch
from centra.train.joint import JointStudent, JointTrainer, train_joint
from centra.train.pipeline import open_run, train_task, validate_job
from centra.train.settings import REFERENCE_EPOCHS

# On these tiny keyword tasks a separate student reaches ~0.9-1.0 of dev; an exit of the joint student must
# sit within this of the separate student with as many layers (or above it)
TOLERANCE = 0.1


@pytest.fixture(scope="module")
def bert(tiny_models) -> Backbone:
    return Backbone.load(tiny_models["bert"])


@pytest.fixture
def opened(bert, tmp_path):
    """An open run of a tiny multiclass job with a random 3-layer teacher attached at layer 1."""
    run = open_run(validate_job(job_for(tmp_path, "t", "multiclass", False, layers=(3, 3)), bert.cfg), bert)
    run.advance_to(1)
    teacher = run.new_head(1, 3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a teacher that is not the backbone's layers as they are
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    yield run, teacher
    run.close()


def _states(bert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states at the attach layer (one row padded), their attention bias and mask: one seeded draw."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 9, bert.cfg.hidden_size, generator=gen)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    return hidden, attention_bias(mask), mask


def test_exits_start_as_the_separate_students_and_share_their_layers(bert, opened):
    run, teacher = opened
    joint = joint_student(teacher, 3, bert.cfg).eval()
    alone = [student_from(teacher, lay, bert.cfg).eval() for lay in (1, 2, 3)]
    with torch.no_grad():
        for got, student in zip(joint(*_states(bert)), alone, strict=True):
            assert torch.equal(got, student(*_states(bert)))
    # the layers are trained once: the parameters are the deepest student's plus two more exits' heads
    head = sum(p.numel() for n, p in alone[0].named_parameters() if not n.startswith("layers."))
    assert sum(p.numel() for p in joint.parameters()) == sum(p.numel() for p in alone[2].parameters()) + 2 * head
    assert joint.exits[0].layers[0] is joint.exits[2].layers[0]
    with pytest.raises(ValueError, match="1, 2, ... n task layers"):
        JointStudent([student_from(teacher, 2, bert.cfg)])


def test_a_lone_exit_trains_exactly_as_a_separate_student(opened):
    """The trainer's batches, seeds, loss, schedule and best epoch are the separate student's."""
    run, teacher = opened
    cfg = replace(run.checked.tc, epochs=2)
    soft = np.random.default_rng(0).normal(size=(len(run.train), 2)).astype(np.float32)
    args = (run.caches[0], run.train.targets, run.caches[1], run.dev.targets, cfg)
    student, log = train_branch(student_from(teacher, 1, run.backbone.cfg), *args, "alone", soft=soft)
    [(exit_, exit_log)] = train_joint(JointStudent([student_from(teacher, 1, run.backbone.cfg)]), *args, "joint",
                                      soft=soft)
    for name, value in student.state_dict().items():
        assert torch.equal(value, exit_.state_dict()[name]), name
    assert exit_log["losses"] == log["losses"] and exit_log["dev"] == log["dev"]
    assert exit_log["best_epoch"] == log["best_epoch"] and exit_log["joint"] == 1


def test_the_joint_loss_trains_every_exit(bert, opened):
    """Each exit's own head moves; each exit is returned as its own module."""
    run, teacher = opened
    cfg = replace(run.checked.tc, epochs=1)
    joint = joint_student(teacher, 3, bert.cfg)
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in joint.exits]
    trained = train_joint(joint, run.caches[0], run.train.targets, run.caches[1], run.dev.targets, cfg, "joint")
    assert [h.spec.task_layers for h, _ in trained] == [1, 2, 3]
    for (head, log), start in zip(trained, before, strict=True):
        assert not torch.equal(head.classifier.weight, start["classifier.weight"])
        assert log["joint"] == 3 and len(log["epochs"]) == 1
    assert trained[0][0].layers[0] is not trained[2][0].layers[0]
    assert not torch.equal(trained[2][0].layers[0].q.weight, teacher.layers[0].q.weight)
    with pytest.raises(ValueError, match="whole epochs"):
        JointTrainer(joint_student(teacher, 2, bert.cfg), run.caches[0], run.train.targets, run.caches[1],
                     run.dev.targets, cfg, "joint").run(0.5)


def test_each_exit_is_kept_at_its_own_best_epoch(bert, opened, monkeypatch):
    """Exit 1 is best at epoch 1, exit 2 at epoch 3: each comes back with its weights of that epoch (the
    shared layer too, as it stood then) and that epoch's dev scores."""
    run, teacher = opened
    cfg = replace(run.checked.tc, epochs=3)
    planted = {1: [0.9, 0.1, 0.2], 2: [0.1, 0.2, 0.9]}  # selection scores by exit, per epoch
    calls = []

    def score(kind, scores, metric):
        exit_ = len(calls) % 2 + 1
        calls.append(exit_)
        return planted[exit_][(len(calls) - 1) // 2]

    monkeypatch.setattr(joint_module, "selection_score", score)
    snapshots = []
    real_end = JointTrainer._end_epoch

    def end(self, epoch):
        snapshots.append([{k: v.clone() for k, v in e.state_dict().items()} for e in self.head.exits])
        real_end(self, epoch)

    monkeypatch.setattr(JointTrainer, "_end_epoch", end)
    trained = train_joint(joint_student(teacher, 2, bert.cfg), run.caches[0], run.train.targets, run.caches[1],
                          run.dev.targets, cfg, "joint")
    for i, ((head, log), best) in enumerate(zip(trained, (1, 3), strict=True)):
        assert log["best_epoch"] == best and log["dev"] == log["epochs"][best - 1]
        for name, value in head.state_dict().items():
            assert torch.equal(value, snapshots[best - 1][i][name]), (i, name)
    assert not torch.equal(trained[0][0].layers[0].q.weight, trained[1][0].layers[0].q.weight)


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_joint_students_in_the_pipeline(bert, tmp_path, kind):
    """Joint (the default) against separate on one task with a 3-layer teacher: the students l = 1..3
    reported and published, each exit within TOLERANCE of the separate student on dev, the mixed
    allocation's rule applied to the exits, and every published student scoring on dev what its log says."""
    reports = {}
    for students, threshold in (("separate", -100.0), ("joint", 1.0)):  # separate: every l trained
        job = job_for(tmp_path, students, kind, False, layers=(3, 3), students=students, threshold=threshold,
                      epochs=4)
        reports[students], _ = train_task(job, bert, tmp_path / "tasks")
    separate, joint = reports["separate"], reports["joint"]
    metric = joint.metric
    assert [s.task_layers for s in joint.students] == [1, 2, 3] == [s.task_layers for s in separate.students]
    assert [s.log.joint for s in joint.students] == [3, 3, 3] and {s.log.joint for s in separate.students} == {None}
    chosen = {s.task_layers: selection_score(kind, s.log.dev, metric) for s in joint.students}
    for a, b in zip(joint.students, separate.students, strict=True):
        assert chosen[a.task_layers] >= selection_score(kind, b.log.dev, metric) - TOLERANCE, (a.log.dev, b.log.dev)
    assert joint.chosen.task_layers == mixed_layers(chosen, 1.0)
    on_disk = json.loads((tmp_path / "tasks" / "joint" / "report.json").read_text())
    assert [s["joint"] for s in on_disk["students"]] == [3, 3, 3]
    # each candidate student, loaded from its folder, gives on dev the logits its log was scored on
    job = job_for(tmp_path, "joint", kind, False, layers=(3, 3))
    run = open_run(validate_job(job, bert.cfg), bert)
    try:
        run.advance_to(1)
        for s in joint.students:
            spec, head = load_task(tmp_path / "tasks" / "joint" / "candidates" / f"student-l{s.task_layers}", bert,
                                   name="joint")
            assert spec.attach_layer == 1 and len(head.layers) == s.task_layers
            got = dev_scores(kind, predict_cache(head, run.caches[1]), run.dev.targets, None, run.checked.tc.tuning)
            assert got == {k: v for k, v in s.log.dev.items() if k not in ("epoch", "train_loss")}
    finally:
        run.close()


def test_a_joint_student_is_counted_once_in_the_estimate(bert, tmp_path, monkeypatch):
    """The full fine-tuning estimate divides the seconds by the layer-epochs trained: a joint student's
    are its deepest exit's (2 layers), not the sum over its exits (3)."""
    seen = {}
    real = pipeline.full_finetune_estimate
    monkeypatch.setattr(pipeline, "full_finetune_estimate", lambda run, trained: seen.setdefault(
        "args", (run, trained)) and real(run, trained))
    train_task(job_for(tmp_path, "t", "multiclass", False, layers=(2, 2), epochs=1), bert, tmp_path / "tasks")
    run, trained = seen["args"]
    [teacher] = trained.teachers
    logs = [(teacher.trainable_layers, teacher.log), (2, trained.students[1].log)]
    per_layer_epoch = sum(log.seconds for _, log in logs) / sum(lay * log.epochs_trained for lay, log in logs)
    assert real(run, trained) == pytest.approx(REFERENCE_EPOCHS * bert.cfg.num_layers * per_layer_epoch)
