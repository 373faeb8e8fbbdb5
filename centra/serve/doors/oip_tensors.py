"""The Open Inference Protocol's tensors (KServe v2, what Triton and tritonclient speak) <-> centra's call
type, for every transport that carries them: OIP over gRPC and HTTP (doors/oip.py) and the Triton model
(doors/triton.py). The names are core/protocol.py's, which the Triton repositories share.

- inputs, BYTES, shape [rows, 1] (or [rows]): `TEXT`; `TEXT_PAIR` (empty strings for single-text calls;
  optional); `TASKS` (comma-separated task names, the same on every row, or one row for all; empty or
  absent: every task that fits the inputs, as centra.v1). Triton checks that every input of a request has
  the same rows before its model runs, so there a single TASKS row is for single-row requests only;
- outputs: `LOGITS_<task>` FP32 [rows, outputs] for each task the call asked for (the raw logits, the
  names of the ONNX Runtime-backend repository), and `ANSWERS` BYTES [rows, 1]: per row one JSON object
  {task: {"label" | "labels" | "value", "scores": {label: score}, "truncated"}}, `centra predict`'s
  answers. Logits alone would leave every client to re-implement softmax, thresholds and label names;
  Triton's classification extension covers top-k classes only (no multilabel thresholds, no regression).
  A call that names no outputs gets all of its own; asking for the logits of a task it did not ask for
  is refused;
- output parameter `classification` K (Triton's classification extension, tritonclient's `class_count`)
  on a LOGITS_<task> output: that output comes back as BYTES [rows, min(K, outputs)], per row its K
  highest logits as "value:index:label", highest first (value as C's %f, Triton's own formatting; the
  Triton repositories carry the same labels in their label files); 0 or absent: the logits themselves;
- request parameter `tasks` (a string: comma-separated task names, e.g. "sentiment,topic"): every row asks
  for these tasks, as a TASKS input on every row would. The portable way to name the tasks once: Triton
  refuses a single TASKS row for many texts before the model runs. Not with TASKS too; no empty names;
- request parameter `max_labels` (an integer; 0 or absent: each task's own limit): at most this many labels
  in each multilabel answer of ANSWERS, as Classify's max_labels (the logits are unchanged);
- request parameter `timeout` (microseconds, what tritonclient's `infer(timeout=)` sends): the call's
  deadline (with the transport's own deadline, whichever comes first); past it, DEADLINE_EXCEEDED, never
  computed;
- tasks with a candidate head (serve/shadow.py): request parameters `head` ("active" | "candidate") and
  `request_id` (the canary fraction's draw), or the headers X-Centra-Head and X-Request-Id; ANSWERS
  names the head that answered ("head"), LOGITS_<task> are that head's, and `CANDIDATE_LOGITS_<task>`
  (FP32) carries the candidate's logits when the call names that output (never among the default ones).

The tensors become a `Call`: the same checks, limits and messages as a centra.v1 call, and the same batcher.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from centra.core import protocol as wire
from centra.core.protocol import (
    ANSWERS,
    CLASSIFICATION,
    HEADER_LENGTH,
    INPUTS,
    TASKS,
    TEXT,
    TEXT_PAIR,
    candidate_logits_name,
    logits_name,
    task_of,
)
from centra.core.shadow import candidate_key
from centra.core.versions import names_version, version_number
from centra.runtime.engine import Engine
from centra.serve.call import MAX_LABELS_LIMIT, Answered, Call, Limits, ServeError
from centra.serve.http import strings_over
from centra.serve.status import one_line

PLATFORM = "centra_{runtime}"  # the spec's <project>_<format>: centra's engine on its runtime (torch, onnx...)
MAX_TENSORS = 16  # input tensors (and raw contents) in one call; three are known
MAX_NAMES = 256  # strings of a valid inference request besides its elements: keys, names, datatypes, ids


@dataclass(frozen=True)
class Tensor:
    """One input tensor as given: name, datatype, shape, and its elements (BYTES: bytes each)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list


