"""`centra languages`: sentiment in eight languages on one multilingual trunk (UMSAB, the XLM-T
benchmark), in the shape of the published table: macro-F1 per language on the test sets, and the average.

    centra languages [--data ../shared/data] [--out runs/languages] [--backbone multilingual-e5-small]
                     [--runs a,b,c] [--reference a,b] [--epochs 2] [--layers 4:4] [--table] [--probe]

- (a) one task trained on all eight languages (cross-lingual);
- (b) the same trained on English only, answering the other seven zero-shot;
- (c) one task per language, eight branches on one trunk (language-specific).
Each run is merged (ONNX int8 graphs and the torch files) and scored through the served engines, torch and
int8, beside the full fine-tuning of the same backbone (the reference, every layer and the embeddings
trained) and the published UMSAB averages. `--probe` measures the frozen trunk alone (a logistic
regression on mean-pooled embeddings, no layer trained) with and without the backbone's text prefix.
Writes OUT/data (JSONL with a language column, read from the data folder), OUT/<run>/{tasks,merged},
OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from centra.errors import CentraError
from centra.io import read_json

FOLDER = "xlm-t-sentiment"
LANGUAGES = {"arabic": "ar", "english": "en", "french": "fr", "german": "de", "hindi": "hi", "italian": "it",
             "portuguese": "pt", "spanish": "es"}
LABELS = ["negative", "neutral", "positive"]
SPLITS = ("train", "val", "test")
# UMSAB test macro-F1, average of the eight languages (Barbieri et al., 2022, XLM-T, Table 4)
PUBLISHED = {"XLM-R Mono (base, one model per language)": 64.8, "XLM-R Multi (base, all languages)": 66.8,
             "XLM-Tw Multi (base, Twitter-pretrained, all languages)": 69.4}
RUNS = {"a": "one task, all 8 languages", "b": "one task, English only (zero-shot to 7)",
        "c": "one task per language (8 branches)"}


def prepare(data: Path, out: Path) -> dict[str, dict[str, Path]]:
    """UMSAB as JSONL files {text, label, language}: every language together ("all") and each alone, per
    split. Read from the data folder as distributed (escape sequences in tweets kept)."""
    root = data / FOLDER
    if not root.is_dir():
        raise CentraError(f"{root}: not found (the UMSAB data of XLM-T; give --data)")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    rows_all: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for language, code in LANGUAGES.items():
        for split in SPLITS:
            texts = _lines(root / language / f"{split}_text.txt")
            labels = _lines(root / language / f"{split}_labels.txt")
            if len(texts) != len(labels):
                raise CentraError(f"{root / language}: {split} has {len(texts)} texts and {len(labels)} labels")
            try:
                rows = [{"text": t, "label": LABELS[int(y)], "language": code} for t, y in zip(texts, labels)]
            except (ValueError, IndexError):
                raise CentraError(f"{root / language / f'{split}_labels.txt'}: labels must be 0, 1 or 2") from None
            files.setdefault(code, {})[split] = _write_jsonl(out / f"{code}-{split}.jsonl", rows)
            rows_all[split] += rows
    files["all"] = {s: _write_jsonl(out / f"all-{s}.jsonl", rows) for s, rows in rows_all.items()}
    return files


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CentraError(f"{path}: file not found")
    return path.read_text(encoding="utf-8").splitlines()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def probe(backbone_spec: str, files: dict[str, dict[str, Path]], progress: bool) -> dict:
    """The frozen trunk alone: a multinomial logistic regression on mean-pooled embeddings (no layer
    trained), trained on all eight languages' train sets, scored per language on val and test, with the
    backbone's text prefix and without it."""
    import json as _json

    import numpy as np
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from centra.core.backbone import Backbone, load_tokenizer
    from centra.core.catalog import without_prefix
    from centra.core.wheel_check import embed
    from centra.train.metrics import by_segment

    backbone = Backbone.load(backbone_spec)
    with_tok = load_tokenizer(backbone.path)
    spec = _json.loads((backbone.path / "tokenizer.json").read_text(encoding="utf-8"))
    prefix = next((n.get("prepend", "") for n in _normalizers(spec) if n.get("type") == "Prepend"), "")
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_json.dumps(without_prefix(spec))),
                                   pad_token=with_tok.pad_token)
    rows = {s: read_jsonl(files["all"][s]) for s in SPLITS}
    out = {}
    for name, tok in ((repr(prefix), with_tok), ("no prefix", bare)):
        clock = time.perf_counter()
        feats = {s: embed(backbone, tok, [r["text"] for r in rows[s]], batch=64, max_length=128)
                 for s in SPLITS}
        gold = {s: np.array([LABELS.index(r["label"]) for r in rows[s]]) for s in SPLITS}
        logits = _logistic_regression(feats["train"], gold["train"], [feats["val"], feats["test"]])
        entry = {}
        for split, z in zip(("val", "test"), logits):
            parts = by_segment("multiclass", z, list(gold[split]), [r["language"] for r in rows[split]])
            entry[split] = {lang: round(100 * m["macro_f1"], 2) for lang, m in parts.items()}
            entry[split]["average"] = round(float(np.mean(list(entry[split].values()))), 2)
        entry["seconds"] = round(time.perf_counter() - clock, 1)
        out[name] = entry
        print(f"probe {name}: val average {entry['val']['average']}, test average {entry['test']['average']}",
              file=sys.stderr, flush=True)
    return out


