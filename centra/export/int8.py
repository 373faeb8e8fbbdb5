"""int8: dynamic quantization of the exported graphs, checked by label agreement with fp32.

Weights of every MatMul, Gemm and Attention with a weight initializer (every linear layer, pooler and
classifier included) become int8 (QInt8, per output channel); activations are quantized per call. The
embedding tables (Gather) and the attention products (activation x activation) stay fp32. Static int8
(calibrated activation scales, QDQ or QOperator) was measured slower on ONNX Runtime's CPU provider: on 6
all-MiniLM-L6-v2 layers at 32 x 40 tokens, 2 cores, 154 ms (QDQ) and 192 ms (QOperator) against 60 ms
dynamic and about 140 ms fp32, so centra quantizes dynamically.

A user may keep named groups of nodes in fp32 (`int8_fp32`, `centra merge --int8-fp32 GROUP`; the groups
are FP32_NODES): the quantizer leaves them float MatMuls. The choice is part of the graphs' reuse key
(`quantizer_identity`) and of the check's report (`check_settings`), so a version says what ran and never
reuses int8 graphs made with another choice.

int8 cannot match fp32 to 1e-4, so the check bounds the error and looks at what a user sees, the answers.
On sample inputs (centra.runtime.verify's texts and pairs, both ways round: 16 inputs) each task's int8
logits must stay within MAX_RELATIVE_ERROR of fp32's (mean |int8 - fp32| over the root mean square of
fp32's logits), and, when fp32 decides at least MIN_DECIDED answers clearly, int8 must give the same
answer on at least MIN_AGREEMENT of them; else the export is refused. The agreement on all samples and
the largest logit difference are reported per task either way.
Weights are quantized per channel: on all-MiniLM-L6-v2's tasks it agreed with fp32 on 97-99.6% of GLUE
dev inputs where per-tensor weights agreed on 88-99%.

`add_int8` is the export's int8 stage: it quantizes the fp32 graphs that are new in a version and checks
the tasks they serve; a task whose graphs were all reused keeps its earlier check, found by its check key
(`check_keys`) in the versions kept (centra.export.reuse).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from centra.core import check_int8_fp32
from centra.core.answers import labels_agree, threshold_logits
from centra.core.graph import MergedModel
from centra.core.manifest import EngineInfo
from centra.core.task import TaskSpec
from centra.errors import CentraError
from centra.export.fused import fusions, sum_fusions
from centra.export.reuse import GraphCache, digest, graph_path, sub_layout, tasks_through
from centra.io import sha256_file
from centra.progress import progress_bar
from centra.runtime.engine import Engine
from centra.runtime.onnx import ONNX_DIR, OnnxRunner, open_session
from centra.runtime.verify import SAMPLE_PAIRS, SAMPLE_TEXTS

# A sample where fp32 itself hesitates (top two logits closer than DECIDED_MARGIN; a sigmoid label
# within it of its threshold's logit) can flip under any rounding: measured on all-MiniLM-L6-v2's MRPC
# task, 3 of the 16 samples had fp32 margins of 0.01-0.23 and flipped, while int8 agreed with fp32 on 99%
# of MRPC dev. Such flips are reported but do not count against the floor; on the decided samples int8
# must agree on at least MIN_AGREEMENT (a broken quantization agrees on about half).
MIN_AGREEMENT = 0.9
# logits (softmax 0.62 vs 0.38 between the top two classes): above int8's largest logit error on the
# demo's four tasks (0.05-0.35), and low enough that a hesitant task (CoLA's: 8 of 16) keeps samples
DECIDED_MARGIN = 0.5
# Always, whatever fp32 decides: the int8 logits' mean error must stay below this share of the size (root
# mean square) of fp32's logits over the samples. A broken export (e.g. a sign flip: 200%) is far above.
MAX_RELATIVE_ERROR = 0.25
# Fewer decided answers than this and the agreement floor would rest on too little: it is not applied,
# and the relative error bound alone decides.
MIN_DECIDED = 8
PER_CHANNEL = True
# Attention: the fused graphs' (centra.export.fused) -> QAttention; Gemm: the exporter's 2-D pooler and classifier
QUANTIZED_OPS = ["MatMul", "Gemm", "Attention"]
# The node groups int8_fp32 may keep in fp32, by the node names centra.export.fused writes (per layer
# "layerN." in trunk segments and task branches alike). "ffn-out": each layer's FFN output projection (fc2,
# the MatMul from the intermediate size back to hidden). On multilingual-e5-small (its weights 4-bit,
# dequantised) all-int8 lost 0.5-1.6 test macro-F1 points against fp32; with ffn-out in fp32 it scored 64.43
# and 58.41 against fp32's 64.63 and 58.8 (all-int8: 63.96, 57.17), while the int8 engine lost 10-20% of
# its throughput: a user's choice, off by default.
# centra.core.INT8_FP32 names the groups where the CLI can read them without importing this module.
FP32_NODES = {"ffn-out": re.compile(r"layer\d+\.fc2")}


def fp32_nodes(graph, groups: Sequence[str]) -> list[str]:
    """The names of the nodes of an ONNX graph that `groups` keep in fp32."""
    patterns = [FP32_NODES[g] for g in check_int8_fp32(groups)]
    return [n.name for n in graph.node if any(p.fullmatch(n.name) for p in patterns)]


def quantize_graph(src: Path, dest: Path, per_channel: bool = PER_CHANNEL, int8_fp32: Sequence[str] = ()) -> bool:
    """Write src's dynamically quantized copy to dest, the nodes of the groups `int8_fp32` left in fp32;
    False (nothing written) when src has no weight MatMul or Gemm to quantize besides those (the
    embeddings graph), so the fp32 graph serves as its own int8 version."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    weights = {init.name for init in model.graph.initializer}
    kept = set(fp32_nodes(model.graph, int8_fp32))
    if not any(n.op_type in QUANTIZED_OPS and n.name not in kept and any(i in weights for i in n.input)
               for n in model.graph.node):
        return False
    # The exporter's value_info (shapes it recorded, initializers included) trips the quantizer's second
    # shape inference ("inferred shape and existing shape differ"): quantize a copy without it.
    del model.graph.value_info[:]
    dest.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs advice (pre-processing) through the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="centra-int8-") as tmp:
            onnx.save(model, str(Path(tmp) / src.name))
            quantize_dynamic(str(Path(tmp) / src.name), str(dest), weight_type=QuantType.QInt8,
                             per_channel=per_channel, op_types_to_quantize=QUANTIZED_OPS,
                             nodes_to_exclude=sorted(kept),
                             # com.microsoft ops have no shape inference: their outputs are float
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    except Exception as exc:  # the quantizer raises plain Exceptions on graphs it cannot handle
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CentraError(f"{src}: int8 quantization failed ({first})") from None
    finally:
        quiet.setLevel(level)
    return True


def decided(spec: TaskSpec, ref: torch.Tensor, margin: float = DECIDED_MARGIN) -> torch.Tensor:
    """Per answer: is fp32's answer clear of its decision boundary by `margin` logits (always, for
    regression)? Rows for multiclass and regression; (row, label) pairs for multilabel."""
    if spec.kind == "multiclass":
        top = ref.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1] >= margin
    if spec.kind == "multilabel":
        return ((ref - threshold_logits(spec)).abs() >= margin).flatten()
    return torch.ones(ref.shape[0], dtype=torch.bool)


