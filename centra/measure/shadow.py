"""`centra shadow report`: a server's shadow figures (serve/shadow.py's Prometheus metrics) as tables.

Reads the metrics text of a running server (its /metrics URL) or a saved copy, and per task with a
candidate head prints: calls and rows compared, the agreement of the two heads (top label, multiclass;
label set, multilabel) or their mean absolute difference (regression), a confusion table of active
against candidate labels (multiclass) or per label how often each head gives it (multilabel), both heads'
label distributions, the calls each head answered (canary), and the candidate's extra cost: its layers per
row beside the active head's, and its measured engine time (seconds, per row, and its share of the
batches it ran in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from centra.core.table import table
from centra.errors import CentraError

PREFIX = "centra_shadow_"
FETCH_TIMEOUT_S = 10.0


def read_metrics(source: str) -> str:
    """The metrics text at `source`: an http(s) URL (a server's /metrics) or a file."""
    if source.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=FETCH_TIMEOUT_S) as reply:  # noqa: S310 (http(s) only)
                return reply.read().decode("utf-8")
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
            raise CentraError(f"{source}: cannot read the metrics ({getattr(exc, 'reason', exc)})") from None
    try:
        return Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CentraError(f"{source}: cannot read the metrics ({getattr(exc, 'strerror', None) or exc})") from None


@dataclass
class TaskFigures:
    """One shadowed task's figures, summed from the metrics."""

    task: str
    calls: float = 0.0
    rows: float = 0.0
    agree: float = 0.0
    abs_diff: float = 0.0
    confusion: dict[tuple[str, str], float] = field(default_factory=dict)  # (active, candidate) -> rows
    label_pairs: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (label, active, candidate)
    labels: dict[tuple[str, str], float] = field(default_factory=dict)  # (head, label) -> count
    answered: dict[str, float] = field(default_factory=dict)  # head -> calls
    layers: dict[str, float] = field(default_factory=dict)  # head -> layers per row
    candidate_s: float = 0.0
    batch_s: float = 0.0
    sampled: float = 0.0

    @property
    def kind(self) -> str:
        if self.confusion:
            return "multiclass"
        if self.label_pairs:
            return "multilabel"
        return "regression" if self.abs_diff or not self.labels else "multiclass"

    @property
    def agreement(self) -> float | None:
        return self.agree / self.rows if self.rows and self.kind != "regression" else None

    @property
    def mean_abs_diff(self) -> float | None:
        return self.abs_diff / self.rows if self.rows and self.kind == "regression" else None


