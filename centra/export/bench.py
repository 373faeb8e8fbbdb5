"""`centra bench`'s work: the merged graph against each task served as its own full-depth model, same texts.

Engines (every one on the same pre-tokenised batches; centra.runtime.bench measures):
- separate_torch_fp32: per task, embeddings + all N backbone layers + its pooler and classifier, torch
  fp32: what serving each task as its own fine-tuned model costs today;
- separate_onnx_int8: those models exported and int8-quantized by centra's own exporter (parity with
  torch and int8 label agreement checked at export), in a temporary folder: the strong baseline;
- merged_torch_fp32, merged_onnx_fp32, merged_onnx_int8: the merged graph (the ONNX graphs of the model
  when its manifest has both precisions, else exported into a temporary folder; the model is never written);
- with a CUDA GPU: torch fp32 and fp16 (autocast) on it, separate and merged, and when tensorrt is
  importable merged_tensorrt_fp16 / _int8 (plans built into a temporary folder, int8 calibrated on the
  bench's texts).

It lives in the export layer because it exports. `bench_job` checks everything before a model loads;
`run_bench` measures. torch is imported inside the functions: the CLI reads the constants at start-up.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from centra.errors import CentraError, FieldError, Name

if TYPE_CHECKING:
    from centra.core.manifest import Manifest
    from centra.core.texts import Sequences
    from centra.runtime.engine import Engine

ENGINES = ("separate_torch_fp32", "separate_onnx_int8", "merged_torch_fp32", "merged_onnx_fp32", "merged_onnx_int8")
BASELINES = ("separate_torch_fp32", "separate_onnx_int8")
DEFAULT_BATCHES = (1, 32)
DEFAULT_SECONDS = 3.0


@dataclass(frozen=True)
class BenchOptions:
    """Batch sizes; whole passes over the texts for `seconds` per engine or exactly `repeats` passes (neither:
    DEFAULT_SECONDS); whether to measure the separate models too."""

    batches: tuple[int, ...] = DEFAULT_BATCHES
    seconds: float | None = None
    repeats: int | None = None
    skip_separate: bool = False

    def check(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise FieldError(Name("batch"), f" sizes must be >= 1, not {list(self.batches)}")
        if self.seconds is not None and not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise FieldError(Name("seconds"), f" must be a finite number > 0, not {self.seconds}")
        if self.repeats is not None and self.repeats < 1:
            raise FieldError(Name("repeats"), f" must be >= 1, not {self.repeats}")
        if self.seconds is not None and self.repeats is not None:
            raise FieldError("give ", Name("seconds"), " or ", Name("repeats"), ", not both")

    @property
    def timing(self) -> tuple[float | None, int | None]:
        """(seconds, repeats) as runtime.bench.measure takes them."""
        return (None, self.repeats) if self.repeats else (self.seconds or DEFAULT_SECONDS, None)


@dataclass
class BenchJob:
    """A checked bench: the version folder, its manifest, one sequence per text (cycled up to the largest
    batch) and where the texts came from."""

    folder: Path
    manifest: Manifest
    texts: list[str]
    pairs: list[tuple[str, str]]
    source: str
    options: BenchOptions


@dataclass
class BenchReport:
    job: BenchJob
    results: list  # runtime.bench.Result, in the order measured
    fixed: int  # tokens every batch of the "fixed" setting is padded to
    threads: int
    load_before: float
    load_after: float

    def figures(self) -> dict:
        """The JSON line: sequences/s of each engine at the largest batch, realistic lengths; tasks; overhead."""
        largest = max(r.batch for r in self.results)
        figures: dict = {name: None for name in ENGINES}
        for r in self.results:
            if r.batch == largest and r.lengths == "realistic":
                figures[r.engine] = round(r.sequences_per_s, 2)
        manifest = self.job.manifest
        return {**figures, "batch": largest, "tasks": manifest.task_names, "overhead_layers": manifest.overhead_layers,
                "single_task_layers": manifest.single_task_layers}


def bench_job(model: Path, texts: Path | Sequences, options: BenchOptions) -> BenchJob:
    """Every option, the texts (a texts file: one per line, text<TAB>second text for pair tasks; or
    Sequences) and the model folder checked before anything loads."""
    from centra.core.texts import read_sequences_file
    from centra.core.versions import model_folder, read_manifest

    options.check()
    options = replace(options, batches=tuple(sorted(set(options.batches))))
    folder = model_folder(Path(model))
    manifest = read_manifest(folder)
    inputs = {t.input for t in manifest.tasks}
    if isinstance(texts, (str, Path)):
        found, pairs = read_sequences_file(Path(texts))
        if "pair" in inputs and not pairs:
            raise CentraError(f"{texts}: the model's pair tasks need text pairs: give lines "
                              "'text<TAB>second text'")
        source = f"{texts} ({len(found)} texts, {len(pairs)} pairs)"
    else:
        found, pairs = texts.texts, texts.pairs
        source = " + ".join(s for kind, s in (("single", texts.text_source), ("pair", texts.pair_source))
                            if kind in inputs)
    counts = ([len(found)] if "single" in inputs else []) + ([len(pairs)] if "pair" in inputs else [])
    n = max(min(counts), *options.batches)  # one sequence per text; cycled when fewer than the largest batch
    found, pairs = [found[i % len(found)] for i in range(n)], [pairs[i % len(pairs)] for i in range(n)] if pairs else []
    bb = manifest.backbone
    if not options.skip_separate and manifest.trunk_depth < bb.num_layers and not (bb.path and Path(bb.path).is_dir()):
        raise FieldError(f"bench: the separate models need all {bb.num_layers} layers of backbone {bb.id!r}, but its "
                         f"folder {bb.path} is gone and the merged trunk has {manifest.trunk_depth}: give ",
                         Name("skip_separate"))
    return BenchJob(folder, manifest, found, pairs, f"{n} sequences: {source}", options)


def run_bench(job: BenchJob, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Every engine on the same batches, for each length setting and batch size; exports go to a temporary
    folder. `progress` gets a line per measurement."""
    import torch

    from centra.progress import progress_bar, progress_line
    from centra.runtime.bench import LENGTHS, fixed_width, make_batches, measure
    from centra.runtime.engine import Engine

    say = progress or (lambda line: progress_line(f"bench: {line}"))
    say(f"loading {job.folder}")
    engine = Engine.load(job.folder, engine="torch")
    seconds, repeats = job.options.timing
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="centra-bench-") as tmp:
        engines = build_engines(job, engine, Path(tmp))
        configs = [(lengths, batch) for lengths in LENGTHS for batch in job.options.batches]
        for lengths, batch in progress_bar(configs, desc="bench"):
            batches = make_batches(engine.tokenizer, engine.model.cfg, engine.specs, job.texts, job.pairs, batch,
                                   lengths)
            for result in measure(engines, batches, lengths, seconds, repeats):
                results.append(result)
                say(f"{lengths:<9} batch {batch:>3} {result.engine:<24} {result.sequences_per_s:10.1f} seq/s, p50 "
                    f"{result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")
    fixed = max(fixed_width(spec.max_length) for spec in engine.specs.values())
    return BenchReport(job, results, fixed, torch.get_num_threads(), load_before, os.getloadavg()[0])


