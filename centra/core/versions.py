"""The versions store of merged models, written and read in one place.

OUT/versions/vNNNNNN/ holds one self-contained version (its manifest.json hashes every other file of it)
and the OUT/current symlink points at the version served. `publish_version` adds a version with the
publishing steps of `centra.publish` (stage, hash, load the staged version, then rename it in and replace
the pointer by rename) and prunes the oldest; `model_folder` reads the pointer once, `read_version`
checks what a version holds before anything is loaded from it. Building a version's content is
`centra.core.merge`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from centra.core.backbone import EncoderConfig
from centra.core.manifest import Manifest
from centra.core.shadow import VERSION_DIR as CANDIDATES_DIR
from centra.core.shadow import as_branch, check_same_task
from centra.core.task import TASK_FILE, TaskSpec, read_task_json
from centra.errors import CentraError
from centra.io import check_tree, fault_point, read_json
from centra.publish import (
    artifact_kind,
    check_replaceable,
    clean_stale,
    finalize_tree,
    fsync_dir,
    locked,
    remove_tree,
    temp_name,
    write_marker,
)

MANIFEST = "manifest.json"
CURRENT = "current"
VERSIONS = "versions"
VERSION_RE = re.compile(r"^v(\d{6,})$")
DEFAULT_KEEP_VERSIONS = 3


def versions_of(dest: Path) -> list[str]:
    """Version folder names under dest/versions, oldest first."""
    folder = Path(dest) / VERSIONS
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if VERSION_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=_number)


def current_version(dest: Path) -> tuple[str, Path] | None:
    """(version name, its folder) that dest/current points to now, or None when nothing is published.
    The pointer is read once, so a publish that swaps it meanwhile cannot mix two versions."""
    link = Path(dest) / CURRENT
    try:
        target = os.readlink(link)
    except (FileNotFoundError, OSError):
        return None
    name = Path(target).name
    if not VERSION_RE.match(name):
        raise CentraError(f"{link}: points to {target!r}, not to a version folder")
    root = Path(dest) / VERSIONS
    folder = root / name
    try:
        inside = not folder.is_symlink() and folder.resolve().parent == root.resolve()
    except OSError:
        inside = False
    if not inside:  # a version is what centra published here, not a link to a folder elsewhere
        raise CentraError(f"{folder}: not a version folder inside {root} (a link to another place is refused)")
    return name, folder


def _number(version: str) -> int:
    return int(VERSION_RE.match(version).group(1))


def version_number(name: str) -> int | None:
    """The number of a version's name (v000003 -> 3); None for a name that is not a version's."""
    found = VERSION_RE.match(name)
    return int(found.group(1)) if found else None


def names_version(given: str, name: str) -> bool:
    """Whether a caller's version string names version `name`: the name itself, or its number in decimal
    digits ("3" or "03" for v000003), as Triton numbers a model's versions (the number of the version
    folder `centra export-triton` writes)."""
    if given == name:
        return True
    number, digits = version_number(name), given.lstrip("0")
    # a number's digits only (no sign, space or underscore, which int() would take), at most 18 of them
    return (number is not None and given.isascii() and given.isdecimal() and len(digits) <= 18
            and int(digits or "0") == number)


def _clean_versions(dest: Path, kind: str) -> None:
    """Inside a versioned artifact of this kind, what a killed publish left (we hold its lock, so none is
    live): staging and trash folders, and versions newer than `current` (renamed in by a publish killed
    before it moved the pointer: never served, so they must not outlive the served one)."""
    if dest.is_symlink() or artifact_kind(dest) != kind:  # never inside a folder that is not this kind's
        return
    for pattern in (f"{VERSIONS}/.tmp-*", f"{VERSIONS}/.trash-*", f".{CURRENT}.tmp-*"):
        for path in dest.glob(pattern):
            remove_tree(path)
    current = current_version(dest) if (dest / CURRENT).is_symlink() else None
    if current is not None:
        served = _number(current[0])
        for name in versions_of(dest):
            if _number(name) > served:
                remove_tree(dest / VERSIONS / name)


def publish_version(dest: Path, kind: str, build: Callable[[Path, str], None], check: Callable[[Path], None],
                    keep_versions: int = DEFAULT_KEEP_VERSIONS) -> str:
    """Publish a new version of a versioned artifact: dest/versions/vNNNNNN behind dest/current.

    build(staging, version) writes the version, check(staging) loads it; then the version folder is
    renamed into versions/ and the `current` symlink replaced by rename, so a reader of current sees
    the old version or the new one, whole. Versions beyond the newest `keep_versions` are pruned.
    Returns the new version's name.
    """
    if keep_versions < 1:
        raise CentraError("keep at least 1 version")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest):
        clean_stale(dest)
        _clean_versions(dest, kind)
        check_replaceable(dest, kind)
        if artifact_kind(dest) == kind:
            (dest / VERSIONS).mkdir(exist_ok=True)
            return _add_version(dest, build, check, keep_versions)
        # Nothing there, or an empty folder: build the whole artifact beside it, then one rename
        # (rename replaces an empty folder), so a failed first publish leaves nothing behind.
        root = temp_name(dest)
        try:
            (root / VERSIONS).mkdir(parents=True)
            write_marker(root, kind)
            version = _add_version(root, build, check, keep_versions)
            finalize_tree(root)
            os.rename(root, dest)
            fsync_dir(dest.parent)
        finally:
            remove_tree(root)
        return version


def _add_version(root: Path, build: Callable[[Path, str], None], check: Callable[[Path], None],
                 keep_versions: int) -> str:
    existing = versions_of(root)
    number = _number(existing[-1]) + 1 if existing else 1
    version = f"v{number:06d}"
    stage = root / VERSIONS / f".tmp-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        fault_point("stage")
        build(stage, version)
        finalize_tree(stage)
        check(stage)
        fault_point("staged")
        os.rename(stage, root / VERSIONS / version)
        fsync_dir(root / VERSIONS)
    finally:
        remove_tree(stage)
    fault_point("swap")
    link = root / f".{CURRENT}.tmp-{secrets.token_hex(4)}"
    os.symlink(f"{VERSIONS}/{version}", link)
    os.replace(link, root / CURRENT)
    fsync_dir(root)
    fault_point("pointer")
    _prune(root, keep_versions, version)
    return version


def _prune(root: Path, keep_versions: int, current: str) -> None:
    """Drop versions beyond the newest `keep_versions` (never the current one); each is renamed away
    first, so no version is ever half-deleted under its own name."""
    old = [v for v in versions_of(root) if v != current]
    for name in old[: max(0, len(old) - (keep_versions - 1))]:
        trash = root / VERSIONS / f".trash-{secrets.token_hex(4)}"
        os.rename(root / VERSIONS / name, trash)
        fsync_dir(root / VERSIONS)
        fault_point("prune")
        remove_tree(trash)


def model_folder(out: Path) -> Path:
    """The version folder to load: OUT/current's target, or OUT itself when it is a version folder."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        return out
    if not out.is_dir():
        raise CentraError(f"{out}: no such merged model folder (build one with `centra merge`)")
    current = current_version(out)
    if current is None:
        raise CentraError(f"{out}: no merged model published here (build one with `centra merge --out {out}`)")
    return current[1]


