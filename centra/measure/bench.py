"""`centra bench`'s work: the merged graph against each task served as its own full-depth model, same texts.

This module drives; the helpers below it do one thing each: measure/bench_engines.py builds the engines
(its docstring lists them: separate torch and ONNX int8, merged torch and ONNX, on a GPU torch fp16 and
TensorRT), measure/bench_batches.py cuts the texts into pre-tokenised batches and times the engines on them.
`bench_job` checks everything before a model loads; `run_bench` loads the model, builds the engines (exports
go to a temporary folder) and times them for each length setting and batch size; `BenchReport` gives the
figures and the lines `centra bench` prints. torch is imported inside the functions: the CLI reads the
constants at start-up.
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

ENGINES = ("separate_torch_fp32", "separate_onnx_int8", "merged_torch_fp32", "merged_onnx_fp32", "merged_onnx_int8")
BASELINES = ("separate_torch_fp32", "separate_onnx_int8")
DEFAULT_BATCHES = (1, 32)
DEFAULT_SECONDS = 3.0
DISTURBED = 5.0  # p99 / p50 above which a measurement is flagged as stalled (see `disturbed_lines`)


@dataclass(frozen=True)
class EngineBenchOptions:
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
        """(seconds, repeats) as bench_engines.measure takes them."""
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
    options: EngineBenchOptions


@dataclass
class BenchReport:
    job: BenchJob
    results: list  # bench_engines.Result, in the order measured
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

    def lines(self) -> list[str]:
        """What `centra bench` prints before its plot and JSON line: the model, the setting, the table, the
        ratios and a note on stalled measurements."""
        job, manifest = self.job, self.job.manifest
        names = manifest.task_names
        return [f"model {manifest.version} ({job.folder}): {len(names)} tasks ({', '.join(names)}) on "
                f"{manifest.backbone.id}; overhead {manifest.overhead_layers} layers per sequence vs "
                f"{manifest.single_task_layers} as separate {manifest.backbone.num_layers}-layer models",
                f"texts: {job.source}; fixed: every batch padded to {self.fixed} tokens; tokenisation not timed; "
                f"{self.threads} torch/ORT threads; load average {self.load_before:.2f} before, "
                f"{self.load_after:.2f} after",
                results_table(self.results), *ratio_lines(self.figures()), *disturbed_lines(self.results)]


def bench_job(model: Path, texts: Path | Sequences, options: EngineBenchOptions) -> BenchJob:
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

    from centra.measure.bench_batches import LENGTHS, fixed_width, make_batches, time_engines
    from centra.measure.bench_engines import build_engines
    from centra.progress import progress_bar, progress_line
    from centra.runtime.engine import Engine

    say = progress or (lambda line: progress_line(f"bench: {line}"))
    say(f"loading {job.folder}")
    engine = Engine.load(job.folder, engine="torch")
    seconds, repeats = job.options.timing
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="centra-bench-") as tmp:
        engines = build_engines(engine, job.folder, job.manifest, Path(tmp), job.options.skip_separate,
                                (job.texts[:512], job.pairs[:512]), max(job.options.batches))
        configs = [(lengths, batch) for lengths in LENGTHS for batch in job.options.batches]
        for lengths, batch in progress_bar(configs, desc="bench"):
            batches = make_batches(engine.tokenizer, engine.model.cfg, engine.specs, job.texts, job.pairs, batch,
                                   lengths)
            for result in time_engines(engines, batches, lengths, seconds, repeats):
                results.append(result)
                say(f"{lengths:<9} batch {batch:>3} {result.engine:<24} {result.sequences_per_s:10.1f} seq/s, p50 "
                    f"{result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")
    fixed = max(fixed_width(spec.max_length) for spec in engine.specs.values())
    return BenchReport(job, results, fixed, torch.get_num_threads(), load_before, os.getloadavg()[0])


def results_table(results: list) -> str:
    from centra.core.table import table

    base = {(r.lengths, r.batch): r.sequences_per_s for r in results if r.engine == "separate_torch_fp32"}
    rows = [("lengths", "batch", "engine", "seq/s", "p50 ms", "p99 ms", "vs separate_torch_fp32")]
    for r in results:
        ref = base.get((r.lengths, r.batch))
        rows.append((r.lengths, str(r.batch), r.engine, f"{r.sequences_per_s:,.1f}", f"{r.p50_ms:.2f}",
                     f"{r.p99_ms:.2f}", f"{r.sequences_per_s / ref:.2f}x" if ref else "-"))
    return table(rows, right=(1, 3, 4, 5, 6))


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
