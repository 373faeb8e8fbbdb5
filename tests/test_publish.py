"""Publishing (centra/publish.py, core/versions.py): a CLI killed at every step, refusals, versions, modes,
fsync, integrity."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot
from helpers import STANDARD_TASKS, make_task, make_tasks

from centra import io, publish
from centra.cli import main
from centra.core import versions
from centra.core.backbone import Backbone
from centra.core.merge import TRUNK_FILE, load_merged, plan_merge, write_merged
from centra.core.task import HEAD_FILE, RECIPE_FILE, TASK_FILE, init_task, load_task, remove_task, save_task
from centra.core.versions import model_folder
from centra.errors import CentraError

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from centra.cli import main; sys.exit(main(sys.argv[1:]))"
NO_EXCHANGE = "import centra.publish; centra.publish._exchange = lambda a, b: False; " + CLI  # the two-rename fallback
LEFTOVER = re.compile(r"\.(tmp|trash|old)(-|$)")
RECIPE = b'{"name":  "alpha",   "kind": "multiclass"}\n'  # odd spacing: must be carried byte for byte


@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory) -> Path:
    """tasks/{alpha (with a recipe), beta} and out/ holding v000001 of them: built once, copied per test."""
    root = tmp_path_factory.mktemp("publish-base")
    make_tasks(Backbone.load(tiny_models["bert"]), root / "tasks", STANDARD_TASKS[:2])
    (root / "tasks" / "alpha" / RECIPE_FILE).write_bytes(RECIPE)
    write_merged(plan_merge([root / "tasks"]), root / "out")
    return root


@pytest.fixture
def world(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "w", symlinks=True))


def tree(root: Path) -> list[str]:
    """Every entry under root (files, folders, links, dot-names), to assert nothing was added or moved."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if LEFTOVER.search(p.name)]


