"""Triton Inference Server model repository of a merged model (`centra export-triton`).

Per token group (core.overhead.TokenGroup: tasks that read the same tokens) two models: a python
backend tokenizer (1/model.py = centra/export/triton_model.py, 1/tokenizer/ = the version's tokenizer
files: TEXT (+ TEXT_PAIR) -> input_ids, attention_mask, token_type_ids) and an onnxruntime_onnx graph
(1/model.onnx: the ids -> LOGITS_<task> of the group's tasks, the trunk once as deep as its deepest task,
then each branch). They are centra_tokenizer and centra_graph, suffixed _<input>_<max_length> when there
is more than one group. The ensemble `centra` runs them all: TEXT (and TEXT_PAIR) in, LOGITS_<task> out;
its version folder is numbered as the exported version (v000003: 3) and its label files (one per task)
label the outputs of Triton's classification extension.
README.md and centra-triton.json (tasks, labels, checks, file hashes) sit beside the models.

`--engine tensorrt` (GPU servers) writes the same repository with "portable" graphs (standard ONNX ops
only) and asks Triton's onnxruntime backend to run them through ONNX Runtime's TensorRT execution
provider (`gpu_execution_accelerator` "tensorrt", precision_mode FP16 or FP32, one optimization profile
over batch 1..max_batch_size and sequence 1..max_length, engines cached): the server builds the TensorRT
engines on its own GPU at the first request (minutes) and never again for a larger shape, so the
repository is not tied to one GPU model or TensorRT version. At fp16 the graphs are in half precision
(fp32 in and out), as centra's own TensorRT build writes them, checked here against PyTorch fp32 on ONNX
Runtime (tensorrt_graphs): TensorRT 11 builds only strongly typed networks, whose precision is the
graph's, and has no FP16 builder flag for precision_mode to set; TensorRT 10 still needs the flag to
build fp16 layers in its default (weakly typed) networks, so precision_mode stays FP16.

Each graph model is composed, not re-exported: the version's checked ONNX graphs (embeddings, trunk
segments, branches; fp32 or int8) joined into one graph, tensors prefixed by graph name, wired with
Identity nodes (ONNX Runtime removes them). A version without ONNX graphs at that precision gets them
exported and checked first (centra.export.onnx, into a temporary folder). Before publishing (through
centra.publish.publish_folder), each group's staged tokenizer model and graph run on sample texts: the ids
must equal centra.core.tokens.encode's and the logits the engine's on the same batch within TOLERANCE.
"""

from __future__ import annotations

import importlib.util
import secrets
import tempfile
from pathlib import Path

import torch

from centra import io, publish
from centra.core.backbone import load_tokenizer
from centra.core.manifest import Manifest
from centra.core.merge import load_merged
from centra.core.overhead import TokenGroup
from centra.core.protocol import logits_name
from centra.core.shadow import is_candidate
from centra.core.task import TaskSpec
from centra.core.tokens import encode
from centra.core.versions import model_folder
from centra.errors import CentraError, FieldError, Name
from centra.export.onnx import FP32_TOLERANCE, export_onnx
from centra.export.triton_config import (
    ENSEMBLE,
    ID_TENSORS,
    TENSORRT,
    GroupModels,
    ensemble_config,
    graph_config,
    group_models,
    label_file,
    label_lines,
    tokenizer_config,
    triton_version,
)
from centra.runtime.engine import Engine
from centra.runtime.graphs import graph_layout
from centra.runtime.onnx import ENGINE_NAME, PRECISIONS, OnnxRunner, open_session
from centra.runtime.verify import SAMPLE_PAIRS, SAMPLE_TEXTS

KIND = "triton repository"
ENGINES = (ENGINE_NAME, TENSORRT)
ENGINE_PRECISIONS = {ENGINE_NAME: PRECISIONS, TENSORRT: ("fp32", "fp16")}
SUMMARY = "centra-triton.json"
README = "README.md"
DEFAULT_MAX_BATCH = 32
TOLERANCE = FP32_TOLERANCE  # max |triton graph - centra engine| of any logit, same precision
MODEL_SOURCE = Path(__file__).with_name("triton_model.py")
EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes: protobuf's 2 GB limit; weights go to model.onnx.data