def _normalizers(spec: dict) -> list[dict]:
    norm = spec.get("normalizer") or {}
    return norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]


def _logistic_regression(x, y, evaluate: list, weight_decay: float = 1e-4, steps: int = 300) -> list:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    import torch

    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y)
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [linear(torch.tensor((z - mean) / std, dtype=torch.float32)).numpy() for z in evaluate]


def cmd_languages(args: argparse.Namespace) -> int:
    from centra.train.recipe import data_root

    out = Path(args.out)
    runs = _listed(args.runs, "--runs")
    reference = _listed(args.reference, "--reference") if args.reference else []
    if args.table:
        path = out / "results.json"
        if not path.is_file():
            raise CentraError(f"{path}: file not found (run `centra languages` without --table first)")
        print(markdown(read_json(path)))
        return 0
    data = data_root(Path(args.data) if args.data else None)
    files = prepare(data, out / "data")
    results = read_json(out / "results.json") if (out / "results.json").is_file() else {}
    if args.probe:
        results["probe"] = probe(args.backbone, files, args.progress)
        _save(out, results)
    for run in runs:
        results[run] = run_one(run, run in reference, files, out, args)
        _save(out, results)
    if args.deploy:
        results["deploy"] = deploy(files, out, data, args.progress)
        _save(out, results)
    print(markdown(results))
    return 0


