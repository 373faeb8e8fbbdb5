"""The config.pbtxt files of centra's Triton repositories: the tokenizer, graph and ensemble models of the
graph repository (export/triton.py) and the tensor lines the python repository (export/triton_python.py)
shares; which token group each pair of models serves."""

from __future__ import annotations

import json
from dataclasses import dataclass

from centra.core.overhead import TokenGroup, token_groups
from centra.core.protocol import MODEL, TEXT, TEXT_PAIR, logits_name
from centra.core.task import TaskSpec
from centra.core.versions import version_number
from centra.errors import CentraError
from centra.runtime.onnx import ENGINE_NAME

TENSORRT = "tensorrt"
TRT_WORKSPACE_BYTES = 4 << 30
ENSEMBLE = MODEL
TOKENIZER_MODEL = "centra_tokenizer"
GRAPH_MODEL = "centra_graph"
ID_TENSORS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class GroupModels:
    """One token group (tasks in the manifest's order) and the names of the two models that serve it."""

    tokens: TokenGroup
    tokenizer: str = TOKENIZER_MODEL
    graph: str = GRAPH_MODEL


def group_models(specs: dict[str, TaskSpec]) -> list[GroupModels]:
    """The token groups of the tasks; suffixed model names when there is more than one group."""
    groups = token_groups(specs.values())
    if len(groups) == 1:
        return [GroupModels(groups[0])]
    return [GroupModels(g, f"{TOKENIZER_MODEL}_{g.label}", f"{GRAPH_MODEL}_{g.label}") for g in groups]


def tensor(name: str, dtype: str, dims: list[int], optional: bool = False, labels: str | None = None) -> str:
    """One input or output line; `optional`: an input a request may leave out; `labels`: an output's label
    file (in the model's folder: the labels of Triton's classification extension)."""
    extra = (" optional: true" if optional else "") + (f" label_filename: {json.dumps(labels)}" if labels else "")
    return f'  {{ name: {json.dumps(name)} data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}'


def triton_version(version: str) -> str:
    """The Triton version folder of a centra version: its number (v000003: "3", the number `centra serve`
    also answers to); "1" for a version folder whose name is not a published version's."""
    return str(version_number(version) or 1)


def label_file(task: str) -> str:
    """The label file of a task's logits output, in the folder of the model that outputs them."""
    return f"labels_{task}.txt"


def label_lines(spec: TaskSpec) -> str:
    """A task's label file: one label per line, in the order of its logits (Triton splits it at each
    newline and keeps everything else); a label with a newline cannot be written there and is refused."""
    for label in spec.labels:
        if "\n" in label:
            raise CentraError(f"task {spec.name}: label {label[:80]!r} has a newline, which Triton's label files "
                              "cannot hold")
    return "".join(f"{label}\n" for label in spec.labels)


def tensors(items: list[str]) -> str:
    return "[\n" + ",\n".join(items) + "\n]"


def text_inputs(pair: bool) -> list[str]:
    return [tensor(TEXT, "TYPE_STRING", [1])] + ([tensor(TEXT_PAIR, "TYPE_STRING", [1])] if pair else [])


def tokenizer_config(group: GroupModels, max_batch: int, params: dict) -> str:
    ids = [tensor(n, "TYPE_INT64", [-1]) for n in ID_TENSORS]
    parameters = "".join(f'parameters {{ key: {json.dumps(k)} value {{ string_value: {json.dumps(str(v))} }} }}\n'
                         for k, v in params.items())
    return (f'name: {json.dumps(group.tokenizer)}\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f"dynamic_batching {{ }}\ninput {tensors(text_inputs(group.tokens.input == 'pair'))}\n"
            f"output {tensors(ids)}\ninstance_group [ {{ kind: KIND_CPU count: 1 }} ]\n{parameters}")


def graph_config(group: GroupModels, max_batch: int, specs: dict[str, TaskSpec], precision: str,
                 engine: str = ENGINE_NAME) -> str:
    ids = [tensor(n, "TYPE_INT64", [-1]) for n in ID_TENSORS]
    outs = [tensor(logits_name(t), "TYPE_FP32", [specs[t].num_outputs]) for t in group.tokens.tasks]
    # dynamically quantized int8 graphs are CPU graphs; fp32 runs where Triton places it (a GPU if any)
    instances = "instance_group [ { kind: KIND_CPU } ]\n" if precision == "int8" else ""
    if engine == TENSORRT:  # ONNX Runtime's TensorRT execution provider, on the server's GPU
        # one profile over every shape the group can get, so the engine is built once, not again whenever a
        # request is longer or larger than the ones before. precision_mode FP16 sets TensorRT 10's FP16
        # flag, without which its weakly typed networks refuse the fp16 graph's half-precision layers;
        # TensorRT 11 has no such flag and takes the precision from the graph (see the module's docstring)
        def shapes(batch: int, length: int) -> str:
            return ",".join(f"{n}:{batch}x{length}" for n in ID_TENSORS)

        profile = {"trt_profile_min_shapes": shapes(1, 1),
                   "trt_profile_opt_shapes": shapes(min(32, max_batch), min(64, group.tokens.max_length)),
                   "trt_profile_max_shapes": shapes(max_batch, group.tokens.max_length)}
        parameters = {"precision_mode": precision.upper(), "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
                      "trt_engine_cache_enable": "1", **profile}
        instances = ('instance_group [ { kind: KIND_GPU } ]\noptimization { execution_accelerators {\n'
                     ' gpu_execution_accelerator : [ {\n  name : "tensorrt"\n'
                     + "".join(f'  parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in parameters.items())
                     + ' } ]\n} }\n')
    return (f'name: {json.dumps(group.graph)}\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
            f"dynamic_batching {{ }}\ninput {tensors(ids)}\noutput {tensors(outs)}\n{instances}")


def ensemble_config(groups: list[GroupModels], max_batch: int, specs: dict[str, TaskSpec]) -> str:
    pair = any(g.tokens.input == "pair" for g in groups)
    outs = [tensor(logits_name(t), "TYPE_FP32", [specs[t].num_outputs], labels=label_file(t))
            for g in groups for t in g.tokens.tasks]
    steps = []
    for g in groups:
        texts = [TEXT, TEXT_PAIR] if g.tokens.input == "pair" else [TEXT]
        feed = "".join(f' input_map {{ key: "{n}" value: "{n}" }}' for n in texts)
        ids = "".join(f' output_map {{ key: "{n}" value: "{g.tokens.label}_{n}" }}' for n in ID_TENSORS)
        steps.append(f'  {{ model_name: "{g.tokenizer}" model_version: -1{feed}{ids} }}')
        ids = "".join(f' input_map {{ key: "{n}" value: "{g.tokens.label}_{n}" }}' for n in ID_TENSORS)
        logits = "".join(f' output_map {{ key: "{logits_name(t)}" value: "{logits_name(t)}" }}' for t in g.tokens.tasks)
        steps.append(f'  {{ model_name: "{g.graph}" model_version: -1{ids}{logits} }}')
    return (f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            f"input {tensors(text_inputs(pair))}\noutput {tensors(outs)}\n"
            f"ensemble_scheduling {{\n step {tensors(steps)}\n}}\n")
