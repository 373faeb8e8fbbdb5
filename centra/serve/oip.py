"""The Open Inference Protocol (KServe v2, what Triton and tritonclient speak): tensors <-> centra's calls,
and the gRPC servicer `inference.GRPCInferenceService` (the HTTP routes are in http.py).

One model, named `centra`, with the tensors of the Triton python-backend repository
(centra/export/triton_python.py), so one tritonclient script runs unchanged against both:
- inputs, BYTES, shape [rows, 1] (or [rows]): `TEXT`; `TEXT_PAIR` (empty strings for single-text calls;
  optional here); `TASKS` (comma-separated task names, the same on every row, or one row for all; empty:
  every task that fits the inputs, as centra.v1; optional here);
- outputs: `LOGITS_<task>` FP32 [rows, outputs] for each task the call asked for (the raw logits, the
  names of the ONNX Runtime-backend repository), and `ANSWERS` BYTES [rows, 1]: per row one JSON object
  {task: {"label" | "labels" | "value", "scores": {label: score}, "truncated"}}, `centra predict`'s
  answers. Logits alone would leave every client to re-implement softmax, thresholds and label names;
  Triton's classification extension covers top-k classes only (no multilabel thresholds, no regression).
  A call that names no outputs gets all of its own; asking for the logits of a task it did not ask for
  is refused;
- request parameter `max_labels` (an integer; 0 or absent: each task's own limit): at most this many labels
  in each multilabel answer of ANSWERS, as Classify's max_labels (the logits are unchanged).
- request parameter `timeout` (microseconds, what tritonclient's `infer(timeout=)` sends): the call's
  deadline (with gRPC's own deadline, whichever comes first); past it, DEADLINE_EXCEEDED, never computed.

The tensors become a centra.v1 ClassifyRequest and go through `rows_from_pb`: the same checks, limits and
messages as a Classify call, and the same batcher (an OIP call and a centra.v1 call share batches).
No grpc here at module level; the generated stubs are imported inside functions.
"""

from __future__ import annotations

import asyncio
import functools
import json
import struct
from dataclasses import dataclass

import numpy as np

from centra.runtime.engine import Engine, Row, RowResult
from centra.serve.convert import Limits, ServeError, Unparsed, answer_of, parser, rows_from_pb

SERVICE = "inference.GRPCInferenceService"
MODEL = "centra"
PLATFORM = "centra"
INPUTS = ("TEXT", "TEXT_PAIR", "TASKS")
ANSWERS = "ANSWERS"
LOGITS = "LOGITS_"
MAX_TENSORS = 16  # input tensors (and raw contents) in one call; three are known
OIP_FACTOR = 2  # an OIP call may be this many times the largest valid centra.v1 call on the wire
MAX_LABELS = "max_labels"  # the request parameter; other request parameters are not centra's and are ignored
TIMEOUT = "timeout"  # the request parameter tritonclient's infer(timeout=) sends: microseconds


def output_name(task: str) -> str:
    return f"{LOGITS}{task}"


def wire_bytes(limits: Limits) -> int:
    """The largest OIP request (serialized ModelInferRequest, or an HTTP body) read at all: TASKS repeats
    per row and BYTES elements carry 4-byte lengths, so more than a Classify call's framing."""
    return OIP_FACTOR * limits.wire_bytes + 16 * limits.max_inputs


@dataclass(frozen=True)
class Tensor:
    """One input tensor as given: name, datatype, shape, and its elements (BYTES: bytes each)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """The binary form of a BYTES tensor (each element: 4-byte little-endian length, then its bytes)."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ServeError(f"input {name}: truncated binary BYTES data")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise ServeError(f"input {name}: truncated binary BYTES data")
        out.append(raw[pos:pos + size])
        pos += size
    return out


def serialize_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def strings(tensor: Tensor, limits: Limits) -> list[str]:
    """A BYTES tensor of shape [rows] or [rows, 1] as strings (UTF-8)."""
    if tensor.datatype != "BYTES":
        raise ServeError(f"input {tensor.name}: datatype {tensor.datatype!r}, expected BYTES")
    shape = tensor.shape
    if not 1 <= len(shape) <= 2 or (len(shape) == 2 and shape[1] != 1) or shape[0] < 0:
        raise ServeError(f"input {tensor.name}: shape {list(shape)}, expected [rows, 1] or [rows]")
    if shape[0] > limits.max_inputs:
        raise ServeError(f"{shape[0]:,} inputs in one call; the limit is {limits.max_inputs:,}")
    if len(tensor.values) != shape[0]:
        raise ServeError(f"input {tensor.name}: shape {list(shape)} holds {shape[0]} elements, "
                         f"{len(tensor.values)} given")
    out = []
    for i, value in enumerate(tensor.values):
        if isinstance(value, str):
            out.append(value)
            continue
        try:
            out.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError:
            raise ServeError(f"input {tensor.name}, element {i}: not valid UTF-8") from None
    return out