def answers_agree(spec: TaskSpec, ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Like labels_agree, but per (row, label) for multilabel: the unit `decided` counts."""
    if spec.kind == "multilabel":
        cut = threshold_logits(spec)
        return ((ref >= cut) == (got >= cut)).flatten()
    return labels_agree(spec, ref, got)


def sample_inputs() -> tuple[list[str], list[str]]:
    return SAMPLE_TEXTS + SAMPLE_PAIRS, SAMPLE_PAIRS + SAMPLE_TEXTS


def check_int8(fp32: Engine, int8: Engine, min_agreement: float | None = None,
               tasks: list[str] | None = None, int8_fp32: Sequence[str] = ()) -> dict:
    """Per task (`tasks`, default fp32's) on the sample inputs: label agreement of int8 with fp32 (on all
    samples, and on those fp32 decides clearly) and max |int8 - fp32| of the logits; a one-line
    CentraError when the agreement on the decided samples is below min_agreement. The report names the
    node groups the int8 graphs kept in fp32 (`int8_fp32`)."""
    return check_precision(fp32, int8, "int8", min_agreement=min_agreement,
                           refusal="refusing the int8 export (export fp32 instead)", tasks=tasks,
                           int8_fp32=check_int8_fp32(int8_fp32))


def check_precision(fp32: Engine, other: Engine, label: str, min_agreement: float | None = None,
                    max_relative_error: float | None = None, max_abs_diff: float | None = None,
                    refusal: str = "refusing the export", tasks: list[str] | None = None,
                    int8_fp32: tuple[str, ...] | None = None) -> dict:
    """check_int8's check of any engine against the fp32 reference: the relative error bound (None:
    MAX_RELATIVE_ERROR), the agreement floor on decided answers (None: MIN_AGREEMENT) and, when given, a
    bound on max |other - fp32| of any logit. `int8_fp32` (ONNX int8 only) goes into the report's
    settings (check_settings)."""
    settings = check_settings(min_agreement, max_relative_error, max_abs_diff, int8_fp32)  # the bounds resolved
    min_agreement, max_relative_error = settings["min_agreement"], settings["max_relative_error"]
    texts, pairs = sample_inputs()
    names = list(tasks or fp32.specs)
    ref, got = fp32.logits(texts, pairs, names), other.logits(texts, pairs, names)
    report = {}
    for name in names:
        spec, r, g = fp32.branches[name], ref[name].double(), got[name].double()
        same, clear = labels_agree(spec, r, g), decided(spec, r)
        units = answers_agree(spec, r, g)
        relative = ((r - g).abs().mean() / r.pow(2).mean().sqrt().clamp(min=1e-6)).item()
        report[name] = {"agreement": round(same.float().mean().item(), 4),
                        "decided": int(clear.sum()),
                        "decided_agreement": round(units[clear].float().mean().item(), 4) if clear.any() else None,
                        "max_abs_diff": float(f"{(r - g).abs().max().item():.3e}"),
                        "relative_error": round(relative, 4)}
    for name, r in report.items():
        problem = None
        if r["relative_error"] > max_relative_error:
            problem = f"a mean error of {r['relative_error']:.0%} of fp32's logit size (> {max_relative_error:.0%})"
        elif max_abs_diff is not None and r["max_abs_diff"] > max_abs_diff:
            problem = f"a logit differing from fp32 by {r['max_abs_diff']:.2e} (> {max_abs_diff:g})"
        elif r["decided"] >= MIN_DECIDED and r["decided_agreement"] < min_agreement:
            problem = (f"agreement with fp32 on only {r['decided_agreement']:.0%} of the {r['decided']} answers fp32 "
                       f"decides clearly (< {min_agreement:.0%})")
        if problem:
            raise CentraError(f"{label} graphs of task {name!r}: {problem}; max |{label} - fp32| "
                              f"{r['max_abs_diff']:.2e}: {refusal}")
    return {**settings, "tasks": report}


def check_settings(min_agreement: float | None = None, max_relative_error: float | None = None,
                   max_abs_diff: float | None = None, int8_fp32: Sequence[str] | None = None) -> dict:
    """What a check's report says it was made with (its floors and bounds, the samples, the weights; for
    ONNX int8, `int8_fp32`: the node groups its graphs kept in fp32, [] for none)."""
    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    max_relative_error = MAX_RELATIVE_ERROR if max_relative_error is None else max_relative_error
    settings = {"min_agreement": min_agreement, "decided_margin": DECIDED_MARGIN, "min_decided": MIN_DECIDED,
                "max_relative_error": max_relative_error, "max_abs_diff": max_abs_diff,
                "samples": len(sample_inputs()[0]), "per_channel": PER_CHANNEL}
    if int8_fp32 is not None:
        settings["int8_fp32"] = list(check_int8_fp32(int8_fp32))
    return settings


def quantizer_identity(int8_fp32: Sequence[str] = ()) -> dict:
    """What an int8 graph's bytes depend on besides its fp32 graph (its reuse key, centra.export.reuse),
    the node groups kept in fp32 included. Named only when there are some: the all-int8 key stays the one
    earlier versions recorded, so their graphs are still reused."""
    import onnx
    import onnxruntime

    identity = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "per_channel": PER_CHANNEL,
                "ops": sorted(QUANTIZED_OPS), "weights": "QInt8 dynamic"}
    groups = check_int8_fp32(int8_fp32)
    return {**identity, "fp32_nodes": list(groups)} if groups else identity


def check_keys(layout: list[dict], keys: dict[str, dict[str, str]], specs: dict[str, TaskSpec],
               folder: Path, int8_fp32: Sequence[str] = ()) -> dict[str, str]:
    """Per task, the key of its int8 check: the int8 keys of the graphs its rows run through, the spec
    fields the check reads (kind, labels, thresholds, max_labels, input, max_length), the check's own
    settings (the node groups kept in fp32 named only when there are some, as in quantizer_identity) and
    samples, and the tokenizer's files (folder/tokenizer, when there). Equal keys, equal check: it carries
    over."""
    tokenizer = folder / "tokenizer"
    tokens = sorted((p.name, sha256_file(p)) for p in tokenizer.iterdir() if p.is_file()) if tokenizer.is_dir() else []
    groups = check_int8_fp32(int8_fp32)
    common = {"settings": check_settings(int8_fp32=groups or None), "samples": digest(sample_inputs()),
              "tokenizer": tokens}
    found = {}
    for name, spec in specs.items():
        fields = {"kind": spec.kind, "labels": list(spec.labels), "thresholds": spec.thresholds,
                  "max_labels": spec.max_labels, "input": spec.input, "max_length": spec.max_length}
        found[name] = digest({"graphs": [keys[g]["int8"] for g in graph_path(layout, spec)], "spec": fields,
                              **common})
    return found


def add_int8(folder: Path, info: EngineInfo, model: MergedModel, fp32: Engine, progress: bool = True, *,
             specs: dict[str, TaskSpec] | None = None, fresh: set[str] | None = None,
             cache: GraphCache | None = None, paths: dict[str, str] | None = None,
             todo: list[str] | None = None, int8_fp32: Sequence[str] = ()) -> EngineInfo:
    """Quantize the fp32 graphs of `info` (those in `fresh`; default all; the node groups `int8_fp32` left
    in fp32) into folder/onnx/int8 and check the tasks `todo` (default: those whose graphs are new)
    against the fp32 engine (check_int8, refusing below its floor); the other tasks' checks carry over from
    `cache` by their check keys (`paths`: check_keys). Return `info` with the int8 files, the check's
    report and the per-graph fusions."""
    specs = specs or model.specs
    int8_fp32 = check_int8_fp32(int8_fp32)
    fresh = {g["name"] for g in info.graphs} if fresh is None else fresh
    paths = paths or {}
    graphs = []
    for graph in progress_bar([g for g in info.graphs], desc="quantize int8", enabled=progress and bool(fresh)):
        if graph["name"] not in fresh:
            graphs.append(graph)
            continue
        rel = f"{ONNX_DIR}/int8/{graph['name']}.onnx"
        quantized = quantize_graph(folder / graph["fp32"], folder / rel, int8_fp32=int8_fp32)
        graph = {**graph, "int8": rel if quantized else graph["fp32"]}
        if graph["int8"] == graph["fp32"]:  # nothing to quantize (the embeddings, or all kept in fp32): the
            # fp32 graph serves as int8
            rel = f"{ONNX_DIR}/int8/{graph['name']}.onnx"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(folder / graph["fp32"], folder / rel)
            graph["int8"] = rel
        graph["fusions"] = {**(graph.get("fusions") or {}), "int8": fusions(folder / graph["int8"])}
        graphs.append(graph)
    info = replace(info, graphs=tuple(graphs))
    layout = [{k: g[k] for k in ("name", "kind", "first", "last", "task") if k in g} for g in graphs]
    todo = tasks_through(layout, specs, fresh) if todo is None else todo
    report = {**check_settings(int8_fp32=int8_fp32), "tasks": {}}
    if todo:
        sub = sub_layout(layout, todo)
        int8 = OnnxRunner.open(folder, info, "int8", open_session, {t: specs[t] for t in todo}, model.cfg, "int8",
                               model, layout=sub)
        report = check_int8(fp32, Engine(int8, fp32.tokenizer, batch_size=fp32.batch_size), tasks=todo,
                            int8_fp32=int8_fp32)
    carried = {t: (cache.checks.get(paths[t]) if cache is not None and t in paths else None) for t in specs
               if t not in todo}
    lost = [t for t, entry in carried.items() if entry is None]
    if lost:  # export_onnx puts every task without a carried check in todo: a caller that did not
        raise CentraError(f"int8 graphs of task {lost[0]!r}: reused without their check")
    tasks = {**report["tasks"], **carried}
    for t in tasks:
        if t in paths:
            tasks[t] = {**tasks[t], "path_key": paths[t]}
    info = replace(info, int8={**report, "tasks": {t: tasks[t] for t in specs}})
    return replace(info, fusions=sum_fusions(info.graphs))