def _listed(value: str, flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    unknown = sorted(set(items) - set(RUNS))
    if unknown:
        raise CentraError(f"{flag}: unknown run {unknown[0]!r} (known: {', '.join(RUNS)})")
    return items


def _save(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(out / "results.json")


def add_parser(sub, common) -> None:
    p = sub.add_parser("languages", parents=[common], help="sentiment in 8 languages on the multilingual trunk "
                       "(UMSAB): cross-lingual, English-only and per-language runs, macro-F1 per language")
    p.add_argument("--data", help="data folder (default: $CENTRA_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/languages")
    p.add_argument("--backbone", default="multilingual-e5-small", help="[multilingual-e5-small]")
    p.add_argument("--runs", default="a,b,c", help="which runs: a (all languages), b (English only), "
                   "c (one task per language) [a,b,c]")
    p.add_argument("--reference", default="a,b", help="runs that also fine-tune the whole model [a,b]")
    p.add_argument("--reference-epochs", type=int, default=2, help="epochs of the full fine-tuning [2]")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every branch [2]")
    p.add_argument("--layers", default="4:4", help="teacher search: trainable top layers MIN:MAX [4:4]")
    p.add_argument("--extra-attach", type=int, default=0, help="shallower students per task [0]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="also measure the frozen trunk (logistic regression on "
                   "mean-pooled embeddings) with and without the text prefix")
    p.add_argument("--deploy", action="store_true", help="also train recipes/multilingual (sentiment, PLUE, "
                   "IndoNLU) on one trunk, merge them and check merged, served and in-process answers alike")
    p.add_argument("--progress", action="store_true", help="show progress")
    p.add_argument("--table", action="store_true", help="only print the tables of OUT/results.json")
    p.set_defaults(func=cmd_languages)


def run_one(run: str, reference: bool, files: dict[str, dict[str, Path]], out: Path, args: argparse.Namespace
            ) -> dict:
    """Train a run's tasks, merge them (ONNX int8 + torch), score them per language on the test sets."""
    import numpy as np

    from centra.core.backbone import Backbone
    from centra.export.engines import merge
    from centra.runtime.engine import Engine
    from centra.train.data import Columns
    from centra.train.evaluate import evaluate
    from centra.train.job import TaskJob
    from centra.train.metrics import by_segment

    backbone = Backbone.load(args.backbone)
    columns = Columns("text", ["label"])
    sets = {"a": [("sentiment", "all")], "b": [("sentiment", "en")],
            "c": [(f"sentiment_{code}", code) for code in LANGUAGES.values()]}[run]
    tasks_dir, test = out / run / "tasks", read_jsonl(files["all"]["test"])
    entry: dict = {"what": RUNS[run], "tasks": {}}
    reference_rows: dict[str, float] = {}
    for name, source in sets:
        job = TaskJob(name=name, kind="multiclass", train=files[source]["train"], dev=files[source]["val"],
                      columns=columns, label_names=LABELS, metric="macro_f1", epochs=args.epochs,
                      layers=args.layers, extra_attach=args.extra_attach, seed=args.seed, reference=reference,
                      reference_epochs=args.reference_epochs, progress=args.progress)
        scored = test if run != "c" else [r for r in test if r["language"] == source]
        clock = time.perf_counter()
        report, ref_logits, times = train_scoring_reference(job, backbone, tasks_dir, [r["text"] for r in scored])
        wall = time.perf_counter() - clock
        entry["tasks"][name] = {"chosen": report.to_dict()["chosen"], "seconds": round(wall, 1),
                                "times": {k: round(v, 1) for k, v in times.items()}}
        print(f"languages {run}: {name} trained in {wall:.0f} s", file=sys.stderr, flush=True)
        if ref_logits is not None:
            gold = [LABELS.index(r["label"]) for r in scored]
            parts = by_segment("multiclass", ref_logits, gold, [r["language"] for r in scored])
            reference_rows |= {lang: round(100 * m["macro_f1"], 2) for lang, m in parts.items()}
    manifest = merge([tasks_dir], out / run / "merged", engine="onnx", precision="int8", progress=args.progress)
    rows: dict[str, dict] = {}
    for engine_name in ("torch", "onnx"):
        engine = Engine.load(out / run / "merged", engine=engine_name)
        row: dict[str, float] = {}
        for name, source in sets:
            data = files["all"]["test"] if run != "c" else files[source]["test"]
            result = evaluate(engine, name, data, columns, LABELS, by="language")
            row |= {lang: round(100 * m["macro_f1"], 2) for lang, m in result["segments"].items()}
        rows["int8" if engine_name == "onnx" else "torch"] = row
    if reference_rows:
        rows["reference"] = reference_rows
    for row in rows.values():
        row["average"] = round(float(np.mean([row[c] for c in LANGUAGES.values() if c in row])), 2)
    by_name = {t.name: t for t in manifest.tasks}
    depth = [by_name[name].attach_layer + by_name[name].task_layers for name, _ in sets]
    entry |= {"rows": rows, "layers_per_request": round(float(np.mean(depth)), 2),
              "train_seconds": round(sum(t["seconds"] - t["times"].get("reference", 0)
                                         for t in entry["tasks"].values()), 1),
              "reference_seconds": round(sum(t["times"].get("reference", 0) for t in entry["tasks"].values()), 1)
              if reference else None,
              "overhead_layers": manifest.overhead_layers, "settings": {
                  "epochs": args.epochs, "layers": args.layers, "extra_attach": args.extra_attach,
                  "reference_epochs": args.reference_epochs if reference else None, "seed": args.seed}}
    return entry


def train_scoring_reference(job, backbone, tasks_dir: Path, texts: list[str]):
    """train_task, and the full fine-tuning's logits on `texts` (it is never published)."""
    import torch

    from centra.core.backbone import attention_bias
    from centra.core.tokens import encode
    from centra.train.pipeline import check_destination, open_run, publish, train_run, validate_job
    from centra.train.reference import TokenSource

    checked = validate_job(job, backbone.cfg)
    check_destination(tasks_dir, job.name)
    run = open_run(checked, backbone)
    logits = None
    try:
        trained = train_run(run)
        if run.reference_model is not None:
            tok = backbone.tokenizer()
            source = TokenSource(encode(tok, backbone.cfg.type_vocab_size, texts, None, checked.max_length),
                                 tok.pad_token_id or 0)
            model, parts = run.reference_model.eval(), {}
            with torch.no_grad():
                for rows in source.rows_in_batches(64):
                    tokens, mask = source.batch(rows)
                    parts.update(zip(rows, model(tokens, attention_bias(mask), mask).numpy()))
            import numpy as np

            logits = np.stack([parts[i] for i in range(len(texts))])
            run.reference_model = None
    finally:
        run.close()
    report, _ = publish(run, trained, Path(tasks_dir))
    return report, logits, dict(run.times)


def markdown(results: dict) -> str:
    """The published table's shape: macro-F1 per language on the UMSAB test sets, x100, and the average."""
    codes = list(LANGUAGES.values())
    head = ("| run | model | " + " | ".join(codes) +
            " | average | % of reference (a) | layers per request | train time |")
    lines = [head, "|" + "---|" * (len(codes) + 6)]
    anchor = results.get("a", {}).get("rows", {}).get("reference", {}).get("average")
    for run in RUNS:
        if run not in results:
            continue
        entry = results[run]
        for model, row in entry["rows"].items():
            label = {"torch": "served, torch", "int8": "served, ONNX int8", "reference": "full fine-tuning"}[model]
            layers = "12" if model == "reference" else f"{entry['layers_per_request']:g}"
            seconds = entry["reference_seconds"] if model == "reference" else entry["train_seconds"]
            share = f"{100 * row['average'] / anchor:.1f}%" if anchor else "-"
            lines.append(f"| ({run}) {entry['what']} | {label} | " + " | ".join(
                f"{row[c]:.1f}" if c in row else "-" for c in codes) +
                f" | **{row['average']:.1f}** | {share} | {layers} | {_minutes(seconds)} |")
    for name, average in PUBLISHED.items():
        lines.append(f"| published | {name} | " + " | ".join("" for _ in codes) + f" | {average:.1f} | "
                     f"{100 * average / anchor:.1f}% | 12 | - |" if anchor else f"| published | {name} | " +
                     " | ".join("" for _ in codes) + f" | {average:.1f} | - | 12 | - |")
    if "deploy" in results:
        d = results["deploy"]
        lines += ["", f"Deployment ({', '.join(d['tasks'])}): {d['overhead_layers']} layers per request for every "
                  f"task against {d['single_task_layers']} as one model per task; merged vs standalone max "
                  f"|diff| {d['merged_vs_standalone']:.2g}; served vs in-process: gRPC {d['served']['grpc']}, "
                  f"REST {d['served']['rest']}."]
    if "probe" in results:
        lines += ["", "| frozen trunk, logistic regression (test) | " + " | ".join(codes) + " | average |",
                  "|" + "---|" * (len(codes) + 2)]
        for name, entry in results["probe"].items():
            lines.append(f"| {name} | " + " | ".join(f"{entry['test'][c]:.1f}" for c in codes) +
                         f" | {entry['test']['average']:.1f} (val {entry['val']['average']:.1f}) |")
    return "\n".join(lines)


def _minutes(seconds: float | None) -> str:
    return "-" if not seconds else f"{seconds / 60:.1f} min"


RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "multilingual"
DEPLOY_SAMPLE = 24  # test texts per language in the deployment's checks and bench texts


def deploy(files: dict[str, dict[str, Path]], out: Path, data: Path, progress: bool) -> dict:
    """The multilingual deployment: the recipes of recipes/multilingual (sentiment in 8 languages, PLUE's
    Portuguese SST-2, two IndoNLU hotel aspects) on one trunk, merged (int8 too) and checked: merged
    against standalone, served answers (gRPC and REST) against in-process ones. Sentiment is run (a)'s task
    when that run is there (the recipe holds its settings), else trained from the recipe."""
    import shutil

    from centra.export.engines import merge
    from centra.io import read_json as read
    from centra.runtime.engine import Engine
    from centra.runtime.verify import verify
    from centra.train.recipe import add_task

    tasks = out / "deploy" / "tasks"
    entry: dict = {"tasks": {}}
    for recipe in sorted(RECIPES.glob("*/recipe.json")):
        name = recipe.parent.name
        (tasks / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recipe, tasks / name / "recipe.json")
        trained_a = out / "a" / "tasks" / name
        clock = time.perf_counter()
        if name == "sentiment" and (trained_a / "task.json").is_file():
            shutil.rmtree(tasks / name)
            shutil.copytree(trained_a, tasks / name)
            shutil.copyfile(recipe, tasks / name / "recipe.json")
            entry["tasks"][name] = {"from": str(trained_a)}
        else:
            root = files["all"]["train"].parent if name == "sentiment" else data
            report, _ = add_task(tasks, name, root=root)
            entry["tasks"][name] = {"chosen": report.to_dict()["chosen"],
                                    "seconds": round(time.perf_counter() - clock, 1)}
        print(f"languages deploy: {name} ready", file=sys.stderr, flush=True)
    manifest = merge([tasks], out / "deploy" / "merged", engine="onnx", precision="int8", progress=progress)
    texts = sample_texts(files, data)
    (out / "deploy" / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    engine = Engine.load(out / "deploy" / "merged", engine="torch")
    checks = verify(engine, texts[:64], texts[:64])  # no pair task here: the pairs are never read
    entry["merged_vs_standalone"] = max(c.max_abs_diff for c in checks)
    entry["served"] = served_equal(engine, texts[:48])
    entry["overhead_layers"] = manifest.overhead_layers
    entry["single_task_layers"] = manifest.single_task_layers
    entry["dev"] = {name: read(tasks / name / "task.json").get("metrics", {}) for name in entry["tasks"]}
    return entry


def sample_texts(files: dict[str, dict[str, Path]], data: Path) -> list[str]:
    """A few test tweets of every language, Portuguese SST-2 and Indonesian hotel reviews, interleaved."""
    import csv

    groups = [[r["text"] for r in read_jsonl(files[code]["test"])[:DEPLOY_SAMPLE]] for code in LANGUAGES.values()]
    sst = data / "plue" / "SST-2" / "dev.tsv"
    if sst.is_file():
        lines = sst.read_text(encoding="utf-8").splitlines()[1:DEPLOY_SAMPLE + 1]
        groups.append([line.split("\t")[0] for line in lines])
    hotel = data / "indonlu" / "hoasa_absa-airy" / "test_preprocess.csv"
    if hotel.is_file():
        with open(hotel, encoding="utf-8", newline="") as f:
            groups.append([row["review"] for _, row in zip(range(DEPLOY_SAMPLE), csv.DictReader(f))])
    texts = [g[i] for i in range(DEPLOY_SAMPLE) for g in groups if i < len(g)]
    return [" ".join(t.split()) for t in texts if t.strip()]


def served_equal(engine, texts: list[str]) -> dict:
    """The same texts over gRPC (centra.v1) and REST against the engine in process: the largest score
    difference and whether every label is the same."""
    import urllib.request

    from centra.client import Client
    from centra.serve.background import BackgroundServer
    from centra.serve.server import ServeOptions

    local = engine.predict(texts)
    key = {(a["text"], a["task"]): a for a in local}
    with BackgroundServer(engine, ServeOptions(port=0, http_port=0, drain_s=0)) as server:
        with Client(server.target, timeout=60) as client:
            grpc_answers = client.classify(texts)
        body = json.dumps({"inputs": [{"text": t, "id": str(i)} for i, t in enumerate(texts)]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{server.server.http.port}/v1/classify", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            rest = json.loads(response.read())
    out = {}
    worst, same = 0.0, True
    for answer in grpc_answers:
        mine = key[(answer["text"], answer["task"])]
        same &= answer.get("label") == mine.get("label")
        worst = max(worst, *(abs(answer["scores"][k] - v) for k, v in mine["scores"].items()))
    out["grpc"] = {"answers": len(grpc_answers), "same_labels": same, "max_score_diff": worst}
    worst, same, count = 0.0, True, 0
    for result in rest["results"]:
        text = texts[int(result["id"])]
        for answer in result["tasks"]:
            mine = key[(text, answer["task"])]
            labels = engine.specs[answer["task"]].labels
            same &= answer.get("label") == mine.get("label")
            worst = max(worst, *(abs(s - mine["scores"][k]) for k, s in zip(labels, answer["scores"])))
            count += 1
    out["rest"] = {"answers": count, "same_labels": same, "max_score_diff": worst}
    if count != len(local) or len(grpc_answers) != len(local):
        raise CentraError(f"served {len(grpc_answers)} (gRPC) and {count} (REST) answers, {len(local)} in process")
    return out
