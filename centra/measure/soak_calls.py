"""The soak's calls: valid ones, every bad-input class, cancellations and tiny deadlines, each with the
status codes it may get, made as centra.v1 ClassifyRequests (soak_doors sends them through every door, in
each door's wire form), and the tally of their codes per door and class.

EXPECTED is the contract the soak holds the server to. RESOURCE_EXHAUSTED on a call that could succeed
counts as "busy"; NOT_FOUND on one that asked for a task a re-merge may have removed counts as "stale"
(the server may be on a version without it); anything else not in EXPECTED is an unexpected code.
EXPECTED holds on every door: each door answers each class with the same codes (HTTP's statuses are read
as the code names of their JSON bodies: 413, a body over the cap, is INVALID_ARGUMENT).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from centra.runtime.verify import SAMPLE_PAIRS, SAMPLE_TEXTS

HUGE_INPUTS = 2_000_000  # empty inputs in the huge message: 2 bytes each on the wire, 4 MB
TOO_LARGE = "Received message larger than max"  # gRPC's own refusal of a message over its receive limit
LONG_NAME = 20_000
TEXT_CHARS = 60_000  # per text of an oversized call, under the 100,000 characters any text may have
SHOWN = 8  # unexpected outcomes described in the report
EXPECTED: dict[str, frozenset[str]] = {name: frozenset(codes) for name, codes in {
    "valid": {"OK"}, "valid_pair": {"OK"},
    "no_inputs": {"INVALID_ARGUMENT"}, "empty_text": {"INVALID_ARGUMENT"},
    "too_many_inputs": {"INVALID_ARGUMENT"}, "too_many_bytes": {"INVALID_ARGUMENT"},
    "huge_message": {"INVALID_ARGUMENT"},  # or gRPC's RESOURCE_EXHAUSTED with TOO_LARGE (see verdict)
    # not a possible task name: refused as bad input, or as an unknown task; never "busy"
    "long_task_name": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "bad_utf8": {"INVALID_ARGUMENT"}, "unknown_task": {"NOT_FOUND"},
    "pair_to_single": {"INVALID_ARGUMENT"}, "missing_pair": {"INVALID_ARGUMENT"},
    "bad_token": {"UNAUTHENTICATED"},
    "cancel": {"OK", "CANCELLED"}, "deadline": {"OK", "DEADLINE_EXCEEDED"},
}.items()}
MAY_BE_BUSY = ("valid", "valid_pair", "cancel", "deadline")
WEIGHTS = {"valid": 30, "valid_pair": 12, "cancel": 5, "deadline": 5, "huge_message": 1}  # others: 2
TEXTS = [
    "where is my parcel?", "I love it!", "meh", "Refund please.", "ok", "the app keeps crashing",
    "¿Dónde está mi pedido?",
    "Das Paket ist nie angekommen.", "配送が遅れています", "great 👍 thanks", "   spaces around   ",
    "billing " * 60,  # longer than any task's max_length: truncated
    "A rather long complaint about the delivery, the box, the product inside it and the support team that "
    "never answered, written in one breath without a single full stop until the very end of it all.",
]


@dataclass
class SoakCall:
    cls: str
    request: object = None  # a ClassifyRequest, or bytes sent as they are
    timeout: float = 30.0
    token_ok: bool = True
    cancel_after: float | None = None
    removable: tuple[str, ...] = ()  # tasks it asks for that a re-merge may remove
    door: str = "v1"  # soak_doors.DOORS


@dataclass
class Workload:
    """Makes calls of every class from the model's tasks and the server's limits (seeded per client)."""

    single: list[str]  # single-text tasks, every version
    pair: list[str]  # text-pair tasks, every version
    removable: set[str]  # tasks some versions lack
    max_inputs: int
    max_bytes: int
    huge_every_s: float = 5.0
    texts: list[str] = field(default_factory=lambda: TEXTS + SAMPLE_TEXTS + SAMPLE_PAIRS)
    _huge_at: float = -1e9
    _huge_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cap(self) -> int:
        """The server's HTTP body cap (and OIP gRPC's message cap): the largest request it reads at all."""
        from centra.serve.call import Limits

        return Limits(max_inputs=self.max_inputs, max_bytes=self.max_bytes).framed_bytes

    @property
    def classes(self) -> list[str]:
        """The classes this model allows (no pair tasks: no pair classes; no single tasks: no single ones)."""
        names = list(EXPECTED)
        if not self.pair:
            names = [n for n in names if n not in ("valid_pair", "missing_pair")]
        if not self.single:
            names = [n for n in names if n not in ("valid", "pair_to_single")]
        return names

    def pick(self, rng: random.Random) -> str:
        classes = self.classes
        name = rng.choices(classes, [WEIGHTS.get(n, 2) for n in classes])[0]
        if name == "huge_message":  # at most one in flight and one per huge_every_s: it costs the server most
            with self._huge_lock:
                now = time.monotonic()
                if now - self._huge_at < self.huge_every_s:
                    return "valid" if self.single else "valid_pair"
                self._huge_at = now
        return name

    def make(self, name: str, rng: random.Random, tag: str) -> SoakCall:
        from centra.serve.v1 import centra_pb2 as pb

        if name in ("valid", "valid_pair", "cancel", "deadline", "bad_token"):
            call = self.valid(rng, tag, pair=name == "valid_pair" or (not self.single) or
                              (name != "valid" and bool(self.pair) and rng.random() < 0.3))
            call.cls = name
            if name == "cancel":
                call.cancel_after = rng.uniform(0, 0.005)
            elif name == "deadline":
                call.timeout = 0.001
            elif name == "bad_token":
                call.token_ok = False
            return call
        some = self.single[0] if self.single else self.pair[0]
        text = rng.choice(self.texts)
        make = {
            "no_inputs": lambda: pb.ClassifyRequest(tasks=[some]),
            "empty_text": lambda: pb.ClassifyRequest(inputs=[pb.Input(text="", text_pair="x" if not self.single
                                                                       else "")], tasks=[some]),
            "too_many_inputs": lambda: pb.ClassifyRequest(inputs=[pb.Input(text="a")] * (self.max_inputs + 1),
                                                          tasks=[some]),
            "too_many_bytes": lambda: self.too_many_bytes(rng, some),
            "huge_message": lambda: b"\n\x00" * HUGE_INPUTS,  # ClassifyRequest.inputs, 2,000,000 empty ones
            "long_task_name": lambda: pb.ClassifyRequest(inputs=[pb.Input(text=text)], tasks=["t" * LONG_NAME]),
            "bad_utf8": lambda: b"\n\x04\n\x02\xff\xfe",  # inputs { text: 0xff 0xfe }: not UTF-8
            "unknown_task": lambda: pb.ClassifyRequest(inputs=[pb.Input(text=text)], tasks=[f"no-such-task-{tag}"]),
            "pair_to_single": lambda: pb.ClassifyRequest(inputs=[pb.Input(text=text, text_pair=text)],
                                                         tasks=[self.single[0]]),
            "missing_pair": lambda: pb.ClassifyRequest(inputs=[pb.Input(text=text)], tasks=[self.pair[0]]),
        }
        return SoakCall(name, make[name](), timeout=60.0 if name == "huge_message" else 30.0)

    def too_many_bytes(self, rng: random.Random, task: str):
        """Texts of just over --max-call-bytes, or two or three times it (refused by size, parsed or not)."""
        from centra.serve.v1 import centra_pb2 as pb

        total = rng.choice((self.max_bytes + 128, 2 * self.max_bytes, 3 * self.max_bytes))
        count = -(-total // TEXT_CHARS)
        return pb.ClassifyRequest(inputs=[pb.Input(text="a" * (total // count + 1))] * count, tasks=[task])

    def valid(self, rng: random.Random, tag: str, pair: bool) -> SoakCall:
        """1-8 inputs, a random task subset (sometimes none: every task that fits; sometimes a duplicate)."""
        from centra.serve.v1 import centra_pb2 as pb

        count = rng.choice((1, 1, 1, 2, 3, 4, 8))
        inputs = [pb.Input(text=rng.choice(self.texts), text_pair=rng.choice(self.texts) if pair else "",
                           id=f"{tag}-{j}") for j in range(count)]
        tasks: list[str] = []
        if rng.random() >= 0.15:
            tasks = [t for t in self.single if rng.random() < (0.3 if pair else 0.5)]
            if pair:
                tasks += [t for t in self.pair if rng.random() < 0.5] or [rng.choice(self.pair)]
            tasks = tasks or [rng.choice(self.single)]
            rng.shuffle(tasks)
            if rng.random() < 0.05:
                tasks.append(tasks[0])
        return SoakCall("valid", pb.ClassifyRequest(inputs=inputs, tasks=tasks),
                    removable=tuple(t for t in dict.fromkeys(tasks) if t in self.removable))


def verdict(call: SoakCall, code: str, details: str) -> str:
    """The outcome of one call's status code: ok, busy, stale or unexpected."""
    if code in EXPECTED[call.cls]:
        return "ok"
    if code == "RESOURCE_EXHAUSTED" and call.cls in MAY_BE_BUSY:
        return "busy"
    if code == "RESOURCE_EXHAUSTED" and call.cls == "huge_message" and TOO_LARGE in details:
        return "ok"
    if code == "NOT_FOUND" and call.cls in MAY_BE_BUSY and any(repr(t) in details for t in call.removable):
        return "stale"  # the server names the task: one a re-merge removed
    return "unexpected"


