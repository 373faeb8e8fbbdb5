"""Versions known by content, and a version's manifest confined to the version.

A model rebuilt under the same version name (`rm -rf out && centra merge --out out` publishes `v000001`
again) has another content id: a running server's watcher loads it (and SIGHUP does), and a long-lived
Client never reads its answers with the old model's labels. A manifest's task names and files entries
cannot reach outside the version, and a version holding a symbolic link is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import grpc
import pytest
from conftest import TEXTS
from helpers import STANDARD_TASKS, make_tasks

from centra.client import Client, RemoteError
from centra.core.backbone import Backbone
from centra.core.manifest import Manifest, content_id
from centra.core.merge import load_merged, plan_merge, write_merged
from centra.core.versions import CURRENT, MANIFEST, VERSIONS, model_folder, read_manifest
from centra.errors import CentraError
from centra.io import sha256_file
from centra.runtime.engine import Engine
from centra.serve.app import AppOptions, build
from centra.serve.server import ServeOptions
from centra.serve.v1 import centra_pb2 as pb
from centra.serve.v1 import centra_pb2_grpc

OLD_LABELS = ["neg", "neu", "pos"]  # alpha in STANDARD_TASKS
NEW_LABELS = ["x", "y", "z"]  # as many labels: read with the old ones, scores would be silently mislabelled
REBUILT = [("alpha", "multiclass", NEW_LABELS, "single", 1, 1, "mean")]


@pytest.fixture
def published(tiny_models, tmp_path) -> Path:
    make_tasks(Backbone.load(tiny_models["bert"]), tmp_path / "tasks", STANDARD_TASKS[:2])
    write_merged(plan_merge([tmp_path / "tasks"]), tmp_path / "out")
    return tmp_path


def rebuild(root: Path, tiny_models, rows=REBUILT, tasks: str = "tasks-rebuilt", out: str = "out") -> Manifest:
    """`rm -rf out && centra merge --tasks-dir OTHER --out out`: v000001 again, with other tasks or labels."""
    if not (root / tasks).exists():
        make_tasks(Backbone.load(tiny_models["bert"]), root / tasks, rows)
    shutil.rmtree(root / out, ignore_errors=True)
    manifest = write_merged(plan_merge([root / tasks]), root / out)
    assert manifest.version == "v000001"
    return manifest


def retamper(folder: Path, edit) -> None:
    """Edit a version's manifest and give it the matching content_id, so the checks behind it are reached."""
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    manifest["content_id"] = content_id(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


class Served:
    """build()'s server and watcher in their own event loop thread (tests/test_serve_ops.py's App, on a
    chosen port, metrics read from the registry)."""

    def __init__(self, model: Path, port: int = 0, **app):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        options = ServeOptions(port=port, max_wait_ms=1, drain_s=0)
        self.server, self.metrics, self.watcher = build(model, options, AppOptions(metrics_port=None, **app))
        self.port = self.do(self.server.start())
        if self.watcher is not None:
            self.loop.call_soon_threadsafe(self.watcher.start)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = centra_pb2_grpc.ClassifierStub(self.channel)

    def do(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def scrape(self) -> str:
        return self.metrics.render().decode()

    def labels(self) -> list[str]:
        reply = self.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
        return next(list(t.labels) for t in reply.tasks if t.name == "alpha")

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.channel.close()
        if self.watcher is not None:
            self.do(self.watcher.stop())
        self.do(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serve():
    started: list[Served] = []
    yield lambda *args, **kwargs: started.append(Served(*args, **kwargs)) or started[-1]
    for app in started:
        app.close()


def wait_for(condition, seconds: float = 20.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        threading.Event().wait(0.05)
    return condition()


# ------------------------------------------------------------------------------------------ content id


def test_content_id_is_stable_and_names_the_content(published, tiny_models):
    manifest = read_manifest(model_folder(published / "out"))
    cid = manifest.content_id
    assert cid.startswith("sha256:") and len(cid) == len("sha256:") + 64
    data = manifest.to_dict()
    assert content_id(data) == cid == content_id(dict(reversed(data.items()))), "key order is not content"
    assert content_id({k: v for k, v in data.items() if k != "content_id"}) == cid, "the id is not hashed"
    assert Engine.load(published / "out").content_id == cid
    # the same tasks merged again (same version name): the same id
    write_merged(plan_merge([published / "tasks"]), published / "again")
    assert read_manifest(model_folder(published / "again")).content_id == cid
    # another task set under the same name: another id
    other = rebuild(published, tiny_models, out="other")
    assert other.version == manifest.version and other.content_id != cid
    # a version written by an earlier centra (no content_id) still loads; its id is computed
    folder = model_folder(published / "again")
    stored = json.loads((folder / MANIFEST).read_text())
    del stored["content_id"]
    (folder / MANIFEST).write_text(json.dumps(stored))
    assert load_merged(folder)[0].content_id == cid


@pytest.mark.parametrize("edit", ["content_id", "labels"])
def test_a_tampered_manifest_is_refused_at_load(published, edit):
    folder = model_folder(published / "out")
    manifest = json.loads((folder / MANIFEST).read_text())
    if edit == "content_id":
        manifest["content_id"] = "sha256:" + "0" * 64
    else:  # relabelled by hand, content_id left as published
        manifest["tasks"][0]["labels"] = NEW_LABELS
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CentraError) as err:
        load_merged(published / "out")
    message = str(err.value)
    assert message.startswith(f"{folder / MANIFEST}: content_id differs") and "\n" not in message


# ----------------------------------------------------------------------------------- same-name rebuilds


def test_a_same_name_rebuild_is_served_by_a_running_watcher(published, tiny_models, serve):
    app = serve(published / "out", watch_interval=0.05)
    old_id = content_id(read_manifest(model_folder(published / "out")).to_dict())
    before = app.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
    assert app.labels() == OLD_LABELS
    rebuilt = rebuild(published, tiny_models)
    assert wait_for(lambda: app.labels() == NEW_LABELS), "the rebuilt v000001 is never served"
    assert before.model_id == old_id
    after = app.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
    assert (after.model_version, after.model_id) == ("v000001", rebuilt.content_id) != (before.model_version,
                                                                                         before.model_id)
    reply = app.stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text=TEXTS[0])], tasks=["alpha"]), timeout=10)
    assert reply.model_id == rebuilt.content_id and reply.results[0].tasks[0].label in NEW_LABELS
    text = app.scrape()
    assert f'centra_model_version{{id="{rebuilt.content_id}",version="v000001"}} 1.0' in text
    assert 'centra_reloads_total{result="ok"} 1.0' in text


