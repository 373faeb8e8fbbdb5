"""ONNX export of a merged model, in the layout of centra.runtime.graphs.graph_layout, with parity checks.

Each graph (embeddings; trunk layers between consecutive attach layers; one per task branch) has dynamic
batch and sequence axes. The embeddings are exported with `torch.onnx.export(..., dynamo=True)`; the
layer stacks are written in ONNX Runtime's fused operators (style "fused", centra.export.fused: the
exporter's attention is not fused by ORT) or exported too (style "portable": standard ops only, for
runtimes other than ONNX Runtime). Each graph is checked against PyTorch right away, before the next one
is written: padded batches of mixed lengths (batch 1, 3 and 8; none the shape of the export's example, so
fixed shapes would show) through the ONNX Runtime session the engine uses. Then the composed engine
(OnnxRunner) is checked against MergedModel on the same batches, each task asked for by a different
subset of rows. Any difference above FP32_TOLERANCE refuses the export with one line naming the graph.
int8 graphs are checked by label agreement (centra.export.int8).

`onnx_extender` is `write_merged`'s hook: the graphs land in the staged version's onnx/ folder and are
hashed and published with the torch files, in the same atomic step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from centra.core.backbone import Embeddings, EncoderConfig, EncoderLayer, attention_bias, check_state, load_safetensors
from centra.core.graph import MergedModel
from centra.core.manifest import EngineInfo, Manifest
from centra.core.merge import TRUNK_FILE
from centra.core.task import TaskSpec, load_task, max_positions
from centra.errors import CentraError
from centra.progress import progress_bar, progress_line
from centra.runtime.engine import Engine
from centra.runtime.graphs import graph_layout
from centra.runtime.onnx import ENGINE_NAME, PRECISIONS, OnnxRunner, open_session

if TYPE_CHECKING:
    from centra.export.reuse import GraphCache

FP32_TOLERANCE = 1e-4  # max |onnx - torch| of any graph's output (hidden states or logits), fp32
OPSET = 20
ONNX_DIR = "onnx"
PARITY_SHAPES = ((1, 7), (3, 19), (8, None))  # (batch, length); None: the longest max_length of the tasks
STYLES = ("fused", "portable")
EXAMPLE_SHAPE = (2, 8)  # the export's example: 1 would be specialised, so it is not used
# Op types ONNX Runtime's optimiser fuses patterns into (or the exporter emits whole), counted by `fusions`.
FUSED_OPS = ("Attention", "MultiHeadAttention", "QAttention", "EmbedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Gelu",
             "FastGelu", "BiasGelu", "QuickGelu", "BiasSoftmax", "FusedMatMul", "FusedGemm", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear")


class EmbeddingsGraph(nn.Module):
    def __init__(self, embeddings: Embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids, token_type_ids)


class SegmentGraph(nn.Module):
    """Trunk layers first..last; the additive attention bias is computed inside from the 0/1 mask."""

    def __init__(self, layers: list[EncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bias = attention_bias(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return hidden


class BranchGraph(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, attention_bias(attention_mask, hidden.dtype), attention_mask)


def graph_module(model: MergedModel, graph: dict) -> tuple[nn.Module, tuple[str, str], str]:
    """The torch module of one graph of the layout, its input names and its output name."""
    if graph["kind"] == "embeddings":
        return EmbeddingsGraph(model.embeddings), ("input_ids", "token_type_ids"), "hidden"
    if graph["kind"] == "segment":
        return SegmentGraph(list(model.trunk[graph["first"] - 1: graph["last"]])), ("hidden", "attention_mask"), \
            "hidden_out"  # an output may not share its input's name
    return BranchGraph(model.heads[graph["task"]]), ("hidden", "attention_mask"), "logits"


def export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: tuple[str, str],
                 output_name: str) -> None:
    """torch.onnx.export (dynamo) with dynamic batch and sequence axes on every input, weights inside the
    file (one file per graph, well under ONNX's 2 GB)."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = tuple({0: batch, 1: sequence} for _ in example)
    path.parent.mkdir(parents=True, exist_ok=True)
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.__trace")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)  # the exporter logs optional-dependency notes on every call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example, str(path), dynamo=True, external_data=False, verbose=False,
                              opset_version=OPSET, input_names=list(input_names), output_names=[output_name],
                              dynamic_shapes=dynamic)
    except Exception as exc:  # the exporter raises many types; one line for the user, --debug for the rest
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CentraError(f"{path.stem}: ONNX export failed ({type(exc).__name__}: {first})") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def parity_batches(model: MergedModel, specs: dict[str, TaskSpec] | None = None,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Padded batches of mixed lengths (input_ids, attention_mask, token_type_ids), random real tokens:
    the first row of each batch full length (the longest max_length of `specs`, default the model's
    tasks), the others shorter; odd rows carry a second segment."""
    cfg = model.cfg
    longest = min(max((s.max_length for s in (specs or model.specs).values()), default=32), max_positions(cfg))
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for batch, length in PARITY_SHAPES:
        length = min(length or longest, longest)
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
        ids[ids == cfg.pad_token_id] = (cfg.pad_token_id + 1) % cfg.vocab_size
        mask = torch.ones(batch, length, dtype=torch.long)
        types = torch.zeros(batch, length, dtype=torch.long)
        for row in range(1, batch):
            n = int(torch.randint(2, length + 1, (1,), generator=gen))
            mask[row, n:] = 0
            if row % 2 and cfg.type_vocab_size > 1:
                types[row, n // 2: n] = 1
        ids[mask == 0] = cfg.pad_token_id
        batches.append((ids, mask, types))
    return batches


def example_inputs(cfg: EncoderConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The export's example batch: EXAMPLE_SHAPE, the second row padded."""
    batch, length = EXAMPLE_SHAPE
    ids = torch.full((batch, length), (cfg.pad_token_id + 1) % cfg.vocab_size, dtype=torch.long)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, length // 2:] = 0
    ids[mask == 0] = cfg.pad_token_id
    return ids, mask, torch.zeros(batch, length, dtype=torch.long)


@torch.inference_mode()
def reference_states(model: MergedModel, batches: list) -> list[dict[int, torch.Tensor]]:
    """Per batch, PyTorch's hidden state at layer 0 (embeddings) .. the trunk's depth."""
    states = []
    for ids, mask, types in batches:
        bias = attention_bias(mask)
        hidden = {0: model.embeddings(ids, types)}
        for k, layer in enumerate(model.trunk, start=1):
            hidden[k] = layer(hidden[k - 1], bias)
        states.append(hidden)
    return states


@torch.inference_mode()
def graph_parity(model: MergedModel, graph: dict, session, batches: list, states: list) -> float:
    """max |onnx - torch| of one graph's output over the parity batches."""
    worst = 0.0
    for (ids, mask, types), hidden in zip(batches, states):
        if graph["kind"] == "embeddings":
            feeds, expected = {"input_ids": ids.numpy(), "token_type_ids": types.numpy()}, hidden[0]
        elif graph["kind"] == "segment":
            feeds, expected = {"hidden": hidden[graph["first"] - 1].numpy(), "attention_mask": mask.numpy()}, \
                hidden[graph["last"]]
        else:
            k = model.specs[graph["task"]].attach_layer
            feeds = {"hidden": hidden[k].numpy(), "attention_mask": mask.numpy()}
            expected = model.heads[graph["task"]](hidden[k], attention_bias(mask), mask)
        try:
            got = torch.from_numpy(session.run(None, feeds)[0])
        except Exception as exc:  # e.g. a shape fixed at export: ORT refuses any other
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CentraError(f"ONNX graph {graph['name']!r} fails on a {ids.shape[0]} x {ids.shape[1]} batch "
                              f"({first}): refusing the export; nothing was published") from None
        if got.shape != expected.shape:
            return float("inf")
        worst = max(worst, (got - expected).abs().max().item())
    return worst


@torch.inference_mode()
def composed_parity(model: MergedModel, runner: OnnxRunner, batches: list, seed: int = 0) -> float:
    """max |OnnxRunner - MergedModel| of forward_rows, every task on all rows, then on random row subsets
    (so branches run on row subsets and rows leave the trunk early)."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for ids, mask, types in batches:
        n = ids.shape[0]
        subsets = {name: torch.arange(n) for name in model.specs}
        picked = {name: torch.nonzero(torch.rand(n, generator=gen) < 0.5).flatten() for name in model.specs}
        for wants in (subsets, {k: v if len(v) else torch.tensor([n - 1]) for k, v in picked.items()}):
            expected = model.forward_rows(ids, mask, types, wants)
            got = runner.forward_rows(ids, mask, types, wants)
            for name, value in expected.items():
                if got[name].shape != value.shape:
                    return float("inf")
                worst = max(worst, (got[name] - value).abs().max().item())
    return worst


def refuse(name: str, diff: float, tolerance: float) -> CentraError:
    return CentraError(f"ONNX graph {name!r} differs from PyTorch by {diff:.3e} (max |onnx - torch| on padded "
                       f"batches, tolerance {tolerance:g}): refusing the export; nothing was published")


def export_onnx(model: MergedModel, folder: Path, precision: str = "fp32", tokenizer=None,
                tolerance: float = FP32_TOLERANCE, progress: bool = True, style: str = "fused", *,
                specs: dict[str, TaskSpec] | None = None, cache: GraphCache | None = None,
                heads: Callable[[str], nn.Module] | None = None, keep_fp32: bool = True) -> EngineInfo:
    """Export every graph of `specs`' layout (default: the model's tasks) into folder/onnx/fp32 (and
    onnx/int8), each checked as it is written; return the manifest's engine field (file paths relative
    to folder). With `cache`, a graph whose keys an earlier version holds is linked, not exported, and
    the heads of the tasks whose graphs are new are the only ones used: `model`'s, else `heads(name)`.
    `keep_fp32=False` (int8): the fp32 graphs are checked, quantized and deleted; the version holds the
    int8 graphs it serves."""
    from centra.export.fused import write_fused
    from centra.export.reuse import exporter_identity, graph_keys, quantizer_identity

    if precision not in PRECISIONS:
        raise CentraError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if style not in STYLES:
        raise CentraError(f"unknown ONNX graph style {style!r} (known: {', '.join(STYLES)})")
    if precision == "int8" and tokenizer is None:
        raise CentraError("the int8 check needs the model's tokenizer")
    folder, specs = Path(folder), specs or model.specs
    layout = graph_layout(specs)
    needed = ("fp32",) if precision == "fp32" else ("fp32", "int8") if keep_fp32 else ("int8",)
    identity = exporter_identity(style, OPSET)
    quantizer = quantizer_identity() if precision == "int8" else None
    fingerprint = next(iter(specs.values())).backbone["fingerprint"] if specs else ""
    keys = {g["name"]: graph_keys(g, specs, fingerprint, model.cfg.to_dict(), identity, quantizer) for g in layout}
    entries, fresh = reuse_graphs(layout, keys, needed, folder, cache)
    todo = tasks_through(layout, specs, fresh)
    paths = check_keys(layout, keys, specs, folder) if precision == "int8" else {}
    # a task whose graphs were all reused but whose int8 check no earlier version made for these exact
    # inputs (its spec changed; an old head with a new neighbour) is checked again
    todo += [t for t in specs if t not in todo and paths and (cache is None or paths[t] not in cache.checks)]
    if set(model.heads) != set(todo):  # the torch model of the tasks whose graphs are new, and only theirs
        missing = [t for t in todo if t not in model.heads and heads is None]
        if missing:
            raise CentraError(f"ONNX export: task {missing[0]!r} has new graphs but no head was given")
        model = MergedModel(model.cfg, model.embeddings, model.trunk,
                            {t: model.heads[t] if t in model.heads else heads(t) for t in todo}).eval()
    batches = parity_batches(model, specs)
    states = reference_states(model, batches)
    ids, mask, types = example_inputs(model.cfg)
    with torch.inference_mode():
        hidden = model.embeddings(ids, types)
    for graph in progress_bar([g for g in layout if g["name"] in fresh], desc="export ONNX", enabled=progress):
        module, names, output = graph_module(model, graph)
        rel = f"{ONNX_DIR}/fp32/{graph['name']}.onnx"
        if graph["kind"] == "embeddings" or style == "portable":
            inputs = (ids, types) if graph["kind"] == "embeddings" else (hidden, mask)
            export_graph(module, inputs, folder / rel, names, output)
        else:
            write_fused(module, model.cfg, folder / rel, graph["name"])
        diff = graph_parity(model, graph, open_session(folder / rel), batches, states)
        if not diff <= tolerance:
            raise refuse(graph["name"], diff, tolerance)
        entry = entries[graph["name"]]
        entry.update(fp32=rel, parity=float(f"{diff:.3e}"), fusions={"fp32": fusions(folder / rel)})
        progress_line(f"onnx: {graph['name']} exported, max |onnx - torch| {diff:.1e}", progress)
    parity = {name: e["parity"] for name, e in entries.items() if e.get("parity") is not None}
    sub = sub_layout(layout, todo)
    if todo and all(entries[g["name"]].get("fp32") for g in sub):  # the composed engine on the tasks checked
        runner = OnnxRunner({t: specs[t] for t in todo}, model.cfg,
                            {g["name"]: open_session(folder / entries[g["name"]]["fp32"]) for g in sub}, sub, "fp32",
                            model)
        diff = composed_parity(model, runner, batches)
        if not diff <= tolerance:
            raise refuse("composed (OnnxRunner.forward_rows)", diff, tolerance)
        parity["composed"] = float(f"{diff:.3e}")
    exporter = f"torch {torch.__version__} dynamo" + (" (embeddings); layer stacks written by centra.export.fused"
                                                       if style == "fused" else "")
    info = EngineInfo(ENGINE_NAME, precision, tuple(entries.values()), opset=OPSET, exporter=exporter, style=style,
                      tolerance=tolerance, parity=parity)
    if precision == "int8":
        info = add_int8(folder, info, model, Engine(model, tokenizer, batch_size=8), progress, specs=specs,
                        fresh=fresh, cache=cache, paths=paths, todo=todo)
    if not keep_fp32:  # the version holds the graphs it serves
        graphs = []
        for graph in info.graphs:
            graph = dict(graph)
            if "fp32" in graph:
                (folder / graph.pop("fp32")).unlink()
            graph["fusions"] = {k: v for k, v in (graph.get("fusions") or {}).items() if k != "fp32"}
            graphs.append(graph)
        with contextlib.suppress(OSError):
            (folder / ONNX_DIR / "fp32").rmdir()
        info = replace(info, graphs=tuple(graphs))
    return replace(info, fusions=sum_fusions(info.graphs))


def reuse_graphs(layout: list[dict], keys: dict[str, dict[str, str]], needed: tuple[str, ...], folder: Path,
                 cache: GraphCache | None) -> tuple[dict[str, dict], set[str]]:
    """Per graph of the layout, its manifest entry (with its keys); the graphs whose `needed` files were
    all linked from `cache` carry their earlier entry's files, parity and fusions. Also the names of the
    graphs to export (the rest)."""
    entries, fresh = {}, set()
    for graph in layout:
        name = graph["name"]
        entry = {**graph, "keys": {p: keys[name][p] for p in needed}}
        linked = []
        for p in needed:
            rel = f"{ONNX_DIR}/{p}/{name}.onnx"
            hit = cache.link(keys[name][p], folder / rel) if cache is not None else None
            if hit is None:
                break
            linked.append(rel)
            entry[p] = rel
            entry.setdefault("parity", hit.entry.get("parity"))
            entry.setdefault("fusions", {})
            entry["fusions"][p] = (hit.entry.get("fusions") or {}).get(p) or {}
        if len(linked) < len(needed):  # all or nothing: a graph is exported whole
            for rel in linked:
                (folder / rel).unlink()
            entry = {**graph, "keys": entry["keys"]}
            fresh.add(name)
        else:
            entry["reused"] = True
        entries[name] = entry
    return entries, fresh


def graph_path(layout: list[dict], spec: TaskSpec) -> list[str]:
    """The graphs a task's rows run through: the embeddings, the trunk segments to its attach layer, its branch."""
    return [g["name"] for g in layout if g["kind"] == "embeddings" or g["kind"] == "segment"
            and g["last"] <= spec.attach_layer or g.get("task") == spec.name]


