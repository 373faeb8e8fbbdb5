"""Students below the teacher distilled later (`centra plan --extra-attach N`): a task trained with
extra_attach 0 then widened gets exactly the candidates add-task with extra_attach N gives (ids, attach,
layers, weights and figures, fp32), its served head and every other file byte for byte; a rerun trains
nothing; a task whose data is gone or changed, or whose folder lacks what it needs, is refused with one
line before anything trains, the folder as it was; plan without the flag says when the frontier could be
wider."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import snapshot
from test_training import job_for

from centra import progress
from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.candidates import read_candidates
from centra.core.task import CANDIDATES_DIR, REPORT_FILE, TEACHER_FILE
from centra.measure.costs import cost_row
from centra.train.pipeline import train_task
from centra.train.planning import train_shallower
from centra.train.report import TrainingReport

CHANGED = ("shallower_students", "candidates", "seconds")  # what widening rewrites in report.json


@pytest.fixture(scope="module", params=[("multiclass", False), ("multilabel", False), ("regression", True)],
                ids=["multiclass", "multilabel", "regression-pair"])
def trained(request, tiny_models, tmp_path_factory):
    """One task trained twice on the same data and seed in fp32: without shallower students (lazy/) and
    with those at the attach layer below the teacher's (eager/)."""
    kind, pair = request.param
    root = tmp_path_factory.mktemp("extra-attach")
    bert = Backbone.load(tiny_models["bert"])
    lazy = job_for(root, "topic", kind, pair, layers=(1, 2), precision="fp32", epochs=2)
    assert lazy.extra_attach == 0, "the default trains no shallower students"
    train_task(lazy, bert, root / "lazy")
    train_task(replace(lazy, extra_attach=1), bert, root / "eager")
    return root, bert


def fresh(trained, tmp_path: Path) -> Path:
    """A copy of the lazy tasks folder, for one test to change."""
    root, _ = trained
    return Path(shutil.copytree(root / "lazy", tmp_path / "tasks"))


def plan(tasks: Path, *extra: str) -> int:
    return main(["plan", "--tasks-dir", str(tasks), "--budget-layers", "100", "--no-plot", "--dry-run", *extra])


def test_widening_gives_exactly_what_add_task_gives(trained, tmp_path, monkeypatch, capsys):
    root, bert = trained
    tasks = fresh(trained, tmp_path)
    folder, eager = tasks / "topic", root / "eager" / "topic"
    before = snapshot(folder)
    assert not read_candidates(folder).has_shallower and read_candidates(eager).has_shallower
    bars = []

    class Kept(progress.JobBar):  # the job bar: the work it is told of stays within its plan
        def __init__(self, total, desc, enabled=True):
            super().__init__(total, desc, enabled)
            self.planned, self.desc = total, desc
            bars.append(self)

    monkeypatch.setattr(progress, "JobBar", Kept)
    assert plan(tasks, "--extra-attach", "1") == 0
    out = capsys.readouterr().out
    new = sorted({p.name for p in (eager / CANDIDATES_DIR).iterdir()} - set(before_ids(before)))
    assert new and all(c.startswith("student-a") for c in new)
    assert f"topic: distilled {', '.join(new)} in" in out and "dry run: nothing activated" in out
    [bar] = bars
    assert bar.desc == "topic: shallower students" and 0.5 * bar.planned <= bar.done <= bar.planned
    after = snapshot(folder)
    # the served head, the teacher file, the recipe-less job's other candidates: byte for byte
    assert {k: v for k, v in after.items() if k in before and k != REPORT_FILE} == \
        {k: v for k, v in before.items() if k != REPORT_FILE}
    # the new candidates are add-task's, byte for byte (weights, task.json with its dev figures and source)
    assert sorted(after) == sorted(snapshot(eager)) == sorted([*before, *(f"{CANDIDATES_DIR}/{c}/{f}" for c in new
                                                                         for f in ("task.json", "head.safetensors"))])
    for cid in new:
        for name in ("task.json", "head.safetensors"):
            rel = f"{CANDIDATES_DIR}/{cid}/{name}"
            assert after[rel] == (eager / rel).read_bytes(), rel
    got, want, old = (json.loads(x) for x in (after[REPORT_FILE], (eager / REPORT_FILE).read_bytes(),
                                               before[REPORT_FILE]))
    assert list(got) == list(want), "report.json keeps add-task's key order"
    assert {k: v for k, v in got.items() if k not in CHANGED} == {k: v for k, v in old.items() if k not in CHANGED}
    assert got["candidates"] == want["candidates"]
    assert untimed(got["shallower_students"]) == untimed(want["shallower_students"])
    assert list(got["seconds"]) == list(want["seconds"]) and got["seconds"]["shallower_students"] > 0
    # `centra costs` sees them: its shallower column (s), "-" before
    columns = [cost_row("topic", TrainingReport.from_dict(r)).split(" | ")[6] for r in (old, got)]
    assert columns == ["-", f"{got['seconds']['shallower_students']:.0f}"]
    assert got["seconds"]["task"] == pytest.approx(old["seconds"]["task"] + got["seconds"]["shallower_students"],
                                                   abs=0.02)

    # a rerun trains nothing and writes nothing
    assert plan(tasks, "--extra-attach", "1") == 0
    assert "nothing trained" in capsys.readouterr().out and snapshot(folder) == after
    assert train_shallower(tasks, 1, progress=False) == []