def test_the_watcher_parses_a_manifest_once_not_every_tick(published, tiny_models, serve, monkeypatch):
    from centra.serve import reload

    parsed: list[str] = []
    real = reload.published_id
    monkeypatch.setattr(reload, "published_id", lambda folder: parsed.append(str(folder)) or real(folder))
    app = serve(published / "out", watch_interval=0.02)
    threading.Event().wait(0.5)  # about 25 ticks
    assert len(parsed) == 1, "an unchanged manifest was parsed again"
    rebuild(published, tiny_models)  # the same name, another manifest file
    assert wait_for(lambda: app.labels() == NEW_LABELS)
    assert len(parsed) == 2


def test_sighup_loads_a_same_name_rebuild_and_retries_a_failed_one(published, tiny_models, serve, caplog):
    caplog.set_level(logging.INFO, logger="centra.serve")
    app = serve(published / "out", watch_interval=3600)  # only SIGHUP (poke) checks
    # a rebuild under the same name whose trunk is corrupt: built aside, then moved in whole
    bad = rebuild(published, tiny_models, out="aside")
    (published / "aside" / VERSIONS / "v000001" / "trunk.safetensors").write_bytes(b"not weights")
    shutil.rmtree(published / "out")
    (published / "aside").rename(published / "out")
    app.loop.call_soon_threadsafe(app.watcher.poke)
    assert wait_for(lambda: 'centra_reloads_total{result="failed"} 1.0' in app.scrape())
    assert app.labels() == OLD_LABELS, "the old model keeps serving"
    short = bad.content_id.removeprefix("sha256:")[:12]
    assert any(f"reload of v000001 ({short}) failed, still serving v000001 (" in r.getMessage()
               for r in caplog.records), "the log names the version and its short id"
    app.loop.call_soon_threadsafe(app.watcher.poke)  # SIGHUP retries a failed one
    assert wait_for(lambda: 'centra_reloads_total{result="failed"} 2.0' in app.scrape())
    # a good rebuild under the same name, on SIGHUP
    rebuild(published, tiny_models)
    app.loop.call_soon_threadsafe(app.watcher.poke)
    assert wait_for(lambda: app.labels() == NEW_LABELS), "SIGHUP never loads the rebuilt v000001"
    assert 'centra_reloads_total{result="ok"} 1.0' in app.scrape()
    assert any("reloaded v000001 (" in r.getMessage() for r in caplog.records)


