"""Backbone loading: centra's own layers reproduce transformers' models; bad folders are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PAIRS, TEXTS

from centra.core.backbone import Backbone, attention_bias, map_hf_key
from centra.errors import CentraError

TOLERANCE = 1e-5


def run_trunk(bb: Backbone, enc, depth: int | None = None) -> torch.Tensor:
    bias = attention_bias(enc["attention_mask"])
    hidden = bb.embeddings(enc["input_ids"], enc["token_type_ids"])
    for layer in bb.layers[:depth]:
        hidden = layer(hidden, bias)
    return hidden


@pytest.mark.parametrize("with_pairs", [False, True])
def test_trunk_matches_transformers(backbone_path, with_pairs):
    """Every layer's hidden state equals transformers' own model (padded batch, mixed lengths)."""
    from transformers import AutoModel

    bb = Backbone.load(backbone_path)
    tok = bb.tokenizer()
    enc = tok(TEXTS, PAIRS if with_pairs else None, padding=True, return_tensors="pt", return_token_type_ids=True)
    assert enc["attention_mask"].sum(1).min() < enc["attention_mask"].shape[1], "batch must contain padding"
    ref = AutoModel.from_pretrained(str(backbone_path)).eval()
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        expected = ref(**enc, output_hidden_states=True).hidden_states
        for depth in range(bb.cfg.num_layers + 1):
            got = run_trunk(bb, enc, depth)
            assert (got - expected[depth])[keep].abs().max().item() < TOLERANCE, f"layer {depth}"


def test_fingerprint_identifies_weights(tiny_models):
    a, a2 = Backbone.load(tiny_models["bert"]), Backbone.load(tiny_models["bert"])
    other = Backbone.load(tiny_models["bert-other"])
    assert a.fingerprint == a2.fingerprint and a.fingerprint.startswith("sha256:")
    assert a.fingerprint != other.fingerprint
    assert a.backbone_id == "tiny-bert"


def test_pooler_loaded_when_present(tiny_models):
    assert Backbone.load(tiny_models["bert"]).pooler is not None
    assert Backbone.load(tiny_models["xlmr"]).pooler is None


def test_key_mapping():
    assert map_hf_key("bert.encoder.layer.3.attention.self.query.weight") == "layers.3.q.weight"
    assert map_hf_key("roberta.embeddings.LayerNorm.gamma") == "embeddings.ln.weight"
    assert map_hf_key("encoder.layer.0.output.LayerNorm.bias") == "layers.0.ln2.bias"
    assert map_hf_key("encoder.layer.0.intermediate.dense.weight") == "layers.0.fc1.weight"
    assert map_hf_key("cls.predictions.bias") is None
    assert map_hf_key("embeddings.position_ids") is None


def test_bad_backbone_folders(tmp_path, bert_path):
    with pytest.raises(CentraError, match="no such folder"):
        Backbone.load(tmp_path / "missing")
    folder = tmp_path / "bb"
    shutil.copytree(bert_path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CentraError, match="model_type 'gpt2' is not supported"):
        Backbone.load(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    with pytest.raises(CentraError, match="shape"):
        Backbone.load(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CentraError, match="corrupt or truncated"):
        Backbone.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CentraError, match="no \\*.safetensors"):
        Backbone.load(folder)