def source_graphs(folder: Path, manifest: Manifest, merged, tokenizer, precision: str, tmp: Path,
                  progress: bool, style: str = "fused") -> tuple[dict[str, Path], Engine, str]:
    """The ONNX file of every graph of the layout at `precision` (the version's own, else exported and
    checked into tmp; "portable" graphs are always exported), the engine the Triton graphs must match,
    and where the graphs came from."""
    info, files = manifest.engine, manifest.files
    if style == "fused" and info is not None and info.name == ENGINE_NAME and (info.style or "fused") == style \
            and info.has_files(precision):
        base, origin = folder, f"the version's {precision} ONNX graphs"
    else:
        info = export_onnx(merged, tmp, precision, tokenizer, progress=progress, style=style)
        base, files, origin = tmp, None, f"{precision} {style} ONNX graphs exported from torch"
    paths = {name: base / rel for name, rel in info.files(precision).items()}
    missing = [g["name"] for g in graph_layout(merged.specs) if g["name"] not in paths]
    if missing:
        raise CentraError(f"{folder / 'manifest.json'}: no {precision} ONNX graph for {missing[0]!r}")
    runner = merged if precision == "fp32" else OnnxRunner.load(base, info, merged, precision=precision, files=files)
    return paths, Engine(runner, tokenizer, batch_size=8), origin


def tensorrt_graphs(merged, tokenizer, tmp: Path, progress: bool) -> tuple[dict[str, Path], Engine, str, dict]:
    """`--engine tensorrt --precision fp16`: the portable graphs in half precision (fp32 in and out) in tmp,
    checked on ONNX Runtime against PyTorch fp32 by centra's TensorRT build's own check (its report is the
    last value), and the engine over them that the composed graphs must match at the same precision."""
    from centra.export.tensorrt import precision_graphs

    info = export_onnx(merged, tmp, "fp32", progress=progress, style="portable")
    files, checks, runner = precision_graphs(merged, tokenizer, tmp, info, "fp16", None, progress)
    return ({name: tmp / rel for name, rel in files.items()}, Engine(runner, tokenizer, batch_size=8),
            "fp16 portable ONNX graphs (fp32 in and out) exported from torch", checks)


def compose_group(paths: dict[str, Path], specs: dict[str, TaskSpec], group: TokenGroup):
    """One ONNX model for a token group: input_ids, attention_mask, token_type_ids [batch, sequence] ->
    LOGITS_<task> [batch, outputs] for each of its tasks, from the layout's graphs up to its depth."""
    import onnx
    from onnx import TensorProto, compose, helper

    nodes, initializers, infos, opsets, ir_version, outputs = [], [], [], {}, 0, []
    hidden_at: dict[int, str] = {}  # trunk layer -> the tensor holding its hidden state
    for graph in graph_layout(specs):
        kind, name, prefix = graph["kind"], graph["name"], f"{graph['name']}/"
        if (kind == "segment" and graph["last"] > group.depth) or (kind == "branch" and graph["task"] not in
                                                                   group.tasks):
            continue
        model = compose.add_prefix(onnx.load(str(paths[name])), prefix)
        sources = {n: n for n in ID_TENSORS}
        if kind == "segment":
            sources["hidden"] = hidden_at[graph["first"] - 1]
        elif kind == "branch":
            sources["hidden"] = hidden_at[specs[graph["task"]].attach_layer]
        for tensor in model.graph.input:  # Identity nodes feed the graph's inputs
            local = tensor.name[len(prefix):]
            if local not in sources:
                raise CentraError(f"{paths[name]}: unexpected input {local!r} in ONNX graph {name!r}")
            nodes.append(helper.make_node("Identity", [sources[local]], [tensor.name], name=f"wire/{tensor.name}"))
        nodes.extend(model.graph.node)
        initializers.extend(model.graph.initializer)
        infos.extend(model.graph.value_info)
        for opset in model.opset_import:
            if opsets.setdefault(opset.domain, opset.version) != opset.version:
                raise CentraError(f"{paths[name]}: opset {opset.domain or 'ai.onnx'} {opset.version} differs from "
                                  f"the other graphs' {opsets[opset.domain]}")
        ir_version = max(ir_version, model.ir_version)
        (result,) = model.graph.output
        if kind == "embeddings":
            hidden_at[0] = result.name
        elif kind == "segment":
            hidden_at[graph["last"]] = result.name
        else:
            out = onnx.ValueInfoProto()
            out.CopyFrom(result)
            out.name = logits_name(graph["task"])
            nodes.append(helper.make_node("Identity", [result.name], [out.name], name=f"wire/{out.name}"))
            outputs.append(out)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ID_TENSORS]
    body = helper.make_graph(nodes, f"centra_{group.label}", inputs, outputs, initializer=initializers,
                             value_info=infos)
    return helper.make_model(body, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                             ir_version=ir_version, producer_name="centra export-triton")