def test_a_failed_rebuild_is_not_retried_until_its_content_changes(published, tiny_models, serve):
    app = serve(published / "out", watch_interval=0.05)
    rebuild(published, tiny_models, out="aside")
    (published / "aside" / VERSIONS / "v000001" / "trunk.safetensors").write_bytes(b"not weights")
    shutil.rmtree(published / "out")
    (published / "aside").rename(published / "out")
    assert wait_for(lambda: 'centra_reloads_total{result="failed"} 1.0' in app.scrape())
    threading.Event().wait(0.3)
    assert 'centra_reloads_total{result="failed"} 1.0' in app.scrape(), "a failed content id is not retried"
    rebuild(published, tiny_models, tasks="tasks-fixed",
            rows=[("alpha", "multiclass", ["p", "q", "r"], "single", 1, 1, "mean")])
    assert wait_for(lambda: app.labels() == ["p", "q", "r"]), "a fixed rebuild of the same name is never served"


def test_a_long_lived_client_reads_a_restarted_server_with_the_new_labels(published, tiny_models, serve):
    first = serve(published / "out", watch=False)
    client = Client(first.target, timeout=10)
    try:
        answer = client.classify([TEXTS[0]], tasks=["alpha"])[0]
        assert list(answer["scores"]) == OLD_LABELS
        port = first.port
        first.close()  # the server stops; the client stays
        rebuilt = rebuild(published, tiny_models)
        second = serve(published / "out", port=port, watch=False)
        assert second.target == client.target

        def ask():
            try:
                return client.classify([TEXTS[0]], tasks=["alpha"])[0]
            except RemoteError as exc:  # the channel may still be backing off from the first server
                if exc.code != "UNAVAILABLE":
                    raise
                return None

        assert wait_for(lambda: ask() is not None)
        answer = ask()
        expected = Engine.load(published / "out").predict([TEXTS[0]], tasks=["alpha"])[0]
        assert list(answer["scores"]) == NEW_LABELS, "scores named by the old model's labels"
        assert answer["label"] == expected["label"] and answer["scores"] == pytest.approx(expected["scores"], abs=1e-5)
        listed = client.list_tasks()
        assert (listed["model_version"], listed["model_id"]) == ("v000001", rebuilt.content_id)
    finally:
        client.close()


# ------------------------------------------------------------------------ names and paths in the version


def outside_task(folder: Path, where: Path) -> str:
    """A copy of the version's task alpha outside the version (today's loader would read it from there)."""
    shutil.copytree(folder / "tasks" / "alpha", where)
    return str(where)


def bad_name(root: Path, folder: Path, kind: str) -> str:
    if kind == "absolute":  # "/elsewhere/alpha": folder / "tasks" / name is that absolute path
        return outside_task(folder, root / "elsewhere" / "alpha")
    if kind == "dotdot":  # folder / "tasks" / "../../alpha": a copy beside the version
        outside_task(folder, folder.parent / "alpha")
        return "../../alpha"
    if kind == "long":
        return "../" + "x" * 300
    return "alpha\n"  # the task-name rule, whole: no trailing newline


