"""Merge: many task folders on one backbone -> one published, versioned merged model.

OUT is a versioned artifact (`centra.core.versions`): OUT/versions/vNNNNNN/ holds one self-contained merged model
(manifest.json, trunk.safetensors, tokenizer/, a verified copy of every task folder, and of every candidate
head in candidates/<task>/: centra.core.shadow) and OUT/current points at the newest. The manifest hashes
every other file of its version; loading refuses any missing, changed or added file, naming it. A refused
or crashed merge leaves OUT as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from centra.core.backbone import Backbone, Embeddings, EncoderLayer, check_state, load_safetensors
from centra.core.graph import MergedModel
from centra.core.manifest import BackboneInfo, EngineInfo, Manifest, ManifestTask
from centra.core.overhead import overhead_layers, trunk_passes
from centra.core.shadow import VERSION_DIR as CANDIDATES_DIR
from centra.core.shadow import as_branch, check_same_task, extra_layers
from centra.core.table import table
from centra.core.task import HEAD_FILE, TASK_FILE, TaskSpec, load_task, read_task_json, task_dirs
from centra.core.versions import (
    DEFAULT_KEEP_VERSIONS,
    MANIFEST,
    Version,
    earlier_files,
    publish_version,
    read_version,
)
from centra.errors import CentraError
from centra.io import copy_verified, hash_tree, link_verified, sha256_file, write_json

TRUNK_FILE = "trunk.safetensors"
MODEL_KIND = "merged model"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".md")


@dataclass
class PlannedTask:
    folder: Path
    spec: TaskSpec
    task_json_sha256: str  # the bytes validated; the copy must hash the same
    source: str | None = None  # the manifest's source (default: the folder, resolved)


@dataclass
class MergePlan:
    backbone: Backbone
    tasks: list[PlannedTask]
    candidates: list[PlannedTask] = field(default_factory=list)  # candidate heads, each named after its task

    @property
    def specs(self) -> list[TaskSpec]:
        return [t.spec for t in self.tasks]

    @property
    def trunk_depth(self) -> int:
        return max(spec.attach_layer for spec in [*self.specs, *(c.spec for c in self.candidates)])

    @property
    def overhead_layers(self) -> int:
        return overhead_layers(self.specs)

    @property
    def single_task_layers(self) -> int:
        return self.backbone.cfg.num_layers * len(self.tasks)


def plan_merge(tasks_dirs: list[Path], backbone: str | None = None, trusted: Collection[str] = (),
               candidates: Mapping[str, Path] | None = None) -> MergePlan:
    """Find and validate every task folder; refuse (CentraError naming the file) on any problem. A head
    whose sha256 is in `trusted` (files an earlier version of the same OUT published, so validated) is
    hashed, not loaded. `candidates`: task name -> a trained folder of the same task, merged as its
    candidate head (centra.core.shadow)."""
    folders = [folder for d in tasks_dirs for folder in task_dirs(Path(d))]
    if not folders:
        raise CentraError(f"{', '.join(str(d) for d in tasks_dirs)}: no task folders to merge")
    return plan_folders(folders, backbone, trusted, candidates)


def plan_folders(folders: list[Path], backbone: str | None = None, trusted: Collection[str] = (),
                 candidates: Mapping[str, Path] | None = None, sources: Mapping[Path, str] | None = None) -> MergePlan:
    """plan_merge over task folders named one by one. `sources`: per folder (a version's own copy), the
    source its manifest entry keeps (where the task was merged from at first)."""
    planned = [PlannedTask(folder, *read_task_json(folder)) for folder in folders]
    for task in planned:
        task.source = (sources or {}).get(task.folder)
    seen: dict[str, Path] = {}
    for task in planned:
        key = task.spec.name.lower()
        if key in seen:
            raise CentraError(f"{task.folder / TASK_FILE}: duplicate task name {task.spec.name!r} "
                              f"(also {seen[key] / TASK_FILE})")
        seen[key] = task.folder
    bb = Backbone.load(backbone if backbone is not None else backbone_hint(planned[0].spec))
    shadowed = plan_candidates(planned, candidates or {}, sources)
    for task in [*planned, *shadowed]:
        if task.spec.head_sha256 in trusted:  # the same bytes an earlier version validated: spec and hash only
            check_task(task.folder, task.spec, bb)
        else:  # full validation: fingerprint, sha256, keys, shapes, finite values
            load_task(task.folder, bb, name=task.spec.name)
    return MergePlan(bb, planned, shadowed)


def plan_candidates(planned: list[PlannedTask], candidates: Mapping[str, Path],
                    sources: Mapping[Path, str] | None = None) -> list[PlannedTask]:
    """Each candidate folder read as a head of the task it names (its task.json's name must be the
    task's), answering the same question: kind, labels, inputs and backbone (one line naming the file)."""
    by_name = {t.spec.name: t for t in planned}
    found = []
    for name, folder in candidates.items():
        if name not in by_name:
            raise CentraError(f"candidate for {name!r}: no such task among the folders merged "
                              f"(tasks: {', '.join(sorted(by_name))})")
        folder = Path(folder)
        if not folder.is_dir():
            raise CentraError(f"{folder}: no such task folder (the candidate for {name!r})")
        spec, digest = read_task_json(folder, name=name)
        check_same_task(by_name[name].spec, spec, str(folder / TASK_FILE))
        found.append(PlannedTask(folder, spec, digest, (sources or {}).get(folder)))
    return found


def replan(version: Version, task: str, promote: bool, backbone: str | None = None,
           trusted: Collection[str] = ()) -> MergePlan:
    """The plan of `version` again (its own copies of every task folder and candidate head, their sources
    kept), with task's candidate head made its active one (`promote`) or removed: what `centra promote` and
    `centra drop-candidate` publish. Every other file is the version's, so it stays byte-identical."""
    manifest, folder = version.manifest, version.folder
    if manifest.task(task) is None:
        raise CentraError(f"{folder / MANIFEST}: no task {task!r} (tasks: {', '.join(manifest.task_names)})")
    candidate = manifest.candidate(task)
    if candidate is None:
        shadowed = ", ".join(c.name for c in manifest.candidates) or "none"
        raise CentraError(f"{folder / MANIFEST}: task {task!r} has no candidate head (tasks with one: {shadowed})")
    folders, sources = [], {}
    for entry in manifest.tasks:
        chosen = candidate if promote and entry.name == task else entry
        path = folder / (CANDIDATES_DIR if chosen is candidate else "tasks") / entry.name
        folders.append(path)
        sources[path] = chosen.source
    candidates = {c.name: folder / CANDIDATES_DIR / c.name for c in manifest.candidates if c.name != task}
    sources.update({path: manifest.candidate(name).source for name, path in candidates.items()})
    if backbone is None:  # the folder the version was cut from while it is there, else its id
        path = manifest.backbone.path
        backbone = path if path and Path(path).is_dir() else manifest.backbone.id
    return plan_folders(folders, backbone, trusted, candidates, sources)


def check_task(folder: Path, spec: TaskSpec, bb: Backbone) -> None:
    """A task folder whose head bytes were validated before (an earlier version holds them): its spec
    against the backbone, its fingerprint and its head's sha256; the weights are not loaded again."""
    spec.validate(str(folder / TASK_FILE), bb.cfg)
    if spec.backbone["fingerprint"] != bb.fingerprint:
        load_task(folder, bb, name=spec.name)  # refuses with load_task's own message
    head = folder / HEAD_FILE
    if not head.is_file() or sha256_file(head) != spec.head_sha256:
        load_task(folder, bb, name=spec.name)  # names the missing or replaced file


def backbone_hint(spec: TaskSpec) -> str:
    """The backbone a task names: its folder while that is still there, else its id."""
    path = spec.backbone.get("path")
    return path if path and Path(path).is_dir() else spec.backbone["id"]


def write_merged(plan: MergePlan, out: Path, keep_versions: int = DEFAULT_KEEP_VERSIONS,
                 extend: Callable[[Path, Manifest], EngineInfo] | None = None) -> Manifest:
    """Publish a new version of OUT from a validated plan; return its manifest.

    `extend(stage, manifest)`, when given, runs after the torch files are staged and before anything is
    hashed (the manifest has no files yet): it writes what another runtime needs into the staged version
    (e.g. ONNX graphs, checked for parity there) and returns the manifest's engine field. Its files are
    hashed and published with the rest, in the same atomic step."""
    from safetensors.torch import save_file

    bb, depth = plan.backbone, plan.trunk_depth
    written: list[Manifest] = []
    earlier = earlier_files(Path(out))

    def place(src: Path, dest: Path, digest: str) -> None:  # a link to an earlier version's copy, else a copy
        if digest not in earlier or not link_verified(earlier[digest], dest, digest):
            copy_verified(src, dest, digest)

    def build(stage: Path, version: str) -> None:
        trunk = {f"embeddings.{k}": v for k, v in bb.embeddings.state_dict().items()}
        for i in range(depth):
            trunk.update({f"layers.{i}.{k}": v for k, v in bb.layers[i].state_dict().items()})
        save_file({k: v.contiguous() for k, v in trunk.items()}, str(stage / TRUNK_FILE))
        digest = sha256_file(stage / TRUNK_FILE)
        linked = stage / f".{TRUNK_FILE}"
        if digest in earlier and link_verified(earlier[digest], linked, digest):
            os.replace(linked, stage / TRUNK_FILE)  # the same trunk as an earlier version's: one copy on disk
        (stage / "tokenizer").mkdir()
        for item in tokenizer_files(bb.path):
            place(item, stage / "tokenizer" / item.name, sha256_file(item))
        for root, tasks in (("tasks", plan.tasks), (CANDIDATES_DIR, plan.candidates)):
            for task in tasks:
                dest = stage / root / task.spec.name
                dest.mkdir(parents=True)
                place(task.folder / TASK_FILE, dest / TASK_FILE, task.task_json_sha256)
                place(task.folder / HEAD_FILE, dest / HEAD_FILE, task.spec.head_sha256)
        manifest = Manifest(
            version=version,
            backbone=BackboneInfo(bb.backbone_id, bb.fingerprint, bb.cfg.num_layers, str(bb.path)),
            encoder=bb.cfg.to_dict(), trunk_depth=depth, trunk_passes=tuple(trunk_passes(plan.specs)),
            tasks=tuple(manifest_task(task) for task in plan.tasks), overhead_layers=plan.overhead_layers,
            single_task_layers=plan.single_task_layers,
            candidates=tuple(manifest_task(task) for task in plan.candidates))
        if extend is not None:
            manifest = replace(manifest, engine=extend(stage, manifest))
        manifest = replace(manifest, files=hash_tree(stage)).with_content_id()
        write_json(stage / MANIFEST, manifest.to_dict())
        written[:] = [manifest]

    def check(stage: Path) -> None:  # every file hashed; the torch weights loaded when torch serves them
        version = read_version(stage)
        if version.manifest.engine is None:
            load_merged(version)

    publish_version(Path(out), MODEL_KIND, build, check, keep_versions)
    return written[0]


def manifest_task(task: PlannedTask) -> ManifestTask:
    spec = task.spec
    return ManifestTask(spec.name, spec.kind, tuple(spec.labels), spec.input, spec.max_length, spec.attach_layer,
                        spec.task_layers, spec.trained, spec.head_sha256, task.source or str(task.folder.resolve()))


def tokenizer_files(src: Path) -> list[Path]:
    """The backbone folder's tokenizer files: every plain file but weights and hidden ones."""
    return [item for item in sorted(Path(src).iterdir())
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and not item.name.startswith(".")]


def load_merged(out: Path | Version) -> tuple[Manifest, MergedModel]:
    """Load OUT's current version (or a version folder, or a Version already read), checking every
    file's sha256: the torch weights of the trunk and of every task."""
    version = out if isinstance(out, Version) else read_version(out)
    folder, manifest, cfg = version.folder, version.manifest, version.cfg
    trunk_file = folder / TRUNK_FILE
    embeddings = Embeddings(cfg)
    layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(manifest.trunk_depth))
    holder = nn.Module()
    holder.embeddings, holder.layers = embeddings, layers
    state = load_safetensors(trunk_file)
    check_state(holder.state_dict(), state, str(trunk_file))
    holder.load_state_dict(state)
    heads = {entry.name: load_task(folder / "tasks" / entry.name, cfg, manifest_sha256=entry.head_sha256)[1]
             for entry in manifest.tasks}
    for entry in manifest.candidates:
        _, head = load_task(folder / CANDIDATES_DIR / entry.name, cfg, manifest_sha256=entry.head_sha256)
        heads[as_branch(head.spec).name] = head.with_spec(as_branch(head.spec))
    model = MergedModel(cfg, embeddings, layers, heads).eval().requires_grad_(False)
    return manifest, model


def overhead_table(manifest: Manifest) -> str:
    """The task table and the overhead against serving each task as its own model."""
    rows = [("task", "kind", "input", "max_len", "labels", "attach", "layers", "trained")]
    for t in manifest.tasks:
        rows.append((t.name, t.kind, t.input, str(t.max_length), str(len(t.labels)), str(t.attach_layer),
                     str(t.task_layers), "yes" if t.trained else "NO (untrained)"))
    lines = [table(rows)]
    merged, single = manifest.overhead_layers, manifest.single_task_layers
    passes = manifest.trunk_passes
    trunk = sum(p.depth for p in passes)
    shape = " + ".join(f"{p.depth} [{p.input}, max_length {p.max_length}]" for p in passes)
    lines.append(f"overhead: {merged} layers per request (trunk passes: {shape}; task layers: {merged - trunk}) "
                 f"vs {single} as {len(manifest.tasks)} separate {manifest.backbone.num_layers}-layer "
                 f"models: {100.0 * merged / single:.0f}%")
    for c in manifest.candidates:
        active = manifest.task(c.name)
        lines.append(f"candidate head for {c.name!r}: attach {c.attach_layer}, {c.task_layers} layers (active: attach "
                     f"{active.attach_layer}, {active.task_layers} layers); a row asking for {c.name!r} runs "
                     f"+{extra_layers(active, c)} layers for it, other rows nothing")
    return "\n".join(lines)
