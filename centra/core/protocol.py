"""The names on the wire that more than one door speaks: the Open Inference Protocol's model and tensors,
which `centra serve` (serve/doors/oip.py), the Triton model (serve/doors/triton.py) and both Triton
repositories (export/triton.py, export/triton_python.py) share, so one tritonclient script runs against
each of them.

- inputs, BYTES [rows, 1]: TEXT; TEXT_PAIR (empty strings for single-text calls); TASKS (comma-separated
  task names, the same on every row; empty: every task that fits the inputs);
- outputs: LOGITS_<task> FP32 [rows, outputs] per task asked for; ANSWERS BYTES [rows, 1], one JSON object
  per row, `centra predict`'s answers; for a task with a candidate head (centra.core.shadow), its answer
  names the head that gave it ("head"), and CANDIDATE_LOGITS_<task> carries the candidate's logits when a
  call names that output;
- request parameters: max_labels, timeout, and for tasks with a candidate head: head ("active" |
  "candidate") and request_id (what a canary fraction is drawn by).
"""

from __future__ import annotations

MODEL = "centra"  # the one model a server or repository serves under this protocol
TEXT, TEXT_PAIR, TASKS = "TEXT", "TEXT_PAIR", "TASKS"
INPUTS = (TEXT, TEXT_PAIR, TASKS)
ANSWERS = "ANSWERS"
LOGITS = "LOGITS_"  # + a task's name: that task's logits
HEADER_LENGTH = "Inference-Header-Content-Length"  # HTTP: the JSON head's length before binary tensors
CANDIDATE_LOGITS = "CANDIDATE_LOGITS_"  # + a task's name: its candidate head's logits, when asked for
HEAD = "head"  # request parameter: the head that answers tasks with a candidate ("active" | "candidate")
REQUEST_ID = "request_id"  # request parameter: what the canary fraction is drawn by
MAX_LABELS = "max_labels"  # request parameter: at most this many labels per multilabel answer in ANSWERS
TASKS_PARAMETER = "tasks"  # request parameter: comma-separated task names for every row (instead of TASKS)
TIMEOUT = "timeout"  # request parameter (what tritonclient's infer(timeout=) sends): microseconds
CLASSIFICATION = "classification"  # output parameter (Triton's extension): the output's top classes, not its values


def logits_name(task: str) -> str:
    """The output that carries `task`'s logits."""
    return f"{LOGITS}{task}"


def candidate_logits_name(task: str) -> str:
    """The output that carries the logits of `task`'s candidate head."""
    return f"{CANDIDATE_LOGITS}{task}"


def task_of(output: str) -> str | None:
    """The task whose logits `output` names, or None when it names none."""
    return output[len(LOGITS):] if output.startswith(LOGITS) else None
