"""Triton model repository whose python-backend model runs centra's engine (`centra export-triton`,
`--backend python`, the default; `--backend onnxruntime` is export/triton.py's graph repository).

    <repo>/centra/config.pbtxt      backend "python", max_batch_size, dynamic batching (queue delay),
                                    instance_group count, inputs TEXT, TEXT_PAIR and TASKS (both optional),
                                    outputs LOGITS_<task> (with their label files) and ANSWERS
                                    (core/protocol.py), the engine's settings
    <repo>/centra/labels_<task>.txt each task's labels, one a line: Triton's classification extension
    <repo>/centra/N/model.py        one import: centra.serve.doors.triton's TritonPythonModel; N is the
                                    number of the exported version (v000003: 3), so that a call naming
                                    version N reaches the same version on `centra serve` and on Triton
    <repo>/centra/N/model/          the version's files, copied and hashed (the engine checks them again)
    <repo>/centra-triton.json       what was exported: version, engine, tasks, options, every file's hash
    <repo>/README.md

Unlike the graph repository, the per-request task subset and the branch-on-its-rows saving are kept:
Triton's batch of requests with different task sets is one Engine.run. Before publishing
(publish.publish_folder), the staged model loads the staged files and answers sample calls; its logits must
equal the source engine's within the engine's tolerance and a bad call must fail alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from centra import io, publish
from centra.core.protocol import (
    ANSWERS,
    INPUTS,
    MODEL,
    TASKS,
    TEXT,
    TEXT_PAIR,
    candidate_logits_name,
    logits_name,
    task_of,
)
from centra.core.texts import SAMPLE_PAIRS, SAMPLE_TEXTS
from centra.core.versions import MANIFEST, model_folder, read_manifest
from centra.errors import CentraError, FieldError, Name
from centra.export.triton_config import label_file, label_lines, tensor, triton_version
from centra.runtime.engine import Engine
from centra.serve.doors import triton as door
from centra.serve.doors.triton import VERSION_DIR

KIND = "triton repository"  # the same kind as the graph repository: either replaces the other
SUMMARY = "centra-triton.json"
README = "README.md"
# Triton's python backend loads model.py and looks for TritonPythonModel: the door, imported from centra
# (installed in the Python of Triton's python-backend stub)
MODEL_PY = ('"""centra\'s engine on Triton\'s python backend (written by `centra export-triton`)."""\n\n'
            "from centra.serve.doors.triton import TritonPythonModel  # noqa: F401\n")
TOLERANCE = 1e-5  # max |staged model - source engine| of a logit on the same rows (same engine, same files)
ENGINE_BATCH = 32


@dataclass(frozen=True)
class PythonRepoOptions:
    max_batch: int = 32  # Triton's max_batch_size: rows per request and per dynamic batch
    instances: int = 1  # instance_group count: model copies (processes), each with its own engine
    queue_delay_us: int = 0  # dynamic batching's max_queue_delay_microseconds
    engine: str | None = None  # runtime override ("torch" | "onnx"); None: the one the version's manifest names
    max_inputs_per_call: int = 256  # centra serve's limits, applied per request
    max_call_bytes: int = 1 << 20

    def check(self) -> None:
        for name in ("max_batch", "instances", "max_inputs_per_call", "max_call_bytes"):
            if getattr(self, name) < 1:
                raise FieldError(Name(name), f" must be >= 1, not {getattr(self, name)}")
        if self.queue_delay_us < 0:
            raise FieldError(Name("queue_delay_us"), f" must be >= 0, not {self.queue_delay_us}")
        if self.engine not in (None, "torch", "onnx"):
            raise FieldError(Name("engine"), f" {self.engine!r} is not one the python backend runs (torch, onnx)")


