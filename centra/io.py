"""Files: JSON, sha256 hashing (remembered per process), verified copies and links, tree hashes and
checks, and the fault hook each write step calls in tests.

Publishing a folder is `centra.publish`; the versions store of merged models is `centra.core.versions`.
This module imports nothing else of centra's but its error type.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import time
from pathlib import Path

from centra.errors import CentraError

FAULT_ENV = "CENTRA_FAULT_AT"  # tests: the publishing step at which the process kills itself
FAULT_STEPS = ("stage", "copy", "staged", "swap", "pointer", "prune")


def fault_point(step: str) -> None:
    """Fault injection for tests: SIGKILL this process when $CENTRA_FAULT_AT names this step."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line CentraError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CentraError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CentraError(f"{path}: is a folder, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CentraError(f"{path}: malformed JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CentraError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file in the same folder, fsync, rename), mode 0644 less the umask."""
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


HASH_MEMO_SIZE = 1 << 16  # files whose sha256 one process remembers (a merge of 300 tasks holds ~1,000)
SETTLED_S = 2.0  # a file written this recently is hashed every time (a same-size rewrite within one tick
#                  of the file system's clock would keep its mtime)
_memo: dict[tuple[int, ...], str] = {}


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def sha256_file(path: Path) -> str:
    """sha256 of one file, as 'sha256:<hex>'. Remembered for this process by the file's identity and
    stamp (device, inode, size, mtime and ctime in ns): every write, chmod, link or utime changes ctime,
    which no process can set back, so a changed or replaced file is hashed again; a file hashed once and
    not touched since (a merge's hash of its staged version, then the check of what it published) is not
    read twice. A file written within SETTLED_S of the hash is never remembered."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise CentraError(f"{path}: file not found") from None
    key = _stamp(before)
    found = _memo.get(key)
    if found is not None:
        return found
    start = time.time_ns()
    digest = sha256_files([path])
    try:
        same = _stamp(os.stat(path)) == key
    except OSError:  # gone while hashed: the digest of what was read, not remembered
        return digest
    if same and start - before.st_mtime_ns > SETTLED_S * 1e9:
        if len(_memo) >= HASH_MEMO_SIZE:
            _memo.clear()
        _memo[key] = digest
    return digest


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the files' bytes in name order, as 'sha256:<hex>'."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: Path(p).name):
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            raise CentraError(f"{path}: file not found") from None
    return "sha256:" + digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def copy_verified(src: Path, dest: Path, expected: str | None = None) -> str:
    """Copy src to dest, hashing the bytes written; refuse (naming src) when they differ from `expected`."""
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            first = True
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                fout.write(chunk)
                digest.update(chunk)
                if first:
                    fout.flush()
                    fault_point("copy")  # a kill here leaves a half-copied file in the staging folder
                    first = False
    except FileNotFoundError:
        raise CentraError(f"{src}: file not found") from None
    got = "sha256:" + digest.hexdigest()
    if expected is not None and got != expected:
        raise CentraError(f"{src}: changed while it was being published (sha256 differs from the one "
                          "validated); nothing was written")
    return got


def link_verified(src: Path, dest: Path, expected: str) -> bool:
    """Put src at dest as a hard link (no copy: a file an earlier version already holds costs no disk
    twice), then hash what dest holds; False (dest removed) when it is not `expected` or src is gone.
    Across file systems, a verified copy."""
    try:
        os.link(src, dest)
    except FileNotFoundError:
        return False
    except OSError:  # another file system, or links not allowed: copy
        try:
            copy_verified(src, dest, expected)
            return True
        except CentraError:
            dest.unlink(missing_ok=True)
            return False
    if sha256_file(dest) != expected:  # a corrupted earlier file is never reused
        dest.unlink()
        return False
    return True


def hash_tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """relative path -> sha256 of every file under root, in path order (names in `skip` left out)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


def shorten(text: str, limit: int = 80) -> str:
    """A name echoed in an error, cut to about `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def bad_relative_path(rel: str) -> str | None:
    """Why `rel` is not a plain relative POSIX path that stays inside its root (None when it is one):
    no absolute path, no backslash or NUL, no empty, "." or ".." component."""
    if not rel:
        return "is empty"
    if "\\" in rel or "\0" in rel:
        return "holds a backslash or NUL"
    if rel.startswith("/"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "is not a plain relative path (an empty, '.' or '..' component)"
    return None


def check_tree(root: Path, files: dict[str, str], skip: tuple[str, ...] = (),
               listed_in: str = "the manifest") -> None:
    """Every listed file present with its sha256 and no unlisted file: else a one-line CentraError.
    Every listed path must be relative and stay inside root through plain folders: a symbolic link
    anywhere under root (or on the way to a listed file) is refused before anything is read through it."""
    root = Path(root)
    for rel, expected in files.items():
        why = bad_relative_path(rel)
        if why is not None:
            raise CentraError(f"{listed_in}: files entry {shorten(rel)!r} {why}")
        path = root
        for part in rel.split("/"):
            path = path / part
            if path.is_symlink():
                raise CentraError(f"{path}: a symbolic link (listed in {listed_in} as {shorten(rel)!r}); a "
                                  "published folder holds only plain files inside it")
        if not path.is_file():
            raise CentraError(f"{path}: file not found (listed in the manifest)")
        if sha256_file(path) != expected:
            raise CentraError(f"{path}: sha256 differs from the manifest (corrupt or replaced file)")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise CentraError(f"{path}: a symbolic link; a published folder holds only plain files")
        if path.is_file() and rel not in files and rel not in skip:
            raise CentraError(f"{path}: not listed in the manifest (a file added after publishing)")

