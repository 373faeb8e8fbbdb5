"""The engine bench's engines: each a callable batch -> {task: logits (batch, num_outputs)}.

`runner_engine` runs a merged graph (one trunk pass per token group, every branch on every row);
`separate_engine` and `standalone_engine` run one model per task. `full_depth_model` is that baseline: a
task served as its own fine-tuned model, i.e. embeddings + all N backbone layers (its own copies) + the
task's pooler and classifier. `build_engines` makes every engine `centra bench` measures (measure/bench.py):
- separate_torch_fp32: per task, its full-depth model in torch fp32: what serving each task as its own
  fine-tuned model costs today;
- separate_onnx_int8: those models exported and int8-quantized by centra's own exporter (parity with
  torch and int8 label agreement checked at export), in a temporary folder: the strong baseline;
- merged_torch_fp32, merged_onnx_fp32, merged_onnx_int8: the merged graph (the ONNX graphs of the model
  when its manifest has both precisions, else exported into a temporary folder; the model is never written);
- with a CUDA GPU: torch fp32 and fp16 (autocast) on it, separate and merged, and when tensorrt is
  importable merged_tensorrt_fp16 / _int8 (plans built into a temporary folder, int8 calibrated on the
  bench's texts).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from centra.core.backbone import EncoderLayer
from centra.core.graph import StandaloneModel
from centra.core.overhead import token_groups
from centra.core.task import TaskHead
from centra.errors import FieldError, Name
from centra.measure.bench_batches import Batch, BenchEngine, Tensors

if TYPE_CHECKING:
    from centra.core.manifest import Manifest
    from centra.runtime.engine import Engine


def _to(tensors: Tensors, device: str | None) -> Tensors:
    return tensors if device is None else tuple(t.to(device) for t in tensors)  # type: ignore[return-value]


def runner_engine(runner, device: str | None = None) -> BenchEngine:
    """A merged graph (MergedModel or any Runner: forward_rows): per token group one call, every task of
    the group on every row."""
    tasks = {group.key: group.tasks for group in token_groups(runner.specs.values())}

    @torch.inference_mode()
    def run(batch: Batch) -> dict[str, torch.Tensor]:
        rows = torch.arange(batch.size)
        out: dict[str, torch.Tensor] = {}
        for key, tensors in batch.groups.items():
            names = tasks.get(key, ())
            if names:
                out.update(runner.forward_rows(*_to(tensors, device), {name: rows for name in names}))
        return out if device is None else {k: v.cpu() for k, v in out.items()}  # .cpu(): waits for the GPU

    return run


def separate_engine(engines: dict[str, BenchEngine]) -> BenchEngine:
    """One engine per task (each a model of its own), run one after the other on the batch."""

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for engine in engines.values():
            out.update(engine(batch))
        return out

    return run


def full_depth_head(head: TaskHead, num_layers: int) -> TaskHead:
    """The task's pooler and classifier (copied) over the last of `num_layers` layers, no task layers."""
    spec = replace(head.spec, attach_layer=num_layers, task_layers=0)
    full = TaskHead(spec, head.cfg)
    full.pooler.load_state_dict(head.pooler.state_dict())
    full.classifier.load_state_dict(head.classifier.state_dict())
    return full.eval().requires_grad_(False)


def full_depth_model(embeddings: nn.Module, layers: list[EncoderLayer], head: TaskHead) -> StandaloneModel:
    """The task as its own model of the full backbone depth: copies of the embeddings and of all layers
    (its own weights, as a separately fine-tuned model holds), then the task's pooler and classifier."""
    model = StandaloneModel(copy.deepcopy(embeddings), [copy.deepcopy(layer) for layer in layers],
                            full_depth_head(head, len(layers)))
    return model.eval().requires_grad_(False)


def standalone_engine(models: dict[str, StandaloneModel], device: str | None = None) -> BenchEngine:
    """Separate torch models, one per task, each run on its task's token group."""

    @torch.inference_mode()
    def run(batch: Batch) -> dict[str, torch.Tensor]:
        out = {name: model(*_to(batch.groups[model.head.spec.encoding_key], device)) for name, model in models.items()}
        return out if device is None else {k: v.cpu() for k, v in out.items()}

    return run