def model_config(engine: Engine, options: PythonRepoOptions) -> str:
    # TEXT_PAIR and TASKS may be left out, as on centra serve (Triton batches only requests that carry the
    # same inputs, and checks that each input has the request's rows: no single TASKS row for many texts)
    inputs = [tensor(n, "TYPE_STRING", [1], optional=n != TEXT) for n in INPUTS]
    outputs = [tensor(logits_name(s.name), "TYPE_FP32", [s.num_outputs], labels=label_file(s.name))
               for s in engine.specs.values()]
    outputs.append(tensor(ANSWERS, "TYPE_STRING", [1]))
    outputs += [tensor(candidate_logits_name(task), "TYPE_FP32", [s.num_outputs])  # asked for by name only
                for task, s in engine.candidates.items()]
    params = {"engine": options.engine or "", "engine_batch": ENGINE_BATCH,
              "max_inputs_per_call": options.max_inputs_per_call, "max_call_bytes": options.max_call_bytes}
    parameters = "".join(f"parameters {{ key: {json.dumps(k)} value {{ string_value: {json.dumps(str(v))} }} }}\n"
                         for k, v in params.items())
    return (f'name: "{MODEL}"\nbackend: "python"\nmax_batch_size: {options.max_batch}\n'
            f"dynamic_batching {{ max_queue_delay_microseconds: {options.queue_delay_us} }}\n"
            "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"
            f"instance_group [ {{ kind: KIND_CPU count: {options.instances} }} ]\n{parameters}")


def check_staged(stage: Path, reference: Engine, options: PythonRepoOptions) -> float:
    """Load the staged model as Triton would (its model.py, its files) and answer sample calls, a bad one
    among them: the worst |logit - reference| over the good ones; refuses what differs or fails."""
    version = stage / MODEL / triton_version(reference.version)
    if (version / "model.py").read_text(encoding="utf-8") != MODEL_PY:
        raise CentraError("triton: the staged model.py is not the one written")
    config = {"parameters": {"engine": {"string_value": options.engine or ""}}}
    engine, limits = door.load(version / VERSION_DIR, door.settings(config))
    if engine.content_id != reference.content_id:
        raise CentraError(f"triton: the staged model is {engine.content_id}, not {reference.content_id}")
    specs = list(reference.specs.values())
    singles = ",".join(s.name for s in specs if s.input == "single")
    pairs = ",".join(s.name for s in specs if s.input == "pair")
    texts = list(SAMPLE_TEXTS[:4])

    def call(tasks: str, with_pairs: bool, rows: int = len(texts)) -> dict:
        return {TEXT: np.array([[t.encode()] for t in texts[:rows]], dtype=object),
                TEXT_PAIR: np.array([[(SAMPLE_PAIRS[i % len(SAMPLE_PAIRS)] if with_pairs else "").encode()]
                                       for i in range(rows)], dtype=object),
                TASKS: np.array([[tasks.encode()]] * rows, dtype=object)}
    calls = [(call(singles, False), [], {})] if singles else []
    calls += [(call(pairs, True), [], {})] if pairs else []
    calls.append((call("no such task", False, 1), [], {}))
    outcomes = door.answer(engine, limits, calls)
    if not isinstance(outcomes[-1], CentraError):
        raise CentraError("triton: the staged model answered a call naming an unknown task")
    worst = 0.0
    for (arrays, _, _), outcome in zip(calls[:-1], outcomes[:-1]):
        if isinstance(outcome, BaseException):
            raise CentraError(f"triton: the staged model failed on sample texts: {outcome}")
        tasks = arrays[TASKS][0, 0].decode().split(",")
        given = [p[0].decode() for p in arrays[TEXT_PAIR]]
        want = reference.logits(texts, given if any(given) else None, tasks)
        for output in outcome:
            task = task_of(output.name)
            if task is not None:
                diff = float(np.abs(output.array - want[task].numpy()).max())
                worst = max(worst, diff)
    if not worst <= TOLERANCE:
        raise CentraError(f"triton: the staged model differs from the engine by {worst:.3e} > {TOLERANCE:g}: "
                          "refusing the export; nothing was published")
    return worst


