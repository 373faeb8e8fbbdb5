"""Protocol buffers <-> the engine: a ClassifyRequest checked and turned into Rows before it is queued,
RowResults turned into a ClassifyResponse, the served model described as a ListTasksResponse.

Work per call is bounded before any check: the raw message is refused on its length alone, or on its
count of inputs or task names (a walk over its top-level fields that stops at the limit), before it is
parsed (`parser`); then sizes. Names echoed in messages are cut (`shown`), so no refusal outgrows gRPC's metadata limit.

No grpc here; the generated message module (protobuf only) is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from centra.core.answers import interpret
from centra.core.task import NAME_RE, TaskSpec
from centra.core.tokens import check_texts
from centra.errors import CentraError
from centra.runtime.engine import Engine, Row, RowResult

CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL")
MAX_TASK_NAMES = 1024  # task names in one call (duplicates count)
# Protobuf framing around one Input at most: its tag and length (1 + 4 bytes), and three string fields'
# tags and lengths (3 x (1 + 4)). Per task name: 1 + 4. Plus the message's own slack.
INPUT_FRAMING, NAME_FRAMING, MESSAGE_FRAMING = 20, 5, 64
SHOWN_CHARS = 80  # of a name echoed in an error
SHOWN_NAMES = 20  # names listed in an error


class ServeError(CentraError):
    """A refused call: a one-line message and the name of the gRPC status code it is answered with."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        if code not in CODES:
            raise ValueError(f"unknown status code name {code!r}")
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What one call may carry. Bytes: UTF-8 bytes of its texts, pair texts, ids and task names together."""

    max_inputs: int = 256
    max_bytes: int = 1 << 20
    max_task_names: int = MAX_TASK_NAMES

    @property
    def wire_bytes(self) -> int:
        """The largest serialized ClassifyRequest a valid call can be: content plus framing."""
        return (self.max_bytes + INPUT_FRAMING * self.max_inputs + NAME_FRAMING * self.max_task_names
                + MESSAGE_FRAMING)


class Unparsed:
    """Stands in for a request the server did not parse: over the size limit (refused on its length alone)
    or not a valid message (e.g. a string field that is not UTF-8), so the servicer answers
    INVALID_ARGUMENT instead of grpc's UNKNOWN with the parser's exception text."""

    def __init__(self, message: str):
        self.message = message


def parser(message_type, max_bytes: int | None = None, max_counts: dict[int, tuple[int, str]] | None = None):
    """Request deserializer for a handler: bytes -> message, or Unparsed. Bytes over `max_bytes` are
    never parsed; nor is a message with more than N repeated top-level fields of a number in
    `max_counts` ({field number: (N, what)}), counted by walking the top-level fields (the walk stops
    at the first one over its limit, so it costs at most the limits, never the message's size)."""
    from google.protobuf.message import DecodeError

    name = message_type.DESCRIPTOR.name

    def parse(data: bytes):
        if max_bytes is not None and len(data) > max_bytes:
            return Unparsed(f"the {name} has {len(data):,} bytes; the limit is {max_bytes:,} "
                            "(fewer inputs or shorter texts per call)")
        over = over_count(data, max_counts) if max_counts else None
        if over is not None:
            return Unparsed(over)
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Unparsed(f"the {name} could not be parsed (is every string valid UTF-8?)")
    return parse


def over_count(data: bytes, max_counts: dict[int, tuple[int, str]]) -> str | None:
    """Why the message carries too many of a counted field, or None (also for malformed bytes: the
    parser then says so)."""
    counts: dict[int, int] = {}
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = _varint(data, pos)
        if tag is None:
            return None
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            length, pos = _varint(data, pos)
            if length is None:
                return None
            pos += length
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            return None
        if field in max_counts:
            counts[field] = counts.get(field, 0) + 1
            limit, what = max_counts[field]
            if counts[field] > limit:
                return f"more than {limit:,} {what} in one call; the limit is {limit:,}"
    return None


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


def shown(name: str) -> str:
    """A caller's name as echoed in an error: repr, cut to SHOWN_CHARS characters."""
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}... ({len(name):,} characters)"


def listed(names: list[str]) -> str:
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f", ... ({more} more)" if more > 0 else "")