def deserialize_bytes(raw: bytes, name: str, max_elements: int | None = None) -> list[bytes]:
    """The binary form of a BYTES tensor (each element: 4-byte little-endian length, then its bytes); more
    than `max_elements` elements are refused before the rest is read."""
    out, pos = [], 0
    while pos < len(raw):
        if max_elements is not None and len(out) >= max_elements:
            raise ServeError(f"input {name[:80]}: more than {max_elements:,} elements; the limit is {max_elements:,} "
                             "rows per call")
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
    return count_parameter(parameters, wire.MAX_LABELS, "0: each task's own limit", MAX_LABELS_LIMIT) or 0


def deadline_of(parameters, now: float, deadline: float | None = None) -> float | None:
    """The call's deadline on the loop's clock: the request parameter timeout (microseconds, as
    tritonclient sends it; 0 or absent: none) or the transport's `deadline`, whichever comes first."""
    timeout = count_parameter(parameters, wire.TIMEOUT, "microseconds; 0: none")
    if not timeout:
        return deadline
    mine = now + timeout / 1e6
    return mine if deadline is None else min(mine, deadline)


def text_parameter(parameters, name: str) -> str:
    """Request parameter `name` as a string ("" when absent)."""
    value = parameters.get(name) if parameters else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ServeError(f"parameter {name} must be a string, not {str(value)[:80]!r}")
    return value


def tasks_parameter(parameters, limits: Limits) -> list[str] | None:
    """The request parameter tasks ("name,name,..."): its task names; None when absent. Not a string, an
    empty name or more names than the limit are refused in one line."""
    value = parameters.get(wire.TASKS_PARAMETER) if parameters else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServeError(f"parameter {wire.TASKS_PARAMETER} must be a string of comma-separated task names, "
                         f"not {str(value)[:80]!r}")
    limits.check_task_names(value.count(",") + 1)
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise ServeError(f"parameter {wire.TASKS_PARAMETER} {value[:80]!r} has an empty task name "
                         "(comma-separated task names; leave it out for every task that fits)")
    return names


def call_of(tensors: list[Tensor], limits: Limits, parameters: dict | None = None,
            deadline: float | None = None) -> Call:
    """OIP input tensors (and request parameters: tasks, max_labels, head, request_id) -> the Call they mean."""
    if len(tensors) > MAX_TENSORS:
        raise ServeError(f"{len(tensors)} input tensors; the limit is {MAX_TENSORS}")
    by_name: dict[str, Tensor] = {}
    for tensor in tensors:
        if tensor.name not in INPUTS:
            raise ServeError(f"unknown input {tensor.name[:80]!r} (inputs: {', '.join(INPUTS)})")
        if tensor.name in by_name:
            raise ServeError(f"input {tensor.name} given twice")
        by_name[tensor.name] = tensor
    if TEXT not in by_name:
        raise ServeError(f"no {TEXT} input given")
    texts = strings(by_name[TEXT], limits)
    pairs = strings(by_name[TEXT_PAIR], limits) if TEXT_PAIR in by_name else [""] * len(texts)
    if len(pairs) != len(texts):
        raise ServeError(f"{TEXT} has {len(texts)} rows, {TEXT_PAIR} {len(pairs)}")
    tasks: list[str] = []
    if TASKS in by_name:
        given = strings(by_name[TASKS], limits)
        if len(given) not in (1, len(texts)):
            raise ServeError(f"{TEXT} has {len(texts)} rows, {TASKS} {len(given)} (give one, or one per row)")
        if any(value != given[0] for value in given[1:]):
            raise ServeError(f"{TASKS} differs between rows: one task set per request")
        tasks = [name.strip() for name in given[0].split(",") if name.strip()] if given else []
    named = tasks_parameter(parameters, limits)
    if named is not None:
        if TASKS in by_name:
            raise ServeError(f"both the {TASKS} input and the {wire.TASKS_PARAMETER} parameter given: name the "
                             "tasks once")
        tasks = named
    return Call(texts=texts, pairs=pairs, tasks=tasks, max_labels=max_labels_of(parameters), deadline=deadline,
                head=text_parameter(parameters, wire.HEAD), request_id=text_parameter(parameters, wire.REQUEST_ID))


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str  # FP32 | BYTES
    array: np.ndarray  # FP32: float32 [rows, outputs]; BYTES: object (bytes) [rows, 1] or [rows, classes]

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


