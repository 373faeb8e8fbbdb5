"""Engine: texts in, per-task answers out, over a merged model (PyTorch reference engine).

Tasks that read the same tokens (same input kind and max_length) share one trunk pass. Texts are
tokenised once, sorted by length and batched, so a batch carries little padding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from centra.core.answers import interpret
from centra.core.graph import MergedModel
from centra.core.merge import load_merged, model_folder
from centra.core.task import TaskSpec
from centra.core.tokens import Encoded, check_texts, encode
from centra.errors import CentraError

DEFAULT_BATCH_SIZE = 32


class Engine:
    """Tokenise, run the merged model in length-sorted batches, turn logits into answers."""

    def __init__(self, model: MergedModel, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE,
                 manifest: dict | None = None):
        if batch_size < 1:
            raise CentraError(f"batch size must be >= 1, not {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.manifest = manifest or {}

    @classmethod
    def load(cls, out: Path, batch_size: int = DEFAULT_BATCH_SIZE) -> Engine:
        from centra.core.backbone import load_tokenizer

        folder = model_folder(Path(out))  # the pointer is read once: model and tokenizer of one version
        manifest, model = load_merged(folder)
        return cls(model, load_tokenizer(folder / "tokenizer"), batch_size, manifest)

    @property
    def version(self) -> str:
        return self.manifest.get("version", "")

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