def tasks_through(layout: list[dict], specs: dict[str, TaskSpec], names: set[str]) -> list[str]:
    """The tasks whose rows run through any of the graphs `names`."""
    return [t for t, spec in specs.items() if names.intersection(graph_path(layout, spec))]


def sub_layout(layout: list[dict], tasks: list[str]) -> list[dict]:
    """The layout's embeddings and trunk segments, and the branches of `tasks` only."""
    return [g for g in layout if g["kind"] != "branch" or g["task"] in tasks]


def add_int8(folder: Path, info: EngineInfo, model: MergedModel, fp32: Engine, progress: bool = True, *,
             specs: dict[str, TaskSpec] | None = None, fresh: set[str] | None = None,
             cache: GraphCache | None = None, paths: dict[str, str] | None = None,
             todo: list[str] | None = None) -> EngineInfo:
    """Quantize the fp32 graphs of `info` (those in `fresh`; default all) into folder/onnx/int8 and check
    the tasks `todo` (default: those whose graphs are new) against the fp32 engine
    (centra.export.int8.check_int8, refusing below its floor); the other tasks' checks carry over from
    `cache` by their check keys (`paths`: check_keys). Return `info` with the int8 files, the check's
    report and the per-graph fusions."""
    from centra.export.int8 import check_int8, check_settings, quantize_graph

    specs = specs or model.specs
    fresh = {g["name"] for g in info.graphs} if fresh is None else fresh
    paths = paths or {}
    graphs = []
    for graph in progress_bar([g for g in info.graphs], desc="quantize int8", enabled=progress and bool(fresh)):
        if graph["name"] not in fresh:
            graphs.append(graph)
            continue
        rel = f"{ONNX_DIR}/int8/{graph['name']}.onnx"
        graph = {**graph, "int8": rel if quantize_graph(folder / graph["fp32"], folder / rel) else graph["fp32"]}
        if graph["int8"] == graph["fp32"]:  # nothing to quantize (the embeddings): the fp32 graph serves as int8
            rel = f"{ONNX_DIR}/int8/{graph['name']}.onnx"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(folder / graph["fp32"], folder / rel)
            graph["int8"] = rel
        graph["fusions"] = {**(graph.get("fusions") or {}), "int8": fusions(folder / graph["int8"])}
        graphs.append(graph)
    info = replace(info, graphs=tuple(graphs))
    layout = [{k: g[k] for k in ("name", "kind", "first", "last", "task") if k in g} for g in graphs]
    todo = tasks_through(layout, specs, fresh) if todo is None else todo
    report = {**check_settings(), "tasks": {}}
    if todo:
        sub = sub_layout(layout, todo)
        int8 = OnnxRunner.open(folder, info, "int8", open_session, {t: specs[t] for t in todo}, model.cfg, "int8",
                               model, layout=sub)
        report = check_int8(fp32, Engine(int8, fp32.tokenizer, batch_size=fp32.batch_size), tasks=todo)
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


