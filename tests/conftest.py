"""Fixtures: tiny random BERT and XLM-R folders built from a config, with tokenizers trained here.

Nothing is downloaded: the models are random (seeded), the tokenizers learn a small vocabulary from
CORPUS. Each folder looks like a Hugging Face model folder (config.json, model.safetensors,
tokenizer files), so centra loads it exactly as it loads a real backbone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CORPUS = [
    "the delivery was late and the box was damaged",
    "great product, works exactly as described",
    "how do i change the billing address on my account",
    "i love it, best purchase this year",
    "the app crashes every time i open the settings page",
    "can you set an alarm for seven tomorrow morning",
    "refund please, the package arrived broken",
    "support answered quickly and solved my problem",
    "where is my order? it has been two weeks",
    "the battery lasts for days, very happy",
] * 3
TEXTS = [
    "the delivery was late",
    "great product",
    "how do i change the billing address on my account, the app crashes every time",
    "i love it",
    "support answered quickly and solved my problem with the broken package",
    "where is my order",
]
PAIRS = [
    "my order came late",
    "the product is great",
    "billing address change",
    "i hate it",
    "the support team fixed it",
    "order status",
]


def _train_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
        cls, sep = "[CLS]", "[SEP]"
        pair = f"{cls} $A {sep} $B:1 {sep}:1"
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token=cls, sep_token=sep, mask_token="[MASK]")
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # pad id 1, as in XLM-R
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
        cls, sep = "<s>", "</s>"
        pair = f"{cls} $A {sep} {sep} $B {sep}"
        names = dict(pad_token="<pad>", unk_token="<unk>", cls_token=cls, sep_token=sep, mask_token="<mask>",
                     bos_token=cls, eos_token=sep)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair,
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **names)


def build_tiny_model(folder: Path, kind: str, seed: int = 0, layers: int = 4) -> Path:
    """Write a tiny random `kind` ('bert' | 'xlmr') model folder and return it."""
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    tokenizer = _train_tokenizer(kind)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, hidden_act="gelu")
    if kind == "bert":
        model = BertModel(BertConfig(max_position_embeddings=64, type_vocab_size=2, pad_token_id=0, **common))
    else:
        config = XLMRobertaConfig(max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, **common)
        model = XLMRobertaModel(config, add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {
        "bert": build_tiny_model(root / "tiny-bert", "bert", seed=0),
        "xlmr": build_tiny_model(root / "tiny-xlmr", "xlmr", seed=1),
        "bert-other": build_tiny_model(root / "tiny-bert-other", "bert", seed=2),
    }


@pytest.fixture(params=["bert", "xlmr"])
def backbone_path(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture
def bert_path(tiny_models) -> Path:
    return tiny_models["bert"]


@pytest.fixture(scope="module")
def model_out(tiny_models, tmp_path_factory) -> Path:
    """The standard tasks (helpers.STANDARD_TASKS) on tiny BERT, merged (torch): one per test module that
    asks (a module may define its own)."""
    from helpers import make_tasks

    from centra.core.backbone import Backbone
    from centra.core.merge import plan_merge, write_merged

    root = tmp_path_factory.mktemp("merged")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks")
    write_merged(plan_merge([root / "tasks"]), root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def engine(model_out):
    """model_out's Engine (batch size 32, as `centra predict`)."""
    from centra.runtime.engine import Engine

    return Engine.load(model_out)


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), to assert byte-identity."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bert_out(tiny_models, tmp_path_factory) -> Path:
    """The standard tasks (two token groups: single and pair) merged with fp32 and int8 ONNX graphs (the
    Triton tests)."""
    from helpers import make_tasks

    from centra.cli import main
    from centra.core.backbone import Backbone

    root = tmp_path_factory.mktemp("triton-bert")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks")
    assert main(["merge", "--tasks-dir", str(root / "tasks"), "--out", str(root / "out"), "--engine", "onnx",
                 "--precision", "int8", "--keep-fp32"]) == 0
    return root / "out"


@pytest.fixture
def serve():
    """Start test_serve.Running servers over an engine (closed after the test)."""
    from test_serve import Running

    started: list = []
    yield lambda engine, **options: started.append(Running(engine, **options)) or started[-1]
    for running in started:
        running.close()


@pytest.fixture(scope="module")
def running(engine):
    """A test_serve.Running server over the module's engine."""
    from test_serve import Running

    server = Running(engine)
    yield server
    server.close()
