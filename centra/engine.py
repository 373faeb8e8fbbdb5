"""Engine: texts in, per-task answers out, over a merged model (PyTorch reference engine).

Tasks that read the same tokens (same input kind and max_length) share one trunk pass. Texts are
tokenised once, sorted by length and batched, so a batch carries little padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from centra.errors import CentraError
from centra.merge import MergedModel, load_merged
from centra.task import TaskSpec

MAX_TEXT_CHARS = 100_000
DEFAULT_BATCH_SIZE = 32


@dataclass
class Encoded:
    """Token ids of a list of texts, unpadded, in input order."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]

    def batch(self, rows: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(self.input_ids[r]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(self.input_ids[r])
            ids[i, :n] = torch.tensor(self.input_ids[r])
            types[i, :n] = torch.tensor(self.token_type_ids[r])
            mask[i, :n] = 1
        return ids, mask, types


def encode(tokenizer, type_vocab_size: int, texts: list[str], pairs: list[str] | None, max_length: int,
           ) -> Encoded:
    """Token ids (unpadded, truncated to max_length) of texts or text pairs."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_token_type_ids=True,
                    return_attention_mask=False)
    types = enc["token_type_ids"]
    if type_vocab_size == 1:  # RoBERTa-style models have no segment embeddings
        types = [[0] * len(t) for t in types]
    return Encoded(enc["input_ids"], types)


def check_texts(texts: list[str], pairs: list[str] | None) -> None:
    if not texts:
        raise CentraError("no texts given")
    if pairs is not None and len(pairs) != len(texts):
        raise CentraError(f"{len(texts)} texts but {len(pairs)} pair texts: give one pair text per text")
    for what, items in (("text", texts), ("pair text", pairs or [])):
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise CentraError(f"{what} {i} is not a string")
            if not text.strip():
                raise CentraError(f"{what} {i} is empty")
            if len(text) > MAX_TEXT_CHARS:
                raise CentraError(f"{what} {i} has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")


class Engine:
    """Tokenise, run the merged model in length-sorted batches, turn logits into answers."""

    def __init__(self, model: MergedModel, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE,
                 manifest: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.manifest = manifest or {}

    @classmethod
    def load(cls, out: Path, batch_size: int = DEFAULT_BATCH_SIZE) -> Engine:
        from centra.backbone import load_tokenizer

        manifest, model = load_merged(Path(out))
        return cls(model, load_tokenizer(Path(out) / "tokenizer"), batch_size, manifest)

    @property
    def specs(self) -> dict[str, TaskSpec]:
        return self.model.specs

    def select(self, names: list[str] | None, has_pair: bool) -> list[TaskSpec]:
        """Named tasks (checked), or all tasks that can answer this input when none is named."""
        if not names:
            chosen = [s for s in self.specs.values() if has_pair or s.input == "single"]
            if not chosen:
                raise CentraError("every task takes text pairs: give the second texts (--pair)")
            return chosen
        out = []
        for name in dict.fromkeys(names):
            if name not in self.specs:
                raise CentraError(f"unknown task {name!r} (known: {', '.join(sorted(self.specs))})")
            if self.specs[name].input == "pair" and not has_pair:
                raise CentraError(f"task {name!r} takes text pairs: give the second texts (--pair)")
            out.append(self.specs[name])
        return out

    def encode(self, texts: list[str], pairs: list[str] | None, max_length: int) -> Encoded:
        return encode(self.tokenizer, self.model.cfg.type_vocab_size, texts, pairs, max_length)

    @torch.inference_mode()
    def logits(self, texts: list[str], pairs: list[str] | None = None,
               tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Raw outputs per task, each (len(texts), num_outputs), rows in input order."""
        check_texts(texts, pairs)
        groups: dict[tuple[str, int], list[str]] = {}
        for spec in self.select(tasks, pairs is not None):
            groups.setdefault(spec.encoding_key, []).append(spec.name)
        pad_id = self.tokenizer.pad_token_id or 0
        out: dict[str, torch.Tensor] = {}
        for (input_kind, max_length), names in groups.items():
            enc = self.encode(texts, pairs if input_kind == "pair" else None, max_length)
            order = sorted(range(len(texts)), key=lambda r: len(enc.input_ids[r]))
            parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                for name, value in zip(names, self.model(*enc.batch(rows, pad_id), names)):
                    parts[name].append(value)
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            for name in names:
                out[name] = torch.cat(parts[name])[inverse]
        return out

    def predict(self, texts: list[str], pairs: list[str] | None = None,
                tasks: list[str] | None = None) -> list[dict]:
        """One answer per text and task: {"text", "task", "label"|"labels"|"value", "scores"}."""
        results = self.logits(texts, pairs, tasks)
        answers = []
        for i, text in enumerate(texts):
            for name, values in results.items():
                answer = {"text": text, "task": name, **interpret(self.specs[name], values[i])}
                if pairs is not None and self.specs[name].input == "pair":
                    answer = {"text": text, "pair": pairs[i], **{k: v for k, v in answer.items() if k != "text"}}
                answers.append(answer)
        return answers


def interpret(spec: TaskSpec, logits: torch.Tensor) -> dict:
    """Logits of one example -> label / labels / value and per-label scores."""
    if spec.kind == "regression":
        value = float(logits[0])
        return {"value": round(value, 6), "scores": {spec.labels[0]: round(value, 6)}}
    if spec.kind == "multiclass":
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": spec.labels[best], "scores": {lab: round(p, 6) for lab, p in zip(spec.labels, probs)}}
    probs = torch.sigmoid(logits.float()).tolist()
    thresholds = spec.thresholds or [0.5] * len(spec.labels)
    return {"labels": [lab for lab, p, t in zip(spec.labels, probs, thresholds) if p >= t],
            "scores": {lab: round(p, 6) for lab, p in zip(spec.labels, probs)}}
