"""Shadow and canary serving of candidate heads (centra.core.shadow), behind every door.

A served version in which task T has a candidate head runs both heads on every row that asks for T (the
candidate on a detour of the same trunk pass: rows that do not ask for T pay nothing) and answers with
the active head, bit-identical to a version without the candidate. `Shadow` is the classify path's part
of it (serve/call.py calls it):
- `rows` adds the candidate keys to the rows of a call;
- `heads` picks, per call and task, the head that answers: the candidate when the call asks for it
  (`Call.head`), or for a share of calls (the canary fraction, `ShadowOptions.canary`) chosen by the
  call's request id, so one id always gets the same head (`canary_point`); else the active one;
- `observe` compares the two heads' answers of every row and counts them in Prometheus metrics on the
  server's registry (`ShadowMetrics`: calls, rows, agreement, confusion, both heads' label distributions,
  mean absolute difference for regression, the candidate's layers and its measured time);
- an opt-in sample of disagreeing inputs (`ShadowOptions.sample_file`): at most `sample_size` lines,
  each text cut to `sample_chars` characters; off by default, and texts are never logged otherwise.
`centra shadow report` reads the metrics back (centra.measure.shadow).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from centra.core.answers import Answer, ClassAnswer, LabelsAnswer, ValueAnswer
from centra.core.shadow import HEADS, candidate_key, extra_layers, is_candidate, task_of
from centra.errors import CentraError, FieldError, Name
from centra.runtime.engine import Engine, Row
from centra.serve.record import BatchRecord

ALL = "*"  # ShadowOptions.canary's key for every task with a candidate
SAMPLE_SIZE = 100  # disagreeing inputs kept when a sample file is given
SAMPLE_CHARS = 200  # of each text kept in the sample


@dataclass(frozen=True)
class ShadowOptions:
    """Canary fractions by task (ALL: every task with a candidate), and the opt-in sample of disagreeing
    inputs (None: none kept)."""

    canary: Mapping[str, float] = field(default_factory=dict)
    sample_file: Path | None = None
    sample_size: int = SAMPLE_SIZE
    sample_chars: int = SAMPLE_CHARS

    def check(self) -> None:
        for task, share in self.canary.items():
            if not 0.0 <= share <= 1.0:
                raise FieldError(Name("canary"), f" {'for ' + task + ' ' if task != ALL else ''}must be a fraction "
                                 f"in [0, 1], not {share}")
        for name in ("sample_size", "sample_chars"):
            if getattr(self, name) < 1:
                raise FieldError(Name(name), f" must be >= 1, not {getattr(self, name)}")

    def fraction(self, task: str) -> float:
        return self.canary.get(task, self.canary.get(ALL, 0.0))


def canary_point(request_id: str) -> float:
    """Where a request id falls in [0, 1): a call is a canary of a task when this is below the task's
    fraction. A hash, so one id always falls at the same point (a caller sees one head), and raising the
    fraction only adds ids."""
    digest = hashlib.sha256(b"centra-canary\0" + request_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_heads(options: ShadowOptions | None, tasks: list[str], engine: Engine, head: str = "",
                 request_id: str = "") -> dict[str, str]:
    """Per task asked for that has a candidate head in `engine`: the head that answers the call. `head`: the
    call's own choice ("" for the server's: the candidate for the canary fraction of `options`, none
    without options); `request_id`: where the call falls for the fractions (none: a random point, so such
    a call is a canary with the fraction's probability)."""
    shadowed = engine.candidates
    point = None
    chosen = {}
    for task in (t for t in dict.fromkeys(tasks) if t in shadowed):
        if head:
            chosen[task] = head
            continue
        share = options.fraction(task) if options is not None else 0.0
        if point is None and share > 0:
            point = canary_point(request_id) if request_id else random.random()
        chosen[task] = HEADS[1] if share > 0 and point < share else HEADS[0]
    return chosen


def agree(active: Answer, candidate: Answer) -> bool | None:
    """Do the two heads give the same answer: the top label (multiclass), the label set (multilabel); None
    for regression (measured by the difference)."""
    if isinstance(active, ClassAnswer):
        return active.label == candidate.label
    if isinstance(active, LabelsAnswer):
        return set(active.labels) == set(candidate.labels)
    return None


def compare(task: str, active: Answer, candidate: Answer, labels: list[str], add) -> bool | None:
    """One row's two answers into counts (`add(key, amount)`): agreement, the absolute difference
    (regression), both heads' labels, the confusion pair (multiclass) or each label's pair (multilabel).
    Returns `agree`'s verdict."""
    same = agree(active, candidate)
    if same:
        add(("agree", task))
    if isinstance(active, ValueAnswer):
        add(("abs_diff", task), abs(active.value - candidate.value))
    elif isinstance(active, ClassAnswer):
        add(("confusion", task, active.label, candidate.label))
        for head, answer in zip(HEADS, (active, candidate)):
            add(("labels", task, head, answer.label))
    else:
        given = (set(active.labels), set(candidate.labels))
        for head, chosen in zip(HEADS, given):
            for label in chosen:
                add(("labels", task, head, label))
        for label in labels:
            add(("pairs", task, label, str(int(label in given[0])), str(int(label in given[1]))))
    return same


class ShadowMetrics:
    """The shadow figures, on a Prometheus registry (the server's: one /metrics shows them all)."""

    def __init__(self, registry=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.calls = Counter("centra_shadow_calls", "Calls that asked for a task with a candidate head", ["task"],
                             registry=r)
        self.rows = Counter("centra_shadow_rows", "Rows both heads of a task answered", ["task"], registry=r)
        self.agree = Counter("centra_shadow_agree", "Rows whose active and candidate answers agree (top label, "
                             "multiclass; label set, multilabel)", ["task"], registry=r)
        self.abs_diff = Counter("centra_shadow_abs_diff", "Sum over rows of |active - candidate| (regression)",
                                ["task"], registry=r)
        self.labels = Counter("centra_shadow_labels", "Labels answered, by head (multilabel: each label of the set)",
                              ["task", "head", "label"], registry=r)
        self.confusion = Counter("centra_shadow_confusion", "Rows by active label and candidate label (multiclass)",
                                 ["task", "active", "candidate"], registry=r)
        self.label_pairs = Counter("centra_shadow_label_pairs", "Rows by whether each head gives the label "
                                   "(multilabel; 1 or 0)", ["task", "label", "active", "candidate"], registry=r)
        self.answered = Counter("centra_shadow_answered", "Calls answered, by the head that answered them",
                                ["task", "head"], registry=r)
        self.candidate_seconds = Counter("centra_shadow_candidate_seconds", "Engine time of the candidate head's "
                                         "detour", ["task"], registry=r)
        self.batch_seconds = Counter("centra_shadow_batch_seconds", "Engine time of the batches the candidate ran in",
                                     ["task"], registry=r)
        self.layers = Gauge("centra_shadow_layers", "Transformer layers a row asking for the task runs for each "
                            "head (active: its trunk and branch; candidate: what it adds)", ["task", "head"],
                            registry=r)
        self.sampled = Counter("centra_shadow_sampled", "Disagreeing inputs written to the sample file", ["task"],
                               registry=r)


class Shadow:
    """The classify path's shadow and canary part (see the module's doc)."""

    def __init__(self, options: ShadowOptions | None = None, registry=None):
        self.options = options or ShadowOptions()
        self.options.check()
        self.metrics = ShadowMetrics(registry)
        self._seen: str | None = None  # the content id whose layer gauges are set
        self._lock = threading.Lock()  # the sample file: one writer at a time
        self._sampled = 0
        if self.options.sample_file is not None:
            self._open_sample(Path(self.options.sample_file))

    @staticmethod
    def rows(rows: list[Row], engine: Engine) -> list[Row]:
        """The rows with the candidate key of every task they ask for that has a candidate head."""
        shadowed = engine.candidates
        if not shadowed:
            return rows
        return [Row(r.text, r.pair, r.tasks + tuple(candidate_key(t) for t in r.tasks if t in shadowed))
                for r in rows]

    def heads(self, tasks: list[str], engine: Engine, head: str = "", request_id: str = "") -> dict[str, str]:
        """choose_heads with this server's canary fractions."""
        return choose_heads(self.options, tasks, engine, head, request_id)

    def observe(self, rows: list[Row], results, engine: Engine, heads: Mapping[str, str]) -> None:
        """Count one answered call: per task with a candidate, its rows and the two heads' answers. Counted
        here first, then one increment per metric and label set (on the event loop: a call of 256 rows of
        a 28-label task is 28 x 4 label pairs, not 7,000 increments)."""
        counts: dict[tuple, float] = {}

        def add(key: tuple, amount: float = 1.0) -> None:
            counts[key] = counts.get(key, 0.0) + amount

        self._set_layers(engine)
        for i, row in enumerate(rows):
            answers = results[i].answers
            for key in (t for t in row.tasks if is_candidate(t)):
                task = task_of(key)
                active, candidate = answers.get(task), answers.get(key)
                if active is None or candidate is None:
                    continue
                add(("rows", task))
                same = compare(task, active, candidate, engine.specs[task].labels, add)
                if same is False and self.options.sample_file is not None:
                    self._sample(task, row, active, candidate)
        m = self.metrics
        for key, amount in counts.items():
            what, task, *rest = key
            if what == "rows":
                m.calls.labels(task=task).inc()
                m.rows.labels(task=task).inc(amount)
            elif what in ("agree", "abs_diff"):
                getattr(m, what).labels(task=task).inc(amount)
            elif what == "labels":
                m.labels.labels(task=task, head=rest[0], label=rest[1]).inc(amount)
            elif what == "confusion":
                m.confusion.labels(task=task, active=rest[0], candidate=rest[1]).inc(amount)
            else:
                m.label_pairs.labels(task=task, label=rest[0], active=rest[1], candidate=rest[2]).inc(amount)
        for task, head in heads.items():
            m.answered.labels(task=task, head=head).inc()

    def _set_layers(self, engine: Engine) -> None:
        if engine.content_id == self._seen and self._seen is not None:
            return
        self._seen = engine.content_id
        self.metrics.layers.clear()
        for task, candidate in engine.candidates.items():
            active = engine.specs[task]
            self.metrics.layers.labels(task=task, head=HEADS[0]).set(active.attach_layer + active.task_layers)
            self.metrics.layers.labels(task=task, head=HEADS[1]).set(extra_layers(active, candidate))

    def observe_batch(self, record: BatchRecord) -> None:
        """A batch listener: the candidate heads' measured time, and the time of the batches they ran in."""
        for key, seconds in record.candidate_s.items():
            task = task_of(key)
            self.metrics.candidate_seconds.labels(task=task).inc(seconds)
            self.metrics.batch_seconds.labels(task=task).inc(record.compute_s)

    def _open_sample(self, path: Path) -> None:
        """The sample file, created (or emptied) for this server, readable by its owner only."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise CentraError(f"{path}: cannot write the shadow sample ({exc.strerror or exc})") from None
        os.close(fd)

    def _sample(self, task: str, row: Row, active: Answer, candidate: Answer) -> None:
        """One disagreeing input into the sample file, while it holds fewer than sample_size lines."""
        cut = self.options.sample_chars
        with self._lock:
            if self._sampled >= self.options.sample_size:
                return
            self._sampled += 1
            entry = {"task": task, "text": row.text[:cut], **({"pair": row.pair[:cut]} if row.pair else {}),
                     "active": active.to_dict(), "candidate": candidate.to_dict()}
            with open(self.options.sample_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.metrics.sampled.labels(task=task).inc()