def cli(code: str, args: list[str], step: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", io.FAULT_ENV: step}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def add_task_args(tasks: Path, name: str, backbone: Path, *extra: str) -> list[str]:
    return ["add-task", "--tasks-dir", str(tasks), "--name", name, "--kind", "multiclass", "--labels", "a,b,c",
            "--init-only", "--attach-layer", "1", "--task-layers", "1", "--backbone", str(backbone), *extra]


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("centra: error: "), lines
    return lines[0]


# --------------------------------------------------------------------------- killed at every step


OLD_VISIBLE = {"stage", "copy", "staged", "swap"}  # killed before `current` moved: still v000001
TEMP_LEFT = {"stage", "copy", "staged", "prune"}  # a staging or trash folder for the next publish to clean


@pytest.mark.parametrize("step", io.FAULT_STEPS)
def test_merge_killed_at_each_step(world, tmp_path, bert_path, step):
    out = world / "out"
    old = snapshot(out / "versions" / "v000001")
    make_task(Backbone.load(bert_path), world / "tasks", STANDARD_TASKS[2], seed=7)  # the new version: 3 tasks
    done = cli(CLI, ["merge", "--tasks-dir", str(world / "tasks"), "--out", str(out), "--keep-versions", "1"], step)
    assert done.returncode == -signal.SIGKILL, done.stderr  # over a published version every step is reached
    name, folder = versions.current_version(out)
    manifest, _ = load_merged(out)
    if step in OLD_VISIBLE:
        assert name == manifest.version == "v000001" and snapshot(folder) == old
    else:
        assert name == manifest.version == "v000002" and len(manifest.tasks) == 3
    assert bool(leftovers(out)) == (step in TEMP_LEFT)

    manifest = write_merged(plan_merge([world / "tasks"]), out, keep_versions=1)
    assert versions.versions_of(out) == [manifest.version] == [load_merged(out)[0].version]
    assert len(manifest.tasks) == 3 and leftovers(tmp_path) == []


@pytest.mark.parametrize("step", ["copy", "pointer"])
def test_first_merge_killed_leaves_nothing(world, tmp_path, step):
    out = world / "new-out"
    done = cli(CLI, ["merge", "--tasks-dir", str(world / "tasks"), "--out", str(out)], step)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists() and leftovers(world), "the whole OUT is staged beside it, then renamed in"
    assert write_merged(plan_merge([world / "tasks"]), out).version == "v000001"
    assert load_merged(out)[0].version == "v000001" and leftovers(tmp_path) == []


TASK_REACHED = {"stage", "copy", "staged", "swap"}  # "copy": carrying recipe.json over; no pointer, no pruning


@pytest.mark.parametrize("code,step", [(CLI, s) for s in io.FAULT_STEPS] + [(NO_EXCHANGE, "swap")],
                         ids=[*io.FAULT_STEPS, "swap-no-exchange"])
def test_add_task_killed_at_each_step(world, tmp_path, bert_path, code, step):
    bb = Backbone.load(bert_path)
    folder = world / "tasks" / "alpha"
    old = snapshot(folder)
    done = cli(code, add_task_args(world / "tasks", "alpha", bert_path, "--seed", "5"), step)
    assert done.returncode == (-signal.SIGKILL if step in TASK_REACHED else 0), done.stderr
    if code == NO_EXCHANGE:  # killed between the two renames: the old folder waits aside, whole
        [aside] = (world / "tasks").glob(".alpha.old-*")
        assert not folder.exists() and snapshot(aside) == old
    elif step in ("stage", "copy", "staged"):
        assert snapshot(folder) == old
        load_task(folder, bb)
    else:
        assert load_task(folder, bb)[0].labels == ["a", "b", "c"]
        assert (folder / RECIPE_FILE).read_bytes() == RECIPE
    assert bool(leftovers(world)) == (step in TASK_REACHED)

    spec, head = init_task(bb, "alpha", "multiclass", ["x", "y"], 2, 1, seed=3)
    save_task(folder, spec, head)
    assert load_task(folder, bb)[0].labels == ["x", "y"]
    assert (folder / RECIPE_FILE).read_bytes() == RECIPE, "the recipe survives (put back from aside first)"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------- refusals


def test_merge_refuses_a_user_file_or_folder(world, capsys):
    notes = world / "notes.txt"
    notes.write_text("my notes\n")
    assert main(["merge", "--tasks-dir", str(world / "tasks"), "--out", str(notes)]) == 2
    assert "notes.txt" in error_line(capsys) and notes.read_text() == "my notes\n"

    docs = world / "mydocs"
    docs.mkdir()
    (docs / "a.txt").write_text("a")
    (docs / "versions").mkdir()
    (docs / "versions" / ".tmp-draft.txt").write_text("b")  # named like centra's staging, still the user's
    before, listing = snapshot(docs), tree(docs)
    assert main(["merge", "--tasks-dir", str(world / "tasks"), "--out", f"{docs}/"]) == 2
    assert "'a.txt'" in error_line(capsys)
    plan = plan_merge([world / "tasks"])
    with pytest.raises(CentraError, match="is not a centra merged model"):  # the publish step refuses too
        write_merged(plan, docs)
    with pytest.raises(CentraError, match="holds a centra task, not a merged model"):
        write_merged(plan, world / "tasks" / "beta")
    assert snapshot(docs) == before and tree(docs) == listing
    assert leftovers(world) == leftovers(docs), "nothing left beside it"


def test_add_task_refuses_unknown_files_and_keeps_a_recipe(tmp_path, bert_path, capsys):
    tasks = tmp_path / "tasks"
    odd = tasks / "alpha"
    odd.mkdir(parents=True)
    (odd / "notes.md").write_text("mine")
    assert main(add_task_args(tasks, "alpha", bert_path)) == 2
    assert "'notes.md'" in error_line(capsys)
    with pytest.raises(CentraError, match="not a centra task"):
        remove_task(odd)
    assert tree(odd) == ["notes.md"] and (odd / "notes.md").read_text() == "mine"

    recipe_only = tasks / "beta"
    recipe_only.mkdir()
    (recipe_only / RECIPE_FILE).write_bytes(RECIPE)
    assert main(add_task_args(tasks, "beta", bert_path)) == 0
    assert tree(recipe_only) == sorted([publish.ARTIFACT_FILE, HEAD_FILE, RECIPE_FILE, TASK_FILE])
    assert (recipe_only / RECIPE_FILE).read_bytes() == RECIPE
    assert load_task(recipe_only, Backbone.load(bert_path))[0].labels == ["a", "b", "c"]
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- versions and pruning


def test_versions_are_pruned_and_a_resolved_version_stays_whole(world):
    out, plan = world / "out2", plan_merge([world / "tasks"])
    assert [write_merged(plan, out, keep_versions=2).version for _ in range(3)] == \
        ["v000001", "v000002", "v000003"]
    assert sorted(os.listdir(out / "versions")) == versions.versions_of(out) == ["v000002", "v000003"]
    assert os.readlink(out / versions.CURRENT) == "versions/v000003"
    assert load_merged(out)[0].version == "v000003"

    resolved = model_folder(out)  # a reader resolved current once; then another publish happens
    assert write_merged(plan, out, keep_versions=3).version == "v000004"
    assert load_merged(resolved)[0].version == "v000003"
    assert load_merged(out)[0].version == "v000004"
    assert versions.versions_of(out) == ["v000002", "v000003", "v000004"] and leftovers(world) == []
    with pytest.raises(CentraError, match="keep at least 1"):
        write_merged(plan, out, keep_versions=0)


# ------------------------------------------------------------------------------ modes and fsync


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root.parent)): oct(stat.S_IMODE(p.lstat().st_mode))
            for p in [root, *root.rglob("*")] if not p.is_symlink()}


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_modes_follow_the_umask(world, bert_path, mask):
    def odd_modes(tmp: Path) -> None:  # made with other modes: normalised when published
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "f.bin", 0o640)
        os.chmod(tmp / "sub", 0o750)

    saved = os.umask(mask)
    try:
        bb = Backbone.load(bert_path)
        make_task(bb, world / "tasks", STANDARD_TASKS[2])  # a new task folder
        make_task(bb, world / "tasks", STANDARD_TASKS[0], seed=4)  # a replaced one
        write_merged(plan_merge([world / "tasks"]), world / "out")  # a new version
        write_merged(plan_merge([world / "tasks"]), world / "fresh")  # a new OUT
        publish.publish_folder(world / "thing", "thing", odd_modes, lambda tmp: None)
    finally:
        os.umask(saved)
    want = {False: oct(0o666 & ~mask), True: oct(0o777 & ~mask)}
    for root in (world / "tasks" / "gamma", world / "tasks" / "alpha", model_folder(world / "out"),
                 world / "fresh", world / "thing"):
        got = modes(root)
        assert got == {k: want[(root.parent / k).is_dir()] for k in got}, root


