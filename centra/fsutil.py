"""Atomic file and folder writes: a crash at any point leaves either the old or the new version."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; on success it replaces `final` as one step.

    A folder cannot be renamed over a non-empty one, so the old version is first moved aside
    (`.NAME.old-*`), the new one renamed in, then the old one deleted. If anything fails before
    the swap, `final` is untouched and the temp folder is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(new: Path, final: Path) -> None:
    _fsync_tree(new)
    if not final.exists():
        os.replace(new, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / "v")
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old / "v", final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(final: Path) -> None:
    """Remove a folder so that a crash never leaves it half-deleted under its own name."""
    final = Path(final)
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / "v")
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in Path(root).rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the files' bytes in name order, as 'sha256:<hex>'."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: Path(p).name):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