def before_ids(files: dict[str, bytes]) -> set[str]:
    return {Path(k).parts[1] for k in files if k.startswith(CANDIDATES_DIR + "/")}


def untimed(students: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "seconds"} for s in students]


def test_a_deeper_request_trains_only_the_layers_missing(trained, tmp_path):
    """With the students at k-1 kept, extra_attach 2 trains those at k-2 alone (none where k-1 is 0)."""
    root, bert = trained
    tasks = tmp_path / "tasks"
    shutil.copytree(root / "eager", tasks)
    attach = read_candidates(tasks / "topic").active.attach_layer
    widened = train_shallower(tasks, 2, progress=False)
    if attach < 2:
        assert widened == []
        return
    [w] = widened
    assert w.trained and all(c.startswith(f"student-a{attach - 2}-l") for c in w.trained), w


def test_an_older_report_counts_an_attach_layer_with_students_as_done(trained, tmp_path):
    """A report from before the job was recorded (and without a teacher file): nothing to train when its
    folder keeps students at every attach layer asked for."""
    root, _ = trained
    tasks = tmp_path / "tasks"
    shutil.copytree(root / "eager", tasks)
    report = json.loads((tasks / "topic" / REPORT_FILE).read_text())
    del report["job"]
    (tasks / "topic" / REPORT_FILE).write_text(json.dumps(report))
    (tasks / "topic" / TEACHER_FILE).unlink()
    before = snapshot(tasks)
    assert train_shallower(tasks, 1, progress=False) == [] and snapshot(tasks) == before


def one_line_error(capsys, *parts: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("centra: error: ") and all(p in err for p in parts), err


def data_gone(tasks: Path, data: Path) -> str:
    path = data / "topic-train.tsv"
    path.rename(path.with_suffix(".gone"))
    return f"{path}: file not found"


def data_changed(tasks: Path, data: Path) -> str:
    path = data / "topic-dev.tsv"
    shutil.copyfile(path, path.with_suffix(".kept"))
    with path.open("a", encoding="utf-8") as fh:
        fh.write(path.read_text(encoding="utf-8").splitlines()[1] + "\n")
    return f"{path}: changed since task"


def no_job(tasks: Path, data: Path) -> str:
    report = json.loads((tasks / "topic" / REPORT_FILE).read_text())
    del report["job"]
    (tasks / "topic" / REPORT_FILE).write_text(json.dumps(report))
    return f"{tasks / 'topic' / REPORT_FILE}: records no training job"


def no_teacher(tasks: Path, data: Path) -> str:
    (tasks / "topic" / TEACHER_FILE).unlink()
    return f"{tasks / 'topic' / TEACHER_FILE}: file not found"


@pytest.mark.parametrize("damage", [data_gone, data_changed, no_job, no_teacher])
def test_a_task_that_cannot_be_widened_is_refused_in_one_line_and_left_as_it_was(trained, tmp_path, capsys, damage):
    root, _ = trained
    tasks = fresh(trained, tmp_path)
    # task alpha, a copy checked first, is not widened either: every task is checked before any trains
    shutil.copytree(tasks / "topic", tasks / "alpha")
    for path in [tasks / "alpha" / "task.json", *(tasks / "alpha" / CANDIDATES_DIR).glob("*/task.json")]:
        path.write_text(path.read_text().replace('"name": "topic"', '"name": "alpha"'))
    try:
        expected = damage(tasks, root)
        before = snapshot(tasks)
        assert plan(tasks, "--extra-attach", "1") == 2
        one_line_error(capsys, expected)
        assert snapshot(tasks) == before
    finally:
        for split in ("train", "dev"):
            path = root / f"topic-{split}.tsv"
            for kept in (path.with_suffix(".gone"), path.with_suffix(".kept")):
                if kept.exists():
                    kept.replace(path)


def test_another_backbone_is_refused_before_anything_trains(trained, tiny_models, tmp_path, capsys):
    tasks = fresh(trained, tmp_path)
    before = snapshot(tasks)
    assert plan(tasks, "--extra-attach", "1", "--backbone", str(tiny_models["bert-other"])) == 2
    one_line_error(capsys, str(tasks / "topic" / "task.json"), "trained on backbone")
    assert snapshot(tasks) == before


def test_plan_without_the_flag_says_the_frontier_could_be_wider(trained, capsys):
    root, _ = trained
    assert plan(root / "lazy") == 0
    out = capsys.readouterr().out
    attach = read_candidates(root / "lazy" / "topic").active.attach_layer
    wider = [line for line in out.splitlines() if "the frontier could be wider" in line]
    assert len(wider) == (1 if attach > 0 else 0), out
    assert all("--extra-attach" in line and "topic" in line for line in wider)
    assert plan(root / "eager") == 0
    assert "the frontier could be wider" not in capsys.readouterr().out