def read_manifest(folder: Path) -> Manifest:
    """The manifest of one version folder, every field checked by `Manifest.from_dict` (one line naming
    the file). Reads this one file only."""
    path = Path(folder) / MANIFEST
    if path.is_symlink():
        raise CentraError(f"{path}: a symbolic link; a version holds only plain files")
    return Manifest.from_dict(read_json(path), str(path))


@dataclass(frozen=True)
class Version:
    """A version folder checked without building any module: every file's sha256 against its manifest,
    the encoder config, and each branch's spec (its task.json, validated against the manifest): the
    tasks', and their candidate heads' under their keys (centra.core.shadow.as_branch)."""

    folder: Path
    manifest: Manifest
    cfg: EncoderConfig
    specs: dict[str, TaskSpec]


def read_version(out: Path) -> Version:
    """OUT's current version (or a version folder), every file's sha256 checked and every task's spec
    read: what an engine needs before it opens its graphs. No weight is loaded."""
    folder = model_folder(out)
    manifest = read_manifest(folder)
    check_tree(folder, manifest.files, skip=(MANIFEST,), listed_in=str(folder / MANIFEST))
    try:
        cfg = EncoderConfig(**manifest.encoder)
    except TypeError as exc:
        raise CentraError(f"{folder / MANIFEST}: malformed manifest (encoder: {exc})") from None
    specs = {}
    for root, entry in [*(("tasks", e) for e in manifest.tasks), *((CANDIDATES_DIR, e) for e in manifest.candidates)]:
        task_json = folder / root / entry.name / TASK_FILE
        spec, _ = read_task_json(task_json.parent, entry.name)
        spec.validate(str(task_json), cfg)
        if spec.head_sha256 != entry.head_sha256:
            raise CentraError(f"{task_json}: head_sha256 differs from the manifest's")
        if spec.backbone["fingerprint"] != manifest.backbone.fingerprint:
            raise CentraError(f"{task_json}: trained on another backbone than the manifest's")
        if spec.attach_layer > manifest.trunk_depth:
            raise CentraError(f"{task_json}: attaches at layer {spec.attach_layer} but the trunk has "
                              f"{manifest.trunk_depth} layers")
        if root == CANDIDATES_DIR:
            check_same_task(specs[entry.name], spec, str(task_json))
            spec = as_branch(spec)
        specs[spec.name] = spec
    return Version(folder, manifest, cfg, specs)


def earlier_heads(out: Path) -> set[str]:
    """The sha256 of every task head OUT's published versions hold (each validated when it was merged)."""
    found: set[str] = set()
    for name in versions_of(out):
        try:
            manifest = read_manifest(Path(out) / VERSIONS / name)
            found.update(task.head_sha256 for task in (*manifest.tasks, *manifest.candidates))
        except CentraError:
            continue
    return found


def earlier_files(out: Path) -> dict[str, Path]:
    """sha256 -> a file of OUT's published versions holding those bytes (newest version first), from
    their manifests: what a new version can link to instead of copying. Unreadable manifests are skipped
    (a link is hashed again before it is kept)."""
    found: dict[str, Path] = {}
    for name in reversed(versions_of(out)):
        folder = Path(out) / VERSIONS / name
        try:
            files = read_manifest(folder).files
        except CentraError:
            continue
        for rel, digest in files.items():
            found.setdefault(digest, folder / rel)
    return found
