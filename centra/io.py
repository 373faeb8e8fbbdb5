"""Files: JSON, hashing, verified copies, and the one publishing step every artifact goes through.

Publishing (see `publish_folder` and `publish_version`) stages the artifact in a temp folder beside its
destination, re-hashes what it copied, loads the staged result, and only then makes it visible in one
atomic step: a folder exchanged with the old one (`renameat2(RENAME_EXCHANGE)`), or, for merged models,
a new version folder behind a `current` symlink replaced by rename. It refuses to replace anything that
is not an artifact of the same kind, writes files 0644 and folders 0755 (less the umask), fsyncs files
and folders, and removes the temp folders that a killed run left behind.

This module imports nothing else of centra's but its error type.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from centra.errors import CentraError

ARTIFACT_FILE = "centra-artifact.json"
CURRENT = "current"
VERSIONS = "versions"
VERSION_RE = re.compile(r"^v(\d{6,})$")
DEFAULT_KEEP_VERSIONS = 3
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


def process_memory(pid: int | str = "self") -> tuple[float, float] | None:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in MB, from Linux's /proc; None
    where there is no /proc or the process is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return (found["VmRSS"], found.get("VmHWM", found["VmRSS"])) if "VmRSS" in found else None


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


def _write_marker(folder: Path, kind: str) -> None:
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
def _locked(dest: Path) -> Iterator[None]:
    """One publisher at a time in dest's folder: an flock on the folder itself (no lock file left)."""
    import fcntl

    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _temp_name(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"


def _clean_stale(dest: Path, kind: str) -> None:
    """Temp folders a killed publisher left beside dest (we hold its lock, so none is live); a
    destination left aside by the two-rename fallback is put back first. Inside a versioned artifact of
    this kind: staging and trash folders, and versions newer than `current` (renamed in by a publish
    killed before it moved the pointer: never served, so they must not outlive the served one)."""
    parent = dest.parent
    olds = sorted(parent.glob(f".{glob_escape(dest.name)}.old-*"))
    if olds and not dest.exists():
        os.replace(olds[-1], dest)
        olds = olds[:-1]
    for path in [*parent.glob(f".{glob_escape(dest.name)}.tmp-*"), *olds]:
        _remove_tree(path)
    if dest.is_symlink() or artifact_kind(dest) != kind:  # never inside a folder that is not this kind's
        return
    for pattern in (f"{VERSIONS}/.tmp-*", f"{VERSIONS}/.trash-*", f".{CURRENT}.tmp-*"):
        for path in dest.glob(pattern):
            _remove_tree(path)
    current = current_version(dest) if (dest / CURRENT).is_symlink() else None
    if current is not None:
        served = _number(current[0])
        for name in versions_of(dest):
            if _number(name) > served:
                _remove_tree(dest / VERSIONS / name)


def _number(version: str) -> int:
    return int(VERSION_RE.match(version).group(1))


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove_tree(path: Path) -> None:
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
    with _locked(dest):
        _clean_stale(dest, kind)
        check_replaceable(dest, kind, keep, legacy)
        tmp = _temp_name(dest)
        tmp.mkdir()
        try:
            fault_point("stage")
            build(tmp)
            for name in keep:
                if (dest / name).is_file() and not (tmp / name).exists():
                    copy_verified(dest / name, tmp / name)
            _write_marker(tmp, kind)
            finalize_tree(tmp)
            check(tmp)
            fault_point("staged")
            _swap_in(tmp, dest)
        finally:
            _remove_tree(tmp)  # the staging folder, or after an exchange the old version


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
    with _locked(dest):
        check_replaceable(dest, kind, keep, legacy, verb="remove")
        aside = _temp_name(dest)
        os.rename(dest, aside)
        fsync_dir(dest.parent)
        _remove_tree(aside)


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
    return name, Path(dest) / VERSIONS / name


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
    with _locked(dest):
        _clean_stale(dest, kind)
        check_replaceable(dest, kind)
        if artifact_kind(dest) == kind:
            (dest / VERSIONS).mkdir(exist_ok=True)
            return _add_version(dest, build, check, keep_versions)
        # Nothing there, or an empty folder: build the whole artifact beside it, then one rename
        # (rename replaces an empty folder), so a failed first publish leaves nothing behind.
        root = _temp_name(dest)
        try:
            (root / VERSIONS).mkdir(parents=True)
            _write_marker(root, kind)
            version = _add_version(root, build, check, keep_versions)
            finalize_tree(root)
            os.rename(root, dest)
            fsync_dir(dest.parent)
        finally:
            _remove_tree(root)
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
        _remove_tree(stage)
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
        _remove_tree(trash)