def classification_of(parameters: dict, output: str) -> int:
    """An output's `classification` parameter: how many top classes to return (0: the tensor itself)."""
    try:
        return count_parameter(parameters, CLASSIFICATION, "how many top classes; 0: the logits",
                               MAX_LABELS_LIMIT) or 0
    except ServeError as exc:
        raise ServeError(f"output {output[:80]}: {exc}") from None


def top_classes(logits: np.ndarray, labels: list[str], count: int) -> np.ndarray:
    """Per row of `logits` [rows, outputs], its `count` highest values (ties: the lower index first) as
    "value:index:label" (value as C's %f, which is how Triton writes it), BYTES [rows, min(count, outputs)]."""
    rows, outputs = logits.shape
    order = np.argsort(-logits, axis=1, kind="stable")[:, :min(count, outputs)]
    out = np.empty(order.shape, dtype=object)
    for i in range(rows):
        for k, j in enumerate(order[i]):
            out[i, k] = f"{float(logits[i, j]):f}:{j}:{labels[j]}".encode()
    return out


def classified(outputs: list[Output], classes: dict[str, int], engine: Engine) -> list[Output]:
    """The outputs, each asked for with a classification count as its top classes (`top_classes`)."""
    out = []
    for output in outputs:
        count = classes.get(output.name, 0)
        if count:
            task = task_of(output.name) or (output.name.removeprefix(wire.CANDIDATE_LOGITS)
                                            if output.name.startswith(wire.CANDIDATE_LOGITS) else None)
            if output.datatype != "FP32" or task is None:
                raise ServeError(f"output {output.name}: classification is for the logits outputs "
                                 f"({logits_name('<task>')}, {wire.CANDIDATE_LOGITS}<task>), not "
                                 f"{output.datatype} ones")
            output = Output(output.name, "BYTES", top_classes(output.array, engine.specs[task].labels, count))
        out.append(output)
    return out


