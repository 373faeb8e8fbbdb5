"""Engine: texts in, per-task answers out, over a merged model (PyTorch reference engine).

Tasks that read the same tokens (same input kind and max_length) share one trunk pass. Texts are
tokenised once, sorted by length and batched, so a batch carries little padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from centra.core import ENGINES
from centra.core.answers import Answer, interpret
from centra.core.backbone import EncoderConfig
from centra.core.graph import MergedModel
from centra.core.manifest import Manifest
from centra.core.merge import load_merged
from centra.core.overhead import TokenGroup, token_groups
from centra.core.shadow import is_candidate, task_of
from centra.core.task import TaskSpec
from centra.core.tokens import Encoded, check_texts, encode
from centra.core.versions import read_version
from centra.errors import CentraError, FieldError, Name

DEFAULT_BATCH_SIZE = 32


class Runner(Protocol):
    """What runs the merged graph: the torch MergedModel (the reference); other runtimes (ONNX Runtime,
    TensorRT) implement the same attributes and call."""

    specs: dict[str, TaskSpec]
    cfg: EncoderConfig

    def forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                     wants: dict[str, torch.Tensor], spent: dict[str, float] | None = None
                     ) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Row:
    """One input of one call: its text (and pair), and the tasks it asked for (checked by `select`); a
    task's candidate key (centra.core.shadow) among them runs its candidate head too."""

    text: str
    pair: str | None
    tasks: tuple[str, ...]


@dataclass
class RowResult:
    """Per task: the row's logits (num_outputs,), whether its tokens were truncated, and (once
    `interpret_all` ran) its answer: label / labels / value and scores."""

    logits: dict[str, torch.Tensor]
    truncated: dict[str, bool]
    answers: dict[str, Answer] = field(default_factory=dict)


