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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from centra.core import check_int8_fp32
from centra.core.backbone import Embeddings, EncoderConfig, EncoderLayer, attention_bias, check_state, load_safetensors
from centra.core.graph import MergedModel
from centra.core.manifest import EngineInfo, Manifest
from centra.core.merge import TRUNK_FILE
from centra.core.shadow import VERSION_DIR as CANDIDATES_DIR
from centra.core.shadow import as_branch, candidate_key, is_candidate, task_of
from centra.core.task import TaskSpec, load_task, max_positions
from centra.errors import CentraError
from centra.export.fused import fusions, sum_fusions, write_fused
from centra.export.int8 import add_int8, check_keys, quantizer_identity
from centra.export.reuse import GraphCache, exporter_identity, graph_keys, reuse_graphs, sub_layout, tasks_through
from centra.progress import progress_bar, progress_line
from centra.runtime.engine import Engine
from centra.runtime.graphs import graph_layout
from centra.runtime.onnx import ENGINE_NAME, ONNX_DIR, PRECISIONS, OnnxRunner, open_session

FP32_TOLERANCE = 1e-4  # max |onnx - torch| of any graph's output (hidden states or logits), fp32
OPSET = 20
PARITY_SHAPES = ((1, 7), (3, 19), (8, None))  # (batch, length); None: the longest max_length of the tasks
STYLES = ("fused", "portable")
EXAMPLE_SHAPE = (2, 8)  # the export's example: 1 would be specialised, so it is not used


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
                heads: Callable[[str], nn.Module] | None = None, keep_fp32: bool = True,
                int8_fp32: Sequence[str] = ()) -> EngineInfo:
    """Export every graph of `specs`' layout (default: the model's tasks) into folder/onnx/fp32 (and
    onnx/int8), each checked as it is written; return the manifest's engine field (file paths relative
    to folder). With `cache`, a graph whose keys an earlier version holds is linked, not exported, and
    the heads of the tasks whose graphs are new are the only ones used: `model`'s, else `heads(name)`.
    `keep_fp32=False` (int8): the fp32 graphs are checked, quantized and deleted; the version holds the
    int8 graphs it serves. `int8_fp32`: node groups the int8 graphs keep in fp32 (centra.export.int8)."""
    if precision not in PRECISIONS:
        raise CentraError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if style not in STYLES:
        raise CentraError(f"unknown ONNX graph style {style!r} (known: {', '.join(STYLES)})")
    if precision == "int8" and tokenizer is None:
        raise CentraError("the int8 check needs the model's tokenizer")
    int8_fp32 = check_int8_fp32(int8_fp32)
    if int8_fp32 and (precision, style) != ("int8", "fused"):  # the groups are node names of the fused graphs
        raise CentraError(f"keeping nodes in fp32 ({', '.join(int8_fp32)}) applies to int8 graphs of the fused "
                          f"style, not {precision} {style}")
    folder, specs = Path(folder), specs or model.specs
    layout = graph_layout(specs)
    needed = ("fp32",) if precision == "fp32" else ("fp32", "int8") if keep_fp32 else ("int8",)
    identity = exporter_identity(style, OPSET)
    quantizer = quantizer_identity(int8_fp32) if precision == "int8" else None
    fingerprint = next(iter(specs.values())).backbone["fingerprint"] if specs else ""
    keys = {g["name"]: graph_keys(g, specs, fingerprint, model.cfg.to_dict(), identity, quantizer) for g in layout}
    entries, fresh = reuse_graphs(layout, keys, needed, folder, cache)
    todo = tasks_through(layout, specs, fresh)
    paths = check_keys(layout, keys, specs, folder, int8_fp32) if precision == "int8" else {}
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
                        fresh=fresh, cache=cache, paths=paths, todo=todo, int8_fp32=int8_fp32)
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
    wanted = {name: sha for name, sha in staged_heads(manifest).items() if tasks is None or name in tasks}
    heads = {name: staged_head(stage, cfg, sha, name) for name, sha in wanted.items()}
    return MergedModel(cfg, holder.embeddings, holder.layers, heads).eval().requires_grad_(False)


def staged_heads(manifest: Manifest) -> dict[str, str]:
    """Branch key -> head sha256, for the tasks of a manifest and their candidate heads."""
    return {**{e.name: e.head_sha256 for e in manifest.tasks},
            **{candidate_key(e.name): e.head_sha256 for e in manifest.candidates}}


def staged_head(stage: Path, cfg: EncoderConfig, sha256: str, name: str) -> nn.Module:
    """The head of branch `name` (a task, or a candidate key) of a staged version."""
    if is_candidate(name):
        head = load_task(stage / CANDIDATES_DIR / task_of(name), cfg, manifest_sha256=sha256)[1]
        return head.with_spec(as_branch(head.spec))
    return load_task(stage / "tasks" / name, cfg, manifest_sha256=sha256)[1]


def staged_specs(stage: Path, manifest: Manifest) -> dict[str, TaskSpec]:
    """The specs of a staged version's branches (tasks, and candidate heads under their keys), from their
    task.json files (no weights read)."""
    from centra.core.task import read_task_json

    specs = {e.name: read_task_json(stage / "tasks" / e.name, e.name)[0] for e in manifest.tasks}
    for e in manifest.candidates:
        spec = as_branch(read_task_json(stage / CANDIDATES_DIR / e.name, e.name)[0])
        specs[spec.name] = spec
    return specs


def onnx_extender(precision: str = "fp32", progress: bool = True, out: Path | None = None,
                  keep_fp32: bool = False, int8_fp32: Sequence[str] = ()) -> Callable[[Path, Manifest], EngineInfo]:
    """write_merged's `extend`: export the staged version's graphs into its onnx/ folder and return the
    manifest's engine field. Graphs of OUT's kept versions whose keys match are linked, not exported
    (centra.export.reuse); an int8 version keeps its fp32 graphs only with `keep_fp32`, and the node
    groups `int8_fp32` in fp32 in its int8 graphs."""
    from centra.core.backbone import load_tokenizer

    if precision not in PRECISIONS:
        raise CentraError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    int8_fp32 = check_int8_fp32(int8_fp32)

    def extend(stage: Path, manifest: Manifest) -> EngineInfo:
        cache = GraphCache(out)
        trunk = load_staged(stage, manifest, tasks=[])
        cfg = trunk.cfg
        heads = staged_heads(manifest)
        tokenizer = load_tokenizer(stage / "tokenizer") if precision == "int8" else None
        info = export_onnx(trunk, stage, precision, tokenizer, progress=progress, specs=staged_specs(stage, manifest),
                           cache=cache, heads=lambda name: staged_head(stage, cfg, heads[name], name),
                           keep_fp32=keep_fp32 or precision == "fp32", int8_fp32=int8_fp32)
        reused = sum(1 for g in info.graphs if g.get("reused"))
        progress_line(f"onnx: {reused} of {len(info.graphs)} graphs reused from earlier versions of {out}",
                      progress and cache is not None and len(cache) > 0)
        return info

    return extend