def autocast_engine(engine: BenchEngine) -> BenchEngine:
    """A CUDA engine run under torch.autocast fp16 (PyTorch's mixed precision: matmuls and attention in
    half precision, reductions in fp32)."""

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.float16):
            return {k: v.float() for k, v in engine(batch).items()}

    return run


def build_engines(engine: Engine, folder: Path, manifest: Manifest, tmp: Path, skip_separate: bool,
                  calibration: tuple[list[str], list[tuple[str, str]]], max_batch: int) -> dict[str, BenchEngine]:
    """The bench engines by name: separate (torch, ONNX int8) unless skipped, merged (torch, ONNX fp32 and
    int8), and on a CUDA GPU the GPU engines; exports go to `tmp`."""
    from centra.runtime.verify import reference_layers

    model, tokenizer, cfg = engine.model, engine.tokenizer, engine.model.cfg
    engines = {}
    separate: dict = {}
    if not skip_separate:
        embeddings, layers, _ = reference_layers(engine)
        if len(layers) < cfg.num_layers:
            raise FieldError(f"bench: the separate models need all {cfg.num_layers} backbone layers; found "
                             f"{len(layers)}: give ", Name("skip_separate"))
        separate = {name: full_depth_model(embeddings, layers, head) for name, head in model.heads.items()}
        engines["separate_torch_fp32"] = standalone_engine(separate)
        engines["separate_onnx_int8"] = separate_onnx(cfg, dict(model.heads), embeddings, layers, tokenizer,
                                                      tmp / "separate")
    onnx = merged_onnx(folder, manifest, model, tokenizer, tmp / "merged")
    engines.update({"merged_torch_fp32": runner_engine(model), "merged_onnx_fp32": runner_engine(onnx["fp32"]),
                    "merged_onnx_int8": runner_engine(onnx["int8"])})
    if torch.cuda.is_available():
        engines.update(gpu_engines(engine, separate, tmp, calibration, max_batch))
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


def separate_onnx(cfg, heads: dict, embeddings, layers: list, tokenizer, tmp: Path) -> BenchEngine:
    """Each task's full-depth model exported and quantized (one export of all of them, checked as
    centra checks any export), then loaded as its own sessions: one model per task."""
    from centra.core.graph import MergedModel
    from centra.export.onnx import export_onnx
    from centra.progress import progress_line
    from centra.runtime.onnx import OnnxRunner, open_session

    progress_line(f"bench: exporting {len(heads)} separate {len(layers)}-layer models to {tmp} (fp32 + int8)")
    full = {name: full_depth_head(head, len(layers)) for name, head in heads.items()}
    info = export_onnx(MergedModel(cfg, embeddings, nn.ModuleList(layers), full).eval(), tmp, "int8", tokenizer)
    # each task's layout (embeddings, layers 1..N, its branch) as sessions of its own
    return separate_engine({name: runner_engine(OnnxRunner.open(tmp, info, "int8", open_session, {name: head.spec},
                                                                cfg, "int8"))
                            for name, head in full.items()})


def gpu_engines(engine: Engine, separate: dict, tmp: Path, calibration: tuple[list[str], list[tuple[str, str]]],
                max_batch: int) -> dict[str, BenchEngine]:
    """On a CUDA GPU: PyTorch fp32 and fp16 (autocast), separate and merged; TensorRT fp16 and int8 plans of
    the merged graph (built into tmp, int8 calibrated on `calibration`) when tensorrt is importable."""
    import importlib.util

    from centra.progress import progress_line

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

    for precision in ("fp16", "int8"):
        folder = tmp / f"tensorrt-{precision}"
        info = build_tensorrt(engine.model, engine.tokenizer, folder, precision, calibration,
                              max_batch=max_batch)  # the bench never measures slicing
        engines[f"merged_tensorrt_{precision}"] = runner_engine(TensorRTRunner.load(folder, info, engine.model))
    return engines