def bad_entry(root: Path, folder: Path, kind: str) -> tuple[str, str]:
    if kind == "etc":
        rel = "../../../../etc/hostname"
        return rel, sha256_file("/etc/hostname") if Path("/etc/hostname").is_file() else "sha256:" + "0" * 64
    (root / "outside.txt").write_text("not of this version\n")
    if kind == "dotdot":  # resolves to a real file outside, with its true sha256: accepted before
        return os.path.relpath(root / "outside.txt", folder), sha256_file(root / "outside.txt")
    if kind == "absolute":
        return str(root / "outside.txt"), sha256_file(root / "outside.txt")
    return "tasks\\alpha\\task.json", "sha256:" + "0" * 64


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "long", "newline"])
def test_a_task_name_outside_the_version_is_refused(published, kind):
    folder = published / "v-bad"
    shutil.copytree(model_folder(published / "out"), folder)
    name = bad_name(published, folder, kind)

    def rename(manifest: dict) -> None:
        manifest["tasks"][0]["name"] = name
    retamper(folder, rename)
    with pytest.raises(CentraError) as err:
        load_merged(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / MANIFEST}: malformed manifest (task name ") and "\n" not in message
    assert len(message) < len(str(folder / MANIFEST)) + 200, "a long name is echoed truncated"


def test_a_duplicate_task_name_is_refused(published):
    folder = published / "v-bad"
    shutil.copytree(model_folder(published / "out"), folder)
    retamper(folder, lambda m: m["tasks"].append(dict(m["tasks"][0], name=m["tasks"][0]["name"].upper())))
    with pytest.raises(CentraError, match=r"manifest.json: malformed manifest \(duplicate task name 'ALPHA'\)"):
        load_merged(folder)


@pytest.mark.parametrize("kind", ["etc", "dotdot", "absolute", "backslash"])
def test_a_files_entry_outside_the_version_is_refused(published, kind):
    folder = published / "v-bad"
    shutil.copytree(model_folder(published / "out"), folder)
    rel, digest = bad_entry(published, folder, kind)
    retamper(folder, lambda m: m["files"].update({rel: digest}))
    with pytest.raises(CentraError) as err:
        load_merged(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / MANIFEST}: malformed manifest (files entry {rel!r} ")
    assert "\n" not in message


@pytest.mark.parametrize("link", ["tasks/alpha/head.safetensors", "tokenizer"])
def test_a_symbolic_link_in_a_version_is_refused(published, link):
    """Same bytes, so the same sha256: only the link itself is wrong (its target may change at any time)."""
    folder = published / "v-bad"
    shutil.copytree(model_folder(published / "out"), folder)
    target = published / "elsewhere" / Path(link).name
    target.parent.mkdir()
    (folder / link).rename(target)
    (folder / link).symlink_to(target)
    with pytest.raises(CentraError) as err:
        load_merged(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / link}: a symbolic link") and "\n" not in message


@pytest.mark.parametrize("defect", ["task name", "files entry"])
def test_a_version_reaching_outside_fails_to_reload_and_the_old_one_keeps_serving(published, serve, caplog,
                                                                                    defect):
    app = serve(published / "out", watch_interval=0.05)
    out = published / "out"
    bad = out / VERSIONS / "v000002"
    shutil.copytree(out / VERSIONS / "v000001", bad)
    if defect == "task name":
        name = outside_task(bad, published / "elsewhere" / "alpha")  # loadable from there before

        def edit(manifest: dict) -> None:
            manifest["version"] = "v000002"
            manifest["tasks"][0]["name"] = name
    else:
        rel, digest = bad_entry(published, bad, "dotdot")

        def edit(manifest: dict) -> None:
            manifest["version"] = "v000002"
            manifest["files"][rel] = digest
    retamper(bad, edit)
    (out / "next").symlink_to(f"{VERSIONS}/v000002")
    (out / "next").replace(out / CURRENT)
    assert wait_for(lambda: 'centra_reloads_total{result="failed"} 1.0' in app.scrape())
    reply = app.stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(text=TEXTS[0])], tasks=["alpha"]), timeout=10)
    assert reply.model_version == "v000001", "the old version keeps serving"
    assert any("reload of v000002 failed, still serving v000001 (" in r.getMessage() and defect in r.getMessage()
               for r in caplog.records)
    assert 'centra_reloads_total{result="ok"}' not in app.scrape()
