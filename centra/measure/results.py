"""`centra results`'s work: train GLUE + GoEmotions tasks on the default backbone, merge them, and write the
tables of docs/results.md (`run_results`; `results_tables` writes them again from OUT/results.json).

Per task: full fine-tuning reference (embeddings and every layer trained), the teacher for each L,
students (KD-1, KD-2, ...) and the mixed choice (c = 1.0), all dev metrics, then the merged model's dev
metric (which must equal the student's). A multilabel task's figures are held out: each dev fold scored at
thresholds tuned on the other folds, as it is chosen (it is served at thresholds tuned on all of dev, so its
merged column, like `centra evaluate`, gives the in-sample "fit" figure; a table of its own shows both
and the labels per text).
Tasks whose files are absent are skipped. Writes OUT/tasks/*, OUT/merged, OUT/results.json.
Overheads count one trunk pass per token group (single texts and text pairs read other tokens).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from centra.errors import CentraError, FieldError, Name
from centra.io import read_json
from centra.measure.costs import cost_table
from centra.train.data import Columns  # light; the heavy imports happen inside run()
from centra.train.report import TrainingReport

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


@dataclass(frozen=True)
class ResultsOptions:
    """Where the data is (None: $CENTRA_DATA or ../shared/data) and where the run goes; the training
    settings of every task; `only`: comma-separated task names. The multilabel settings (None: the
    task job's defaults) apply to GoEmotions."""

    data: Path | None = None
    out: Path = Path("runs/glue")
    epochs: int = 2
    reference_epochs: int = 3
    seed: int = 0
    only: str | None = None
    search: str = "full"
    progress: bool = False
    threshold_objective: str | None = None
    max_labels: int | None = None
    precision: str | None = None  # of training (None: the job's default, auto)

    def check(self) -> None:
        if self.epochs < 1 or self.reference_epochs < 1:
            raise FieldError(Name("epochs"), " and ", Name("reference_epochs"), f" must be >= 1, not {self.epochs} "
                             f"and {self.reference_epochs}")
        known = [name for name, *_ in TASKS]
        unknown = sorted(set(self.only.split(",")) - set(known)) if self.only else []
        if unknown:
            raise FieldError(Name("only"), f": unknown task {unknown[0]!r} (known: {', '.join(known)})")


def results_tables(options: ResultsOptions) -> str:
    """The tables of OUT/results.json, as `run_results` wrote it."""
    options.check()
    path = Path(options.out) / "results.json"
    if not path.is_file():
        raise CentraError(f"{path}: file not found (run `centra results` without --table first)")
    return markdown(read_json(path))


def run_results(options: ResultsOptions) -> str:
    """Every task trained, merged and scored (after `check_run`); the tables."""
    check_run(options)
    return markdown(run(options))


def check_run(options: ResultsOptions) -> None:
    """The options, the data folder and OUT checked: hours of training come after."""
    from centra.core.merge import MODEL_KIND
    from centra.publish import check_replaceable, check_writable_parent
    from centra.train.recipe import data_root

    options.check()
    data = data_root(Path(options.data) if options.data else None)
    if not data.is_dir():
        raise FieldError(f"{data}: data folder not found (give ", Name("data"), " or set $CENTRA_DATA)")
    check_writable_parent(Path(options.out) / "merged")
    check_replaceable(Path(options.out) / "merged", MODEL_KIND)  # before hours of training


def run(args: ResultsOptions) -> dict:
    from centra.core.backbone import Backbone
    from centra.core.merge import plan_merge, write_merged
    from centra.runtime.engine import Engine
    from centra.train.data import load_examples, parse_label_names
    from centra.train.job import TaskJob
    from centra.train.metrics import compute
    from centra.train.pipeline import train_task
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
                      epochs=args.epochs, metric=metric, seed=args.seed, progress=args.progress,
                      **({"precision": args.precision} if args.precision else {}),
                      **(multilabel_settings(args) if kind == "multilabel" else {}))
        start = time.perf_counter()
        report, _ = train_task(job, backbone, out / "tasks")
        results[name] = {**report.to_dict(), "wall_seconds": round(time.perf_counter() - start, 1)}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: {results[name]['chosen']} in {results[name]['wall_seconds']:.0f} s", flush=True)
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
        results[name]["merged_dev"] = compute(kind, logits, examples.targets, spec.thresholds, spec.max_labels)
    merged = manifest.to_dict()  # results.json keeps the manifest's JSON form of these
    results["_merged"] = {k: merged[k] for k in ("trunk_depth", "trunk_passes", "overhead_layers",
                                                 "single_task_layers")}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def multilabel_settings(options: ResultsOptions) -> dict:
    found = {"threshold_objective": options.threshold_objective, "max_labels": options.max_labels}
    return {key: value for key, value in found.items() if value is not None}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(results: dict) -> str:
    """The paper's Table 2 shape: per task dev metric per setting, then overhead per setting."""
    reports = {name: TrainingReport.from_dict(results[name]) for name, *_ in TASKS if name in results}
    lines = ["| task | metric | train ex. | full FT (6) | " + " | ".join(f"L={i}" for i in range(1, LAYERS)) +
             " | KD-1 | KD-2 | mixed c=1.0 (l) | merged |",
             "|" + "---|" * (LAYERS + 7)]
    lines += [task_row(name, r, results[name].get("merged_dev", {})) for name, r in reports.items()]
    multilabel = multilabel_rows(reports)
    return ("\n".join(lines) + "\n\n" + settings_rows(reports, results.get("_merged", {}).get("overhead_layers"))
            + "\n" + (f"\n{multilabel}\n" if multilabel else "") + "\n" + cost_table(reports) + "\n")


