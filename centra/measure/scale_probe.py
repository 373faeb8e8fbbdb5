"""One measurement of `centra bench-scale`, in a process of its own so its memory is its own: load an
engine (a merged version, or one model per task built from it), answer texts with every task and with
one, and print one JSON line: load seconds, texts/s, RSS after loading and after answering, peak RSS.

    python -m centra.measure.scale_probe MODEL ENGINE LAYOUT TEXTS_FILE [SEPARATE_GRAPHS]

ENGINE: torch | onnx (the version's graphs); LAYOUT: merged | separate (each task a full-depth model of
its own, weights copied: what one fine-tuned model per task holds; for ONNX, SEPARATE_GRAPHS is the
folder of their exported graphs, written by centra.measure.scale.separate_graphs).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from centra.measure.memory import process_memory

ONE_TASK_REPEATS = 3
ENGINE_FILE = "engine.json"  # the separate models' graphs: their engine field


def separate_engines(model: Path, engine: str, graphs: Path | None) -> dict:
    """Per task, an Engine over a full-depth model of its own (separate copies of every weight)."""
    from torch import nn

    from centra.core.backbone import load_tokenizer
    from centra.core.graph import MergedModel
    from centra.core.merge import load_merged
    from centra.core.versions import model_folder
    from centra.measure.bench_engines import full_depth_head
    from centra.runtime.engine import Engine

    folder = model_folder(model)
    manifest, merged = load_merged(folder)
    tokenizer = load_tokenizer(folder / "tokenizer")
    full = {name: full_depth_head(head, len(merged.trunk)) for name, head in merged.heads.items()}
    engines = {}
    if engine == "torch":
        for name, head in full.items():
            own = MergedModel(merged.cfg, copy.deepcopy(merged.embeddings),
                              nn.ModuleList(copy.deepcopy(layer) for layer in merged.trunk), {name: head})
            engines[name] = Engine(own.eval(), tokenizer)
        return engines
    from centra.core.manifest import EngineInfo
    from centra.io import read_json
    from centra.runtime.onnx import OnnxRunner, open_session

    info = EngineInfo.from_dict(read_json(graphs / ENGINE_FILE), str(graphs / ENGINE_FILE))
    for name, head in full.items():  # each task opens its own sessions: its own copy of every weight
        runner = OnnxRunner.open(graphs, info, "int8", open_session, {name: head.spec}, merged.cfg, "int8")
        engines[name] = Engine(runner, tokenizer)
    return engines


def main(argv: list[str]) -> int:
    model, engine, layout, texts_file = Path(argv[0]), argv[1], argv[2], Path(argv[3])
    graphs = Path(argv[4]) if len(argv) > 4 else None
    texts = texts_file.read_text(encoding="utf-8").splitlines()
    start = time.perf_counter()
    if layout == "merged":
        from centra.runtime.engine import Engine

        engines = {"merged": Engine.load(model, engine=engine)}  # warmed up by its runner
    else:
        engines = separate_engines(model, engine, graphs)
        for e in engines.values():
            e.predict(texts[:1])  # the merged engines warm up while loading; these do it here
    load_s = time.perf_counter() - start
    rss_loaded, _ = process_memory()
    first = next(iter(engines.values()))
    tasks = sorted({t for e in engines.values() for t in e.specs})
    for e in engines.values():
        e.predict(texts[:8])
    start = time.perf_counter()
    for e in engines.values():
        e.predict(texts)
    all_tps = len(texts) / (time.perf_counter() - start)
    one = tasks[0]
    owner = next(e for e in engines.values() if one in e.specs) if layout == "separate" else first
    start = time.perf_counter()
    for _ in range(ONE_TASK_REPEATS):
        owner.predict(texts, tasks=[one])
    one_tps = ONE_TASK_REPEATS * len(texts) / (time.perf_counter() - start)
    rss, peak = process_memory()
    print(json.dumps({"load_s": round(load_s, 2), "texts_per_s": round(all_tps, 2), "one_task_texts_per_s":
                      round(one_tps, 1), "rss_loaded_mb": round(rss_loaded), "rss_mb": round(rss),
                      "peak_rss_mb": round(peak), "tasks": len(tasks)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
