"""The full fine-tuning reference is done as the papers do it: embeddings and every layer trained, 3
epochs by default, on token ids (no cache), leaving the shared backbone untouched."""

from __future__ import annotations

import pytest
import torch
from test_training import job_for

from centra.core.backbone import Backbone
from centra.core.task import init_task
from centra.core.tokens import encode
from centra.errors import CentraError
from centra.train.finetune import TrainConfig
from centra.train.pipeline import train_task
from centra.train.reference import FullModel, TokenSource, train_reference


@pytest.fixture(scope="module")
def bert(tiny_models) -> Backbone:
    return Backbone.load(tiny_models["bert"])


def test_reference_trains_embeddings_and_every_layer(bert):
    tok = bert.tokenizer()
    texts = ["good service", "bad service", "great app", "awful app"] * 6
    targets = [i % 2 for i in range(len(texts))]
    source = TokenSource(encode(tok, bert.cfg.type_vocab_size, texts, None, 16), tok.pad_token_id)
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    head = init_task(bert, "r", "multiclass", ["neg", "pos"], 0, bert.cfg.num_layers)[1]
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, head_lr=1e-2, metric="accuracy", progress=False)
    model, log = train_reference(bert, head, source, targets, source, targets, cfg)
    assert len(log["epochs"]) == 3, "3 epochs by default, whatever the students train"
    assert log["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert log["trainable_parameters"] > sum(p.numel() for p in head.parameters())
    for name, param in model.embeddings.named_parameters():  # trained: moved from the backbone's
        assert not torch.equal(param, bert.embeddings.state_dict()[name]), name
    for i, layer in enumerate(model.head.layers):
        assert not torch.equal(layer.fc1.weight, bert.layers[i].fc1.weight), i
    for key, value in bert.state_dict().items():  # the shared trunk is untouched
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="layer 0"):
        FullModel(bert, init_task(bert, "r", "multiclass", ["neg", "pos"], 1, bert.cfg.num_layers - 1)[1])


def test_train_task_reports_the_reference(bert, tmp_path):
    job = job_for(tmp_path, "t", "multiclass", False, reference=True, reference_epochs=2, student_layers=1)
    report, _ = train_task(job, bert, tmp_path / "tasks")
    ref = report.reference
    assert ref.embeddings == "trained" and ref.epochs_setting == 2 and len(ref.log.epochs) == 2
    accuracy = [e["accuracy"] for e in ref.log.epochs]
    assert ref.layers == bert.cfg.num_layers and ref.log.dev["accuracy"] == max(accuracy)
    assert ref.log.best_epoch == 1 + accuracy.index(max(accuracy))
    assert report.search.per_reference > 0
    with pytest.raises(CentraError, match="reference_epochs must be >= 1, not 0"):
        train_task(job_for(tmp_path, "u", "multiclass", False, reference=True, reference_epochs=0), bert,
                   tmp_path / "tasks")