def shadow_figures(text: str) -> dict[str, TaskFigures]:
    """Per task, its shadow figures in the metrics text (Prometheus' text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, TaskFigures] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError) as exc:
        raise CentraError(f"not Prometheus metrics text ({exc})") from None
    for family in families:
        if not family.name.startswith(PREFIX):
            continue
        what = family.name[len(PREFIX):]
        for sample in family.samples:
            if sample.name.endswith("_created") or "task" not in sample.labels:
                continue
            labels, value = sample.labels, sample.value
            figures = found.setdefault(labels["task"], TaskFigures(labels["task"]))
            add(figures, what, labels, value)
    return found


def add(f: TaskFigures, what: str, labels: dict, value: float) -> None:
    scalar = {"calls": "calls", "rows": "rows", "agree": "agree", "abs_diff": "abs_diff",
              "candidate_seconds": "candidate_s", "batch_seconds": "batch_s", "sampled": "sampled"}
    if what in scalar:
        setattr(f, scalar[what], getattr(f, scalar[what]) + value)
    elif what == "confusion":
        key = (labels["active"], labels["candidate"])
        f.confusion[key] = f.confusion.get(key, 0.0) + value
    elif what == "label_pairs":
        key = (labels["label"], labels["active"], labels["candidate"])
        f.label_pairs[key] = f.label_pairs.get(key, 0.0) + value
    elif what == "labels":
        key = (labels["head"], labels["label"])
        f.labels[key] = f.labels.get(key, 0.0) + value
    elif what == "answered":
        f.answered[labels["head"]] = f.answered.get(labels["head"], 0.0) + value
    elif what == "layers":
        f.layers[labels["head"]] = value


def report(figures: dict[str, TaskFigures]) -> str:
    """The tables of every shadowed task."""
    if not figures:
        return "no shadowed task in these metrics (merge with --candidate TASK=FOLDER and serve the version)"
    return "\n\n".join(task_report(figures[task]) for task in sorted(figures))


def task_report(f: TaskFigures) -> str:
    lines = [f"task {f.task!r} ({f.kind}): {f.calls:.0f} calls, {f.rows:.0f} rows compared"]
    if f.agreement is not None:
        lines.append(f"  agreement ({'top label' if f.kind == 'multiclass' else 'label set'}): {f.agreement:.1%} "
                     f"({f.agree:.0f} of {f.rows:.0f} rows)")
    elif f.mean_abs_diff is not None:
        lines.append(f"  mean |active - candidate|: {f.mean_abs_diff:.4g}")
    if f.answered:
        lines.append("  answered by: " + ", ".join(f"{head} {n:.0f} calls" for head, n in sorted(f.answered.items())))
    lines.append("  " + cost_line(f))
    if f.sampled:
        lines.append(f"  {f.sampled:.0f} disagreeing inputs in the sample file")
    if f.confusion:
        lines += ["", indent(confusion_table(f))]
    elif f.label_pairs:
        lines += ["", indent(label_table(f))]
    return "\n".join(lines)


def cost_line(f: TaskFigures) -> str:
    active, extra = f.layers.get("active"), f.layers.get("candidate")
    layers = (f"+{extra:.0f} layers per row asking for it (active head: {active:.0f} layers of trunk and branch)"
              if extra is not None and active is not None else "layers: not reported")
    if not f.candidate_s:
        return f"candidate cost: {layers}; time: none measured yet"
    per_row = f" ({1000 * f.candidate_s / f.rows:.3f} ms per row)" if f.rows else ""
    share = f", {f.candidate_s / f.batch_s:.1%} of the batches it ran in" if f.batch_s else ""
    return f"candidate cost: {layers}; {f.candidate_s:.3f} s of engine time{per_row}{share}"


def confusion_table(f: TaskFigures) -> str:
    """Rows: the active head's labels; columns: the candidate's (multiclass); with each head's totals."""
    active = sorted({a for a, _ in f.confusion} | {label for head, label in f.labels if head == "active"})
    candidate = sorted({c for _, c in f.confusion} | {label for head, label in f.labels if head == "candidate"})
    rows = [("active \\ candidate", *candidate, "total")]
    for a in active:
        counts = [f.confusion.get((a, c), 0.0) for c in candidate]
        rows.append((a, *(f"{n:.0f}" for n in counts), f"{sum(counts):.0f}"))
    totals = [sum(f.confusion.get((a, c), 0.0) for a in active) for c in candidate]
    rows.append(("total", *(f"{n:.0f}" for n in totals), f"{sum(totals):.0f}"))
    return table(rows, right=range(1, len(rows[0])))


def label_table(f: TaskFigures) -> str:
    """Per label (multilabel): rows where each head gives it, both do, only one does."""
    rows = [("label", "active", "candidate", "both", "active only", "candidate only")]
    for label in sorted({key[0] for key in f.label_pairs}):
        n = {(a, c): f.label_pairs.get((label, a, c), 0.0) for a in "01" for c in "01"}
        rows.append((label, f"{n['1', '0'] + n['1', '1']:.0f}", f"{n['0', '1'] + n['1', '1']:.0f}",
                     f"{n['1', '1']:.0f}", f"{n['1', '0']:.0f}", f"{n['0', '1']:.0f}"))
    return table(rows, right=range(1, 6))


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
