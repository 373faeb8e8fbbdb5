"""`centra demo`: several tasks on the default backbone, merged into one graph, answering texts."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from centra.backbone import Backbone
from centra.engine import Engine
from centra.merge import StandaloneModel, overhead_table, plan_merge, write_merged
from centra.task import TaskHead, init_task, save_task
from centra.verify import SAMPLE_PAIRS, SAMPLE_TEXTS, verify

# name, kind, labels, input, attach layer, task layers
DEMO_TASKS = [
    ("sentiment", "multiclass", ["negative", "neutral", "positive"], "single", 4, 2),
    ("intent", "multiclass", ["question", "complaint", "request", "praise"], "single", 3, 1),
    ("topics", "multilabel", ["billing", "delivery", "product", "app"], "single", 2, 1),
    ("urgency", "regression", ["urgency"], "single", 5, 1),
    ("same_issue", "multiclass", ["different", "same"], "pair", 4, 1),
]


def run_demo(workdir: Path | None = None) -> int:
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="centra-demo-") as tmp:
            return _run(Path(tmp))
    return _run(workdir)


def _run(workdir: Path) -> int:
    torch.manual_seed(0)
    backbone = Backbone.load("default")
    print(f"backbone: {backbone.backbone_id} ({backbone.cfg.num_layers} layers, hidden "
          f"{backbone.cfg.hidden_size}, {backbone.fingerprint[:19]}...)")
    print("\nUNTRAINED DEMO TASKS: the branches are copies of backbone layers with freshly initialised "
          "classifiers, so their answers are meaningless; the demo shows the merged graph, not quality.\n")
    tasks_dir, out = workdir / "tasks", workdir / "merged"
    for seed, (name, kind, labels, input_kind, attach, layers) in enumerate(DEMO_TASKS):
        spec, head = init_task(backbone, name, kind, labels, attach, layers, input=input_kind, seed=seed)
        save_task(tasks_dir / name, spec, head)
    manifest = write_merged(plan_merge([tasks_dir]), out)
    print(f"merged {len(manifest['tasks'])} tasks into {out}")
    print(overhead_table(manifest))

    engine = Engine.load(out)
    texts, pairs = SAMPLE_TEXTS[:4], SAMPLE_PAIRS[:4]
    print("\nanswers (untrained), one merged call for all texts and tasks:")
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
    subset = ["intent", "topics"]
    subset_ms = best(lambda: engine.logits(texts, None, subset))
    print(f"\ntiming, batch of {len(texts)} texts, best of {repeats}, {torch.get_num_threads()} threads:")
    rows = [(f"merged graph, all {len(engine.specs)} tasks", merged_ms, ""),
            (f"{len(engine.specs)} separate {backbone.cfg.num_layers}-layer models", separate_ms,
             f"({separate_ms / merged_ms:.1f}x the merged graph)"),
            (f"merged graph, only {' + '.join(subset)}", subset_ms,
             f"(trunk stops at layer {engine.model.depth_for(subset)})")]
    for label, ms, note in rows:
        print(f"  {label:<36} {ms:8.1f} ms  {note}".rstrip())
