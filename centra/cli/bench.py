"""`centra bench`: the merged graph against each task served as its own full-depth model, same texts.

Engines (every one on the same pre-tokenised batches; centra.runtime.bench measures):
- separate_torch_fp32: per task, embeddings + all N backbone layers + its pooler and classifier, torch
  fp32: what serving each task as its own fine-tuned model costs today;
- separate_onnx_int8: those models exported and int8-quantized by centra's own exporter (parity with
  torch and int8 label agreement checked at export), in a temporary folder: the strong baseline;
- merged_torch_fp32, merged_onnx_fp32, merged_onnx_int8: the merged graph (the ONNX graphs of OUT when
  its manifest has both precisions, else exported into a temporary folder; OUT is never written);
- with a CUDA GPU: torch fp32 and fp16 (autocast) on it, separate and merged, and when tensorrt is
  importable merged_tensorrt_fp16 / _int8 (plans built into a temporary folder, int8 calibrated on the
  bench's texts).
Texts: SST-2 dev sentences for single-text tasks and MRPC dev pairs for pair tasks (when found under
the data root), else verify's sample texts; or --texts FILE (a line: a text, or text<TAB>second text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from centra.cli import positive_float, save_figure
from centra.errors import CentraError

if TYPE_CHECKING:
    from centra.core.manifest import Manifest

ENGINES = ("separate_torch_fp32", "separate_onnx_int8", "merged_torch_fp32", "merged_onnx_fp32", "merged_onnx_int8")
BASELINES = ("separate_torch_fp32", "separate_onnx_int8")
DEFAULT_BATCHES = (1, 32)
DEFAULT_SECONDS = 3.0
DISTURBED = 5.0  # p99 / p50 above which a measurement is flagged as stalled (see `disturbed_lines`)
SST2_DEV = Path("glue") / "SST-2" / "dev.tsv"
MRPC_DEV = Path("glue") / "MRPC" / "dev.tsv"


def read_texts_file(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every line's first field (the single-text tasks' inputs) and the lines holding a tab (text pairs)."""
    from centra.core.tokens import check_texts

    if not path.is_file():
        raise CentraError(f"{path}: file not found")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CentraError(f"{path}: not UTF-8 text") from None
    if not lines:
        raise CentraError(f"{path}: no texts (one per line; text<TAB>second text for pair tasks)")
    fields = [[part.strip() for part in line.split("\t", 1)] for line in lines]
    texts = [f[0] for f in fields]
    pairs = [(f[0], f[1]) for f in fields if len(f) == 2]
    try:
        check_texts(texts, None)
        if pairs:
            check_texts([a for a, _ in pairs], [b for _, b in pairs])
    except CentraError as exc:
        raise CentraError(f"{path}: {exc}") from None
    return texts, pairs


def column(rows: list, name: str) -> int | None:
    header = rows[0][1] if rows else None
    return header.index(name) if isinstance(header, list) and name in header else None


def default_sequences() -> tuple[list[str], list[tuple[str, str]], str, str]:
    """SST-2 dev sentences and MRPC dev pairs when the data is there, else verify's samples; and where
    each came from."""
    from centra.runtime.verify import SAMPLE_PAIRS, SAMPLE_TEXTS
    from centra.train.data import read_rows
    from centra.train.recipe import data_root

    root = data_root()
    texts: list[str] = []
    pairs: list[tuple[str, str]] = []
    if (root / SST2_DEV).is_file():
        rows = read_rows(root / SST2_DEV)
        col = column(rows, "sentence")
        if col is not None:
            texts = [row[col].strip() for _, row in rows[1:] if len(row) > col and row[col].strip()]
    if (root / MRPC_DEV).is_file():
        rows = read_rows(root / MRPC_DEV)
        a, b = column(rows, "#1 String"), column(rows, "#2 String")
        if a is not None and b is not None:
            pairs = [(row[a].strip(), row[b].strip()) for _, row in rows[1:]
                     if len(row) > max(a, b) and row[a].strip() and row[b].strip()]
    text_source = f"SST-2 dev sentences ({root / SST2_DEV})" if texts else "verify's sample texts"
    pair_source = f"MRPC dev pairs ({root / MRPC_DEV})" if pairs else "verify's sample pairs"
    return (texts or list(SAMPLE_TEXTS), pairs or list(zip(SAMPLE_TEXTS, SAMPLE_PAIRS)), text_source,
            pair_source)


