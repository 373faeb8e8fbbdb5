"""The one call type every door builds from its own wire format, and the one path it takes: checked
against the served engine and the limits, queued with its deadline, re-checked if a reload comes in
between, answered by the engine that computed it.

A door parses its wire (bounded before parsing: see serve/wire.py and each door), builds a `Call`, awaits
`Classifier.classify(call)` and writes the `Answered` back in its own format. The checks and their
messages are the same on every door: sizes and counts before anything is materialised, then the tasks
(NOT_FOUND for an unknown one), then the texts. No grpc or aiohttp here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from centra.core.answers import Answer, interpret
from centra.core.shadow import HEADS, candidate_key, is_candidate
from centra.core.task import NAME_RE, TaskSpec
from centra.core.tokens import check_texts
from centra.errors import CentraError
from centra.runtime.engine import Engine, Row, RowResult
from centra.serve.shadow import Shadow

CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL")
MAX_TASK_NAMES = 1024  # task names in one call (duplicates count)
MAX_LABELS_LIMIT = 2**31  # a call's max_labels is below this (protobuf's int32)
# Protobuf framing around one Input at most: its tag and length (1 + 4 bytes), and three string fields'
# tags and lengths (3 x (1 + 4)). Per task name: 1 + 4. Plus the message's own slack.
INPUT_FRAMING, NAME_FRAMING, MESSAGE_FRAMING = 20, 5, 64
FRAMING_FACTOR = 2  # see Limits.framed_bytes
SHOWN_CHARS = 80  # of a name echoed in an error
SHOWN_NAMES = 20  # names listed in an error
HEAD_HEADER = "X-Centra-Head"  # the head that answers a task with a candidate (Call.head), as a header
REQUEST_ID_HEADER = "X-Request-Id"  # the request id the canary fraction is drawn by (Call.request_id)


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
        """The largest serialized centra.v1 ClassifyRequest a valid call can be: content plus framing."""
        return (self.max_bytes + INPUT_FRAMING * self.max_inputs + NAME_FRAMING * self.max_task_names
                + MESSAGE_FRAMING)

    @property
    def framed_bytes(self) -> int:
        """The largest request read at all in a framing looser than centra.v1's protobuf (an OIP request,
        where TASKS repeats per row and BYTES elements carry 4-byte lengths; an HTTP body, where JSON
        escapes cost bytes)."""
        return FRAMING_FACTOR * self.wire_bytes + 16 * self.max_inputs

    def check_count(self, count: int) -> None:
        """Refuse a call of `count` inputs before its inputs are read."""
        if not count:
            raise ServeError("no inputs given")
        if count > self.max_inputs:
            raise ServeError(f"{count:,} inputs in one call; the limit is {self.max_inputs:,}")

    def check_task_names(self, count: int) -> None:
        if count > self.max_task_names:
            raise ServeError(f"{count:,} task names in one call; the limit is {self.max_task_names:,}")


@dataclass(frozen=True)
class Call:
    """One call, whatever door it came through: texts (and their pairs: "" or absent means none), the task
    names asked for (empty: every task that fits the inputs), at most max_labels labels per multilabel
    answer (0: each task's own limit), the deadline on the event loop's clock (None: none), and ids that
    the door echoes (the engine never reads them). How scores are written back: top_k > 0 gives only the
    k highest (with their labels, highest first), raw_scores the logits instead of probabilities (TEI's
    `raw_scores`); the answers (label, labels, value) are the same either way.
    For tasks with a candidate head (serve/shadow.py):
    the head that should answer ("" the server's choice, "active" or "candidate"), and the request id
    the canary fraction is drawn by (a caller that keeps its id keeps its head)."""

    texts: list[str]
    pairs: list[str] = field(default_factory=list)  # empty, or one per text
    tasks: list[str] = field(default_factory=list)
    max_labels: int = 0
    deadline: float | None = None
    ids: list[str] = field(default_factory=list)  # empty, or one per text
    top_k: int = 0
    raw_scores: bool = False
    head: str = ""
    request_id: str = ""

    def check(self, limits: Limits) -> None:
        """Counts, max_labels and sizes: everything that does not depend on the served tasks."""
        limits.check_count(len(self.texts))
        limits.check_task_names(len(self.tasks))
        for name, values in (("pairs", self.pairs), ("ids", self.ids)):
            if values and len(values) != len(self.texts):
                raise ServeError(f"{len(self.texts)} texts but {len(values)} {name}")
        if not 0 <= self.max_labels < MAX_LABELS_LIMIT:
            raise ServeError(f"max_labels must be >= 0 and < 2^31 (0: the task's own limit), not {self.max_labels}")
        if not 0 <= self.top_k < MAX_LABELS_LIMIT:
            raise ServeError(f"top_k must be >= 0 and < 2^31 (0: every label's score), not {self.top_k}")
        if self.head not in ("", *HEADS):
            raise ServeError(f"head {shown(self.head)} is not one of {', '.join(HEADS)} (or empty: the server's "
                             "choice)")
        fields = (("text", self.texts), ("text_pair", self.pairs), ("id", self.ids))
        size = sum(utf8_size(values[i], f"input {i}: {what}") for i in range(len(self.texts))
                   for what, values in fields if values)
        size += sum(utf8_size(name, "a task name") for name in self.tasks)
        size += utf8_size(self.request_id, "the request id")
        if size > limits.max_bytes:
            raise ServeError(f"{size:,} bytes of text, ids and task names in one call; the limit is "
                             f"{limits.max_bytes:,}")

    def rows(self, engine: Engine, limits: Limits) -> list[Row]:
        """The call checked against the limits and `engine`'s tasks: one Row per text. Refusals are
        ServeErrors: NOT_FOUND for an unknown task, INVALID_ARGUMENT for everything else (sizes included:
        retrying a call that is too large cannot help)."""
        self.check(limits)
        has_pair = [bool(p) for p in self.pairs] if self.pairs else [False] * len(self.texts)
        specs = select_tasks(engine, self.tasks, all(has_pair))
        pair_task = next((s.name for s in specs if s.input == "pair"), None)
        for i, given in enumerate(has_pair):
            if given and pair_task is None:  # it would be silently ignored
                raise ServeError(f"input {i} has a text_pair but no task asked for takes pairs "
                                 f"({listed([s.name for s in specs])})")
            if not given and pair_task is not None:
                raise ServeError(f"input {i} has no text_pair; task {pair_task!r} takes text pairs")
        pairs = self.pairs if pair_task else None
        check_texts(self.texts, pairs)  # empty or oversized texts: one-line CentraErrors, INVALID_ARGUMENT
        chosen = tuple(s.name for s in specs)
        return [Row(text, pairs[i] if pairs else None, chosen) for i, text in enumerate(self.texts)]


def with_headers(call: Call, headers) -> Call:
    """The call with the head and request id that HTTP headers (or gRPC metadata: pairs) name, where its
    own fields name none: HEAD_HEADER and REQUEST_ID_HEADER, on every door."""
    items = headers.items() if hasattr(headers, "items") else headers
    found = {key.lower(): value for key, value in items if isinstance(value, str)}
    head = call.head or found.get(HEAD_HEADER.lower(), "")
    request_id = call.request_id or found.get(REQUEST_ID_HEADER.lower(), "")
    if (head, request_id) == (call.head, call.request_id):
        return call
    return replace(call, head=head, request_id=request_id)


@dataclass(frozen=True)
class Answered:
    """A call's results, with the engine that computed them (its labels, version and content id describe
    them) and the rows as that engine checked them (one per text, each with its tasks in order); per task
    with a candidate head, the head that answers ("active" or "candidate": serve/shadow.py)."""

    call: Call
    rows: list[Row]
    engine: Engine
    results: list[RowResult]
    heads: dict[str, str] = field(default_factory=dict)

    def answer(self, i: int, task: str) -> Answer:
        """Row i's answer for `task` by the head that answers it, at the call's max_labels."""
        return answer_of(self.engine, self.results[i], self.key(task), self.call.max_labels)

    def key(self, task: str) -> str:
        """The branch whose outputs answer `task`: the task's, or its candidate head's (centra.core.shadow)."""
        return candidate_key(task) if self.heads.get(task) == HEADS[1] else task

    def head(self, task: str) -> str | None:
        """The head that answered `task`: "active" or "candidate"; None when the task has no candidate."""
        return self.heads.get(task)

    def truncated(self, i: int, task: str) -> bool:
        return self.results[i].truncated.get(task, False)

    def scores(self, i: int, task: str) -> dict[str, float]:
        """Row i's scores for `task` by label, in label order, as the call asked: probabilities (the
        answer's), or with raw_scores the logits of the head that answered, rounded to 6 decimals as the
        probabilities are."""
        if not self.call.raw_scores:
            return self.answer(i, task).scores
        labels = self.engine.specs[task].labels
        return {label: round(float(x), 6) for label, x in zip(labels, self.results[i].logits[self.key(task)].tolist())}

    def top(self, i: int, task: str) -> list[tuple[str, float]]:
        """The call's top_k highest of `scores(i, task)`, highest first (ties: label order)."""
        return sorted(self.scores(i, task).items(), key=lambda item: -item[1])[:self.call.top_k]


class Classifier:
    """The one classify path behind every door: a call checked against the served engine, queued on the
    batcher with its deadline, re-checked against a new engine if a reload comes in between. Rows asking
    for a task with a candidate head run it too (serve/shadow.py: shadow figures, canary answers)."""

    def __init__(self, batcher, limits: Limits, shadow: Shadow | None = None):
        self.batcher = batcher
        self.limits = limits
        self.ready = False  # serving, not starting or draining (health, OIP's ServerReady)
        self.shadow = shadow or Shadow()
        batcher.listeners.append(self.shadow.observe_batch)

    @property
    def engine(self) -> Engine:
        return self.batcher.engine

    async def classify(self, call: Call) -> Answered:
        engine = self.batcher.engine
        rows = Shadow.rows(call.rows(engine, self.limits), engine)
        done = await self.batcher.submit(rows, call.deadline, checked=engine,
                                         recheck=lambda other: Shadow.rows(call.rows(other, self.limits), other))
        asked = [Row(r.text, r.pair, tuple(t for t in r.tasks if not is_candidate(t))) for r in done.rows]
        heads = self.shadow.heads(list(asked[0].tasks), done.engine, call.head, call.request_id)
        self.shadow.observe(done.rows, done.results, done.engine, heads)
        return Answered(call, asked, done.engine, done.results, heads)


def utf8_size(value: str, what: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: protobuf would not send it, a caller in-process might
        raise ServeError(f"{what} is not valid UTF-8") from None


def shown(name: str) -> str:
    """A caller's name as echoed in an error: repr, cut to SHOWN_CHARS characters."""
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}... ({len(name):,} characters)"


def listed(names: list[str]) -> str:
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f", ... ({more} more)" if more > 0 else "")


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


def answer_of(engine: Engine, result: RowResult, name: str, max_labels: int = 0) -> Answer:
    """Task `name`'s answer in `result`; a call's max_labels (> 0) re-reads a multilabel task's logits
    (the answers computed with the batch hold the task's own limit only)."""
    answer = result.answers.get(name)
    if answer is None or max_labels and engine.branches[name].kind == "multilabel":
        answer = interpret(engine.branches[name], result.logits[name], max_labels or None)
    return answer
