"""Evaluate one task of a merged model on a labelled file: its metrics, broken down by the values of a
column (`by`: language, channel, product), and against another engine of the same version (`against`:
e.g. int8 against the torch reference).

The engines are loaded by the caller (centra.runtime.engine.Engine.load, or `load_engines` for two of one
version): training does not import the runtime, it only calls an engine's `logits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from centra.errors import CentraError
from centra.train.data import Columns, load_examples, parse_label_names, read_segments
from centra.train.metrics import by_segment, compute

if TYPE_CHECKING:
    import numpy as np
    import torch

    from centra.core.task import TaskSpec
    from centra.train.data import Examples


class Predictor(Protocol):
    """What evaluate reads of an engine (centra.runtime.engine.Engine)."""

    specs: dict[str, TaskSpec]
    runtime: str

    def logits(self, texts: list[str], pairs: list[str] | None = None,
               tasks: list[str] | None = None) -> dict[str, torch.Tensor]: ...


def evaluate(engine: Predictor, task: str, data: Path | str, columns: Columns,
             label_names: str | list[str] | None = None, by: str | None = None,
             against: Predictor | None = None) -> dict:
    """The task's metrics on `data` (label_names: a list, 'a,b,c' or '@file'), as the JSON line of
    `centra evaluate`: {"task", "examples", metric...}, with "against" (another engine's metrics, the share
    of answers alike and the metric deltas) and "by"/"segments" (per value of the column) when asked.
    The file and the column are read, and refused, before anything runs."""
    if task not in engine.specs:
        raise CentraError(f"unknown task {task!r} (known: {', '.join(sorted(engine.specs))})")
    spec = engine.specs[task]
    names = parse_label_names(label_names) if isinstance(label_names, str) else label_names
    examples, _ = load_examples(Path(data), spec.kind, columns, labels=None if spec.kind == "regression" else
                                spec.labels, label_names=names)
    segments = read_segments(Path(data), columns, by) if by is not None else None
    logits = engine.logits(examples.texts, examples.pairs, [task])[task].numpy()
    result = {"task": task, "examples": len(examples), **rounded(compute(spec.kind, logits, examples.targets,
                                                                         spec.thresholds, spec.max_labels))}
    if spec.kind == "multilabel":  # does the task answer as many labels as the data has?
        import numpy as np

        from centra.train.thresholds import labels_per_text, neutral_of

        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        result["labels_per_text"] = labels_per_text(probs, spec.thresholds, examples.targets, spec.max_labels,
                                                    neutral_of(spec.labels))
    if against is not None:
        result["against"] = compare(task, against, spec, examples, logits)
    if segments is not None:
        parts = by_segment(spec.kind, logits, examples.targets, segments, spec.thresholds, spec.max_labels)
        result |= {"by": by, "segments": {v: rounded(m) for v, m in parts.items()}}
    return result


def compare(task: str, other: Predictor, spec: TaskSpec, examples: Examples, logits: np.ndarray) -> dict:
    """The same examples through another engine of the same version: its metrics, the share of examples
    answered alike (labels_agree: the same label, the same label set, a value within 10% of the spread)
    and the metric deltas (engine - other), e.g. int8 against the torch reference."""
    import torch

    from centra.core.answers import labels_agree

    theirs = other.logits(examples.texts, examples.pairs, [task])[task]
    scores = compute(spec.kind, theirs.numpy(), examples.targets, spec.thresholds, spec.max_labels)
    ours = compute(spec.kind, logits, examples.targets, spec.thresholds, spec.max_labels)
    same = labels_agree(spec, theirs.double(), torch.from_numpy(logits).double())
    return {"engine": other.runtime, **rounded(scores), "agreement": round(same.float().mean().item(), 6),
            "delta": {k: round(ours[k] - v, 6) for k, v in scores.items() if isinstance(v, float) and k in ours}}


def rounded(scores: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items()}
