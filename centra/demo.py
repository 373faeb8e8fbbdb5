"""`centra demo`: several tasks on the default backbone, merged into one graph, answering texts."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from centra.backbone import Backbone
from centra.data import Columns, parse_label_names
from centra.engine import Engine
from centra.finetune import TrainConfig
from centra.fsutil import remove_dir
from centra.merge import StandaloneModel, overhead_table, plan_merge, write_merged
from centra.pipeline import TaskJob, train_task
from centra.task import TaskHead, init_task, save_task, task_dirs
from centra.verify import SAMPLE_PAIRS, SAMPLE_TEXTS, verify

# Untrained fallback: name, kind, labels, input, attach layer, task layers
DEMO_TASKS = [
    ("sentiment", "multiclass", ["negative", "neutral", "positive"], "single", 4, 2),
    ("intent", "multiclass", ["question", "complaint", "request", "praise"], "single", 3, 1),
    ("topics", "multilabel", ["billing", "delivery", "product", "app"], "single", 2, 1),
    ("urgency", "regression", ["urgency"], "single", 5, 1),
    ("same_issue", "multiclass", ["different", "same"], "pair", 4, 1),
]
# Trained demo tasks (small, so that training takes minutes on 2 cores):
# name, kind, data folder, columns, label names, train examples
DEMO_DATA = [
    ("sentiment", "multiclass", "glue/SST-2", Columns("sentence", ["label"]), "negative,positive", 2000),
    ("grammar", "multiclass", "glue/CoLA", Columns("3", ["1"]), "unacceptable,acceptable", 2000),
    ("paraphrase", "multiclass", "glue/MRPC", Columns("#1 String", ["Quality"], "#2 String"),
     "different,paraphrase", 1000),
    ("similarity", "regression", "glue/STS-B", Columns("sentence1", ["score"], "sentence2"), None, 1000),
]


def default_data_dir() -> Path:
    """$CENTRA_DATA, else ../shared/data beside the working folder or beside this checkout."""
    if os.environ.get("CENTRA_DATA"):
        return Path(os.environ["CENTRA_DATA"])
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def run_demo(workdir: Path | None = None, data: Path | None = None, untrained: bool = False) -> int:
    data = data or default_data_dir()
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="centra-demo-") as tmp:
            return _run(Path(tmp), data, untrained)
    return _run(workdir, data, untrained)


def _train_demo_tasks(backbone: Backbone, tasks_dir: Path, data: Path) -> None:
    for name, kind, folder, cols, names, examples in DEMO_DATA:
        done = tasks_dir / name / "task.json"
        if done.is_file() and json.loads(done.read_text()).get("trained"):
            print(f"  {name}: already trained in {tasks_dir / name}, reused")
            continue
        root = data / folder
        job = TaskJob(name=name, kind=kind, train=root / "train.tsv", dev=root / "dev.tsv", columns=cols,
                      label_names=parse_label_names(names, root), layers=(1, 2), student_layers=1,
                      max_train_examples=examples, train_config=TrainConfig(epochs=2))
        start = time.perf_counter()
        report, _ = train_task(job, backbone, tasks_dir)
        chosen = report["chosen"]
        print(f"  {name:<11} {kind:<10} {examples} train examples: dev {chosen['metric']} "
              f"{100 * chosen[chosen['metric']]:.1f}, attach layer {chosen['attach_layer']} + "
              f"{chosen['task_layers']} task layer(s), {time.perf_counter() - start:.0f} s")


def _run(workdir: Path, data: Path, untrained: bool) -> int:
    torch.manual_seed(0)
    backbone = Backbone.load("default")
    print(f"backbone: {backbone.backbone_id} ({backbone.cfg.num_layers} layers, hidden "
          f"{backbone.cfg.hidden_size}, {backbone.fingerprint[:19]}...)")
    tasks_dir, out = workdir / "tasks", workdir / "merged"
    have_data = all((data / folder / "train.tsv").is_file() for _, _, folder, *_ in DEMO_DATA)
    wanted = {row[0] for row in (DEMO_TASKS if untrained or not have_data else DEMO_DATA)}
    for folder in task_dirs(tasks_dir) if tasks_dir.is_dir() else []:
        if folder.name not in wanted:  # left by a demo run of the other mode
            remove_dir(folder)
    if untrained or not have_data:
        if not untrained:
            print(f"\n{data}: demo data not found (set CENTRA_DATA or --data); using untrained tasks.")
        print("\nUNTRAINED DEMO TASKS: the branches are copies of backbone layers with freshly initialised "
              "classifiers, so their answers are meaningless; the demo shows the merged graph, not quality.\n")
        for seed, (name, kind, labels, input_kind, attach, layers) in enumerate(DEMO_TASKS):
            spec, head = init_task(backbone, name, kind, labels, attach, layers, input=input_kind, seed=seed)
            save_task(tasks_dir / name, spec, head)
    else:
        print(f"\ntraining {len(DEMO_DATA)} tasks on {data} (teacher search L=1..2, a 1-layer "
              "distilled student, 2 epochs; small subsets so this takes minutes):")
        _train_demo_tasks(backbone, tasks_dir, data)
    manifest = write_merged(plan_merge([tasks_dir]), out)
    print(f"merged {len(manifest['tasks'])} tasks into {out}")
    print(overhead_table(manifest))

    engine = Engine.load(out)
    texts, pairs = SAMPLE_TEXTS[:6], SAMPLE_PAIRS[:6]
    label = "answers (untrained)" if untrained or not have_data else "answers"
    print(f"\n{label}, one merged call for all texts and tasks:")
    by_text: dict[str, list[str]] = {}
    for answer in engine.predict(texts, pairs):
        shown = answer.get("label", answer.get("labels", answer.get("value")))
        if isinstance(shown, list):
            shown = "+".join(shown) or "-"
        by_text.setdefault(answer["text"], []).append(f"{answer['task']}={shown}")
    for text, parts in by_text.items():
        print(f"  {text[:58]!r}")
        print(f"      {'  '.join(parts)}")

    print("\nverify: merged vs standalone per task")
    for check in verify(engine):
        print(f"  {check.name:<11} max |diff| = {check.max_abs_diff:.2e}")

    _timing(engine, backbone)
    return 0


@torch.inference_mode()
def _timing(engine: Engine, backbone: Backbone, repeats: int = 3) -> None:
    """Merged graph vs one full fine-tuned-size model per task, same 32 texts (and pairs)."""
    texts = (SAMPLE_TEXTS * 4)[:32]
    pairs = (SAMPLE_PAIRS * 4)[:32]
    engine.logits(texts, pairs)  # warm-up

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1000

    merged_ms = best(lambda: engine.logits(texts, pairs))
    pad_id = engine.tokenizer.pad_token_id or 0
    separate = []
    for name, spec in engine.specs.items():
        # Serving a task as its own model: all N backbone layers under that task's classifier.
        full_spec = replace(spec, attach_layer=backbone.cfg.num_layers, task_layers=0)
        head = TaskHead(full_spec, backbone.cfg).eval()
        head.pooler, head.classifier = engine.model.heads[name].pooler, engine.model.heads[name].classifier
        enc = engine.encode(texts, pairs if spec.input == "pair" else None, spec.max_length)
        separate.append((StandaloneModel(backbone.embeddings, list(backbone.layers), head),
                         enc.batch(list(range(len(texts))), pad_id)))

    def run_separate() -> None:
        for model, batch in separate:
            model(*batch)

    separate_ms = best(run_separate)
    subset = sorted(engine.specs, key=lambda n: engine.specs[n].attach_layer)[:2]
    subset_ms = best(lambda: engine.logits(texts, pairs, subset))
    print(f"\ntiming, batch of {len(texts)} texts, best of {repeats}, {torch.get_num_threads()} threads:")
    rows = [(f"merged graph, all {len(engine.specs)} tasks", merged_ms, ""),
            (f"{len(engine.specs)} separate {backbone.cfg.num_layers}-layer models", separate_ms,
             f"({separate_ms / merged_ms:.1f}x the merged graph)"),
            (f"merged graph, only {' + '.join(subset)}", subset_ms,
             f"(trunk stops at layer {engine.model.depth_for(subset)})")]
    for label, ms, note in rows:
        print(f"  {label:<36} {ms:8.1f} ms  {note}".rstrip())