def build_engines(job: BenchJob, engine: Engine, tmp: Path) -> dict:
    """The bench engines by name: separate (torch, ONNX int8) unless skipped, merged (torch, ONNX fp32 and
    int8), and on a CUDA GPU the GPU engines."""
    import torch

    from centra.runtime.bench import full_depth_model, runner_engine, standalone_engine
    from centra.runtime.verify import reference_layers

    model, tokenizer, cfg = engine.model, engine.tokenizer, engine.model.cfg
    engines = {}
    separate: dict = {}
    if not job.options.skip_separate:
        embeddings, layers, _ = reference_layers(engine)
        if len(layers) < cfg.num_layers:
            raise FieldError(f"bench: the separate models need all {cfg.num_layers} backbone layers; found "
                             f"{len(layers)}: give ", Name("skip_separate"))
        separate = {name: full_depth_model(embeddings, layers, head) for name, head in model.heads.items()}
        engines["separate_torch_fp32"] = standalone_engine(separate)
        engines["separate_onnx_int8"] = separate_onnx(cfg, dict(model.heads), embeddings, layers, tokenizer,
                                                      tmp / "separate")
    onnx = merged_onnx(job.folder, job.manifest, model, tokenizer, tmp / "merged")
    engines.update({"merged_torch_fp32": runner_engine(model), "merged_onnx_fp32": runner_engine(onnx["fp32"]),
                    "merged_onnx_int8": runner_engine(onnx["int8"])})
    if torch.cuda.is_available():
        engines.update(gpu_engines(job, engine, separate, tmp))
    return engines


def merged_onnx(folder: Path, manifest: Manifest, model, tokenizer, tmp: Path) -> dict:
    """OnnxRunners (fp32, int8) of the merged graph: the version's graphs when it has both, else exported to tmp."""
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
    from centra.runtime.onnx import OnnxRunner, open_session

    progress_line(f"bench: exporting {len(heads)} separate {len(layers)}-layer models to {tmp} (fp32 + int8)")
    full = {name: full_depth_head(head, len(layers)) for name, head in heads.items()}
    info = export_onnx(MergedModel(cfg, embeddings, nn.ModuleList(layers), full).eval(), tmp, "int8", tokenizer)
    # each task's layout (embeddings, layers 1..N, its branch) as sessions of its own
    return separate_engine({name: runner_engine(OnnxRunner.open(tmp, info, "int8", open_session, {name: head.spec},
                                                                cfg, "int8"))
                            for name, head in full.items()})


def gpu_engines(job: BenchJob, engine: Engine, separate: dict, tmp: Path) -> dict:
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

    calibration = (job.texts[:512], job.pairs[:512])
    for precision in ("fp16", "int8"):
        folder = tmp / f"tensorrt-{precision}"
        info = build_tensorrt(engine.model, engine.tokenizer, folder, precision, calibration,
                              max_batch=max(job.options.batches))  # the bench never measures slicing
        engines[f"merged_tensorrt_{precision}"] = runner_engine(TensorRTRunner.load(folder, info, engine.model))
    return engines
