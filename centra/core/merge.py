"""Merge: many task folders on one backbone -> one published, versioned merged model.

OUT is a versioned artifact (`centra.core.versions`): OUT/versions/vNNNNNN/ holds one self-contained merged model
(manifest.json, trunk.safetensors, tokenizer/, a verified copy of every task folder) and OUT/current
points at the newest. The manifest hashes every other file of its version; loading refuses any
missing, changed or added file, naming it. A refused or crashed merge leaves OUT as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from centra.core.backbone import Backbone, Embeddings, EncoderLayer, check_state, load_safetensors
from centra.core.graph import MergedModel
from centra.core.manifest import BackboneInfo, EngineInfo, Manifest, ManifestTask
from centra.core.overhead import overhead_layers, trunk_passes
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


@dataclass
class MergePlan:
    backbone: Backbone
    tasks: list[PlannedTask]

    @property
    def specs(self) -> list[TaskSpec]:
        return [t.spec for t in self.tasks]

    @property
    def trunk_depth(self) -> int:
        return max(spec.attach_layer for spec in self.specs)

    @property
    def overhead_layers(self) -> int:
        return overhead_layers(self.specs)

    @property
    def single_task_layers(self) -> int:
        return self.backbone.cfg.num_layers * len(self.tasks)


def plan_merge(tasks_dirs: list[Path], backbone: str | None = None, trusted: Collection[str] = ()) -> MergePlan:
    """Find and validate every task folder; refuse (CentraError naming the file) on any problem. A head
    whose sha256 is in `trusted` (files an earlier version of the same OUT published, so validated) is
    hashed, not loaded."""
    folders = [folder for d in tasks_dirs for folder in task_dirs(Path(d))]
    if not folders:
        raise CentraError(f"{', '.join(str(d) for d in tasks_dirs)}: no task folders to merge")
    planned = [PlannedTask(folder, *read_task_json(folder)) for folder in folders]
    seen: dict[str, Path] = {}
    for task in planned:
        key = task.spec.name.lower()
        if key in seen:
            raise CentraError(f"{task.folder / TASK_FILE}: duplicate task name {task.spec.name!r} "
                              f"(also {seen[key] / TASK_FILE})")
        seen[key] = task.folder
    bb = Backbone.load(backbone if backbone is not None else backbone_hint(planned[0].spec))
    for task in planned:
        if task.spec.head_sha256 in trusted:  # the same bytes an earlier version validated: spec and hash only
            check_task(task.folder, task.spec, bb)
        else:
            load_task(task.folder, bb)  # full validation: fingerprint, sha256, keys, shapes, finite values
    return MergePlan(bb, planned)


def check_task(folder: Path, spec: TaskSpec, bb: Backbone) -> None:
    """A task folder whose head bytes were validated before (an earlier version holds them): its spec
    against the backbone, its fingerprint and its head's sha256; the weights are not loaded again."""
    spec.validate(str(folder / TASK_FILE), bb.cfg)
    if spec.backbone["fingerprint"] != bb.fingerprint:
        load_task(folder, bb)  # refuses with load_task's own message
    head = folder / HEAD_FILE
    if not head.is_file() or sha256_file(head) != spec.head_sha256:
        load_task(folder, bb)  # names the missing or replaced file


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
        for task in plan.tasks:
            dest = stage / "tasks" / task.spec.name
            dest.mkdir(parents=True)
            place(task.folder / TASK_FILE, dest / TASK_FILE, task.task_json_sha256)
            place(task.folder / HEAD_FILE, dest / HEAD_FILE, task.spec.head_sha256)
        manifest = Manifest(
            version=version,
            backbone=BackboneInfo(bb.backbone_id, bb.fingerprint, bb.cfg.num_layers, str(bb.path)),
            encoder=bb.cfg.to_dict(), trunk_depth=depth, trunk_passes=tuple(trunk_passes(plan.specs)),
            tasks=tuple(manifest_task(task) for task in plan.tasks), overhead_layers=plan.overhead_layers,
            single_task_layers=plan.single_task_layers)
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
                        spec.task_layers, spec.trained, spec.head_sha256, str(task.folder.resolve()))


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
    return "\n".join(lines)