def save_onnx(model, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_ABOVE:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))


# ------------------------------------------------------------------------------- config.pbtxt


# --------------------------------------------------------------------------------------- export


def load_model_module(path: Path):
    """A tokenizer model's model.py as a module (no Triton needed)."""
    spec = importlib.util.spec_from_file_location(f"centra_triton_tokenizer_{secrets.token_hex(4)}", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.inference_mode()
def group_parity(stage: Path, group: GroupModels, params: dict, reference: Engine) -> float:
    """max |staged graph - reference runner| on the sample texts tokenized by the staged tokenizer model
    (all at once, then one at a time), the reference fed the same padded batch (int8's activation scales
    are per batch); refuses ids that differ from centra's tokenization."""
    module = load_model_module(stage / group.tokenizer / "1" / "model.py")
    tokenizer = module.load_tokenizer(stage / group.tokenizer / "1" / module.TOKENIZER_DIR)
    texts = [*SAMPLE_TEXTS, " ".join(SAMPLE_TEXTS * 4)]  # the last one longer than any max_length: truncated
    pairs = [*SAMPLE_PAIRS, *SAMPLE_PAIRS][: len(texts) - 1] + [" ".join(SAMPLE_PAIRS * 4)]
    tokens = group.tokens
    pairs = pairs if tokens.input == "pair" else None
    expected_ids = encode(reference.tokenizer, reference.model.cfg.type_vocab_size, texts, pairs, tokens.max_length)
    session = open_session(stage / group.graph / "1" / "model.onnx")
    names = [logits_name(t) for t in tokens.tasks]
    worst = 0.0
    for rows in [list(range(len(texts))), [len(texts) - 1], [3]]:
        chosen = None if pairs is None else [pairs[i] for i in rows]
        feeds = module.tokenize(tokenizer, [texts[i] for i in rows], chosen, params["max_length"],
                                params["type_vocab_size"], params["pad_id"])
        for j, i in enumerate(rows):
            n = int(feeds["attention_mask"][j].sum())
            if feeds["input_ids"][j, :n].tolist() != expected_ids.input_ids[i] or \
                    feeds["token_type_ids"][j, :n].tolist() != expected_ids.token_type_ids[i]:
                raise CentraError(f"triton: {group.tokenizer} tokenizes sample {i} unlike centra: refusing the "
                                  "export; nothing was published")
        batch = [torch.from_numpy(feeds[n]) for n in ID_TENSORS]
        expected = reference.model.forward_rows(*batch, {t: torch.arange(len(rows)) for t in tokens.tasks})
        for name, got in zip(tokens.tasks, session.run(names, feeds)):
            worst = max(worst, (torch.from_numpy(got) - expected[name]).abs().max().item())
    return worst


def write_readme(path: Path, groups: list[GroupModels], specs: dict[str, TaskSpec], summary: dict) -> None:
    pair = any(g.tokens.input == "pair" for g in groups)
    opsets = ", ".join(f"{domain} {version}" for domain, version in summary["onnx"]["opset"].items())
    lines = [f"# centra Triton model repository ({summary['source_version']}, {summary['precision']})", "",
             f"Written by `centra export-triton` from `{summary['source']}` ({summary['graphs_from']}); each "
             f"graph matched {summary['reference']} within {summary['tolerance']:g} and each tokenizer model's ids "
             "matched `centra predict`'s on sample texts.", "", "## Run", "", "```",
             f"tritonserver --model-repository {summary['repository']}", "```", "",
             "The tokenizer models run on Triton's python backend and need `transformers` (and numpy) in its "
             "Python: `pip install transformers` in the server image, or a packed execution environment "
             "(parameter EXECUTION_ENV_PATH). The graph models run on the onnxruntime backend; they are ONNX "
             f"IR version {summary['onnx']['ir_version']}, opsets {opsets}, which the server's ONNX Runtime must "
             "read (IR 10 needs ONNX Runtime 1.18 or later).", "", "## Models", "",
             f"- `{ENSEMBLE}` (ensemble; call this one): input `TEXT`" + (
                 " and `TEXT_PAIR` (Triton ensembles take no optional inputs: send it with every request; ask only "
                 "for the outputs you want and Triton runs only the models they need)" if pair else "")
             + ", strings of shape [batch, 1]; one output `LOGITS_<task>` (fp32, [batch, outputs]) per task (the "
             "output parameter `classification` K returns its top K as \"value:index:label\", labels from "
             f"`{ENSEMBLE}/labels_<task>.txt`); max_batch_size {summary['max_batch_size']}."]
    for g, tokens in ((g, g.tokens) for g in groups):
        lines += [f"- `{g.tokenizer}` (python backend): {'TEXT + TEXT_PAIR' if tokens.input == 'pair' else 'TEXT'} -> "
                  f"input_ids, attention_mask, token_type_ids (int64), truncated at {tokens.max_length} tokens, padded "
                  "to the longest text of what it tokenizes at once (a dynamic batch).",
                  f"- `{g.graph}` (onnxruntime_onnx, {summary['precision']}): the ids -> " + ", ".join(
                      f"`{logits_name(t)}` ({specs[t].kind}, {specs[t].num_outputs})" for t in tokens.tasks)
                  + f"; the trunk once, {tokens.depth} layers deep, then each task's branch."]
    if summary["precision"] == "int8":
        lines += ["", "int8 graphs are dynamically quantized CPU graphs (instance_group KIND_CPU): activation "
                  "scales are computed per batch, so a row's logits move slightly with the rows batched with it."]
    if summary.get("engine") == TENSORRT:
        half = summary["precision"] == "fp16"
        lines += ["", "The graph models run on the GPU through ONNX Runtime's TensorRT execution provider "
                  f"(precision_mode {summary['precision'].upper()}): the server builds the TensorRT engines at the "
                  "first request (minutes; one optimization profile covers every batch and length, so never "
                  "again) and caches them in its working directory (add the trt_engine_cache_path parameter to "
                  "choose); the graphs use standard ONNX ops only and were checked here on ONNX Runtime's CPU "
                  "provider" + (", in half precision inside (fp32 in and out): TensorRT 11 builds only strongly "
                                "typed networks, whose precision is the graph's; TensorRT 10 also needs "
                                "precision_mode FP16 to build their fp16 layers. ONNX Runtime's CPU provider "
                                "computes many fp16 nodes in fp32, so the GPU's answers may differ from the ones "
                                "checked here by half precision's rounding" if half else " in fp32")
                  + ". Needs a Triton image whose onnxruntime backend has TensorRT (NVIDIA's images do)."]
    lines += ["", "Outputs are logits: softmax (multiclass), sigmoid against the task's thresholds (multilabel) or "
              f"the value (regression) give `centra predict`'s answers; labels and thresholds are in `{SUMMARY}`.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def export_triton(model: Path, repo: Path, engine: str = ENGINE_NAME, precision: str | None = None,
                  max_batch: int = DEFAULT_MAX_BATCH, progress: bool = True) -> dict:
    """Publish the Triton model repository of OUT's current version at repo; return its summary."""
    if engine not in ENGINES:
        raise CentraError(f"export-triton: unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    known = ENGINE_PRECISIONS[engine]
    if precision is not None and precision not in known:
        raise FieldError(f"precision {precision!r} does not apply to ", Name("engine"), f" {engine} (known: "
                         f"{', '.join(known)})")
    if max_batch < 1:
        raise FieldError(Name("max_batch"), f" must be >= 1, not {max_batch}")
    repo = Path(repo)
    publish.check_writable_parent(repo)
    publish.check_replaceable(repo, KIND)  # before any work: never over a user's folder
    folder = model_folder(Path(model))
    manifest, merged = load_merged(folder)
    tokenizer = load_tokenizer(folder / "tokenizer")
    if engine == TENSORRT:  # standard ops; at fp16 the graphs are half precision inside (tensorrt_graphs)
        precision, graph_precision, style = precision or "fp16", "fp32", "portable"
    else:
        precision = precision or (manifest.engine.precision if manifest.engine is not None else None) or "fp32"
        graph_precision, style = precision, "fused"
    specs = merged.specs
    groups = group_models({k: v for k, v in specs.items() if not is_candidate(k)})  # candidate heads: centra
    # serve and the python-backend repository (an ONNX graph here would compute them for every call)
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="centra-triton-") as tmp:
        checks: dict = {}
        if engine == TENSORRT and precision == "fp16":
            paths, reference, origin, checks = tensorrt_graphs(merged, tokenizer, Path(tmp), progress)
        else:
            paths, reference, origin = source_graphs(folder, manifest, merged, tokenizer, graph_precision,
                                                     Path(tmp), progress, style)

        def build(stage: Path) -> None:
            parity, params = {}, {}
            for g in groups:
                params[g.graph] = {"input": g.tokens.input, "max_length": g.tokens.max_length,
                                   "type_vocab_size": merged.cfg.type_vocab_size, "pad_id": tokenizer.pad_token_id or 0}
                version = stage / g.tokenizer / "1"
                version.mkdir(parents=True)
                io.copy_verified(MODEL_SOURCE, version / "model.py")
                (version / "tokenizer").mkdir()
                for rel, digest in manifest.files.items():  # hashed by load_merged, re-hashed when copied
                    if rel.startswith("tokenizer/"):
                        io.copy_verified(folder / rel, version / rel, digest)
                (stage / g.tokenizer / "config.pbtxt").write_text(tokenizer_config(g, max_batch, params[g.graph]))
                composed = compose_group(paths, specs, g.tokens)
                onnx_format = {"ir_version": composed.ir_version, "opset": {o.domain or "ai.onnx": o.version
                                                                            for o in composed.opset_import}}
                save_onnx(composed, stage / g.graph / "1" / "model.onnx")
                (stage / g.graph / "config.pbtxt").write_text(graph_config(g, max_batch, specs, precision, engine))
            # an ensemble's version folder is empty; numbered as the version (what centra serve answers to)
            (stage / ENSEMBLE / triton_version(manifest.version)).mkdir(parents=True)
            (stage / ENSEMBLE / "config.pbtxt").write_text(ensemble_config(groups, max_batch, specs))
            for key, spec in specs.items():  # the labels of Triton's classification extension
                if is_candidate(key):  # candidate heads: centra serve's only
                    continue
                (stage / ENSEMBLE / label_file(spec.name)).write_text(label_lines(spec), encoding="utf-8")
            for g in groups:
                diff = group_parity(stage, g, params[g.graph], reference)
                if not diff <= TOLERANCE:
                    raise CentraError(f"triton: {g.graph} differs from the centra engine ({reference.runtime}) by "
                                      f"{diff:.3e} > {TOLERANCE:g}: refusing the export; nothing was published")
                parity[g.graph] = float(f"{diff:.3e}")
            summary.update({
                "format": "centra-triton", "repository": str(repo.resolve()), "source": str(folder),
                "source_version": manifest.version, "backbone": manifest.backbone.id, "engine": engine,
                "precision": precision,
                "graphs_from": origin, "max_batch_size": max_batch, "ensemble": ENSEMBLE, "tolerance": TOLERANCE,
                "reference": reference.runtime, "parity": parity, "onnx": onnx_format,
                "groups": [describe(g, specs) for g in groups]})
            if checks:  # the fp16 graphs' check against PyTorch fp32 (tensorrt_graphs)
                summary["onnx_checks"] = checks
            write_readme(stage / README, groups, specs, summary)
            summary["files"] = io.hash_tree(stage)
            io.write_json(stage / SUMMARY, summary)

        publish.publish_folder(repo, KIND, build, lambda stage: check_repository(stage, groups))
    return summary


def describe(g: GroupModels, specs: dict[str, TaskSpec]) -> dict:
    tokens = g.tokens
    return {"input": tokens.input, "max_length": tokens.max_length, "trunk_depth": tokens.depth,
            "tokenizer_model": g.tokenizer, "graph_model": g.graph,
            "tasks": {t: {"output": logits_name(t), "kind": specs[t].kind, "labels": specs[t].labels,
                          "thresholds": specs[t].thresholds} for t in tokens.tasks}}


def check_repository(stage: Path, groups: list[GroupModels]) -> None:
    """What was staged (its graphs and tokenizer models ran in `build`): every file as hashed, every config."""
    io.check_tree(stage, io.read_json(stage / SUMMARY)["files"], skip=(SUMMARY, publish.ARTIFACT_FILE))
    for name in [ENSEMBLE, *(m for g in groups for m in (g.tokenizer, g.graph))]:
        if not (stage / name / "config.pbtxt").is_file():
            raise CentraError(f"{stage / name}: no config.pbtxt")