def count_parameter(parameters, name: str, meaning: str, limit: int | None = None) -> int | None:
    """Request parameter `name` (parameters: name -> plain value) as an integer >= 0 (and < limit, when
    given); None when absent; anything else refused in one line."""
    value = parameters.get(name) if parameters else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or limit is not None and value >= limit:
        raise ServeError(f"parameter {name} must be an integer >= 0 ({meaning}), not {str(value)[:80]!r}")
    return value


def max_labels_of(parameters) -> int:
    """The request parameter max_labels (0 when absent: each task's own limit)."""
    return count_parameter(parameters, MAX_LABELS, "0: each task's own limit", 2**31) or 0


def deadline_of(parameters, now: float, deadline: float | None = None) -> float | None:
    """The call's deadline on the loop's clock: the request parameter timeout (microseconds, as
    tritonclient sends it; 0 or absent: none) or the transport's `deadline`, whichever comes first."""
    timeout = count_parameter(parameters, TIMEOUT, "microseconds; 0: none")
    if not timeout:
        return deadline
    mine = now + timeout / 1e6
    return mine if deadline is None else min(mine, deadline)


def classify_request(tensors: list[Tensor], limits: Limits):
    """OIP input tensors -> the centra.v1 ClassifyRequest they mean (checked as one by rows_from_pb)."""
    from centra.serve.v1 import centra_pb2 as pb

    if len(tensors) > MAX_TENSORS:
        raise ServeError(f"{len(tensors)} input tensors; the limit is {MAX_TENSORS}")
    by_name: dict[str, Tensor] = {}
    for tensor in tensors:
        if tensor.name not in INPUTS:
            raise ServeError(f"unknown input {tensor.name[:80]!r} (inputs: {', '.join(INPUTS)})")
        if tensor.name in by_name:
            raise ServeError(f"input {tensor.name} given twice")
        by_name[tensor.name] = tensor
    if "TEXT" not in by_name:
        raise ServeError("no TEXT input given")
    texts = strings(by_name["TEXT"], limits)
    pairs = strings(by_name["TEXT_PAIR"], limits) if "TEXT_PAIR" in by_name else [""] * len(texts)
    if len(pairs) != len(texts):
        raise ServeError(f"TEXT has {len(texts)} rows, TEXT_PAIR {len(pairs)}")
    tasks: list[str] = []
    if "TASKS" in by_name:
        given = strings(by_name["TASKS"], limits)
        if len(given) not in (1, len(texts)):
            raise ServeError(f"TEXT has {len(texts)} rows, TASKS {len(given)} (give one, or one per row)")
        if any(value != given[0] for value in given[1:]):
            raise ServeError("TASKS differs between rows: one task set per request")
        tasks = [name.strip() for name in given[0].split(",") if name.strip()] if given else []
    return pb.ClassifyRequest(inputs=[pb.Input(text=t, text_pair=p) for t, p in zip(texts, pairs)], tasks=tasks)


def rows_of(tensors: list[Tensor], engine: Engine, limits: Limits) -> tuple[object, list[Row]]:
    request = classify_request(tensors, limits)
    return request, rows_from_pb(request, engine, limits)


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str  # FP32 | BYTES
    array: np.ndarray  # FP32: float32 [rows, outputs]; BYTES: object (bytes) [rows, 1]

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return serialize_bytes(list(self.array.reshape(-1)))
        return np.ascontiguousarray(self.array, dtype="<f4").tobytes()

    def data(self) -> list:
        """The elements, flat, as JSON values."""
        if self.datatype == "BYTES":
            return [v.decode("utf-8") for v in self.array.reshape(-1)]
        return [float(v) for v in self.array.reshape(-1)]


