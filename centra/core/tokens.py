"""Tokens: texts (or text pairs) -> unpadded token ids, checked input, and padded batches.

Tasks that read the same tokens (same input kind and max_length) form one token group
(core.overhead.TokenGroup): the engine runs the trunk once per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from centra.errors import CentraError

MAX_TEXT_CHARS = 100_000


@dataclass
class Encoded:
    """Token ids of a list of texts, unpadded, in input order; truncated[i]: text i was cut."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    truncated: list[bool] | None = None

    def batch(self, rows: list[int], pad_id: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows padded to their longest (or to `width` when that is longer)."""
        width = max(width, *(len(self.input_ids[r]) for r in rows))
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
    # Fast tokenizers keep what truncation cut off in each encoding's `overflowing`.
    encodings = getattr(enc, "encodings", None)
    truncated = [bool(e.overflowing) for e in encodings] if encodings else None
    return Encoded(enc["input_ids"], types, truncated)


def check_texts(texts: list[str], pairs: list[str] | None) -> None:
    """One-line refusals for input no model should see: none, empty, non-strings, huge texts."""
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