def write_readme(path: Path, summary: dict) -> None:
    tasks = ", ".join(f"`{logits_name(t['name'])}` ({t['kind']}, {t['outputs']})" for t in summary["tasks"])
    path.write_text("\n".join([
        f"# centra Triton model repository (python backend, {summary['source_version']})", "",
        f"Written by `centra export-triton --backend python` from `{summary['source']}`. The model `{MODEL}` runs "
        f"centra's engine ({summary['runtime']}) on Triton's python backend: Triton's dynamic batch of requests, "
        "each with its own task set, is one engine run (the trunk once per token group, each branch only on the "
        "rows that asked for it).", "", "## Run", "", "```",
        f"tritonserver --model-repository {summary['repository']}", "```", "",
        "The Python of Triton's python-backend stub must have centra installed (`pip install centra` in the "
        "server image; its torch / onnxruntime run the engine on the CPU). With the `nvidia-pytriton` wheel "
        "instead of the container: `python -m centra.measure.tritonserver stub-env DIR` once, then `python -m "
        "centra.measure.tritonserver serve REPO` (see centra's README).", "",
        "## Tensors", "",
        "Inputs (BYTES, shape [rows, 1]): `TEXT`; `TEXT_PAIR` (optional; empty strings for single-text rows); "
        "`TASKS` (optional; comma-separated task names, the same on every row; empty or absent: every task that "
        "fits the inputs). Triton checks that every input of a request has its rows, so give TASKS one row per "
        "text (`centra serve` also takes a single row for all); it batches together only requests that carry "
        "the same inputs. Or name the tasks once, for every row, with the request parameter `tasks` "
        "(`parameters={\"tasks\": \"a,b\"}` in tritonclient, `\"parameters\": {\"tasks\": \"a,b\"}` in JSON; "
        "not with TASKS too), as on `centra serve`.", "",
        f"Outputs: per task asked for, {tasks}: the logits (FP32 [rows, outputs]); `ANSWERS` (BYTES [rows, 1]): per "
        "row a JSON object {task: {label | labels | value, scores, truncated}}, `centra predict`'s answers. "
        "A request that names no outputs gets all of its own. The output parameter `classification` K "
        "(tritonclient's `class_count`) on a logits output returns its top K as \"value:index:label\" "
        "(labels from `centra/labels_<task>.txt`); never on `ANSWERS` (BYTES), which tritonserver 2.51 does not "
        "survive.", "",
        f"Version `{summary['model_version']}` is centra's {summary['source_version']}: `centra serve` answers "
        "to the same number, so a call naming the version reaches the same one on both.", "",
        f"max_batch_size {summary['max_batch_size']}, {summary['instances']} instance(s), queue delay "
        f"{summary['queue_delay_us']} us. The same tensors are served by `centra serve` (Open Inference Protocol, "
        "model `centra`), so one tritonclient script runs against both.", ""]), encoding="utf-8")


def export_triton_python(model: Path, repo: Path, options: PythonRepoOptions | None = None) -> dict:
    """Publish the python-backend Triton repository of MODEL's current version at repo; return its summary."""
    options = options or PythonRepoOptions()
    options.check()
    repo = Path(repo)
    publish.check_writable_parent(repo)
    publish.check_replaceable(repo, KIND)  # before any work: never over a user's folder
    folder = model_folder(Path(model))
    manifest = read_manifest(folder)
    reference = Engine.load(folder, batch_size=ENGINE_BATCH, engine=options.engine)  # every file's hash checked
    summary: dict = {}

    def build(stage: Path) -> None:
        version = stage / MODEL / triton_version(manifest.version)
        (version / VERSION_DIR).mkdir(parents=True)
        (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
        files = {**manifest.files, MANIFEST: None}  # the manifest is what the content id hashes
        for rel, digest in files.items():
            dest = version / VERSION_DIR / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            io.copy_verified(folder / rel, dest, digest)
        (stage / MODEL / "config.pbtxt").write_text(model_config(reference, options), encoding="utf-8")
        for spec in reference.specs.values():
            (stage / MODEL / label_file(spec.name)).write_text(label_lines(spec), encoding="utf-8")
        worst = check_staged(stage, reference, options)
        summary.update({
            "format": "centra-triton", "backend": "python", "repository": str(repo.resolve()), "source": str(folder),
            "source_version": manifest.version, "model_id": reference.content_id, "runtime": reference.runtime,
            "model": MODEL, "model_version": version.name, "max_batch_size": options.max_batch,
            "instances": options.instances, "queue_delay_us": options.queue_delay_us, "tolerance": TOLERANCE,
            "parity": float(f"{worst:.3e}"),
            "tasks": [{"name": s.name, "kind": s.kind, "labels": s.labels, "input": s.input,
                       "outputs": s.num_outputs, "output": logits_name(s.name)} for s in reference.specs.values()]})
        write_readme(stage / README, summary)
        summary["files"] = io.hash_tree(stage)
        io.write_json(stage / SUMMARY, summary)

    def check(stage: Path) -> None:
        io.check_tree(stage, io.read_json(stage / SUMMARY)["files"], skip=(SUMMARY, publish.ARTIFACT_FILE))

    publish.publish_folder(repo, KIND, build, check)
    return summary