def answers_json(row: Row, engine: Engine, result: RowResult, max_labels: int = 0) -> bytes:
    """The row's answers as `centra predict` gives them (a call's max_labels applied)."""
    answers = {}
    for name in row.tasks:
        answer = answer_of(engine, result, name, max_labels)
        answers[name] = {**answer, "truncated": result.truncated.get(name, False)}
    return json.dumps(answers, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def outputs_of(rows: list[Row], engine: Engine, results: list[RowResult], requested: list[str],
               max_labels: int = 0) -> list[Output]:
    """The call's outputs (all of them when `requested` is empty): LOGITS_<task> of its tasks, ANSWERS
    (at most max_labels labels per multilabel answer, when > 0)."""
    tasks = rows[0].tasks
    known = {output_name(t): t for t in tasks}
    names = requested or [*known, ANSWERS]
    for name in names:
        if name != ANSWERS and name not in known:
            task = name[len(LOGITS):] if name.startswith(LOGITS) else None
            if task is not None and task in engine.specs:
                raise ServeError(f"output {name}: task {task!r} was not asked for (TASKS)")
            raise ServeError(f"unknown output {name[:80]!r} (outputs: {', '.join([*known, ANSWERS])})")
    out = []
    for name in dict.fromkeys(names):
        if name == ANSWERS:
            values = np.empty((len(rows), 1), dtype=object)
            for i, (row, result) in enumerate(zip(rows, results)):
                values[i, 0] = answers_json(row, engine, result, max_labels)
            out.append(Output(ANSWERS, "BYTES", values))
        else:
            task = known[name]
            logits = np.stack([r.logits[task].float().numpy() for r in results]).astype(np.float32)
            out.append(Output(name, "FP32", logits))
    return out


def check_model(name: str, version: str, engine: Engine) -> None:
    if name != MODEL:
        raise ServeError(f"unknown model {name[:80]!r} (served: {MODEL})", "NOT_FOUND")
    if version and version != engine.version:
        raise ServeError(f"model {MODEL} has no version {version[:80]!r} (served: {engine.version or 'none'})",
                         "NOT_FOUND")


def metadata(engine: Engine) -> dict:
    """The model's metadata (the JSON form of ModelMetadataResponse)."""
    inputs = [{"name": name, "datatype": "BYTES", "shape": [-1, 1]} for name in INPUTS]
    outputs = [{"name": output_name(s.name), "datatype": "FP32", "shape": [-1, s.num_outputs]}
               for s in engine.specs.values()] + [{"name": ANSWERS, "datatype": "BYTES", "shape": [-1, 1]}]
    return {"name": MODEL, "versions": [engine.version] if engine.version else [], "platform": PLATFORM,
            "inputs": inputs, "outputs": outputs}


async def infer(batcher, tensors: list[Tensor], requested: list[str], limits: Limits,
                deadline: float | None = None, max_labels: int = 0) -> tuple[Engine, list[Output]]:
    """One OIP inference through the batcher: checked against the served engine, re-checked if a reload
    comes in between, outputs built by the engine that computed them."""
    engine = batcher.engine
    request, rows = rows_of(tensors, engine, limits)
    done = await batcher.submit(rows, deadline, checked=engine,
                                recheck=lambda other: rows_from_pb(request, other, limits))
    return done.engine, outputs_of(done.rows, done.engine, done.results, requested, max_labels)


# ------------------------------------------------------------------------------------------ gRPC


def tensors_from_pb(request) -> list[Tensor]:
    """ModelInferRequest inputs, from raw_input_contents (what tritonclient sends) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ServeError(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    out = []
    for i, item in enumerate(request.inputs):
        values = deserialize_bytes(raw[i], item.name) if raw else list(item.contents.bytes_contents)
        out.append(Tensor(item.name, item.datatype, tuple(item.shape), values))
    return out


def parameters_from_pb(parameters) -> dict:
    """A map<string, InferParameter> as {name: plain value}."""
    out = {}
    for name, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        out[name] = getattr(parameter, which) if which else None
    return out


def response_to_pb(request, engine: Engine, outputs: list[Output]):
    from centra.serve.inference import open_inference_grpc_pb2 as ip

    response = ip.ModelInferResponse(model_name=MODEL, model_version=engine.version, id=request.id)
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(output.raw())
    return response


class InferenceServicer:
    """inference.GRPCInferenceService over the batcher (the `mapped` status codes of status.py)."""

    def __init__(self, server, limits: Limits):
        self.server = server  # the CentraServer: its batcher (engine swapped on reload) and readiness
        self.limits = limits

    async def ServerLive(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        return ip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        return ip.ServerReadyResponse(ready=self.server.ready)

    async def ServerMetadata(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        return ip.ServerMetadataResponse(name="centra", version=self.server.engine.version, extensions=[])

    async def ModelReady(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        check_model(request.name, request.version, self.server.engine)
        return ip.ModelReadyResponse(ready=self.server.ready)

    async def ModelMetadata(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        engine = self.server.engine
        check_model(request.name, request.version, engine)
        meta = metadata(engine)
        return ip.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[ip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[ip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):
        check_model(request.model_name, request.model_version, self.server.engine)
        now = asyncio.get_running_loop().time()
        remaining = context.time_remaining()
        parameters = parameters_from_pb(request.parameters)
        deadline = deadline_of(parameters, now, None if remaining is None else now + remaining)
        engine, outputs = await infer(self.server.batcher, tensors_from_pb(request),
                                      [o.name for o in request.outputs], self.limits, deadline,
                                      max_labels_of(parameters))
        return response_to_pb(request, engine, outputs)


def parsed(method):
    """A request the server did not parse (see convert.Unparsed) is refused before the method runs."""

    @functools.wraps(method)
    async def checked(self, request, context):
        if isinstance(request, Unparsed):
            raise ServeError(request.message)
        return await method(self, request, context)
    return checked


def add_inference(server, servicer: InferenceServicer, max_bytes: int) -> None:
    """Register inference.GRPCInferenceService (status codes by `mapped`; ModelInfer's request over
    max_bytes, or with more than MAX_TENSORS inputs, refused unparsed)."""
    import grpc

    from centra.serve.inference import open_inference_grpc_pb2 as ip
    from centra.serve.status import mapped

    counts = {5: (MAX_TENSORS, "input tensors"), 7: (MAX_TENSORS, "raw input contents")}  # ModelInferRequest's
    handlers = {}
    for name in ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"):
        method = ip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[name]
        request = getattr(ip, method.input_type.name)
        response = getattr(ip, method.output_type.name)
        limit, counted = (max_bytes, counts) if name == "ModelInfer" else (1 << 16, None)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            mapped(parsed(getattr(type(servicer), name))).__get__(servicer),
            request_deserializer=parser(request, limit, counted),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
