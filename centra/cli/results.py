"""`centra results`: train GLUE + GoEmotions tasks on the default backbone, merge them, and print the
tables of docs/results.md.

    centra results [--data ../shared/data] [--out runs/glue] [--epochs 2] [--reference-epochs 3]
                   [--only sst2,cola] [--search full|halving] [--table]

Per task: full fine-tuning reference (embeddings and every layer trained), the teacher for each L,
students (KD-1, KD-2, ...) and the mixed choice (c = 1.0), all dev metrics, then the merged model's dev
metric (which must equal the student's). A multilabel task's figures are at thresholds tuned on dev, as it
is chosen and served.
Tasks whose files are absent are skipped. Writes OUT/tasks/*, OUT/merged, OUT/results.json.
Overheads count one trunk pass per token group (single texts and text pairs read other tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from centra.errors import CentraError
from centra.io import read_json
from centra.train.data import Columns  # light; the heavy imports happen inside run()

# name, kind, folder, train, dev, columns, metric, label names, max train examples
TASKS = [
    ("sst2", "multiclass", "glue/SST-2", "train.tsv", "dev.tsv", Columns("sentence", ["label"]), "accuracy",
     "negative,positive", 8000),
    ("cola", "multiclass", "glue/CoLA", "train.tsv", "dev.tsv", Columns("3", ["1"]), "mcc",
     "unacceptable,acceptable", None),
    ("mrpc", "multiclass", "glue/MRPC", "train.tsv", "dev.tsv", Columns("#1 String", ["Quality"], "#2 String"),
     "accuracy", "different,paraphrase", None),
    ("rte", "multiclass", "glue/RTE", "train.tsv", "dev.tsv", Columns("sentence1", ["label"], "sentence2"),
     "accuracy", None, None),
    ("stsb", "regression", "glue/STS-B", "train.tsv", "dev.tsv", Columns("sentence1", ["score"], "sentence2"),
     "pearson", None, None),
    ("goemotions", "multilabel", "goemotions", "train.tsv", "dev.tsv", Columns("0", ["1"], header="no"),
     "micro_f1", "@emotions.txt", 8000),
]


def run(args: argparse.Namespace) -> dict:
    from centra.core.backbone import Backbone
    from centra.core.merge import plan_merge, write_merged
    from centra.runtime.engine import Engine
    from centra.train.data import load_examples, parse_label_names
    from centra.train.finetune import TrainConfig
    from centra.train.metrics import compute
    from centra.train.pipeline import TaskJob, train_task
    from centra.train.recipe import data_root

    backbone = Backbone.load("default")
    out = Path(args.out)
    data = data_root(Path(args.data) if args.data else None)
    results = read_json(out / "results.json") if (out / "results.json").exists() else {}
    only = set(args.only.split(",")) if args.only else None
    for name, kind, folder, train, dev, cols, metric, names, cap in TASKS:
        if only and name not in only:
            continue
        root = data / folder
        if not (root / train).is_file():
            print(f"skip {name}: {root / train} not found", file=sys.stderr)
            continue
        job = TaskJob(name=name, kind=kind, train=root / train, dev=root / dev, columns=cols,
                      label_names=parse_label_names(names, root), reference=True, threshold=1.0,
                      search=args.search, max_train_examples=cap, reference_epochs=args.reference_epochs,
                      train_config=TrainConfig(epochs=args.epochs, metric=metric, seed=args.seed,
                                               progress=args.progress))
        start = time.perf_counter()
        report, _ = train_task(job, backbone, out / "tasks")
        report["wall_seconds"] = round(time.perf_counter() - start, 1)
        results[name] = report
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: {report['chosen']} in {report['wall_seconds']:.0f} s", flush=True)
    manifest = write_merged(plan_merge([out / "tasks"]), out / "merged")
    engine = Engine.load(out / "merged")
    for name, kind, folder, _, dev, cols, _metric, names, _ in TASKS:
        if name not in results or name not in engine.specs:
            continue
        root = data / folder
        spec = engine.specs[name]
        examples, _ = load_examples(root / dev, kind, cols, labels=None if kind == "regression" else spec.labels,
                                    label_names=parse_label_names(names, root))
        logits = engine.logits(examples.texts, examples.pairs, [name])[name].numpy()
        results[name]["merged_dev"] = compute(kind, logits, examples.targets, spec.thresholds)
    results["_merged"] = {k: manifest[k] for k in ("trunk_depth", "trunk_passes", "overhead_layers",
                                                   "single_task_layers")}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(results: dict) -> str:
    """The paper's Table 2 shape: per task dev metric per setting, then overhead per setting."""
    from centra.train.distill import mixed_layers

    tasks = [name for name, *_ in TASKS if name in results]
    n = 6
    lines = ["| task | metric | train ex. | full FT (6) | " + " | ".join(f"L={i}" for i in range(1, n)) +
             " | KD-1 | KD-2 | mixed c=1.0 (l) | merged |",
             "|" + "---|" * (n + 7)]
    cols: dict[str, list[float]] = {k: [] for k in ("full", "teacher", "kd1", "kd2", "mixed")}
    overhead = {"kd1": [], "kd2": [], "mixed": [], "teacher": [], "trunk": []}
    for name in tasks:
        r = results[name]
        m = r["metric"]
        teachers = {t["trainable_layers"]: t for t in r["teachers"] if "trainable_layers" in t}
        best = next(t for t in teachers.values() if t["chosen"])
        students = {s["task_layers"]: served(r, s["dev"]) for s in r["students"]}
        chosen = r["chosen"]
        reference = served(r, r["reference"].get("thresholds", {}).get("tuned", r["reference"]["dev"]))
        cells = [name, m + (" (tuned)" if tuned_rows(r) else ""), str(r["train_examples"]), pct(reference)]
        cells += [pct(served(r, teachers[i]["dev"])) + ("*" if teachers[i]["chosen"] else "") if i in teachers
                  else "-" for i in range(1, n)]
        cells += [pct(students.get(1)), pct(students.get(2)), f"{pct(served(r, chosen))} ({chosen['task_layers']})",
                  pct(r.get("merged_dev", {}).get(m))]
        lines.append("| " + " | ".join(cells) + " |")
        cols["full"].append(reference)
        cols["teacher"].append(served(r, best["dev"]))
        cols["kd1"].append(students.get(1, served(r, best["dev"])))
        cols["kd2"].append(students.get(2, students.get(1)))
        cols["mixed"].append(served(r, chosen))
        k, big_l = best["attach_layer"], best["trainable_layers"]
        overhead["trunk"].append((INPUTS[name], k))
        overhead["teacher"].append(big_l)
        overhead["kd1"].append(1)
        overhead["kd2"].append(min(2, big_l))
        overhead["mixed"].append(chosen["task_layers"])
    t = len(tasks)
    full_avg = sum(cols["full"]) / t
    trunk = trunk_layers(overhead["trunk"])
    derived = []
    for c in (2.0, 5.0):  # other thresholds, read off the same students (not separately merged)
        picks = []
        for name in tasks:
            r = results[name]
            students = {s["task_layers"]: served(r, s["dev"]) for s in r["students"]}
            picks.append((mixed_layers(students, c), students))
        derived.append((f"mixed (c = {c:g}), read off the same students", trunk + sum(p for p, _ in picks),
                        [st[p] for p, st in picks]))
    rows = [("full fine-tuning, one model per task", n * t, cols["full"]),
            ("teachers (best L per task) on the same trunk passes", trunk + sum(overhead["teacher"]), cols["teacher"]),
            ("KD-1 students on the same trunk passes", trunk + sum(overhead["kd1"]), cols["kd1"]),
            ("KD-2 students on the same trunk passes", trunk + sum(overhead["kd2"]), cols["kd2"]),
            ("mixed (c = 1.0): the merged model", trunk + sum(overhead["mixed"]), cols["mixed"]), *derived]
    table = ["| setting | overhead (layers) | % of full FT overhead | average dev metric | % of full FT average |",
             "|---|---|---|---|---|"]
    for label, layers, values in rows:
        avg = sum(values) / t
        table.append(f"| {label} | {layers} | {100 * layers / (n * t):.0f}% | {100 * avg:.2f} | "
                     f"{100 * avg / full_avg:.1f}% |")
    merged = results.get("_merged", {}).get("overhead_layers")
    if merged is not None:
        mixed = next(layers for label, layers, _ in rows if label.startswith("mixed (c = 1.0)"))
        verdict = "equal" if merged == mixed else f"DIFFERENT: the table's count is wrong ({mixed})"
        table.append(f"\nThe merged model's manifest (counting every trunk pass) says {merged} layers: {verdict}.")
    return "\n".join(lines) + "\n\n" + "\n".join(table) + "\n"