class Tally:
    """Calls per door, class and code, and what did not go as expected, per door (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.codes: dict[str, dict[str, dict[str, int]]] = {}  # door -> class -> code -> calls
        self.outcomes = {"ok": 0, "busy": 0, "stale": 0, "unexpected": 0}
        self.door_outcomes: dict[str, dict[str, int]] = {}
        self.examples: list[str] = []

    def record(self, call: SoakCall, code: str, details: str) -> str:
        outcome = verdict(call, code, details)
        with self.lock:
            per_class = self.codes.setdefault(call.door, {}).setdefault(call.cls, {})
            per_class[code] = per_class.get(code, 0) + 1
            self.outcomes[outcome] += 1
            mine = self.door_outcomes.setdefault(call.door, {"ok": 0, "busy": 0, "stale": 0, "unexpected": 0})
            mine[outcome] += 1
            if outcome == "unexpected" and len(self.examples) < SHOWN:
                self.examples.append(f"{call.door} {call.cls}: {code} {details[:200]}")
        return outcome

    def unexpected(self, what: str) -> None:
        """Something outside a call went wrong (the server stopped answering, a control step failed)."""
        with self.lock:
            self.outcomes["unexpected"] += 1
            if len(self.examples) < SHOWN:
                self.examples.append(what[:300])

    def by_class(self) -> dict[str, dict[str, int]]:
        """class -> code -> calls, over every door."""
        out: dict[str, dict[str, int]] = {}
        with self.lock:
            for per_door in self.codes.values():
                for name, codes in per_door.items():
                    mine = out.setdefault(name, {})
                    for code, count in codes.items():
                        mine[code] = mine.get(code, 0) + count
        return out

    @property
    def calls(self) -> int:
        with self.lock:
            return sum(sum(codes.values()) for per_door in self.codes.values() for codes in per_door.values())
