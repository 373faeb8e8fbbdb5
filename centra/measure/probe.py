"""The frozen trunk alone: a logistic regression on mean-pooled embeddings (no layer trained), trained
on every UMSAB language, scored per language, with the backbone's text prefix and without it. The
prefix a backbone records by default is the one that scores better on the validation sets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from centra.measure.umsab import LABELS, SPLITS, read_jsonl
from centra.progress import progress_line


def probe(backbone_spec: str, files: dict[str, dict[str, Path]], prefix: str = "query: ") -> dict:
    """Macro-F1 x100 per language on val and test, for the tokenizer with `prefix` and without any."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from centra.core.backbone import Backbone, load_tokenizer
    from centra.core.catalog import with_prefix, without_prefix
    from centra.core.wheel_check import embed
    from centra.train.metrics import by_segment

    backbone = Backbone.load(backbone_spec)
    pad = load_tokenizer(backbone.path).pad_token
    spec = without_prefix(json.loads((backbone.path / "tokenizer.json").read_text(encoding="utf-8")))
    rows = {s: read_jsonl(files["all"][s]) for s in SPLITS}
    out = {}
    for name, normalizer in ((repr(prefix), with_prefix(spec.get("normalizer"), prefix)),
                             ("no prefix", spec.get("normalizer"))):
        pipeline = Tokenizer.from_str(json.dumps({**spec, "normalizer": normalizer}))
        tok = PreTrainedTokenizerFast(tokenizer_object=pipeline, pad_token=pad)
        clock = time.perf_counter()
        feats = {s: embed(backbone, tok, [r["text"] for r in rows[s]], batch=64, max_length=128) for s in SPLITS}
        gold = {s: np.array([LABELS.index(r["label"]) for r in rows[s]]) for s in SPLITS}
        logits = logistic_regression(feats["train"], gold["train"], [feats["val"], feats["test"]])
        entry: dict = {}
        for split, z in zip(("val", "test"), logits):
            parts = by_segment("multiclass", z, list(gold[split]), [r["language"] for r in rows[split]])
            entry[split] = {lang: round(100 * m["macro_f1"], 2) for lang, m in parts.items()}
            entry[split]["average"] = round(float(np.mean(list(entry[split].values()))), 2)
        entry["seconds"] = round(time.perf_counter() - clock, 1)
        out[name] = entry
        progress_line(f"probe {name}: val average {entry['val']['average']}, test average {entry['test']['average']}")
    return out


def logistic_regression(x: np.ndarray, y: np.ndarray, evaluate: list[np.ndarray], weight_decay: float = 1e-4,
                        steps: int = 300) -> list[np.ndarray]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS); logits of `evaluate`."""
    import torch

    mean, std = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.tensor((x - mean) / std, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [linear(torch.tensor((z - mean) / std, dtype=torch.float32)).numpy() for z in evaluate]