class Engine:
    """Tokenise, run the merged model in length-sorted batches, turn logits into answers."""

    def __init__(self, model: Runner | MergedModel, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE,
                 manifest: Manifest | None = None):
        if batch_size < 1:
            raise CentraError(f"batch size must be >= 1, not {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.manifest = manifest  # None: a model built in memory, not loaded from a version
        self.groups = token_groups(self.model.specs.values())
        self.group_of = {task: group for group in self.groups for task in group.tasks}
        # what callers name, and the candidate heads beside them (centra.core.shadow): read on every call
        self._tasks = {name: spec for name, spec in self.model.specs.items() if not is_candidate(name)}
        self._candidates = {task_of(name): spec for name, spec in self.model.specs.items() if is_candidate(name)}

    @classmethod
    def load(cls, out: Path, batch_size: int = DEFAULT_BATCH_SIZE, engine: str | None = None) -> Engine:
        """Load a version with the runner its manifest names ("engine"; torch when absent), or `engine`:
        "torch" always works (the torch files are in every version), "onnx" needs the version's graphs,
        "tensorrt" its plans (and the GPU they were built for)."""
        from centra.core.backbone import load_tokenizer

        if engine is not None and engine not in ENGINES:
            raise CentraError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
        version = read_version(Path(out))  # the pointer read once; every file's sha256 checked, graphs included
        folder, manifest = version.folder, version.manifest
        name = engine or (manifest.engine.name if manifest.engine is not None else "torch")
        runner: Runner | MergedModel
        if name == "torch":
            runner = load_merged(version)[1]
        elif name == "onnx":  # the graphs hold the weights: the torch model loads only if verify asks for it
            from centra.runtime.onnx import OnnxRunner

            runner = OnnxRunner.load(folder, manifest.engine, version, files=manifest.files)
        elif name == "tensorrt":
            from centra.runtime.tensorrt import TensorRTRunner

            runner = TensorRTRunner.load(folder, manifest.engine, version, files=manifest.files)
        else:
            raise CentraError(f"{folder / 'manifest.json'}: unknown engine {name!r} (known: {', '.join(ENGINES)})")
        return cls(runner, load_tokenizer(folder / "tokenizer"), batch_size, manifest)

    @classmethod
    def load_many(cls, out: Path, engines: list[str | None], batch_size: int = DEFAULT_BATCH_SIZE) -> list[Engine]:
        """One Engine per runtime name (None: the one the manifest names), all of the same version of `out`
        (e.g. int8 ONNX beside the torch reference); refused when a version is published between the loads."""
        loaded = [cls.load(out, batch_size, engine) for engine in engines]
        if any(e.version != loaded[0].version for e in loaded[1:]):  # the pointer moved between two loads
            raise CentraError(f"{out}: a new version was published while loading; run again")
        return loaded

    @property
    def version(self) -> str:
        return self.manifest.version if self.manifest is not None else ""

    @property
    def content_id(self) -> str:
        """What the version is known by ("sha256:<hex>" of its manifest, see core/merge.content_id): a
        version rebuilt under the same name has another one."""
        return self.manifest.content_id if self.manifest is not None else ""

    @property
    def specs(self) -> dict[str, TaskSpec]:
        """The tasks served (what callers name): every branch but the candidate heads."""
        return self._tasks

    @property
    def branches(self) -> dict[str, TaskSpec]:
        """Every branch of the graph: the tasks, and the candidate heads under their keys."""
        return self.model.specs

    @property
    def candidates(self) -> dict[str, TaskSpec]:
        """Task name -> its candidate head's spec (named by its key), for the tasks that have one."""
        return self._candidates

    @property
    def runtime(self) -> str:
        """What runs the graph: "torch fp32", "onnxruntime int8", ..."""
        return getattr(self.model, "runtime", "torch fp32")

    def select(self, names: list[str] | None, has_pair: bool) -> list[TaskSpec]:
        """Named tasks (checked; a candidate key names a candidate head), or all tasks that can answer this
        input when none is named."""
        if not names:
            chosen = [s for s in self.specs.values() if has_pair or s.input == "single"]
            if not chosen:
                raise FieldError("every task takes text pairs: give the second texts (", Name("pairs"), ")")
            return chosen
        out = []
        for name in dict.fromkeys(names):
            if name not in self.branches:
                if is_candidate(name):
                    raise CentraError(f"task {task_of(name)!r} has no candidate head")
                raise CentraError(f"unknown task {name!r} (known: {', '.join(sorted(self.specs))})")
            if self.branches[name].input == "pair" and not has_pair:
                raise FieldError(f"task {name!r} takes text pairs: give the second texts (", Name("pairs"), ")")
            out.append(self.branches[name])
        return out

    def encode(self, texts: list[str], pairs: list[str] | None, max_length: int) -> Encoded:
        return encode(self.tokenizer, self.model.cfg.type_vocab_size, texts, pairs, max_length)

    @torch.inference_mode()
    def run(self, rows: list[Row], spent: dict[str, float] | None = None) -> list[RowResult]:
        """Rows of any number of calls, each with its own task set: one trunk pass per token group per
        batch of at most batch_size rows (sorted by length), each branch only on the rows that asked.
        `spent`, when given, adds the seconds each candidate head's detour took (per candidate key)."""
        results = [RowResult({}, {}) for _ in rows]
        groups: dict[TokenGroup, list[int]] = {}  # the rows that asked for a task of the group
        for i, row in enumerate(rows):
            for group in dict.fromkeys(self.group_of[t] for t in row.tasks):
                groups.setdefault(group, []).append(i)
        pad_id = self.tokenizer.pad_token_id or 0
        for group, members in groups.items():
            pairs = [rows[i].pair for i in members] if group.input == "pair" else None
            enc = self.encode([rows[i].text for i in members], pairs, group.max_length)
            order = sorted(range(len(members)), key=lambda j: len(enc.input_ids[j]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                wants: dict[str, list[int]] = {}
                for pos, j in enumerate(chunk):
                    for task in rows[members[j]].tasks:
                        if self.group_of[task] is group:
                            wants.setdefault(task, []).append(pos)
                wanted = {t: torch.tensor(p, dtype=torch.long) for t, p in wants.items()}
                if spent is None:  # runners without candidates need not know the argument
                    out = self.model.forward_rows(*enc.batch(chunk, pad_id), wanted)
                else:
                    out = self.model.forward_rows(*enc.batch(chunk, pad_id), wanted, spent=spent)
                for task, positions in wants.items():
                    for value, pos in zip(out[task], positions):
                        j = chunk[pos]
                        results[members[j]].logits[task] = value
                        results[members[j]].truncated[task] = bool(enc.truncated[j]) if enc.truncated else False
        return results

    def interpret_all(self, results: list[RowResult]) -> list[RowResult]:
        """Fill every result's answers (on the caller's thread: the server does it on its engine worker,
        keeping tensor work off the event loop)."""
        for result in results:
            for name, values in result.logits.items():
                result.answers[name] = interpret(self.branches[name], values)
        return results

    def logits(self, texts: list[str], pairs: list[str] | None = None,
               tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Raw outputs per task, each (len(texts), num_outputs), rows in input order."""
        check_texts(texts, pairs)
        names = tuple(spec.name for spec in self.select(tasks, pairs is not None))
        rows = [Row(text, pairs[i] if pairs is not None else None, names) for i, text in enumerate(texts)]
        results = self.run(rows)
        return {name: torch.stack([r.logits[name] for r in results]) for name in names}

    def predict(self, texts: list[str], pairs: list[str] | None = None,
                tasks: list[str] | None = None, max_labels: int | None = None) -> list[dict]:
        """One answer per text and task: {"text", ("pair",) "task", "label"|"labels"|"value", "scores",
        "truncated"}, texts in input order; a multilabel answer at most max_labels labels (and the task's)."""
        check_texts(texts, pairs)
        names = tuple(spec.name for spec in self.select(tasks, pairs is not None))
        rows = [Row(text, pairs[i] if pairs is not None else None, names) for i, text in enumerate(texts)]
        answers = []
        for row, result in zip(rows, self.run(rows)):
            for name in names:
                found = interpret(self.branches[name], result.logits[name], max_labels)
                answer = {"text": row.text, "task": name, **found.to_dict(), "truncated": result.truncated[name]}
                if row.pair is not None and self.branches[name].input == "pair":
                    answer = {"text": row.text, "pair": row.pair, **{k: v for k, v in answer.items() if k != "text"}}
                answers.append(answer)
        return answers