def check_keys(layout: list[dict], keys: dict[str, dict[str, str]], specs: dict[str, TaskSpec],
               folder: Path) -> dict[str, str]:
    """Per task, the key of its int8 check: the int8 keys of the graphs its rows run through, the spec
    fields the check reads (kind, labels, thresholds, max_labels, input, max_length), the check's own
    settings and samples, and the tokenizer's files (folder/tokenizer, when there). Equal keys, equal
    check: it carries over."""
    from centra.export.int8 import check_settings, sample_inputs
    from centra.export.reuse import digest
    from centra.io import sha256_file

    tokenizer = folder / "tokenizer"
    tokens = sorted((p.name, sha256_file(p)) for p in tokenizer.iterdir() if p.is_file()) if tokenizer.is_dir() else []
    common = {"settings": check_settings(), "samples": digest(sample_inputs()), "tokenizer": tokens}
    found = {}
    for name, spec in specs.items():
        fields = {"kind": spec.kind, "labels": list(spec.labels), "thresholds": spec.thresholds,
                  "max_labels": spec.max_labels, "input": spec.input, "max_length": spec.max_length}
        found[name] = digest({"graphs": [keys[g]["int8"] for g in graph_path(layout, spec)], "spec": fields,
                              **common})
    return found


def fusions(path: Path) -> dict[str, int]:
    """Op types ONNX Runtime's full graph optimisation (ORT_ENABLE_ALL, the engine's setting) leaves in the
    graph at `path` that are fused or whole-block ops (FUSED_OPS and any com.microsoft op), with counts."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="centra-fusions-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        open_session(Path(path), optimized_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    counts = Counter(n.op_type for n in graph.node if n.op_type in FUSED_OPS or n.domain == "com.microsoft")
    return dict(sorted(counts.items()))


def sum_fusions(graphs) -> dict[str, dict[str, int]]:
    """Per precision, the fused ops of every graph (their entries' "fusions"), summed."""
    total: dict[str, Counter] = {}
    for graph in graphs:
        for precision, counts in (graph.get("fusions") or {}).items():
            total.setdefault(precision, Counter()).update(counts)
    return {p: dict(sorted(c.items())) for p, c in sorted(total.items())}


def total_fusions(paths) -> dict[str, int]:
    total: Counter = Counter()
    for path in paths:
        total.update(fusions(path))
    return dict(sorted(total.items()))


def load_staged(stage: Path, manifest: Manifest, tasks: list[str] | None = None) -> MergedModel:
    """The MergedModel of a staged version (its manifest not yet written): the files `load_merged` reads;
    with `tasks`, only those tasks' heads."""
    cfg = EncoderConfig(**manifest.encoder)
    holder = nn.Module()
    holder.embeddings = Embeddings(cfg)
    holder.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(manifest.trunk_depth))
    state = load_safetensors(stage / TRUNK_FILE)
    check_state(holder.state_dict(), state, str(stage / TRUNK_FILE))
    holder.load_state_dict(state)
    wanted = {e.name: e for e in manifest.tasks if tasks is None or e.name in tasks}
    heads = {name: staged_head(stage, cfg, e.head_sha256, name) for name, e in wanted.items()}
    return MergedModel(cfg, holder.embeddings, holder.layers, heads).eval().requires_grad_(False)