def multilabel_rows(reports: dict[str, TrainingReport]) -> str:
    """Each multilabel task's figures at 0.5, held out at cross-fitted thresholds ("tuned"), in-sample at
    the thresholds served ("fit": what the merged column and `centra evaluate` give), and the mean
    labels per text held out against gold, for the reference and the chosen student."""
    table = ["| task | model | micro-F1 at 0.5 | micro-F1 tuned (held out) | macro-F1 at 0.5 | macro-F1 tuned "
             "(held out) | macro-F1 fit (in-sample) | labels per text (gold) | more than gold | neutral given "
             "another |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        reference = r.reference.thresholds if r.reference else None
        for model, t in (("full fine-tuning", reference), ("chosen student", r.thresholds)):
            if r.kind != "multilabel" or t is None:
                continue
            per_text = t.labels_per_text
            labels = f"{per_text['predicted']:.2f} ({per_text['gold']:.2f})" if "gold" in per_text else "-"
            over, neutral = (f"{100 * per_text[k]:.0f}%" if k in per_text else "-"
                             for k in ("more_than_gold", "neutral_given_other"))
            table.append(f"| {name} | {model} | {pct(t.at_half.get('micro_f1'))} | {pct(t.tuned.get('micro_f1'))} | "
                         f"{pct(t.at_half.get('macro_f1'))} | {pct(t.tuned.get('macro_f1'))} | "
                         f"{pct(t.fit.get('macro_f1'))} | {labels} | {over} | {neutral} |")
    return "\n".join(table) if len(table) > 2 else ""


LAYERS = 6  # the default backbone's


def task_row(name: str, r: TrainingReport, merged_dev: dict) -> str:
    """One task's dev metric in every setting (x100; `*`: the teacher the search kept)."""
    teachers = {t.trainable_layers: t for t in r.teachers if t.log is not None}
    students = student_scores(r)
    cells = [name, r.metric + (" (tuned, held out)" if tuned_rows(r) else ""), str(r.train_examples),
             pct(reference_score(r))]
    cells += [pct(served(r, teachers[i].log.dev)) + ("*" if teachers[i].chosen else "") if i in teachers else "-"
              for i in range(1, LAYERS)]
    fit = r.thresholds.fit.get(r.metric) if r.thresholds is not None and tuned_rows(r) else None
    merged = pct(merged_dev.get(r.metric)) + (f" (fit {pct(fit)})" if fit is not None else "")  # in-sample
    cells += [pct(students.get(1)), pct(students.get(2)), f"{pct(served(r, r.chosen.dev))} ({r.chosen.task_layers})",
              merged]
    return "| " + " | ".join(cells) + " |"


def settings_rows(reports: dict[str, TrainingReport], merged: int | None) -> str:
    """Overhead and average dev metric of each setting over the tasks, against full fine-tuning."""
    from centra.train.distill import mixed_layers

    t, full = len(reports), LAYERS * len(reports)
    best = {name: r.chosen_teacher for name, r in reports.items()}
    students = {name: student_scores(r) for name, r in reports.items()}
    teacher = [served(r, best[name].log.dev) for name, r in reports.items()]
    trunk = trunk_layers([(INPUTS[name], best[name].attach_layer) for name in reports])
    rows = [("full fine-tuning, one model per task", full, [reference_score(r) for r in reports.values()]),
            ("teachers (best L per task) on the same trunk passes",
             trunk + sum(b.trainable_layers for b in best.values()), teacher),
            ("KD-1 students on the same trunk passes", trunk + t,
             [students[name].get(1, score) for name, score in zip(reports, teacher)]),
            ("KD-2 students on the same trunk passes", trunk + sum(min(2, b.trainable_layers) for b in best.values()),
             [s.get(2, s.get(1)) for s in students.values()]),
            ("mixed (c = 1.0): the merged model", trunk + sum(r.chosen.task_layers for r in reports.values()),
             [served(r, r.chosen.dev) for r in reports.values()])]
    for c in (2.0, 5.0):  # other thresholds, read off the same students (not separately merged)
        picks = [(mixed_layers(s, c), s) for s in students.values()]
        rows.append((f"mixed (c = {c:g}), read off the same students", trunk + sum(p for p, _ in picks),
                     [s[p] for p, s in picks]))
    full_avg = sum(rows[0][2]) / t
    table = ["| setting | overhead (layers) | % of full FT overhead | average dev metric | % of full FT average |",
             "|---|---|---|---|---|"]
    for label, layers, values in rows:
        avg = sum(values) / t
        table.append(f"| {label} | {layers} | {100 * layers / full:.0f}% | {100 * avg:.2f} | "
                     f"{100 * avg / full_avg:.1f}% |")
    if merged is not None:
        mixed = rows[4][1]
        verdict = "equal" if merged == mixed else f"DIFFERENT: the table's count is wrong ({mixed})"
        table.append(f"\nThe merged model's manifest (counting every trunk pass) says {merged} layers: {verdict}.")
    return "\n".join(table)


def student_scores(r: TrainingReport) -> dict[int, float]:
    return {s.task_layers: served(r, s.log.dev) for s in r.students}


def reference_score(r: TrainingReport) -> float:
    ref = r.reference
    return served(r, ref.thresholds.tuned if ref.thresholds else ref.log.dev)


def tuned_rows(r: TrainingReport) -> bool:
    """A multilabel task recorded with tuned figures everywhere: chosen and served at its tuned thresholds
    (a run from before choices were made at them has them for the chosen student only: shown at 0.5)."""
    return r.kind == "multilabel" and r.chosen.tuned is not None and all("tuned" in s.log.dev for s in r.students)


def served(r: TrainingReport, entry: dict) -> float:
    """The task's metric in a dev entry as the task is chosen and served (multilabel: tuned thresholds)."""
    return float((entry["tuned"] if tuned_rows(r) and "tuned" in entry else entry)[r.metric])


def trunk_layers(attached: list[tuple[str, int]]) -> int:
    """One trunk pass per input kind (all tasks here use max_length 128), each as deep as its deepest
    attach layer: the count core.overhead makes for a merged model."""
    depth: dict[str, int] = {}
    for input_kind, k in attached:
        depth[input_kind] = max(depth.get(input_kind, 0), k)
    return sum(depth.values())


INPUTS = {name: "pair" if cols.pair else "single" for name, _, _, _, _, cols, *_ in TASKS}