def rows_from_pb(request, engine: Engine, limits: Limits) -> list[Row]:
    """Check a ClassifyRequest against the engine's tasks and the limits; one Row per input. Refusals are
    ServeErrors: NOT_FOUND for an unknown task, INVALID_ARGUMENT for everything else (sizes included:
    retrying a call that is too large cannot help). Counts are checked before anything is materialised."""
    if isinstance(request, Unparsed):
        raise ServeError(request.message)
    count, name_count = len(request.inputs), len(request.tasks)  # O(1) on a parsed message
    if not count:
        raise ServeError("no inputs given")
    if count > limits.max_inputs:
        raise ServeError(f"{count:,} inputs in one call; the limit is {limits.max_inputs:,}")
    if name_count > limits.max_task_names:
        raise ServeError(f"{name_count:,} task names in one call; the limit is {limits.max_task_names:,}")
    max_labels = getattr(request, "max_labels", 0)  # a request built in process may predate the field
    if max_labels < 0:
        raise ServeError(f"max_labels must be >= 0 (0: the task's own limit), not {max_labels}")
    inputs = list(request.inputs)
    names = list(request.tasks)
    size = sum(utf8_size(value, f"input {i}: {what}") for i, item in enumerate(inputs)
               for what, value in (("text", item.text), ("text_pair", item.text_pair), ("id", item.id)))
    size += sum(utf8_size(name, "a task name") for name in names)
    if size > limits.max_bytes:
        raise ServeError(f"{size:,} bytes of text, ids and task names in one call; the limit is {limits.max_bytes:,}")
    has_pair = [bool(item.text_pair) for item in inputs]
    specs = select_tasks(engine, names, all(has_pair))
    pair_task = next((s.name for s in specs if s.input == "pair"), None)
    for i, given in enumerate(has_pair):
        if given and pair_task is None:  # it would be silently ignored
            raise ServeError(f"input {i} has a text_pair but no task asked for takes pairs "
                             f"({listed([s.name for s in specs])})")
        if not given and pair_task is not None:
            raise ServeError(f"input {i} has no text_pair; task {pair_task!r} takes text pairs")
    texts = [item.text for item in inputs]
    pairs = [item.text_pair for item in inputs] if pair_task else None
    check_texts(texts, pairs)  # empty or oversized texts: one-line CentraErrors, INVALID_ARGUMENT
    chosen = tuple(s.name for s in specs)
    return [Row(text, pairs[i] if pairs else None, chosen) for i, text in enumerate(texts)]


def utf8_size(value: str, what: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: protobuf would not send it, a caller in-process might
        raise ServeError(f"{what} is not valid UTF-8") from None


def select_tasks(engine: Engine, names: list[str], every_input_has_pair: bool) -> list[TaskSpec]:
    """Named tasks (each known, duplicates once), or every task that fits the inputs when none is named."""
    specs = engine.specs
    if names:
        for name in dict.fromkeys(names):
            if name not in specs:
                known = listed(sorted(specs))
                if not NAME_RE.match(name):  # not even a possible task name: cut, and said so
                    raise ServeError(f"unknown task {shown(name)}: not a task name (known: {known})", "NOT_FOUND")
                raise ServeError(f"unknown task {shown(name)} (known: {known})", "NOT_FOUND")
        return [specs[name] for name in dict.fromkeys(names)]
    chosen = [s for s in specs.values() if every_input_has_pair or s.input == "single"]
    if not chosen:
        raise ServeError("every task takes text pairs: give every input a text_pair")
    return chosen


def answer_of(engine: Engine, result: RowResult, name: str, max_labels: int = 0) -> dict:
    """Task `name`'s answer in `result`; a call's max_labels (> 0) re-reads a multilabel task's logits
    (the answers computed with the batch hold the task's own limit only)."""
    answer = result.answers.get(name)
    if answer is None or max_labels and "labels" in answer:
        answer = interpret(engine.specs[name], result.logits[name], max_labels or None)
    return answer


def response_to_pb(request, rows: list[Row], engine: Engine, results: list[RowResult]):
    """One InputResult per input (ids echoed), one TaskResult per task of its row, in the row's order.
    `engine` must be the one that computed the results (its labels, version and content id describe them);
    the call's max_labels applies (answer_of)."""
    from centra.serve.v1 import centra_pb2 as pb

    response = pb.ClassifyResponse(model_version=engine.version, model_id=engine.content_id)
    max_labels = getattr(request, "max_labels", 0)
    for item, row, result in zip(request.inputs, rows, results, strict=True):
        entry = response.results.add(id=item.id)
        for name in row.tasks:
            answer = answer_of(engine, result, name, max_labels)
            task = entry.tasks.add(task=name, truncated=result.truncated.get(name, False),
                                   scores=list(answer["scores"].values()))  # dict in the task's label order
            if "label" in answer:
                task.label = answer["label"]
            elif "labels" in answer:
                task.labels.extend(answer["labels"])
            else:
                task.value = answer["value"]
    return response


def tasks_to_pb(engine: Engine):
    """The served model: its tasks (in serving order), backbone, version, content id and overhead."""
    from centra.serve.v1 import centra_pb2 as pb

    manifest = engine.manifest
    backbone = manifest.backbone if manifest is not None else None
    return pb.ListTasksResponse(
        tasks=[pb.TaskInfo(name=s.name, kind=s.kind, labels=s.labels, input=s.input, max_length=s.max_length,
                           attach_layer=s.attach_layer, task_layers=s.task_layers) for s in engine.specs.values()],
        backbone_id=backbone.id if backbone else "", backbone_fingerprint=backbone.fingerprint if backbone else "",
        model_version=engine.version, model_id=engine.content_id,
        overhead_layers=manifest.overhead_layers if manifest is not None else 0)