def check_options(args: argparse.Namespace) -> dict:
    """Every option, the texts and the model folder checked before anything loads."""
    from centra.core.merge import model_folder, read_manifest
    from centra.io import check_writable_parent

    sizes = sorted(set(args.batch or DEFAULT_BATCHES))
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise CentraError(f"bench: --plot {plot}: the plot is a PNG file (name it *.png)")
        if plot.is_dir():
            raise CentraError(f"bench: --plot {plot}: is a folder")
        check_writable_parent(plot)
    folder = model_folder(Path(args.model))
    manifest = read_manifest(folder)
    inputs = {t.input for t in manifest.tasks}
    if args.texts:
        texts, pairs = read_texts_file(Path(args.texts))
        if "pair" in inputs and not pairs:
            raise CentraError(f"{args.texts}: the model's pair tasks need text pairs: give lines "
                              "'text<TAB>second text'")
        source = f"{args.texts} ({len(texts)} texts, {len(pairs)} pairs)"
    else:
        texts, pairs, text_source, pair_source = default_sequences()
        source = " + ".join(s for kind, s in (("single", text_source), ("pair", pair_source)) if kind in inputs)
    counts = ([len(texts)] if "single" in inputs else []) + ([len(pairs)] if "pair" in inputs else [])
    n = max(min(counts), *sizes)  # one sequence per text; cycled when fewer than the largest batch
    texts, pairs = [texts[i % len(texts)] for i in range(n)], [pairs[i % len(pairs)] for i in range(n)] if pairs else []
    bb = manifest.backbone
    if not args.skip_separate and manifest.trunk_depth < bb.num_layers and not (bb.path and Path(bb.path).is_dir()):
        raise CentraError(f"bench: the separate models need all {bb.num_layers} layers of backbone "
                          f"{bb.id!r}, but its folder {bb.path} is gone and the merged trunk has "
                          f"{manifest.trunk_depth}: give --skip-separate")
    return {"folder": folder, "texts": texts, "pairs": pairs, "source": f"{n} sequences: {source}", "plot": plot,
            "batches": sizes, "seconds": None if args.repeats else (args.seconds or DEFAULT_SECONDS),
            "repeats": args.repeats}


def merged_onnx(folder: Path, manifest: Manifest, model, tokenizer, tmp: Path) -> dict:
    """OnnxRunners (fp32, int8) of the merged graph: OUT's graphs when it has both, else exported to tmp."""
    from centra.export.onnx import export_onnx
    from centra.progress import progress_line
    from centra.runtime.onnx import OnnxRunner

    info, files = manifest.engine, manifest.files
    if not (info is not None and info.name == "onnx" and info.graphs and info.has_files("fp32", "int8")):
        progress_line(f"bench: {folder} has no ONNX fp32 + int8 graphs: exporting the merged model to {tmp}")
        folder, info, files = tmp, export_onnx(model, tmp, "int8", tokenizer), None
    return {p: OnnxRunner.load(folder, info, model, precision=p, files=files) for p in ("fp32", "int8")}


def separate_onnx(cfg, heads: dict, embeddings, layers: list, tokenizer, tmp: Path):
    """Each task's full-depth model exported and quantized (one export of all of them, checked as
    centra checks any export), then loaded as its own sessions: one model per task."""
    from torch import nn

    from centra.core.graph import MergedModel
    from centra.export.onnx import export_onnx
    from centra.progress import progress_line
    from centra.runtime.bench import full_depth_head, runner_engine, separate_engine
    from centra.runtime.graphs import graph_layout
    from centra.runtime.onnx import OnnxRunner, open_session

    progress_line(f"bench: exporting {len(heads)} separate {len(layers)}-layer models to {tmp} (fp32 + int8)")
    full = {name: full_depth_head(head, len(layers)) for name, head in heads.items()}
    info = export_onnx(MergedModel(cfg, embeddings, nn.ModuleList(layers), full).eval(), tmp, "int8", tokenizer)
    files = info.files("int8")
    engines = {}
    for name, head in full.items():
        layout = graph_layout({name: head.spec})  # embeddings, layers 1..N, its branch: sessions of its own
        runner = OnnxRunner({name: head.spec}, cfg, {g["name"]: open_session(tmp / files[g["name"]]) for g in layout},
                            layout, "int8")
        runner.warm_up()
        engines[name] = runner_engine(runner)
    return separate_engine(engines)


