"""Sentiment in eight languages on one multilingual trunk (UMSAB), in the shape of the published table:
macro-F1 per language on the test sets and the average.

- (a) one task trained on all eight languages (cross-lingual);
- (b) the same trained on English only, answering the other seven zero-shot;
- (c) one task per language, eight branches on one trunk (language-specific).
Each run is merged (ONNX int8 graphs and the torch files) and scored through the served engines, torch
and int8, beside the full fine-tuning of the same backbone (the reference: every layer and the embeddings
trained; never published, scored on the test sets before it is dropped) and the published averages.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from centra.errors import CentraError
from centra.measure.umsab import LABELS, LANGUAGES, PUBLISHED, RUNS, read_jsonl
from centra.progress import progress_line


@dataclass(frozen=True)
class LanguagesOptions:
    """What every run trains with (the task settings of centra.train.settings that differ from theirs)."""

    backbone: str = "multilingual-e5-small"
    epochs: int = 2
    layers: str = "4:4"
    extra_attach: int = 0
    reference_epochs: int = 2
    seed: int = 0
    progress: bool = False
    int8_fp32: tuple[str, ...] = ()  # node groups the int8 graphs keep in fp32 (merge's int8_fp32)

    def check(self) -> None:
        from centra.core import check_int8_fp32

        if self.epochs < 1 or self.reference_epochs < 1 or self.extra_attach < 0:
            raise CentraError(f"epochs and reference epochs must be >= 1 and extra attach >= 0, not "
                              f"{self.epochs}, {self.reference_epochs} and {self.extra_attach}")
        check_int8_fp32(self.int8_fp32)


def check_runs(value: str, flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    unknown = sorted(set(items) - set(RUNS))
    if unknown:
        raise CentraError(f"{flag}: unknown run {unknown[0]!r} (known: {', '.join(RUNS)})")
    return items


def run_one(run: str, reference: bool, files: dict[str, dict[str, Path]], out: Path, options: LanguagesOptions
            ) -> dict:
    """Train a run's tasks, merge them (ONNX int8 + torch), score them per language on the test sets."""
    from centra.core.backbone import Backbone
    from centra.export.engines import merge
    from centra.runtime.engine import Engine
    from centra.train.data import Columns
    from centra.train.evaluate import evaluate
    from centra.train.job import TaskJob
    from centra.train.metrics import by_segment
    from centra.train.pipeline import train_task

    backbone = Backbone.load(options.backbone)
    columns = Columns("text", ["label"])
    sets = {"a": [("sentiment", "all")], "b": [("sentiment", "en")],
            "c": [(f"sentiment_{code}", code) for code in LANGUAGES.values()]}[run]
    tasks_dir, test = out / run / "tasks", read_jsonl(files["all"]["test"])
    entry: dict = {"what": RUNS[run], "tasks": {}}
    reference_rows: dict[str, float] = {}
    for name, source in sets:
        job = TaskJob(name=name, kind="multiclass", train=files[source]["train"], dev=files[source]["val"],
                      columns=columns, label_names=LABELS, metric="macro_f1", epochs=options.epochs,
                      layers=options.layers, extra_attach=options.extra_attach, seed=options.seed,
                      reference=reference, reference_epochs=options.reference_epochs, progress=options.progress)
        scored = test if run != "c" else [r for r in test if r["language"] == source]
        clock = time.perf_counter()
        held: dict = {}  # the reference's test logits, computed while train_task still holds it
        score = partial(keep_reference_logits, held, backbone, [r["text"] for r in scored])
        report, _ = train_task(job, backbone, tasks_dir, score_reference=score if reference else None)
        ref_logits = held.get("logits")
        wall = time.perf_counter() - clock
        entry["tasks"][name] = {"chosen": report.chosen.to_dict(), "seconds": round(wall, 1),
                                "times": {k: round(v, 1) for k, v in report.seconds.items()}}
        progress_line(f"languages {run}: {name} trained in {wall:.0f} s")
        if ref_logits is not None:
            gold = [LABELS.index(r["label"]) for r in scored]
            parts = by_segment("multiclass", ref_logits, gold, [r["language"] for r in scored])
            reference_rows |= {lang: round(100 * m["macro_f1"], 2) for lang, m in parts.items()}
    manifest = merge([tasks_dir], out / run / "merged", engine="onnx", precision="int8",
                     int8_fp32=options.int8_fp32, progress=options.progress)
    rows: dict[str, dict] = {}
    for engine_name, label in (("torch", "torch"), ("onnx", "int8")):
        engine = Engine.load(out / run / "merged", engine=engine_name)
        row: dict[str, float] = {}
        for name, source in sets:
            data = files["all"]["test"] if run != "c" else files[source]["test"]
            result = evaluate(engine, name, data, columns, LABELS, by="language")
            row |= {lang: round(100 * m["macro_f1"], 2) for lang, m in result["segments"].items()}
        rows[label] = row
    if reference_rows:
        rows["reference"] = reference_rows
    for row in rows.values():
        row["average"] = round(float(np.mean([row[c] for c in LANGUAGES.values() if c in row])), 2)
    by_name = {t.name: t for t in manifest.tasks}
    depth = [by_name[name].attach_layer + by_name[name].task_layers for name, _ in sets]
    times = [t["times"] for t in entry["tasks"].values()]
    entry |= {"rows": rows, "layers_per_request": round(float(np.mean(depth)), 2),
              "train_seconds": round(sum(t["seconds"] - t["times"].get("reference", 0)
                                         for t in entry["tasks"].values()), 1),
              "reference_seconds": round(sum(t.get("reference", 0) for t in times), 1) if reference else None,
              "overhead_layers": manifest.overhead_layers,
              "settings": {**asdict(options), "reference_epochs": options.reference_epochs if reference else None}}
    return entry


def keep_reference_logits(held: dict, backbone, texts: list[str], model) -> None:
    held["logits"] = reference_logits(model, backbone, texts)


def reference_logits(model, backbone, texts: list[str]) -> np.ndarray:
    """The full fine-tuning's logits on `texts`, in input order (batched by length, as it trained)."""
    import torch

    from centra.core.backbone import attention_bias
    from centra.core.tokens import encode
    from centra.train.reference import TokenSource

    tok = backbone.tokenizer()
    source = TokenSource(encode(tok, backbone.cfg.type_vocab_size, texts, None, model.spec.max_length),
                         tok.pad_token_id or 0)
    model, parts = model.eval(), {}
    with torch.no_grad():
        for rows in source.rows_in_batches(64):
            tokens, mask = source.batch(rows)
            parts.update(zip(rows, model(tokens, attention_bias(mask), mask).numpy()))
    return np.stack([parts[i] for i in range(len(texts))])


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
            kept = entry.get("settings", {}).get("int8_fp32")
            label += f" ({', '.join(kept)} in fp32)" if model == "int8" and kept else ""
            layers = "12" if model == "reference" else f"{entry['layers_per_request']:g}"
            seconds = entry["reference_seconds"] if model == "reference" else entry["train_seconds"]
            share = f"{100 * row['average'] / anchor:.1f}%" if anchor else "-"
            lines.append(f"| ({run}) {entry['what']} | {label} | " + " | ".join(
                f"{row[c]:.1f}" if c in row else "-" for c in codes) +
                f" | **{row['average']:.1f}** | {share} | {layers} | {_minutes(seconds)} |")
    blank = " | ".join("" for _ in codes)
    for name, average in PUBLISHED.items():
        share = f"{100 * average / anchor:.1f}%" if anchor else "-"
        lines.append(f"| published | {name} | {blank} | {average:.1f} | {share} | 12 | - |")
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
