"""TensorRT plans of a merged model (GPU), built from standard-op ONNX graphs and checked at build time.

`centra merge --engine tensorrt --precision fp32|fp16|int8` runs on the GPU that will serve:

1. the "portable" ONNX graphs of the layout (centra.export.onnx: standard ops, since TensorRT has no
   ONNX Runtime contrib ops), checked against PyTorch at 1e-4 like every export;
2. per precision, the graphs TensorRT builds from. TensorRT builds strongly typed networks (the only
   kind from TensorRT 11 on), so the precision is in the graph: fp16 graphs are the same modules exported
   in half precision (fp32 in and out, fp16 inside); int8 graphs are the fp32 graphs with QuantizeLinear /
   DequantizeLinear pairs (ONNX Runtime's static QDQ quantization: symmetric int8, weights per channel,
   activation ranges calibrated on real hidden states of calibration texts: min/max, which kept every
   demo task within the check where clipping at the 99.999th percentile failed it on STS-B; biases stay
   fp32 and every consumer gets its own pair, see qdq_graph);
   both are checked on ONNX Runtime against PyTorch before any build (label agreement, as int8 is; ORT's
   CPU provider computes many fp16 nodes in fp32, so this catches a broken graph and fp16 weight
   rounding, and the check after the build is the one that sees TensorRT's half-precision arithmetic);
3. one plan per graph (the TensorRT Python API: OnnxParser, one optimization profile over batch 1 ..
   --max-batch and sequence 1 .. the longest max_length of the tasks, TF32 off so fp32 means fp32);
4. the plans run behind the engine interface (centra.runtime.tensorrt) and checked against PyTorch fp32
   on the sample inputs: fp32 within FP32_TOLERANCE, fp16 and int8 by the int8 check's relative error and
   agreement (fp16 with a tighter error bound). Any failure refuses the merge; nothing is published.

The graphs and plans land in the staged version (onnx/, tensorrt/) and are hashed with it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from centra.core.graph import MergedModel
from centra.core.manifest import EngineInfo, Manifest
from centra.core.overhead import token_groups
from centra.core.task import max_positions
from centra.core.tokens import encode
from centra.errors import CentraError, FieldError, Name
from centra.progress import progress_bar, progress_line
from centra.runtime.engine import Engine
from centra.runtime.graphs import graph_layout
from centra.runtime.tensorrt import (
    ENGINE_NAME,
    PRECISIONS,
    Plan,
    TensorRTRunner,
    clear_errors,
    gpu_description,
    import_tensorrt,
    last_error,
    trt_logger,
)

if TYPE_CHECKING:
    from centra.runtime.onnx import OnnxRunner

TRT_DIR = "tensorrt"
DEFAULT_MAX_BATCH = 64
OPT_BATCH = 32
OPT_LENGTH = 64  # realistic texts are shorter than max_length: the profile's tuned-for length
WORKSPACE_BYTES = 4 << 30
FP32_TOLERANCE = 1e-3  # max |TensorRT fp32 - PyTorch| of any logit (kernels differ from PyTorch's; TF32 off)
FP16_MAX_RELATIVE_ERROR = 0.05  # mean |fp16 - fp32| over fp32's logit size: half precision keeps ~3 digits
CALIBRATION_BATCH = 16


class HalfGraph(nn.Module):
    """A graph module in half precision with fp32 in and out, so graphs of any precision chain alike."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if first.is_floating_point():
            first = first.half()
        return self.module(first, second).float()


def profile_shapes(graph: dict, hidden_size: int, max_batch: int, max_length: int) -> dict[str, tuple]:
    """(min, opt, max) shape per input of one graph: batch 1..max_batch, sequence 1..max_length."""
    opt_batch, opt_length = min(OPT_BATCH, max_batch), min(OPT_LENGTH, max_length)
    if graph["kind"] == "embeddings":
        two = ((1, 1), (opt_batch, opt_length), (max_batch, max_length))
        return {"input_ids": two, "token_type_ids": two}
    return {"hidden": ((1, 1, hidden_size), (opt_batch, opt_length, hidden_size), (max_batch, max_length, hidden_size)),
            "attention_mask": ((1, 1), (opt_batch, opt_length), (max_batch, max_length))}


