"""Publishing one folder artifact: stage it beside its destination, re-hash what was copied, load the
staged result, and only then make it visible in one atomic step (a folder exchanged with the old one,
`renameat2(RENAME_EXCHANGE)`). It refuses to replace anything that is not an artifact of the same kind,
writes files 0644 and folders 0755 (less the umask), fsyncs files and folders, and removes the temp
folders that a killed run left behind. Merged models are published as versions behind a pointer
(`centra.core.versions`), with these same steps.

This module imports nothing else of centra's but its error type and `centra.io`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from centra.errors import CentraError
from centra.io import copy_verified, fault_point, write_json

ARTIFACT_FILE = "centra-artifact.json"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def finalize_tree(root: Path) -> None:
    """Folders 0755 and files 0644 (less the umask), every file and folder fsynced."""
    mask = _umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = 0o777 & ~mask if path.is_dir() else 0o666 & ~mask
        if stat.S_IMODE(path.stat().st_mode) != mode:  # (a chmod that changes nothing still moves ctime)
            os.chmod(path, mode)
        if not path.is_dir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- publishing


def artifact_kind(folder: Path) -> str | None:
    """The kind recorded in folder's marker file, or None."""
    marker = Path(folder) / ARTIFACT_FILE
    if not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def write_marker(folder: Path, kind: str) -> None:
    write_json(Path(folder) / ARTIFACT_FILE, {"kind": kind, "written_by": "centra"})


def check_replaceable(dest: Path, kind: str, keep: tuple[str, ...] = (),
                      legacy: Callable[[Path], bool] | None = None, verb: str = "replace") -> None:
    """Refuse (one line, nothing touched) a destination that is not an artifact of this kind.

    Replaceable: nothing there, an empty folder, a folder whose marker names this kind, a folder
    holding only the `keep` files (e.g. a task's recipe), or one that `legacy` recognises as written
    by an earlier centra.
    """
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise CentraError(f"{dest}: exists and is not a folder; refusing to {verb} it")
    if not dest.exists():
        return
    found = artifact_kind(dest)
    if found == kind:
        return
    if found is not None:
        raise CentraError(f"{dest}: holds a centra {found}, not a {kind}; refusing to {verb} it")
    entries = sorted(p.name for p in dest.iterdir())
    if all(name in keep for name in entries):
        return
    if legacy is not None and legacy(dest):
        return
    other = next(name for name in entries if name not in keep)
    raise CentraError(f"{dest}: exists and is not a centra {kind} (it holds {other!r}); refusing to {verb} "
                      "it" + (": choose another destination or remove it yourself" if verb == "replace" else ""))


def check_writable_parent(dest: Path) -> None:
    """Refuse, before any work, a destination whose folder cannot be created or written."""
    dest = Path(dest).absolute()
    ancestor = dest.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CentraError(f"{dest}: cannot be created ({ancestor} is a file, not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CentraError(f"{dest}: cannot be created ({ancestor} is not writable)")


@contextlib.contextmanager
def locked(dest: Path) -> Iterator[None]:
    """One publisher at a time in dest's folder: an flock on the folder itself (no lock file left)."""
    import fcntl

    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def temp_name(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"


def clean_stale(dest: Path) -> None:
    """Temp folders a killed publisher left beside dest (we hold its lock, so none is live); a
    destination left aside by the two-rename fallback is put back first. (Inside a versioned artifact,
    `centra.core.versions` cleans what a killed version publish left.)"""
    parent = dest.parent
    olds = sorted(parent.glob(f".{glob_escape(dest.name)}.old-*"))
    if olds and not dest.exists():
        os.replace(olds[-1], dest)
        olds = olds[:-1]
    for path in [*parent.glob(f".{glob_escape(dest.name)}.tmp-*"), *olds]:
        remove_tree(path)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_folder(dest: Path, kind: str, build: Callable[[Path], None], check: Callable[[Path], None],
                   keep: tuple[str, ...] = (), legacy: Callable[[Path], bool] | None = None) -> None:
    """Publish one folder artifact at dest: build(staging) writes it, check(staging) loads it (raising
    on any problem), then it replaces dest in one atomic exchange. Files named in `keep` (e.g. a
    task's recipe) are carried over from the old folder byte for byte."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest):
        clean_stale(dest)
        check_replaceable(dest, kind, keep, legacy)
        tmp = temp_name(dest)
        tmp.mkdir()
        try:
            fault_point("stage")
            build(tmp)
            for name in keep:
                if (dest / name).is_file() and not (tmp / name).exists():
                    copy_verified(dest / name, tmp / name)
            write_marker(tmp, kind)
            finalize_tree(tmp)
            check(tmp)
            fault_point("staged")
            _swap_in(tmp, dest)
        finally:
            remove_tree(tmp)  # the staging folder, or after an exchange the old version


def _swap_in(tmp: Path, dest: Path) -> None:
    """Make tmp visible as dest; afterwards tmp holds the old version (or nothing)."""
    if not dest.exists():
        os.rename(tmp, dest)
    elif not _exchange(tmp, dest):
        # No atomic exchange here: move the old one aside first. A kill between the two renames
        # leaves it as .NAME.old-*, which the next publish of dest puts back before anything else.
        aside = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
        os.rename(dest, aside)
        fault_point("swap")
        os.rename(tmp, dest)
        os.rename(aside, tmp)
    else:
        fault_point("swap")
    fsync_dir(dest.parent)


def remove_artifact(dest: Path, kind: str, keep: tuple[str, ...] = (),
                    legacy: Callable[[Path], bool] | None = None) -> None:
    """Remove a published folder in one step (never a half-deleted one under its name); refuse a
    folder that is not an artifact of this kind (one holding only `keep` files counts as one)."""
    dest = Path(dest)
    if not dest.is_dir() or dest.is_symlink():
        raise CentraError(f"{dest}: no such {kind}")
    with locked(dest):
        check_replaceable(dest, kind, keep, legacy, verb="remove")
        aside = temp_name(dest)
        os.rename(dest, aside)
        fsync_dir(dest.parent)
        remove_tree(aside)

