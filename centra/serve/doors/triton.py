"""centra's engine as a Triton python-backend model: `centra export-triton --backend python`
(export/triton_python.py) writes <repository>/centra/N/model.py (N: the version's number) as one import of
this module's `TritonPythonModel`, beside the version's files in <repository>/centra/N/model/ (hashed when
copied, checked again when the engine loads them).

It is a serving door like the gRPC and HTTP ones, with the OIP door's tensors (doors/oip_tensors.py)
and the one call type's checks and messages (serve/call.py): inputs TEXT, TEXT_PAIR, TASKS (BYTES; the
last two optional, as on centra serve); outputs LOGITS_<task> (FP32) for the request's tasks and ANSWERS
(BYTES, one JSON object per row). Triton's own front end answers the `classification` output parameter
(with the repository's label files), so the model never sees it.
Triton's dynamic batcher hands `execute` several requests, each with its own task set: they become ONE
`Engine.run` over all their rows (the trunk once per token group, each branch only on the rows that asked
for it). Errors are per request: a request that fails its checks gets its own error (the message `centra
serve` gives) and the others run; if the merged run fails, each request runs alone, so a bad one fails
alone.

Runs inside Triton's Python (the stub's): it needs centra installed there. `triton_python_backend_utils`
exists only inside Triton: imported in the methods. `answer` is plain Python, so `centra export-triton`
checks the staged model with it, without Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

from centra.core.protocol import INPUTS

VERSION_DIR = "model"  # the version's files, under the Triton model version folder


def settings(config: dict) -> dict[str, str]:
    """The model's config.pbtxt `parameters` as strings."""
    return {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


def load(folder: Path, params: dict[str, str]):
    """The version's engine (its manifest's runtime, or params["engine"]), warmed up; and the limits."""
    from centra.runtime.engine import Engine, Row
    from centra.serve.call import Limits

    engine = Engine.load(folder, batch_size=int(params.get("engine_batch", "32")), engine=params.get("engine") or None)
    engine.run([Row("warm up", "warm up", tuple(engine.branches))])  # candidate heads too
    limits = Limits(int(params.get("max_inputs_per_call", "256")), int(params.get("max_call_bytes", str(1 << 20))))
    return engine, limits


def answer(engine, limits, calls: list[tuple[dict, list[str], dict]]) -> list:
    """Per call ({input name: numpy array of bytes}, requested output names ([] = all of its own), its
    request parameters (tasks, max_labels, head)): its outputs (list of oip.Output) or the exception that refuses
    it. One engine run over every checked call's rows; when it fails, each call runs alone. A task's
    candidate head runs only for a call that asks for it (the head parameter, or its CANDIDATE_LOGITS_
    output): Triton shows none of centra's shadow figures, so nothing else pays for it."""
    from centra.serve.call import Answered
    from centra.serve.doors.oip_tensors import Tensor, call_of, outputs_of

    out: list = [None] * len(calls)
    checked = []  # (index, call, rows, requested, heads)
    for i, (arrays, requested, parameters) in enumerate(calls):
        try:
            tensors = [Tensor(name, "BYTES", tuple(array.shape), list(array.reshape(-1)))
                       for name, array in arrays.items()]
            call = call_of(tensors, limits, parameters)
            rows = call.rows(engine, limits)
            checked.append((i, call, *asked_heads(engine, call, rows, requested), requested))
        except Exception as exc:
            out[i] = exc
    if not checked:
        return out
    try:
        results = engine.interpret_all(engine.run([row for _, _, rows, _, _ in checked for row in rows]))
    except Exception:
        results = None  # one error slot per request: find the bad one(s) by running each alone
    offset = 0
    for i, call, rows, heads, requested in checked:
        try:
            if results is not None:
                mine = results[offset:offset + len(rows)]
            else:
                mine = engine.interpret_all(engine.run(rows))
            out[i] = outputs_of(Answered(call, call.rows(engine, limits), engine, mine, heads), requested)
        except Exception as exc:
            out[i] = exc
        offset += len(rows)
    return out


def asked_heads(engine, call, rows: list, requested: list[str]) -> tuple[list, dict[str, str]]:
    """The rows with the candidate keys the call asks for (the head parameter, or a CANDIDATE_LOGITS_
    output), and the head that answers each of its tasks that has a candidate head."""
    from centra.core.protocol import candidate_logits_name
    from centra.core.shadow import candidate_key
    from centra.runtime.engine import Row
    from centra.serve.shadow import choose_heads

    tasks = list(rows[0].tasks) if rows else []
    heads = choose_heads(None, tasks, engine, call.head, call.request_id)
    wanted = [t for t in heads if heads[t] == "candidate" or candidate_logits_name(t) in requested]
    if not wanted:
        return rows, heads
    return [Row(r.text, r.pair, r.tasks + tuple(candidate_key(t) for t in wanted)) for r in rows], heads


def parameters_of(request) -> dict:
    """A Triton request's parameters (a JSON object) as a dict; {} where the backend has none or they are
    not an object (then tasks and max_labels cannot be asked for)."""
    try:
        parameters = json.loads(request.parameters())
    except (AttributeError, TypeError, ValueError):
        return {}
    return parameters if isinstance(parameters, dict) else {}


def refusal(exc: BaseException) -> tuple[str, str]:
    """(gRPC code name, one-line message): `centra serve`'s answer to the same call."""
    from centra.serve.status import status_of

    code, message = status_of(exc)
    if code == "INTERNAL":  # a server fault: its traceback goes to Triton's log, not to the caller
        import traceback

        traceback.print_exception(exc)
    return code, message


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = settings(config)
        folder = Path(args["model_repository"]) / args["model_version"] / VERSION_DIR
        self.engine, self.limits = load(folder, params)
        self.outputs = {item["name"] for item in config.get("output", [])}
        self.version = args["model_version"]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        calls = []
        for request in requests:
            arrays = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            requested = list(request.requested_output_names())
            # Triton asks for every output when the client named none: then the call's own outputs
            calls.append((arrays, [] if self.outputs <= set(requested) else requested, parameters_of(request)))
        responses = []
        for outcome in answer(self.engine, self.limits, calls):
            if isinstance(outcome, BaseException):
                code, message = refusal(outcome)
                codes = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                kind = {"NOT_FOUND": "NOT_FOUND", "UNAVAILABLE": "UNAVAILABLE", "INTERNAL": "INTERNAL"}.get(
                    code, "INVALID_ARG")
                error = (pb_utils.TritonError(message, getattr(pb_utils.TritonError, kind)) if codes is not None
                         else pb_utils.TritonError(message))
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(o.name, o.array) for o in outcome]))
        return responses

    def finalize(self):
        self.engine = None
