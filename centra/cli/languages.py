"""`centra languages`: sentiment in eight languages on one multilingual trunk (UMSAB), in the shape of
the published table (centra.measure.languages), the frozen-trunk probe and the multilingual deployment.

    centra languages [--data ../shared/data] [--out runs/languages] [--backbone multilingual-e5-small]
                     [--runs a,b,c] [--reference a,b] [--epochs 2] [--layers 4:4] [--int8-fp32 ffn-out]
                     [--probe] [--deploy] [--table]

Writes OUT/data (JSONL with a language column, read from the data folder), OUT/<run>/{tasks,merged},
OUT/deploy/{tasks,merged,texts.txt} and OUT/results.json (kept across calls: each run replaces its entry).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from centra.cli import flags_named, positive_int
from centra.core import INT8_FP32
from centra.errors import CentraError
from centra.io import read_json, write_json


def cmd_languages(args: argparse.Namespace) -> int:
    from centra.measure.deploy import recipes
    from centra.measure.languages import LanguagesOptions, check_runs, markdown, run_one
    from centra.measure.probe import probe
    from centra.measure.umsab import prepare
    from centra.train.recipe import data_root

    out = Path(args.out)
    runs, reference = check_runs(args.runs, "--runs"), check_runs(args.reference, "--reference")
    options = LanguagesOptions(args.backbone, args.epochs, args.layers, args.extra_attach, args.reference_epochs,
                               args.seed, args.progress, tuple(args.int8_fp32 or ()))
    with flags_named("languages"):
        options.check()
    if args.table:
        path = out / "results.json"
        if not path.is_file():
            raise CentraError(f"{path}: file not found (run `centra languages` without --table first)")
        print(markdown(read_json(path)))
        return 0
    if args.deploy:
        recipes(args.backbone)  # a recipe naming another backbone is refused before any training
    data = data_root(Path(args.data) if args.data else None)
    files = prepare(data, out / "data")
    results = read_json(out / "results.json") if (out / "results.json").is_file() else {}
    with flags_named("languages"):
        if args.probe:
            results["probe"] = probe(args.backbone, files)
            save(out, results)
        for run in runs:
            results[run] = run_one(run, run in reference, files, out, options)
            save(out, results)
        if args.deploy:
            from centra.measure.deploy import deploy

            results["deploy"] = deploy(files, out, data, args.backbone, results.get("a"), args.progress,
                                       options.int8_fp32)
            save(out, results)
    print(markdown(results))
    return 0


def save(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)


def add_parser(sub, common) -> None:
    p = sub.add_parser("languages", parents=[common], help="sentiment in 8 languages on the multilingual trunk "
                       "(UMSAB): cross-lingual, English-only and per-language runs, macro-F1 per language")
    p.add_argument("--data", help="data folder (default: $CENTRA_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/languages")
    p.add_argument("--backbone", default="multilingual-e5-small", help="[multilingual-e5-small]")
    p.add_argument("--runs", default="a,b,c", help="which runs: a (all languages), b (English only), "
                   "c (one task per language); empty for none [a,b,c]")
    p.add_argument("--reference", default="a,b", help="runs that also fine-tune the whole model [a,b]")
    p.add_argument("--reference-epochs", type=positive_int, default=2, help="epochs of the full fine-tuning [2]")
    p.add_argument("--epochs", type=positive_int, default=2, help="epochs of every branch [2]")
    p.add_argument("--layers", default="4:4", help="teacher search: trainable top layers MIN:MAX [4:4]")
    p.add_argument("--extra-attach", type=int, default=0, choices=range(0, 4), metavar="0-3",
                   help="shallower students per task [0]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8-fp32", action="append", choices=INT8_FP32, metavar="GROUP",
                   help="merge the int8 graphs with this group of nodes kept in fp32 (repeatable; `centra merge "
                   "--int8-fp32`) [none]")
    p.add_argument("--probe", action="store_true", help="also measure the frozen trunk (logistic regression on "
                   "mean-pooled embeddings) with and without the text prefix")
    p.add_argument("--deploy", action="store_true", help="also train recipes/multilingual (sentiment, PLUE, "
                   "IndoNLU) on one trunk, merge them and check merged, served and in-process answers alike")
    p.add_argument("--progress", action="store_true", help="show progress")
    p.add_argument("--table", action="store_true", help="only print the tables of OUT/results.json")
    p.set_defaults(func=cmd_languages)
