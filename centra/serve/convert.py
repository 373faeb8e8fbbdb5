"""Protocol buffers <-> the engine: a ClassifyRequest checked and turned into Rows before it is queued,
RowResults turned into a ClassifyResponse, the served model described as a ListTasksResponse.

No grpc here; the generated message module (protobuf only) is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from centra.core.answers import interpret
from centra.core.task import TaskSpec
from centra.core.tokens import check_texts
from centra.errors import CentraError
from centra.runtime.engine import Engine, Row, RowResult

CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL")


class ServeError(CentraError):
    """A refused call: a one-line message and the name of the gRPC status code it is answered with."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        if code not in CODES:
            raise ValueError(f"unknown status code name {code!r}")
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What one call may carry. Bytes: UTF-8 bytes of its texts, pair texts and ids together."""

    max_inputs: int = 256
    max_bytes: int = 1 << 20


class Unparsed:
    """Stands in for a request the server could not parse (e.g. a string field that is not UTF-8), so the
    servicer answers INVALID_ARGUMENT instead of grpc's UNKNOWN with the parser's exception text."""

    def __init__(self, what: str):
        self.what = what


def parser(message_type):
    """Request deserializer for a handler: bytes -> message, or Unparsed."""
    from google.protobuf.message import DecodeError

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Unparsed(message_type.DESCRIPTOR.name)
    return parse


def rows_from_pb(request, engine: Engine, limits: Limits) -> list[Row]:
    """Check a ClassifyRequest against the engine's tasks and the limits; one Row per input. Refusals are
    ServeErrors: NOT_FOUND for an unknown task, INVALID_ARGUMENT for everything else."""
    if isinstance(request, Unparsed):
        raise ServeError(f"the {request.what} could not be parsed (is every string valid UTF-8?)")
    inputs = list(request.inputs)
    if not inputs:
        raise ServeError("no inputs given")
    if len(inputs) > limits.max_inputs:
        raise ServeError(f"{len(inputs):,} inputs in one call; the limit is {limits.max_inputs:,}")
    size = sum(utf8_size(value, i, what) for i, item in enumerate(inputs)
               for what, value in (("text", item.text), ("text_pair", item.text_pair), ("id", item.id)))
    if size > limits.max_bytes:
        raise ServeError(f"{size:,} bytes of text in one call; the limit is {limits.max_bytes:,}")
    has_pair = [bool(item.text_pair) for item in inputs]
    specs = select_tasks(engine, list(request.tasks), all(has_pair))
    pair_task = next((s.name for s in specs if s.input == "pair"), None)
    for i, given in enumerate(has_pair):
        if given and pair_task is None:  # it would be silently ignored
            raise ServeError(f"input {i} has a text_pair but no task asked for takes pairs "
                             f"({', '.join(s.name for s in specs)})")
        if not given and pair_task is not None:
            raise ServeError(f"input {i} has no text_pair; task {pair_task!r} takes text pairs")
    texts = [item.text for item in inputs]
    pairs = [item.text_pair for item in inputs] if pair_task else None
    check_texts(texts, pairs)  # empty or oversized texts: one-line CentraErrors, INVALID_ARGUMENT
    names = tuple(s.name for s in specs)
    return [Row(text, pairs[i] if pairs else None, names) for i, text in enumerate(texts)]


def utf8_size(value: str, index: int, what: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: protobuf would not send it, a caller in-process might
        raise ServeError(f"input {index}: {what} is not valid UTF-8") from None


def select_tasks(engine: Engine, names: list[str], every_input_has_pair: bool) -> list[TaskSpec]:
    """Named tasks (each known, duplicates once), or every task that fits the inputs when none is named."""
    specs = engine.specs
    if names:
        unknown = [name for name in dict.fromkeys(names) if name not in specs]
        if unknown:
            raise ServeError(f"unknown task {unknown[0]!r} (known: {', '.join(sorted(specs))})", "NOT_FOUND")
        return [specs[name] for name in dict.fromkeys(names)]
    chosen = [s for s in specs.values() if every_input_has_pair or s.input == "single"]
    if not chosen:
        raise ServeError("every task takes text pairs: give every input a text_pair")
    return chosen


def response_to_pb(request, rows: list[Row], engine: Engine, results: list[RowResult]):
    """One InputResult per input (ids echoed), one TaskResult per task of its row, in the row's order.
    `engine` must be the one that computed the results (its labels and version describe them)."""
    from centra.serve.v1 import centra_pb2 as pb

    response = pb.ClassifyResponse(model_version=engine.version)
    for item, row, result in zip(request.inputs, rows, results, strict=True):
        entry = response.results.add(id=item.id)
        for name in row.tasks:
            answer = result.answers.get(name) or interpret(engine.specs[name], result.logits[name])
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
    """The served model: its tasks (in serving order), backbone, version and overhead."""
    from centra.serve.v1 import centra_pb2 as pb

    manifest = engine.manifest
    backbone = manifest.get("backbone", {})
    return pb.ListTasksResponse(
        tasks=[pb.TaskInfo(name=s.name, kind=s.kind, labels=s.labels, input=s.input, max_length=s.max_length,
                           attach_layer=s.attach_layer, task_layers=s.task_layers) for s in engine.specs.values()],
        backbone_id=backbone.get("id", ""), backbone_fingerprint=backbone.get("fingerprint", ""),
        model_version=engine.version, overhead_layers=manifest.get("overhead_layers", 0))