def answers_json(answered: Answered, i: int) -> bytes:
    """Row i's answers as `centra predict` gives them (the call's max_labels applied)."""
    answers = {name: {**answered.answer(i, name).to_dict(), "truncated": answered.truncated(i, name),
                      **({"head": answered.head(name)} if answered.head(name) else {})}
               for name in answered.rows[i].tasks}
    return json.dumps(answers, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def outputs_of(answered: Answered, requested: list[str]) -> list[Output]:
    """The call's outputs (all of them when `requested` is empty): LOGITS_<task> of its tasks (the answering
    head's), ANSWERS; CANDIDATE_LOGITS_<task> of its tasks with a candidate head only when requested."""
    rows, results, engine = answered.rows, answered.results, answered.engine
    own = {logits_name(t): answered.key(t) for t in rows[0].tasks}
    names = requested or [*own, ANSWERS]
    known = {**own, **{candidate_logits_name(t): candidate_key(t) for t in rows[0].tasks if t in engine.candidates}}
    for name in names:
        if name != ANSWERS and name not in known:
            task = task_of(name)
            if task is not None and task in engine.specs:
                raise ServeError(f"output {name}: task {task!r} was not asked for ({TASKS})")
            raise ServeError(f"unknown output {name[:80]!r} (outputs: {', '.join([*known, ANSWERS])})")
    out = []
    for name in dict.fromkeys(names):
        if name == ANSWERS:
            values = np.empty((len(rows), 1), dtype=object)
            for i in range(len(rows)):
                values[i, 0] = answers_json(answered, i)
            out.append(Output(ANSWERS, "BYTES", values))
        else:
            key = known[name]
            logits = np.stack([r.logits[key].float().numpy() for r in results]).astype(np.float32)
            out.append(Output(name, "FP32", logits))
    return out


def check_model(name: str, version: str, engine: Engine) -> None:
    """The model by its name; the version (when given) by its name or its number (Triton's numbered
    versions); NOT_FOUND otherwise."""
    if name != wire.MODEL:
        raise ServeError(f"unknown model {name[:80]!r} (served: {wire.MODEL})", "NOT_FOUND")
    if version and not names_version(version, engine.version):
        number = version_number(engine.version)
        served = f"{engine.version}, number {number}" if number is not None else engine.version or "none"
        raise ServeError(f"model {wire.MODEL} has no version {version[:80]!r} (served: {served})", "NOT_FOUND")


def metadata(engine: Engine) -> dict:
    """The model's metadata (the JSON form of ModelMetadataResponse)."""
    inputs = [{"name": name, "datatype": "BYTES", "shape": [-1, 1]} for name in INPUTS]
    outputs = [{"name": logits_name(s.name), "datatype": "FP32", "shape": [-1, s.num_outputs]}
               for s in engine.specs.values()] + [{"name": ANSWERS, "datatype": "BYTES", "shape": [-1, 1]}]
    outputs += [{"name": candidate_logits_name(task), "datatype": "FP32", "shape": [-1, s.num_outputs]}
                for task, s in engine.candidates.items()]
    return {"name": wire.MODEL, "versions": [engine.version] if engine.version else [],
            "platform": PLATFORM.format(runtime=engine.runtime),
            "inputs": inputs, "outputs": outputs}


@dataclass(frozen=True)
class HttpInfer:
    """An inference request over HTTP, parsed: its JSON head, its input tensors, the outputs it names
    ({name: as binary?}; none: all of its own), their classification counts, and binary_data_output."""

    doc: dict
    tensors: list[Tensor]
    outputs: dict[str, bool]
    classes: dict[str, int]
    binary_output: bool


def parse_infer(body: bytes, header_length: str | None, max_inputs: int) -> HttpInfer:
    """An OIP inference request body (JSON, or JSON + binary tensors), parsed. Its strings are counted
    before it is parsed (a valid call has at most a row per element of each input, and a few names); every
    part of the JSON is checked for its type, so a malformed request gets one line, never a server fault."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ServeError(f"{HEADER_LENGTH} is not a number") from None
        if not 0 <= size <= len(body):
            raise ServeError(f"{HEADER_LENGTH} {size:,} is outside the body's {len(body):,} bytes")
        head, blob = body[:size], body[size:]
    else:
        head, blob = body, b""
    most = len(INPUTS) * max_inputs + MAX_NAMES
    if strings_over(head, most):
        raise ServeError(f"more than {most:,} strings in one inference request ({max_inputs:,} rows per input "
                         "at most)")
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ServeError(f"the body is not an inference request in JSON ({one_line(str(exc))[:200]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ServeError("the body is not an inference request: no list of inputs")
    params = object_of(doc.get("parameters"), "the request's parameters")
    binary_output = bool(params.get("binary_data_output", False))
    if len(doc["inputs"]) > MAX_TENSORS:
        raise ServeError(f"{len(doc['inputs'])} input tensors; the limit is {MAX_TENSORS}")
    tensors, offset = [], 0
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ServeError("an input is not an object with a name")
        name, shape = item["name"], item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ServeError(f"input {name[:80]}: no shape (a list of integers)")
        size = object_of(item.get("parameters"), f"input {name[:80]}: parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or not 0 <= size <= len(blob) - offset:
                shown = size if isinstance(size, int) else str(size)[:80]
                raise ServeError(f"input {name[:80]}: binary_data_size {shown!r} is outside the body")
            values = deserialize_bytes(blob[offset:offset + size], name, max_inputs) \
                if item.get("datatype") == "BYTES" else []
            offset += size
        else:
            values = flatten(item.get("data", []), name)
        tensors.append(Tensor(name, str(item.get("datatype", ""))[:80], tuple(shape), values))
    if offset != len(blob):
        raise ServeError(f"{len(blob) - offset:,} bytes of binary data that no input claims")
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list) or len(outputs) > MAX_TENSORS:
        raise ServeError(f"the request's outputs are not a list of at most {MAX_TENSORS} objects")
    requested, classes = {}, {}
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ServeError("an output is not an object with a name")
        given = object_of(item.get("parameters"), f"output {item['name'][:80]}: parameters")
        requested[item["name"]] = bool(given.get("binary_data", binary_output))
        classes[item["name"]] = classification_of(given, item["name"])
    return HttpInfer(doc, tensors, requested, classes, binary_output)


def object_of(value, what: str) -> dict:
    """A JSON object that may be absent (null: {}), or a one-line refusal."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ServeError(f"{what} are not an object")
    return value


def flatten(data, name: str) -> list:
    """JSON tensor data, nested or flat, as a flat list of strings."""
    out, stack = [], [data]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, str):
            out.append(value)
        else:
            raise ServeError(f"input {name[:80]}: BYTES data must be strings")
    return out