def build_engines(options: dict, engine, skip_separate: bool, tmp: Path) -> dict:
    import torch

    from centra.core.merge import read_manifest
    from centra.runtime.bench import full_depth_model, runner_engine, standalone_engine
    from centra.runtime.verify import reference_layers

    model, tokenizer, cfg = engine.model, engine.tokenizer, engine.model.cfg
    manifest = read_manifest(options["folder"])
    engines = {}
    separate: dict = {}
    if not skip_separate:
        embeddings, layers, _ = reference_layers(engine)
        if len(layers) < cfg.num_layers:
            raise CentraError(f"bench: the separate models need all {cfg.num_layers} backbone layers; found "
                              f"{len(layers)}: give --skip-separate")
        separate = {name: full_depth_model(embeddings, layers, head) for name, head in model.heads.items()}
        engines["separate_torch_fp32"] = standalone_engine(separate)
        engines["separate_onnx_int8"] = separate_onnx(cfg, dict(model.heads), embeddings, layers, tokenizer,
                                                      tmp / "separate")
    onnx = merged_onnx(options["folder"], manifest, model, tokenizer, tmp / "merged")
    engines.update({"merged_torch_fp32": runner_engine(model), "merged_onnx_fp32": runner_engine(onnx["fp32"]),
                    "merged_onnx_int8": runner_engine(onnx["int8"])})
    if torch.cuda.is_available():
        engines.update(gpu_engines(options, engine, separate, tmp))
    return engines


def gpu_engines(options: dict, engine, separate: dict, tmp: Path) -> dict:
    """On a CUDA GPU: PyTorch fp32 and fp16 (autocast), separate and merged; TensorRT fp16 and int8 plans of
    the merged graph (built into tmp, int8 calibrated on the bench's texts) when tensorrt is importable."""
    import copy
    import importlib.util

    from centra.progress import progress_line
    from centra.runtime.bench import autocast_engine, runner_engine, standalone_engine

    engines = {}
    if separate:
        on_gpu = standalone_engine({n: copy.deepcopy(m).to("cuda") for n, m in separate.items()}, "cuda")
        engines |= {"separate_torch_cuda_fp32": on_gpu, "separate_torch_cuda_fp16": autocast_engine(on_gpu)}
    merged = runner_engine(copy.deepcopy(engine.model).to("cuda"), "cuda")
    engines |= {"merged_torch_cuda_fp32": merged, "merged_torch_cuda_fp16": autocast_engine(merged)}
    if importlib.util.find_spec("tensorrt") is None:
        progress_line("bench: tensorrt is not installed: no TensorRT rows")
        return engines
    from centra.export.tensorrt import build_tensorrt
    from centra.runtime.tensorrt import TensorRTRunner

    calibration = (options["texts"][:512], options["pairs"][:512])
    for precision in ("fp16", "int8"):
        folder = tmp / f"tensorrt-{precision}"
        info = build_tensorrt(engine.model, engine.tokenizer, folder, precision, calibration,
                              max_batch=max(options["batches"]))  # the bench never measures slicing
        engines[f"merged_tensorrt_{precision}"] = runner_engine(TensorRTRunner.load(folder, info, engine.model))
    return engines


def cmd_bench(args: argparse.Namespace) -> int:
    options = check_options(args)

    import torch

    from centra.progress import progress_bar, progress_line
    from centra.runtime.bench import LENGTHS, fixed_width, make_batches, measure
    from centra.runtime.engine import Engine

    progress_line(f"bench: loading {options['folder']}")
    engine = Engine.load(options["folder"], engine="torch")
    manifest = engine.manifest
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="centra-bench-") as tmp:
        engines = build_engines(options, engine, args.skip_separate, Path(tmp))
        configs = [(lengths, batch) for lengths in LENGTHS for batch in options["batches"]]
        for lengths, batch in progress_bar(configs, desc="bench"):
            batches = make_batches(engine.tokenizer, engine.model.cfg, engine.specs, options["texts"],
                                   options["pairs"], batch, lengths)
            for result in measure(engines, batches, lengths, options["seconds"], options["repeats"]):
                results.append(result)
                progress_line(f"bench: {lengths:<9} batch {batch:>3} {result.engine:<24} "
                              f"{result.sequences_per_s:10.1f} seq/s, p50 {result.p50_ms:.2f} ms, "
                              f"p99 {result.p99_ms:.2f} ms")
    load_after = os.getloadavg()[0]
    names = manifest.task_names
    print(f"model {manifest.version} ({options['folder']}): {len(names)} tasks ({', '.join(names)}) on "
          f"{manifest.backbone.id}; overhead {manifest.overhead_layers} layers per sequence vs "
          f"{manifest.single_task_layers} as separate {manifest.backbone.num_layers}-layer models")
    fixed = max(fixed_width(spec.max_length) for spec in engine.specs.values())
    print(f"texts: {options['source']}; fixed: every batch padded to {fixed} tokens; tokenisation not timed; "
          f"{torch.get_num_threads()} torch/ORT threads; load average {load_before:.2f} before, {load_after:.2f} "
          "after")
    print(table(results))
    figures = summary(results, names, manifest)
    for line in ratio_lines(figures) + disturbed_lines(results):
        print(line)
    title = f"{len(names)} tasks, {manifest.backbone.id}, {torch.get_num_threads()} threads"
    if options["plot"] is not None and write_plot(options["plot"], results, title, fixed):
        print(f"plot: {options['plot']}")
    print(json.dumps(figures))
    return 0


