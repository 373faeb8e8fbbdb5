"""verify: the merged graph against each task's standalone model, on sample texts.

The standalone model is rebuilt from the original backbone folder when it is still there (same
fingerprint), so the check also covers the trunk written into the merged folder; otherwise it uses
the merged folder's own trunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from centra.core.backbone import Backbone, EncoderLayer
from centra.core.graph import StandaloneModel
from centra.core.texts import SAMPLE_PAIRS, SAMPLE_TEXTS
from centra.errors import CentraError
from centra.runtime.engine import Engine


@dataclass
class TaskCheck:
    name: str
    max_abs_diff: float
    reference: str

    def ok(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


def reference_layers(engine: Engine) -> tuple[torch.nn.Module, list, str]:
    """Embeddings and layers to rebuild standalone models from, and where they came from."""
    info = engine.manifest.backbone if engine.manifest is not None else None
    path = info.path if info is not None else None
    if path and Path(path).is_dir():
        try:
            bb = Backbone.load(path)
        except CentraError:
            bb = None
        if bb is not None and bb.fingerprint == info.fingerprint:
            return bb.embeddings, list(bb.layers), f"backbone folder {path}"
    return engine.model.embeddings, list(engine.model.trunk), "the merged folder's trunk"


@torch.inference_mode()
def verify(engine: Engine, texts: list[str] | None = None, pairs: list[str] | None = None) -> list[TaskCheck]:
    texts = texts or SAMPLE_TEXTS
    pairs = pairs or SAMPLE_PAIRS[: len(texts)]
    embeddings, layers, source = reference_layers(engine)
    if any(s.attach_layer > len(layers) for s in engine.branches.values()):
        raise CentraError("the reference trunk is shallower than a task's attach layer")
    merged = engine.logits(texts, pairs, list(engine.branches))  # candidate heads too (centra.core.shadow)
    pad_id = engine.tokenizer.pad_token_id or 0
    checks = []
    for name, spec in engine.branches.items():
        standalone = StandaloneModel(embeddings, layers, engine.model.heads[name]).eval()
        enc = engine.encode(texts, pairs if spec.input == "pair" else None, spec.max_length)
        # Each text alone, unpadded: checks the merged graph's padded, length-sorted batches too.
        expected = torch.cat([standalone(*enc.batch([i], pad_id)) for i in range(len(texts))])
        diff = (merged[name] - expected).abs().max().item()
        checks.append(TaskCheck(name, diff, source))
    return checks


@torch.inference_mode()
def count_layers_run(engine: Engine, texts: list[str], pairs: list[str] | None = None,
                     tasks: list[str] | None = None) -> int:
    """Transformer layers the engine runs for one request, counted by forward hooks on every layer
    (all texts in one batch, so each layer call is one layer of the request)."""
    calls = [0]

    def hook(*_) -> None:
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in engine.model.modules() if isinstance(m, EncoderLayer)]
    saved = engine.batch_size
    try:
        engine.batch_size = max(saved, len(texts))
        engine.logits(texts, pairs, tasks)
    finally:
        engine.batch_size = saved
        for handle in handles:
            handle.remove()
    return calls[0]
