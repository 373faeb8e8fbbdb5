"""centra's tokenizer model for Triton's python backend (copied as <repository>/centra_tokenizer*/1/model.py).

Inputs TEXT (and TEXT_PAIR for a pair group): string tensors [batch, 1]. Outputs input_ids, attention_mask,
token_type_ids: int64 [batch, length], the ids `centra predict` computes (centra.core.tokens.encode:
the same tokenizer files, truncation at the group's max_length, segment ids zeroed for models without
segment embeddings), padded with the pad id to the longest row of what one `execute` call tokenizes
together. That is every request of a dynamic batch, so their outputs share one shape and Triton's
dynamic batcher can run them as one batch in the graph model.

This file runs inside Triton, without centra: it imports numpy and transformers only, and
`triton_python_backend_utils` only inside the model (it exists only inside Triton). `tokenize` is a
plain function, so tests (and `centra export-triton`'s own check) call it without Triton.
The group's settings come from the model's config.pbtxt `parameters`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENIZER_DIR = "tokenizer"
OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")
SETTINGS = {"input": str, "max_length": int, "type_vocab_size": int, "pad_id": int}


def load_tokenizer(folder):
    """The tokenizer centra loads (centra.core.backbone.load_tokenizer), from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, type_vocab_size: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids (int64, [len(texts), longest row]) of texts or text pairs."""
    if not texts:
        empty = np.zeros((0, 0), dtype=np.int64)
        return {name: empty.copy() for name in OUTPUTS}
    enc = tokenizer(list(texts), None if pairs is None else list(pairs), truncation=True, max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    rows, types = enc["input_ids"], enc["token_type_ids"]
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, kinds) in enumerate(zip(rows, types)):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        if type_vocab_size > 1:  # RoBERTa-style models have no segment embeddings: all zeros
            segments[i, :len(kinds)] = kinds
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": segments}


def as_strings(array, name: str) -> list[str]:
    """A [batch, 1] (or [batch]) string tensor as Python strings; UTF-8 required."""
    out = []
    for i, item in enumerate(np.asarray(array, dtype=object).reshape(-1)):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{name} row {i} is not UTF-8 text") from None
        out.append(str(item))
    return out


def settings(model_config: dict) -> dict:
    """The group's settings from the model config's parameters (Triton passes the config as JSON)."""
    params = model_config.get("parameters", {})
    found = {}
    for key, kind in SETTINGS.items():
        if key not in params:
            raise ValueError(f"config.pbtxt of {model_config.get('name')!r}: parameter {key!r} is missing")
        found[key] = kind(params[key]["string_value"])
    return found


def request_strings(pb_utils, request, name: str) -> list[str]:
    """One request's strings of tensor `name`: present, UTF-8, not empty (as `centra predict` requires)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name} is missing")
    items = as_strings(tensor.as_numpy(), name)
    for i, item in enumerate(items):
        if not item.strip():
            raise ValueError(f"{name} row {i} is empty")
    return items


class TritonPythonModel:
    """The python backend's entry point: one tokenizer per model instance."""

    def initialize(self, args):
        self.settings = settings(json.loads(args["model_config"]))
        folder = Path(args.get("model_repository", "")) / str(args.get("model_version", "1")) / TOKENIZER_DIR
        if not folder.is_dir():
            folder = Path(__file__).resolve().parent / TOKENIZER_DIR
        self.tokenizer = load_tokenizer(folder)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        s = self.settings
        texts, pairs, spans, errors = [], [], [], {}
        for r, request in enumerate(requests):
            try:  # every check is per request: a bad request fails alone
                mine = request_strings(pb_utils, request, "TEXT")
                other = None
                if s["input"] == "pair":
                    other = request_strings(pb_utils, request, "TEXT_PAIR")
                    if len(other) != len(mine):
                        raise ValueError(f"{len(mine)} texts but {len(other)} pair texts")
            except Exception as exc:
                errors[r] = str(exc) or type(exc).__name__
                continue
            spans.append((r, len(texts), len(texts) + len(mine)))
            texts += mine
            pairs += other or []
        out = tokenize(self.tokenizer, texts, pairs if s["input"] == "pair" else None, s["max_length"],
                       s["type_vocab_size"], s["pad_id"])
        responses = [None] * len(requests)
        for r, start, end in spans:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[name][start:end])) for name in OUTPUTS]
            responses[r] = pb_utils.InferenceResponse(output_tensors=tensors)
        for r, message in errors.items():
            responses[r] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
        return responses