def tuned_rows(r: dict) -> bool:
    """A multilabel task recorded with tuned figures everywhere: chosen and served at its tuned thresholds
    (a run from before choices were made at them has them for the chosen student only: shown at 0.5)."""
    return r["kind"] == "multilabel" and "tuned" in r["chosen"] and all("tuned" in s["dev"] for s in r["students"])


def served(r: dict, entry: dict) -> float:
    """The task's metric in a dev entry as the task is chosen and served (multilabel: tuned thresholds)."""
    return float((entry["tuned"] if tuned_rows(r) and "tuned" in entry else entry)[r["metric"]])


def trunk_layers(attached: list[tuple[str, int]]) -> int:
    """One trunk pass per input kind (all tasks here use max_length 128), each as deep as its deepest
    attach layer: the count core.overhead makes for a merged model."""
    depth: dict[str, int] = {}
    for input_kind, k in attached:
        depth[input_kind] = max(depth.get(input_kind, 0), k)
    return sum(depth.values())


INPUTS = {name: "pair" if cols.pair else "single" for name, _, _, _, _, cols, *_ in TASKS}


def cmd_results(args: argparse.Namespace) -> int:
    from centra.core.merge import MODEL_KIND
    from centra.io import check_replaceable, check_writable_parent
    from centra.train.recipe import data_root

    if args.epochs < 1 or args.reference_epochs < 1:
        raise CentraError(f"--epochs and --reference-epochs must be >= 1, not {args.epochs} and "
                          f"{args.reference_epochs}")
    known = [name for name, *_ in TASKS]
    unknown = sorted(set(args.only.split(",")) - set(known)) if args.only else []
    if unknown:
        raise CentraError(f"--only: unknown task {unknown[0]!r} (known: {', '.join(known)})")
    if args.table:
        path = Path(args.out) / "results.json"
        if not path.is_file():
            raise CentraError(f"{path}: file not found (run `centra results` without --table first)")
        print(markdown(read_json(path)))
        return 0
    data = data_root(Path(args.data) if args.data else None)
    if not data.is_dir():
        raise CentraError(f"{data}: data folder not found (give --data or set $CENTRA_DATA)")
    check_writable_parent(Path(args.out) / "merged")
    check_replaceable(Path(args.out) / "merged", MODEL_KIND)  # before hours of training
    print(markdown(run(args)))
    return 0


def add_parser(sub, common) -> None:
    p = sub.add_parser("results", parents=[common], help="train GLUE + GoEmotions tasks and print docs/results.md's "
                       "tables (51 min on 2 cores for five tasks with halving)")
    p.add_argument("--data", help="data folder (default: $CENTRA_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/glue")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--reference-epochs", type=int, default=3,
                   help="epochs of the full fine-tuning reference (embeddings and every layer trained) [3]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated task names")
    p.add_argument("--search", choices=["full", "halving"], default="full",
                   help="teacher search [full: every L trained to the end, as the tables show]")
    p.add_argument("--progress", action="store_true", help="show progress")
    p.add_argument("--table", action="store_true", help="only print the tables of OUT/results.json")
    p.set_defaults(func=cmd_results)