def build_plan(trt, onnx_path: Path, plan_path: Path, shapes: dict[str, tuple]) -> None:
    """Parse one ONNX graph and write its serialized engine (strongly typed, one optimization profile)."""
    logger = trt_logger(trt)
    clear_errors()  # a failure below reports its own message, never an earlier build's
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TensorRT 9-10; always on from 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors and errors[0] else "no detail"
        raise CentraError(f"{onnx_path.name}: TensorRT cannot parse the graph ({first})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise CentraError(f"{onnx_path.name}: input {name!r} has no optimization profile")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CentraError(f"{onnx_path.name}: TensorRT could not build an engine ({last_error()})")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))


def calibration_batches(model: MergedModel, tokenizer, texts: list[str], pairs: list[tuple[str, str]]) -> dict:
    """Per token group (by TokenGroup.key): padded batches (ids, mask, types) of the calibration texts
    (the pairs for pair tasks). Every batch of every group has one shape (ONNX Runtime's calibrators
    stack what they collect, and a trunk segment sees every group): CALIBRATION_BATCH rows
    (fewer when there are fewer texts; a remainder is left out), padded to the longest row of all."""
    encoded = {}
    for group in token_groups(model.specs.values()):
        if group.input == "pair":
            if not pairs:
                raise CentraError(f"int8 calibration: task {group.tasks[0]!r} takes text pairs and no pairs were "
                                  "given")
            encoded[group.key] = encode(tokenizer, model.cfg.type_vocab_size, [a for a, _ in pairs],
                                        [b for _, b in pairs], group.max_length)
        else:
            if not texts:
                raise CentraError("int8 calibration: no calibration texts were given")
            encoded[group.key] = encode(tokenizer, model.cfg.type_vocab_size, texts, None, group.max_length)
    size = min(CALIBRATION_BATCH, *(len(enc.input_ids) for enc in encoded.values()))
    width = max(len(ids) for enc in encoded.values() for ids in enc.input_ids)
    pad = tokenizer.pad_token_id or 0
    return {key: [enc.batch(list(range(i, i + size)), pad, width)
                  for i in range(0, len(enc.input_ids) - size + 1, size)] for key, enc in encoded.items()}


def calibration_feeds(model: MergedModel, batches: dict, graph: dict, states: dict | None = None) -> list[dict]:
    """One graph's inputs on every calibration batch, computed by PyTorch (fp32): what its activation
    ranges are calibrated on. `states`: reference_states per token group, when already computed (one
    trunk pass per batch serves every graph)."""
    from centra.export.onnx import reference_states

    if states is None:
        states = {key: reference_states(model, group) for key, group in batches.items()}
    if graph["kind"] == "embeddings":
        return [{"input_ids": ids.numpy(), "token_type_ids": types.numpy()}
                for group in batches.values() for ids, _, types in group]
    keys = list(batches) if graph["kind"] == "segment" else [model.specs[graph["task"]].encoding_key]
    layer = graph["first"] - 1 if graph["kind"] == "segment" else model.specs[graph["task"]].attach_layer
    feeds = []
    for key in keys:
        feeds += [{"hidden": s[layer].numpy(), "attention_mask": mask.numpy()}
                  for s, (_, mask, _) in zip(states[key], batches[key])]
    return feeds


def qdq_graph(src: Path, dest: Path, feeds: list[dict]) -> bool:
    """src with QuantizeLinear / DequantizeLinear around every weight MatMul / Gemm, activation ranges
    from `feeds`; False (nothing written) when src has none (the embeddings).

    Laid out for TensorRT's ONNX parser, by setting rather than by the exporter's shape:
    - biases stay fp32 (QuantizeBias off). ONNX Runtime's default quantizes a Gemm's bias to int32 behind
      a DequantizeLinear, which TensorRT refuses (its DequantizeLinear reads INT8, FP8 or INT4 only:
      onnx-tensorrt docs/operators.md, TensorRT 10; the parse error of onnx-tensorrt #850 and onnxruntime
      #17738). The exporter writes Gemm without its bias today, but another exporter version need not.
    - every quantized reader (each GEMM) of an activation gets its own Q/DQ pair (DedicatedQDQPair): ONNX
      Runtime's quantizer (quantization/qdq_quantizer.py) notes that TensorRT does not take a pair shared
      between nodes (Q, K and V read one hidden state), and NVIDIA's QDQ BERT quantizes each GEMM's input
      separately. Nothing in TensorRT 10's documentation says shared pairs are now fine, and no GPU was
      at hand to try, so the safe layout is written (the pairs of one tensor carry one scale; TensorRT
      fuses each into its GEMM). ONNX Runtime then rewires only the quantized readers, so the attention
      block's residual Add reads the fp32 hidden state, not its int8 rounding: closer to fp32 (a tiny
      random layer's mean error 0.0064, was 0.0099 with shared pairs)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(src))
    weights = {init.name for init in model.graph.initializer}
    if not any(n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input) for n in model.graph.node):
        return False
    del model.graph.value_info[:]  # as in centra.export.int8.quantize_graph

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="centra-qdq-") as tmp:
            onnx.save(model, str(Path(tmp) / src.name))
            quantize_static(str(Path(tmp) / src.name), str(dest), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           # weight products only (not Q.K^T nor softmax.V), inputs only
                                           # (not the outputs, the logits among them)
                                           "MatMulConstBOnly": True,
                                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                                           "QuantizeBias": False, "DedicatedQDQPair": True})
    except Exception as exc:  # the quantizer raises plain Exceptions
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CentraError(f"{src}: int8 QDQ quantization failed ({first})") from None
    finally:
        quiet.setLevel(level)
    return True


def half_graph(model: MergedModel, graph: dict, path: Path) -> None:
    """The graph's module exported in half precision (fp32 in and out)."""
    from centra.export.onnx import example_inputs, export_graph, graph_module

    module, names, output = graph_module(model, graph)
    ids, mask, types = example_inputs(model.cfg)
    with torch.inference_mode():
        hidden = model.embeddings(ids, types)
    example = (ids, types) if graph["kind"] == "embeddings" else (hidden, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_graph(HalfGraph(module).eval(), example, path, names, output)


def precision_graphs(model: MergedModel, tokenizer, folder: Path, info: EngineInfo, precision: str,
                     calibration: tuple[list[str], list[tuple[str, str]]],
                     progress: bool) -> tuple[dict[str, str], dict, OnnxRunner | None]:
    """Per graph, the ONNX file TensorRT builds from (relative to folder), checked on ONNX Runtime
    against PyTorch fp32 (fp16 and int8: by check_precision on the sample inputs), the checks' reports
    by precision and the checked graphs on ONNX Runtime (none of either for fp32, the graphs as exported)."""
    from centra.export.int8 import check_precision
    from centra.runtime.onnx import OnnxRunner, open_session

    sources = info.files("fp32")
    if precision == "fp32":
        return sources, {}, None
    from centra.export.onnx import reference_states

    batches = calibration_batches(model, tokenizer, *calibration) if precision == "int8" else {}
    states = {key: reference_states(model, group) for key, group in batches.items()}
    for graph in progress_bar(graph_layout(model.specs), desc=f"ONNX {precision} for TensorRT", enabled=progress):
        rel = f"onnx/{precision}-qdq/{graph['name']}.onnx" if precision == "int8" else \
            f"onnx/fp16/{graph['name']}.onnx"
        if precision == "int8":
            feeds = calibration_feeds(model, batches, graph, states)
            if qdq_graph(folder / sources[graph["name"]], folder / rel, feeds):
                sources[graph["name"]] = rel
        else:
            half_graph(model, graph, folder / rel)
            sources[graph["name"]] = rel
    layout = graph_layout(model.specs)
    runner = OnnxRunner(model.specs, model.cfg, {n: open_session(folder / rel) for n, rel in sources.items()}, layout,
                        precision, model)
    fp32 = Engine(model, tokenizer, batch_size=8)
    bounds = {"max_relative_error": FP16_MAX_RELATIVE_ERROR} if precision == "fp16" else {}
    report = check_precision(fp32, Engine(runner, tokenizer, batch_size=8), f"ONNX {precision}", **bounds)
    progress_line(f"tensorrt: {precision} ONNX graphs agree with PyTorch fp32 on ONNX Runtime", progress)
    return sources, {precision: report}, runner


def build_tensorrt(model: MergedModel, tokenizer, folder: Path, precision: str,
                   calibration: tuple[list[str], list[tuple[str, str]]] | None = None,
                   max_batch: int = DEFAULT_MAX_BATCH, progress: bool = True) -> EngineInfo:
    """Portable ONNX graphs, the precision's graphs and one plan per graph into folder; the plans
    checked behind the engine interface; return the manifest's engine field."""
    from centra.export.int8 import check_precision
    from centra.export.onnx import export_onnx

    if precision not in PRECISIONS:
        raise CentraError(f"unknown TensorRT precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if max_batch < 1:
        raise FieldError(Name("max_batch"), f" must be at least 1 (got {max_batch})")
    if precision == "int8" and not calibration:
        raise FieldError("TensorRT int8 needs calibration texts (", Name("calibration"), ": a file of a few hundred "
                         "dev texts, one per line); the sample texts are what the build is checked on")
    trt = import_tensorrt()
    folder = Path(folder)
    onnx_info = export_onnx(model, folder, "fp32", progress=progress, style="portable")
    sources, onnx_checks, _ = precision_graphs(model, tokenizer, folder, onnx_info, precision, calibration, progress)
    max_length = min(max(s.max_length for s in model.specs.values()), max_positions(model.cfg))
    layout = graph_layout(model.specs)
    graphs = []
    for graph in progress_bar(layout, desc=f"TensorRT {precision} build", enabled=progress):
        shapes = profile_shapes(graph, model.cfg.hidden_size, max_batch, max_length)
        plan = f"{TRT_DIR}/{precision}/{graph['name']}.plan"
        build_plan(trt, folder / sources[graph["name"]], folder / plan, shapes)
        graphs.append({**graph, "onnx": sources[graph["name"]], "plan": plan})
    device = torch.device("cuda", torch.cuda.current_device())
    runtime = trt.Runtime(trt_logger(trt))
    runner = TensorRTRunner(model.specs, model.cfg, {g["name"]: Plan(trt, runtime, folder / g["plan"], device)
                                                     for g in graphs}, layout, precision, model, device)
    runner.warm_up()
    fp32 = Engine(model, tokenizer, batch_size=8)
    bounds = {"fp32": {"max_abs_diff": FP32_TOLERANCE}, "fp16": {"max_relative_error": FP16_MAX_RELATIVE_ERROR},
              "int8": {}}[precision]
    check = check_precision(fp32, Engine(runner, tokenizer, batch_size=8), f"TensorRT {precision}", **bounds)
    progress_line(f"tensorrt: {precision} plans agree with PyTorch fp32 on the sample inputs", progress)
    name, capability = gpu_description(device)  # what TensorRTRunner.load compares with the serving GPU
    return EngineInfo(ENGINE_NAME, precision, tuple(graphs), tensorrt=trt.__version__, device=name,
                      compute_capability=capability,
                      calibrated_on=len(calibration[0]) + len(calibration[1]) if precision == "int8" else None,
                      max_batch=max_batch, max_length=max_length, onnx_parity=onnx_info.parity,
                      onnx_checks=onnx_checks, check=check)


def tensorrt_extender(precision: str = "fp16", calibration: tuple | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                      progress: bool = True) -> Callable[[Path, Manifest], EngineInfo]:
    """write_merged's `extend`: build the staged version's plans and return the manifest's engine field."""
    from centra.core.backbone import load_tokenizer
    from centra.export.onnx import load_staged

    if precision not in PRECISIONS:
        raise CentraError(f"unknown TensorRT precision {precision!r} (known: {', '.join(PRECISIONS)})")
    import_tensorrt()  # before any work: a machine without TensorRT or a GPU is told at once

    def extend(stage: Path, manifest: Manifest) -> EngineInfo:
        model = load_staged(stage, manifest)
        return build_tensorrt(model, load_tokenizer(stage / "tokenizer"), stage, precision, calibration, max_batch,
                              progress)

    return extend
