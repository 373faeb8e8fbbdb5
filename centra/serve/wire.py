"""gRPC's side of bounding work before parsing, for every gRPC door (centra.v1, OIP): a request
deserializer that refuses a message on its length alone, or on its count of a repeated field, at the top
level or inside a counted one (a walk over the fields that stops at the first limit passed), or on its
count of fields in all, before protobuf parses it. A refused message
reaches the servicer as `Unparsed`, answered INVALID_ARGUMENT (not grpc's UNKNOWN with the parser's
exception text). No grpc here: protobuf's message types are handed in."""

from __future__ import annotations

import functools

from centra.serve.call import ServeError


class Unparsed:
    """Stands in for a request the server did not parse: over the size limit (refused on its length alone)
    or not a valid message (e.g. a string field that is not UTF-8), so the servicer answers
    INVALID_ARGUMENT instead of grpc's UNKNOWN with the parser's exception text."""

    def __init__(self, message: str):
        self.message = message


SLACK_FIELDS = 64  # fields of a message beyond its counted ones (its scalars, maps of a few entries)


def parser(message_type, max_bytes: int | None = None, max_counts: dict | None = None):
    """Request deserializer for a handler: bytes -> message, or Unparsed. Bytes over `max_bytes` are
    never parsed; nor is a message with more than N occurrences of a field in `max_counts` ({field number:
    (N, what) or (N, what, the same for each occurrence's own fields)}), or more fields in all than its
    counted ones allow (their limits + SLACK_FIELDS), counted by walking the fields (the walk stops at the
    first one over a limit, so it costs at most the limits, never the message's size)."""
    from google.protobuf.message import DecodeError

    name = message_type.DESCRIPTOR.name

    def parse(data: bytes):
        if max_bytes is not None and len(data) > max_bytes:
            return Unparsed(f"the {name} has {len(data):,} bytes; the limit is {max_bytes:,} "
                            "(fewer inputs or shorter texts per call)")
        over = over_count(data, max_counts, name) if max_counts else None
        if over is not None:
            return Unparsed(over)
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Unparsed(f"the {name} could not be parsed (is every string valid UTF-8?)")
    return parse


def over_count(data: bytes | memoryview, max_counts: dict, name: str = "message", nested: bool = False
               ) -> str | None:
    """Why the message carries too many of a counted field (or too many fields), or None (also for
    malformed bytes: the parser then says so)."""
    data = memoryview(data)
    counts: dict[int, int] = {}
    budget = sum(spec[0] for spec in max_counts.values()) + SLACK_FIELDS
    fields, pos, end = 0, 0, len(data)
    while pos < end:
        tag, pos = _varint(data, pos)
        if tag is None:
            return None
        field, wire = tag >> 3, tag & 7
        start = pos
        if wire == 2:
            length, start = _varint(data, pos)
            if length is None:
                return None
            pos = start + length
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:  # groups (3, 4) or no wire type at all: centra's proto3 messages have none
            return f"the {name} holds a field of wire type {wire}, which none of its fields has"
        fields += 1
        if fields > budget:
            return f"more than {budget:,} fields in one of the {name}" if nested else \
                f"more than {budget:,} fields in a {name}; fewer inputs per call"
        spec = max_counts.get(field)
        if spec is None:
            continue
        counts[field] = counts.get(field, 0) + 1
        limit, what = spec[0], spec[1]
        if counts[field] > limit:
            return f"more than {limit:,} {what} in one call; the limit is {limit:,}"
        if len(spec) > 2 and wire == 2:
            inner = over_count(data[start:pos], spec[2], what, nested=True)
            if inner is not None:
                return inner
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


def parsed(method):
    """A servicer method that refuses, before it runs, a request the deserializer did not parse."""

    @functools.wraps(method)
    async def checked(self, request, context):
        if isinstance(request, Unparsed):
            raise ServeError(request.message)
        return await method(self, request, context)
    return checked