def table(results: list) -> str:
    base = {(r.lengths, r.batch): r.sequences_per_s for r in results if r.engine == "separate_torch_fp32"}
    rows = [("lengths", "batch", "engine", "seq/s", "p50 ms", "p99 ms", "vs separate_torch_fp32")]
    for r in results:
        ref = base.get((r.lengths, r.batch))
        rows.append((r.lengths, str(r.batch), r.engine, f"{r.sequences_per_s:,.1f}", f"{r.p50_ms:.2f}",
                     f"{r.p99_ms:.2f}", f"{r.sequences_per_s / ref:.2f}x" if ref else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 3, 4, 5, 6}
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in rows)


def summary(results: list, names: list[str], manifest: Manifest) -> dict:
    """The JSON line: sequences/s of each engine at the largest batch, realistic lengths; tasks; overhead."""
    largest = max(r.batch for r in results)
    figures: dict = {name: None for name in ENGINES}
    for r in results:
        if r.batch == largest and r.lengths == "realistic":
            figures[r.engine] = round(r.sequences_per_s, 2)
    return {**figures, "batch": largest, "tasks": names, "overhead_layers": manifest.overhead_layers,
            "single_task_layers": manifest.single_task_layers}


def ratio_lines(figures: dict) -> list[str]:
    merged = figures.get("merged_onnx_int8")
    parts = [f"{merged / figures[b]:.2f}x {b}" for b in BASELINES if merged and figures.get(b)]
    return [f"merged_onnx_int8 at batch {figures['batch']}, realistic lengths: {', '.join(parts)}"] if parts else []


def disturbed_lines(results: list, factor: float = DISTURBED) -> list[str]:
    """A note naming the measurements whose p99 is above `factor` x their p50: stalls that batch lengths do
    not explain (on a shared machine: other jobs on its cores), so their seq/s understate the engine."""
    hit = [f"{r.lengths}/{r.batch}/{r.engine}" for r in results if r.p99_ms > factor * r.p50_ms]
    return [f"note: p99 > {factor:g}x p50 in {', '.join(hit)}: stalled by other load on the machine; their "
            "seq/s understate those engines (rerun on an idle machine)"] if hit else []


def write_plot(path: Path, results: list, title: str, fixed: int) -> bool:
    """Sequences/s per engine, batch size and length setting (log scale), as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("centra: note: matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    from centra.runtime.bench import LENGTHS

    engines = list(dict.fromkeys(r.engine for r in results))
    batches = sorted({r.batch for r in results})
    value = {(r.engine, r.batch, r.lengths): r.sequences_per_s for r in results}
    fig, axes = plt.subplots(1, len(LENGTHS), figsize=(6 * len(LENGTHS), 4.8), sharey=True)
    width = 0.8 / len(engines)
    for ax, lengths in zip(axes, LENGTHS):
        for i, engine in enumerate(engines):
            xs = [j + i * width for j in range(len(batches))]
            ax.bar(xs, [value.get((engine, b, lengths), 0.0) for b in batches], width, label=engine)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_title("realistic lengths (dynamic padding)" if lengths == "realistic" else f"fixed length {fixed}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("sequences/s (every task per sequence)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"centra bench: {title}")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def add_parsers(sub, common) -> None:
    from centra.cli import positive_int

    p = sub.add_parser("bench", parents=[common],
                       help="sequences/s and latency of the merged model vs each task as its own full-depth model")
    p.add_argument("--model", required=True, help="merged model folder (read only: exports go to a temp folder)")
    p.add_argument("--batch", type=positive_int, action="append",
                   help="sequences per batch (repeatable; default: 1 and 32)")
    p.add_argument("--texts", help="texts, one per line; 'text<TAB>second text' lines feed the pair tasks "
                   "(default: SST-2 dev sentences + MRPC dev pairs, else sample texts)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=positive_float,
                     help=f"whole passes over the texts until this many seconds per engine, for each batch size and "
                     f"length setting (default "
                     f"{DEFAULT_SECONDS:g})")
    how.add_argument("--repeats", type=positive_int,
                     help="exactly this many passes over the texts per engine, batch size and length setting")
    p.add_argument("--plot", help="write a PNG plot of sequences/s here (needs matplotlib)")
    p.add_argument("--skip-separate", action="store_true", help="measure only the merged model")
    p.set_defaults(func=cmd_bench, batch=None)