def staged_head(stage: Path, cfg: EncoderConfig, sha256: str, name: str) -> nn.Module:
    return load_task(stage / "tasks" / name, cfg, manifest_sha256=sha256)[1]


def staged_specs(stage: Path, manifest: Manifest) -> dict[str, TaskSpec]:
    """The specs of a staged version's tasks, from their task.json files (no weights read)."""
    from centra.core.task import read_task_json

    return {e.name: read_task_json(stage / "tasks" / e.name, e.name)[0] for e in manifest.tasks}


def onnx_extender(precision: str = "fp32", progress: bool = True, out: Path | None = None,
                  keep_fp32: bool = False) -> Callable[[Path, Manifest], EngineInfo]:
    """write_merged's `extend`: export the staged version's graphs into its onnx/ folder and return the
    manifest's engine field. Graphs of OUT's kept versions whose keys match are linked, not exported
    (centra.export.reuse); an int8 version keeps its fp32 graphs only with `keep_fp32`."""
    from centra.core.backbone import load_tokenizer
    from centra.export.reuse import GraphCache

    if precision not in PRECISIONS:
        raise CentraError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")

    def extend(stage: Path, manifest: Manifest) -> EngineInfo:
        cache = GraphCache(out)
        trunk = load_staged(stage, manifest, tasks=[])
        cfg = trunk.cfg
        heads = {e.name: e.head_sha256 for e in manifest.tasks}
        tokenizer = load_tokenizer(stage / "tokenizer") if precision == "int8" else None
        info = export_onnx(trunk, stage, precision, tokenizer, progress=progress, specs=staged_specs(stage, manifest),
                           cache=cache, heads=lambda name: staged_head(stage, cfg, heads[name], name),
                           keep_fp32=keep_fp32 or precision == "fp32")
        reused = sum(1 for g in info.graphs if g.get("reused"))
        progress_line(f"onnx: {reused} of {len(info.graphs)} graphs reused from earlier versions of {out}",
                      progress and cache is not None and len(cache) > 0)
        return info

    return extend