def test_every_published_file_and_folder_is_fsynced(world, bert_path, monkeypatch):
    synced, real = set(), os.fsync

    def spy(fd: int) -> None:
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))  # inodes: the staged names are renamed away afterwards
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    make_task(Backbone.load(bert_path), world / "tasks", STANDARD_TASKS[0], seed=4)
    write_merged(plan_merge([world / "tasks"]), world / "out")
    version = model_folder(world / "out")
    for root in (world / "tasks" / "alpha", version):
        paths = [root, root.parent, *root.rglob("*")]
        missed = [str(p) for p in paths if (p.stat().st_dev, p.stat().st_ino) not in synced]
        assert missed == []


# ------------------------------------------------------------------------------------- integrity


def retarget(path: Path) -> None:
    data = json.loads(path.read_text())
    data["attach_layer"] = 2  # still valid for its head and trunk: only the manifest's hash notices
    path.write_text(json.dumps(data, indent=2))


DAMAGE = {
    "task.json edited": (lambda v: retarget(v / "tasks" / "alpha" / TASK_FILE),
                         "tasks/alpha/task.json: sha256 differs from the manifest"),
    "tokenizer file added": (lambda v: (v / "tokenizer" / "vocab.txt").write_text("x\n"),
                             "tokenizer/vocab.txt: not listed in the manifest"),
    "trunk deleted": (lambda v: (v / TRUNK_FILE).unlink(), f"{TRUNK_FILE}: file not found"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_load_merged_names_a_damaged_file(world, capsys, case):
    damage, message = DAMAGE[case]
    damage(model_folder(world / "out"))
    with pytest.raises(CentraError, match=message) as info:
        load_merged(world / "out")
    assert "\n" not in str(info.value)
    assert main(["verify", "--model", str(world / "out")]) == 2
    assert message in error_line(capsys) and capsys.readouterr().out == ""


@pytest.mark.parametrize("name", [HEAD_FILE, TASK_FILE])
def test_a_file_changed_after_validation_is_refused(world, name):
    out = world / "out"
    before, listing = snapshot(out), tree(out)
    plan = plan_merge([world / "tasks"])
    path = world / "tasks" / "beta" / name
    data = path.read_bytes()
    changed = data[::-1] if name == HEAD_FILE else data.replace(b'"max_length": 48', b'"max_length": 40')
    assert changed != data
    path.write_bytes(changed)
    with pytest.raises(CentraError, match=f"beta/{name}: changed while it was being published"):
        write_merged(plan, world / "fresh")  # nothing earlier holds the validated bytes: the source is read
    assert not (world / "fresh").exists() and leftovers(world) == []
    # OUT's v000001 holds the bytes validated: the new version links to them, never to the changed file
    manifest = write_merged(plan, out)
    published = out / "versions" / manifest.version / "tasks" / "beta" / name
    assert published.read_bytes() == data and published.stat().st_ino == (
        out / "versions" / "v000001" / "tasks" / "beta" / name).stat().st_ino
    assert snapshot(out / "versions" / "v000001") == before_version(before, "v000001")  # untouched
    assert [e for e in tree(out) if e.startswith("versions/v000001")] == \
        [e for e in listing if e.startswith("versions/v000001")]


def before_version(snap: dict, version: str) -> dict:
    prefix = f"versions/{version}/"
    return {k[len(prefix):]: v for k, v in snap.items() if k.startswith(prefix)}


def test_a_version_never_served_does_not_outlive_the_served_one(world):
    """Killed after renaming v000002 in but before moving `current`: the next publish drops the orphan,
    so pruning keeps the version that was served, not one that never was."""
    args = ["merge", "--tasks-dir", str(world / "tasks"), "--out", str(world / "out"), "--keep-versions", "2"]
    assert cli(CLI, args, "swap").returncode == -signal.SIGKILL
    assert versions.versions_of(world / "out") == ["v000001", "v000002"]
    assert versions.current_version(world / "out")[0] == "v000001"
    served = snapshot(world / "out" / "versions" / "v000001")
    write_merged(plan_merge([world / "tasks"]), world / "out", keep_versions=2)
    assert versions.versions_of(world / "out") == ["v000001", "v000002"]
    assert versions.current_version(world / "out")[0] == "v000002"
    assert snapshot(world / "out" / "versions" / "v000001") == served, "the served fallback is kept"


def test_a_failed_first_publish_into_an_empty_folder_leaves_it_empty(world):
    plan = plan_merge([world / "tasks"])
    head = world / "tasks" / "beta" / HEAD_FILE
    head.write_bytes(head.read_bytes()[::-1])  # changed after validation: the copy is refused
    (world / "empty").mkdir()
    with pytest.raises(CentraError, match="changed while it was being published"):
        write_merged(plan, world / "empty")
    assert list((world / "empty").iterdir()) == [] and leftovers(world) == []


def test_remove_stays_inside_the_tasks_folder(world, capsys):
    assert main(["add-task", "--tasks-dir", str(world / "tasks"), "--remove", "../out"]) == 2
    assert "a task name is" in error_line(capsys)
    assert (world / "out").is_dir()
    (world / "recipe-only").mkdir()
    (world / "recipe-only" / RECIPE_FILE).write_bytes(RECIPE)
    remove_task(world / "recipe-only")  # a recipe not trained yet is still a task to remove
    assert not (world / "recipe-only").exists()


def test_file_hashes_are_remembered_by_identity_and_a_write_is_hashed_again(tmp_path, monkeypatch):
    """sha256_file reads a settled file once per process until anything touches it (a write, a link, a
    write that sets mtime back: each moves ctime); a fresh file is never remembered."""
    reads = []
    real = io.sha256_files
    monkeypatch.setattr(io, "sha256_files", lambda paths: reads.append(list(paths)) or real(paths))
    monkeypatch.setattr(io, "_memo", {})
    old = tmp_path / "weights.bin"
    old.write_bytes(b"a" * 4096)
    settled = os.stat(old).st_mtime_ns - 60 * 10**9
    os.utime(old, ns=(settled, settled))  # written a minute ago
    first = io.sha256_file(old)
    assert io.sha256_file(old) == first and len(reads) == 1
    os.link(old, tmp_path / "linked.bin")  # a link moves ctime: read once more, then remembered
    assert io.sha256_file(tmp_path / "linked.bin") == first and io.sha256_file(old) == first and len(reads) == 2
    with open(old, "r+b") as fh:  # same size, new content, mtime set back as it was
        fh.write(b"b" * 4096)
    os.utime(old, ns=(settled, settled))
    second = io.sha256_file(old)
    assert second == io.sha256_bytes(b"b" * 4096) and len(reads) == 3
    old.write_bytes(b"c" * 4096)  # a plain write: new mtime, so not remembered
    assert io.sha256_file(old) == io.sha256_file(old) == io.sha256_bytes(b"c" * 4096) and len(reads) == 5
