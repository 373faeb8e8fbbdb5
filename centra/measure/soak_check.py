"""The soak's answer check: every OK answer against in-process `Engine.predict` of the version that answered.

`References` keeps a copy of every version the soak published (hard links, as the served folder prunes old
versions; the file of a version the soak corrupts on purpose gets its published bytes back), keyed by
content id ("sha256:...", what a response's `model_id` names) and by version name (for a response without
one: OIP's). A name the soak published with more than one content (a rebuild brings v000001 back with
other tasks) is ambiguous: an answer naming only it is checked against the newest content of that name
(then the name's other contents whose engines are loaded), and one that none agrees with is counted
`ambiguous` (unchecked), never wrong. `Checker` is one thread that
takes answered calls off a bounded queue (a full queue makes the clients wait: the check keeps up, or the
load drops), groups them by version, task set and input kind, runs `Engine.predict` on the copy and
compares: the task set, labels, label sets and values, and the scores within
SCORE_TOLERANCE (they travel as float32 rounded to 6 decimals). A label that differs only where the reference
is tied within that tolerance (or a score sits on its threshold) is not counted.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from centra.client import answer_from_v1
from centra.core.answers import Answer, ClassAnswer, LabelsAnswer, ValueAnswer, answer_from_dict
from centra.core.task import TaskSpec
from centra.core.versions import read_manifest
from centra.errors import CentraError
from centra.runtime.engine import Engine

SCORE_TOLERANCE = 1e-4
ENGINE_CACHE = 3  # reference engines kept loaded (answers of old and new versions interleave around a reload)
UNKNOWN_WAIT_S = 20.0  # an answer naming a version not registered yet waits this long for its copy
SHOWN = 5  # wrong answers described in the report


@dataclass(frozen=True)
class SoakAnswer:
    """One OK call: what was asked and what came back (per input: task -> its centra.v1 TaskResult, read
    as a typed answer with the reference's labels when checked)."""

    model_id: str
    version: str
    texts: tuple[str, ...]
    pairs: tuple[str, ...] | None
    tasks: tuple[str, ...]  # as asked; empty: every task that fits the inputs
    ids: tuple[str, ...]
    got_ids: tuple[str, ...]
    results: tuple[dict[str, object], ...]
    door: str = "v1"


def asked(request) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """A ClassifyRequest's texts, and its pairs (None unless every input has one)."""
    inputs = list(request.inputs)
    pairs = tuple(item.text_pair for item in inputs) if inputs and all(i.text_pair for i in inputs) else None
    return tuple(i.text for i in inputs), pairs


def answered_from_pb(request, response, door: str = "v1") -> SoakAnswer:
    texts, pairs = asked(request)
    results = tuple({t.task: t for t in result.tasks} for result in response.results)
    return SoakAnswer(getattr(response, "model_id", ""), response.model_version, texts, pairs, tuple(request.tasks),
                      tuple(i.id for i in request.inputs), tuple(r.id for r in response.results), results, door)


def v1_result(task: str, answer: dict):
    """One task's answer in `centra predict`'s JSON form (OIP's ANSWERS) as a centra.v1 TaskResult."""
    from centra.serve.v1 import centra_pb2 as pb

    result = pb.TaskResult(task=task, truncated=bool(answer.get("truncated", False)))
    answer_from_dict(answer).to_v1(result)
    return result


def link_tree(src: Path, dest: Path) -> None:
    """A copy of a folder whose files are hard links where the file system allows (copies elsewhere)."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dest, copy_function=link)


class References:
    """Copies of published versions, found by content id or name, and their engines (loaded on demand)."""

    def __init__(self, root: Path, engine: str | None = None, batch_size: int = 32):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine_name, self.batch_size = engine, batch_size
        self.by_id: dict[str, Path] = {}
        self.by_name: dict[str, Path] = {}  # the newest copy of each name
        self.contents: dict[str, set[str]] = {}  # name -> the content ids published under it
        self.copies: dict[str, list[Path]] = {}  # name -> its copies, oldest first
        self._engines: OrderedDict[Path, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._copies = itertools.count()

    def add(self, version_folder: Path) -> tuple[str, str, Path]:
        """Copy a published version aside and register it; (version name, content id, the copy)."""
        dest = self.root / f"{next(self._copies):05d}-{Path(version_folder).name}"  # a name may come back
        link_tree(Path(version_folder), dest)
        manifest = read_manifest(dest)
        version, content = manifest.version, manifest.content_id
        with self._lock:
            self.by_name[version] = dest
            self.contents.setdefault(version, set()).add(content or str(dest))
            self.copies.setdefault(version, []).append(dest)
            if content:
                self.by_id[content] = dest
        return version, content, dest

    def find(self, model_id: str, version: str) -> tuple[Path | None, bool]:
        """The copy an answer names, and whether that is ambiguous (a name alone, under which more than
        one content was published)."""
        with self._lock:
            if model_id:
                return self.by_id.get(model_id), False
            return self.by_name.get(version), len(self.contents.get(version, ())) > 1

    def loaded_others(self, version: str, folder: Path) -> list[Path]:
        """The other copies of a version name whose engines are loaded (trying them costs no load)."""
        with self._lock:
            copies = list(self.copies.get(version, ()))
        return [copy for copy in reversed(copies) if copy != folder and copy in self._engines]

    def engine(self, folder: Path) -> Engine:
        """The reference engine of a copy; only the checker thread calls this."""
        if folder in self._engines:
            self._engines.move_to_end(folder)
            return self._engines[folder]
        engine = Engine.load(folder, batch_size=self.batch_size, engine=self.engine_name)
        self._engines[folder] = engine
        while len(self._engines) > ENGINE_CACHE:
            self._engines.popitem(last=False)
        return engine


def compare(engine: Engine, item: SoakAnswer, expected: list[dict]) -> list[str]:
    """What is wrong with one answered call, given the reference's predict output for it (text-major)."""
    if item.got_ids != item.ids:
        return [f"{len(item.got_ids)} results with ids {list(item.got_ids)[:4]}, asked {list(item.ids)[:4]}"]
    names = list(dict.fromkeys(answer["task"] for answer in expected))
    problems = []
    for i, got in enumerate(item.results):
        if sorted(got) != sorted(names):
            problems.append(f"input {i}: tasks {sorted(got)}, the version has {sorted(names)} for this call")
            continue
        for j, name in enumerate(names):
            spec, ref, task = engine.specs[name], expected[i * len(names) + j], got[name]
            if len(task.scores) != len(spec.labels):
                problem = f"{len(task.scores)} scores, the reference has {len(spec.labels)} ({', '.join(spec.labels)})"
            elif not wire_scores_agree(list(task.scores), list(ref["scores"].values())):
                problem = f"scores {list(task.scores)} differ from {list(ref['scores'].values())}"
            elif task.truncated != ref["truncated"]:
                problem = f"truncated {task.truncated}, the reference {ref['truncated']}"
            else:
                problem = compare_task(spec, answer_from_dict(ref), answer_from_v1(spec.labels, task))
            if problem:
                problems.append(f"input {i} task {name}: {problem}")
    return problems


def wire_scores_agree(given: list[float], scores: list[float], tol: float = SCORE_TOLERANCE) -> bool:
    """The scores as they travelled (float32) against the reference's, every one (a regression answer's
    value travels apart from its score)."""
    return all(abs(a - b) <= tol for a, b in zip(given, scores))  # NaN: False


def compare_task(spec: TaskSpec, ref: Answer, got: Answer, tol: float = SCORE_TOLERANCE) -> str | None:
    """One task's answer against the reference's (None: they agree): the scores within `tol`, then the
    label (or a tie within tol), the label set (differing only at a threshold, within tol), the value."""
    scores, given = list(ref.scores.values()), list(got.scores.values())
    worst = max((abs(a - b) for a, b in zip(given, scores)), default=0.0)
    if len(given) != len(scores) or not worst <= tol:  # NaN too
        return f"scores {given} differ from {scores} by {worst:.2e}"
    if isinstance(ref, ValueAnswer):
        ok = isinstance(got, ValueAnswer) and abs(got.value - ref.value) <= tol
        return None if ok else f"{got.to_dict()}, the reference value {ref.value}"
    if isinstance(ref, ClassAnswer):
        if not isinstance(got, ClassAnswer):
            return f"{got.to_dict()}, the reference label {ref.label!r}"
        tied = got.label in ref.scores and abs(ref.scores[got.label] - ref.scores[ref.label]) <= tol
        return None if got.label == ref.label or tied else f"label {got.label!r}, the reference {ref.label!r}"
    if not isinstance(got, LabelsAnswer):
        return f"{got.to_dict()}, the reference labels {sorted(ref.labels)}"
    thresholds = dict(zip(spec.labels, spec.thresholds or [0.5] * len(spec.labels)))
    differ = set(got.labels) ^ set(ref.labels)
    if all(lab in thresholds and abs(ref.scores[lab] - thresholds[lab]) <= tol for lab in differ):
        return None
    return f"labels {sorted(got.labels)}, the reference {sorted(ref.labels)}"


class Checker:
    """One thread checking answered calls against their version's reference engine."""

    def __init__(self, references: References, max_group: int = 64):
        self.references = references
        self.max_group = max_group
        self.queue: queue.Queue[SoakAnswer] = queue.Queue(maxsize=512)
        self.checked = self.wrong = self.ambiguous = 0
        self.doors: dict[str, dict[str, int]] = {}  # door -> checked, wrong, ambiguous
        self.examples: list[str] = []
        self.versions: dict[str, int] = {}  # "version id" -> answers checked
        self._pending: list[tuple[float, SoakAnswer]] = []  # version not registered yet
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="centra-soak-checker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: SoakAnswer) -> None:
        self.queue.put(item)  # blocks while the checker is behind: back-pressure on the clients

    def finish(self, timeout: float) -> bool:
        """Check what is queued, then stop; False when that took longer than `timeout`."""
        self._done.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not (self._done.is_set() and self.queue.empty() and not self._pending):
            batch = self._take()
            if batch:
                self._check(batch)

    def _take(self) -> list[tuple[Path, bool, SoakAnswer]]:
        waiting, self._pending = self._pending, []
        fresh = []
        try:
            fresh.append(self.queue.get(timeout=0.2))
            while len(fresh) < self.max_group:
                fresh.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        now, ready = time.monotonic(), []
        for first, item in waiting + [(now, item) for item in fresh]:
            folder, ambiguous = self.references.find(item.model_id, item.version)
            if folder is not None:
                ready.append((folder, ambiguous, item))
            elif now - first < UNKNOWN_WAIT_S and not self._done.is_set():
                self._pending.append((first, item))
            else:
                self._flag(item, [f"answered by {item.version} {item.model_id or '(no model_id)'}, a version "
                                  "the soak never published"])
        return ready

    def _check(self, batch: list[tuple[Path, bool, SoakAnswer]]) -> None:
        groups: dict[tuple, list[SoakAnswer]] = {}
        for folder, ambiguous, item in batch:
            groups.setdefault((folder, ambiguous, item.tasks, item.pairs is not None), []).append(item)
        for (folder, ambiguous, tasks, _), items in groups.items():
            try:
                engine = self.references.engine(folder)
                texts = [t for item in items for t in item.texts]
                pairs = [p for item in items for p in item.pairs] if items[0].pairs is not None else None
                expected = engine.predict(texts, pairs, list(tasks) or None)
            except Exception as exc:  # e.g. a task the version does not have: the server answered it anyway
                why = str(exc) if isinstance(exc, CentraError) else f"{type(exc).__name__}: {exc}"
                for item in items:
                    problems = [f"the reference refuses the call: {why}"]
                    self._flag(item, self._another(folder, item, problems) if ambiguous else problems, ambiguous)
                continue
            per_text = len(expected) // len(texts)
            start = 0
            for item in items:
                end = start + len(item.texts) * per_text
                problems = compare(engine, item, expected[start:end])
                if problems and ambiguous:
                    problems = self._another(folder, item, problems)
                self._flag(item, problems, ambiguous)
                start = end

    def _another(self, folder: Path, item: SoakAnswer, problems: list[str]) -> list[str]:
        """An answer known by an ambiguous name that the newest content of the name contradicts, against
        the name's other contents already loaded: [] when one of them agrees."""
        for other in self.references.loaded_others(item.version, folder):
            try:
                engine = self.references.engine(other)
                expected = engine.predict(list(item.texts), list(item.pairs) if item.pairs is not None else None,
                                          list(item.tasks) or None)
            except Exception:  # e.g. a task that content lacks: not the one that answered
                continue
            if not compare(engine, item, expected):
                return []
        return problems

    def _flag(self, item: SoakAnswer, problems: list[str], ambiguous: bool = False) -> None:
        mine = self.doors.setdefault(item.door, {"checked": 0, "wrong": 0, "ambiguous": 0})
        if problems and ambiguous:  # another content under the same name may have answered it
            self.ambiguous += 1
            mine["ambiguous"] += 1
            return
        self.checked += 1
        mine["checked"] += 1
        key = f"{item.version} {item.model_id}".strip()
        self.versions[key] = self.versions.get(key, 0) + 1
        if problems:
            self.wrong += 1
            mine["wrong"] += 1
            if len(self.examples) < SHOWN:
                self.examples.append(f"{item.door} {key} tasks {list(item.tasks)}: {'; '.join(problems[:3])}")
