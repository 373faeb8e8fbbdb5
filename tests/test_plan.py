"""Allocation under a budget (`centra plan`): the planner is exact (against brute force), activating a
plan touches only the chosen heads' two files and nothing of any other task, atomically; and end to end,
add-task keeps candidates, plan activates them, predict serves the activated head."""

from __future__ import annotations

import itertools
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, snapshot
from helpers import STANDARD_TASKS, perturb
from test_publish import CLI, cli, leftovers
from test_training import synthetic, write_split

from centra.cli import main
from centra.core.answers import interpret
from centra.core.backbone import Backbone
from centra.core.candidates import activate, read_candidates
from centra.core.graph import StandaloneModel
from centra.core.overhead import overhead_layers
from centra.core.task import CANDIDATES_DIR, HEAD_FILE, TASK_FILE, TaskSpec, init_task, load_task, save_task
from centra.core.tokens import encode
from centra.core.versions import MANIFEST, model_folder
from centra.train.plan import Option, best_plan, frontier, plan_cost

GROUPS = [("single", 128), ("pair", 128), ("single", 64)]

# ------------------------------------------------------------------------------- the planner is exact


def random_instance(rng: random.Random) -> dict[str, list[Option]]:
    tasks = {}
    for t in range(rng.randint(1, 5)):
        group = rng.choice(GROUPS[: rng.randint(1, 3)])
        options = []
        for i in range(rng.randint(1, 4)):
            score = round(rng.random(), rng.choice([1, 2, 6]))  # coarse scores make ties
            options.append(Option(f"t{t}", f"c{i}", group, rng.randint(0, 6), rng.randint(1, 3), score,
                                  active=i == 0))
        tasks[f"t{t}"] = options
    return tasks


def engine_cost(options) -> int:
    """The overhead as core/overhead.py counts it for the merged engine, from task specs."""
    specs = [TaskSpec(o.task, "multiclass", ["a", "b"], o.attach, o.layers, {}, input=o.group[0],
                      max_length=o.group[1]) for o in options]
    return overhead_layers(specs)


def brute_force(tasks: dict[str, list[Option]]) -> dict[int, float]:
    """cost -> the best summed score of any plan costing exactly that, by trying every combination."""
    best: dict[int, float] = {}
    for combo in itertools.product(*tasks.values()):
        cost, value = engine_cost(combo), sum(o.score for o in combo)
        best[cost] = max(best.get(cost, -1.0), value)
    return best


def test_planner_matches_brute_force_on_random_instances():
    rng = random.Random(9)
    for _ in range(300):
        tasks = random_instance(rng)
        exact = brute_force(tasks)
        plans = frontier(tasks)
        assert plans and plans[0].cost == min(exact), "the frontier starts at the cheapest plan"
        for budget in range(min(exact) - 1, max(exact) + 2):
            optimum = max((v for c, v in exact.items() if c <= budget), default=None)
            plan = best_plan(tasks, budget)
            if optimum is None:
                assert plan is None
                continue
            assert plan.total == pytest.approx(optimum, abs=1e-9), (tasks, budget)
            assert plan.cost <= budget and plan.cost == engine_cost(plan.choice.values())
            assert set(plan.choice) == set(tasks) and all(o in tasks[n] for n, o in plan.choice.items())
        # the frontier is exactly brute force's Pareto front: strictly better with every step up in cost
        pareto, top = [], None
        for cost in sorted(exact):
            if top is None or exact[cost] > top + 1e-9:
                pareto.append(cost)
                top = exact[cost]
        assert [p.cost for p in plans] == pareto


def test_planner_shares_the_trunk_instead_of_choosing_greedily():
    """Moving one task deeper costs the whole trunk (+3); moving both costs less per task: a greedy
    upgrade one task at a time stops at 6 layers, the exact plan takes both at 8."""
    g = ("single", 128)
    tasks = {name: [Option(name, "deep", g, 5, 1, 0.95), Option(name, "shallow", g, 1, 2, 0.90)] for name in "ab"}
    tasks["c"] = [Option("c", "only", g, 1, 1, 0.80)]
    plan = best_plan(tasks, 8)
    assert {n: o.id for n, o in plan.choice.items()} == {"a": "deep", "b": "deep", "c": "only"} and plan.cost == 8
    plan = best_plan(tasks, 7)
    assert {n: o.id for n, o in plan.choice.items()} == {"a": "shallow", "b": "shallow", "c": "only"}
    assert plan_cost(plan.choice.values()) == 6 and best_plan(tasks, 5) is None
    assert [p.cost for p in frontier(tasks)] == [6, 8]
    tie = {"a": [Option("a", "x", g, 1, 1, 0.5), Option("a", "now", g, 1, 1, 0.5, active=True)]}
    assert best_plan(tie, 9).choice["a"].id == "now", "equal score and cost: keep the active head"


# ------------------------------------------------------------------------------------- activation


def make_candidates(bb: Backbone, tasks: Path, row: tuple, seed: int) -> dict[str, tuple]:
    """A task folder whose active head is candidate `student-l<l>` of three (no training: perturbed
    copies), each with a dev metric."""
    name, kind, labels, input_kind, attach, layers, pooling = row
    found = {}
    for i, (cid, k, n, score) in enumerate([(f"student-l{layers}", attach, layers, 0.8),
                                            ("student-alt", attach, 1, 0.7), ("teacher-L1", 3, 1, 0.75)]):
        spec, head = init_task(bb, name, kind, labels, k, n, input=input_kind, pooling=pooling, max_length=48)
        perturb(head, seed * 10 + i)
        spec.trained = True
        metric = {"multiclass": "accuracy", "multilabel": "micro_f1", "regression": "pearson"}[kind]
        spec.metrics = {"metric": metric, metric: score}
        found[cid] = (spec, head)
    active = found[f"student-l{layers}"]
    save_task(tasks / name, *active, extra_files={"report.json": {"task": name}}, candidates=found)
    return found


@pytest.fixture
def world(bert_path, tmp_path) -> dict:
    bb = Backbone.load(bert_path)
    for seed, row in enumerate(STANDARD_TASKS[:3]):
        make_candidates(bb, tmp_path / "tasks", row, seed)
    (tmp_path / "tasks" / "alpha" / "recipe.json").write_bytes(b'{"kept":   "byte for byte"}\n')
    return {"bb": bb, "tasks": tmp_path / "tasks"}


def test_activation_changes_only_the_two_files_of_the_chosen_task(world):
    tasks, bb = world["tasks"], world["bb"]
    before = {name: snapshot(tasks / name) for name in ("alpha", "beta", "gamma")}
    alpha = read_candidates(tasks / "alpha")
    assert alpha.active_id == "student-l1" and [c.id for c in alpha.candidates] == \
        ["student-alt", "student-l1", "teacher-L1"]
    inode = (tasks / "alpha" / TASK_FILE).stat().st_ino
    by_id = {c.id: c for c in alpha.candidates}
    assert not activate(alpha, by_id["student-l1"], bb.cfg), "the active candidate: nothing is rewritten"
    assert (tasks / "alpha" / TASK_FILE).stat().st_ino == inode and snapshot(tasks / "alpha") == before["alpha"]

    assert activate(alpha, by_id["teacher-L1"], bb.cfg)
    after = snapshot(tasks / "alpha")
    assert {k for k in after if after[k] != before["alpha"].get(k)} == {TASK_FILE, HEAD_FILE}
    assert set(after) == set(before["alpha"]), "no file added or lost"
    source = Path(CANDIDATES_DIR) / "teacher-L1"
    assert after[TASK_FILE] == after[str(source / TASK_FILE)] and after[HEAD_FILE] == after[str(source / HEAD_FILE)]
    assert snapshot(tasks / "beta") == before["beta"] and snapshot(tasks / "gamma") == before["gamma"]
    spec, _ = load_task(tasks / "alpha", bb)
    assert (spec.attach_layer, spec.task_layers) == (3, 1)
    again = read_candidates(tasks / "alpha")
    assert again.active_id == "teacher-L1"
    assert activate(again, next(c for c in again.candidates if c.id == "student-l1"), bb.cfg)
    assert snapshot(tasks / "alpha") == before["alpha"], "activating the first head again restores every byte"
    assert leftovers(tasks) == []


@pytest.mark.parametrize("step", ["stage", "copy", "staged", "swap"])
def test_plan_killed_mid_activation_leaves_each_task_whole(world, step):
    tasks = world["tasks"]
    old = {name: snapshot(tasks / name) for name in ("alpha", "beta", "gamma")}
    args = ["plan", "--tasks-dir", str(tasks), "--budget-layers", "6", "--no-plot"]  # beta -> teacher-L1
    done = cli(CLI, args, step)
    assert done.returncode == -signal.SIGKILL, done.stderr
    now = {name: snapshot(tasks / name) for name in ("alpha", "beta", "gamma")}
    changed = [name for name in now if now[name] != old[name]]
    assert changed == (["beta"] if step == "swap" else []), "killed before or after beta's one atomic swap"
    for name in changed:  # that one is whole: exactly a candidate's two files in place of the old
        files = now[name]
        cid = read_candidates(tasks / name).active_id
        assert cid is not None and files[TASK_FILE] == files[f"{CANDIDATES_DIR}/{cid}/{TASK_FILE}"]
    for name in now:
        load_task(tasks / name, world["bb"])
    assert main(args) == 0, "a plan run again finishes the job"
    assert {name: read_candidates(tasks / name).active_id for name in now} == \
        {"alpha": "student-l1", "beta": "teacher-L1", "gamma": "student-l1"}


def test_plan_errors_are_one_line(world, tmp_path, capsys):
    tasks = world["tasks"]
    before = snapshot(tasks)
    base = ["plan", "--tasks-dir", str(tasks), "--no-plot"]
    for extra, message in [(["--budget-layers", "5"], "a budget of 5 layers is below the cheapest plan (6 layers"),
                           ([], "give one budget"), (["--budget-layers", "4", "--budget-ms", "1"], "not both"),
                           (["--budget-ms", "0.000001"], "a budget of 0 layers (1e-06 ms) is below the cheapest"),
                           (["--budget-layers", "0"], "--budget-layers: must be >= 1")]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("centra: error:") and err.count("\n") == 1 and message in err, err
    assert main(["plan", "--tasks-dir", str(tasks), "--budget-layers", "9", "--plot", str(tmp_path / "p.svg")]) == 2
    assert "the plot is a PNG file" in capsys.readouterr().err
    (tmp_path / "empty" / "one").mkdir(parents=True)
    assert main(["plan", "--tasks-dir", str(tmp_path / "empty"), "--budget-layers", "9"]) == 2
    assert "task.json: file not found" in capsys.readouterr().err
    assert snapshot(tasks) == before
    alt = tasks / "beta" / CANDIDATES_DIR / "student-alt" / "task.json"  # a tuned metric that is no number
    spec = json.loads(alt.read_text())
    spec["metrics"]["tuned"] = {"micro_f1": "high"}
    alt.write_text(json.dumps(spec))
    assert main([*base, "--budget-layers", "9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "student-alt" in err and "not a trained candidate with a dev metric" in err, err


def test_plan_prints_the_table_and_plots_the_frontier(world, tmp_path, capsys):
    plot = tmp_path / "plots" / "frontier.png"
    assert main(["plan", "--tasks-dir", str(world["tasks"]), "--budget-layers", "100", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(plot.parent.glob(".*"))
    assert "frontier (layers: best average dev):" in out and "<- chosen" in out and "before" in out
    # alpha, beta, gamma all single-text, max_length 48: the best of each (0.8) at trunk 3 (gamma's attach)
    assert "plan: 7 layers per request of a budget of 100" in out and "average dev 80.00" in out
    assert "activated 0 tasks; 3 unchanged" in out


def test_multilabel_heads_and_the_reference_are_planned_at_tuned_thresholds(world, capsys):
    """beta (multilabel) is served at tuned thresholds, so the plan scores its heads, and the full
    fine-tuning point its reference, by the metric at them, not at 0.5."""
    beta = world["tasks"] / "beta"
    for path in [beta / "task.json", *sorted((beta / CANDIDATES_DIR).glob("*/task.json"))]:
        spec = json.loads(path.read_text())
        spec["metrics"]["tuned"] = {"micro_f1": spec["metrics"]["micro_f1"] - 0.5}  # tuned: 0.3, 0.2, 0.25
        path.write_text(json.dumps(spec))
    for name, at_half, tuned in (("alpha", 0.9, 0.9), ("beta", 0.9, 0.3), ("gamma", 0.9, 0.9)):
        metric = {"alpha": "accuracy", "beta": "micro_f1", "gamma": "pearson"}[name]
        reference = {"dev": {metric: at_half}, **({"thresholds": {"tuned": {metric: tuned}}} if name == "beta" else {})}
        (world["tasks"] / name / "report.json").write_text(json.dumps({"task": name, "reference": reference}))
    assert main(["plan", "--tasks-dir", str(world["tasks"]), "--budget-layers", "100", "--no-plot", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "average dev 63.33" in out, out  # (0.8 + 0.3 + 0.8) / 3, beta's best head at its tuned 0.3
    assert "full fine-tuning 12 layers 70.00" in out, out  # (0.9 + 0.3 + 0.9) / 3


# ------------------------------------------------------------------------------------- end to end


def test_add_task_keeps_candidates_plan_activates_predict_serves(bert_path, tmp_path, capsys):
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    data.mkdir()
    common = ["--backbone", str(bert_path), "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--head-lr", "1e-2",
              "--text-column", "text", "--label-column", "label", "--kind", "multiclass",
              "--extra-attach", "0"]  # candidates at the teacher's layer only (shallower: test_shallower_students)
    for name, pair, extra in (("mood", False, ["--layers", "2:3", "--threshold", "-100", "--first-rung", "0.25"]),
                              ("same", True, ["--layers", "4:4", "--student-layers", "1", "--search", "full"])):
        write_split(data / f"{name}-train.tsv", synthetic("multiclass", pair, 48, 1), pair)
        write_split(data / f"{name}-dev.tsv", synthetic("multiclass", pair, 24, 2), pair)
        assert main(["add-task", "--tasks-dir", str(tasks), "--name", name, "--train", str(data / f"{name}-train.tsv"),
                     "--dev", str(data / f"{name}-dev.tsv"), *(["--pair-column", "pair"] if pair else []),
                     *common, *extra]) == 0
    out = capsys.readouterr().out
    assert "teacher search (halving): 2.33 epochs of 4" in out and "teacher search (full): 2 epochs of 2" in out
    report = json.loads((tasks / "mood" / "report.json").read_text())
    best = next(t["trainable_layers"] for t in report["teachers"] if t["chosen"])
    kept = {f"teacher-L{b}" for b in (2, 3)} | {f"student-l{x}" for x in range(1, best + 1)}
    assert {p.name for p in (tasks / "mood" / CANDIDATES_DIR).iterdir()} == kept
    assert {c["id"] for c in report["candidates"]} == kept
    assert read_candidates(tasks / "mood").active_id == f"student-l{best}"
    assert json.loads((tasks / "same" / "recipe.json").read_text())["training"]["search"] == "full"

    assert main(["plan", "--tasks-dir", str(tasks), "--budget-layers", "1", "--no-plot"]) == 2
    err = capsys.readouterr().err
    cheapest = int(err.split("below the cheapest plan (")[1].split(" layers")[0])
    same_before = snapshot(tasks / "same")
    assert main(["plan", "--tasks-dir", str(tasks), "--budget-layers", str(cheapest), "--plot",
                 str(tmp_path / "plan.png")]) == 0
    out = capsys.readouterr().out
    assert "activated 1 task: mood; 1 unchanged" in out and (tmp_path / "plan.png").is_file()
    assert snapshot(tasks / "same") == same_before
    mood = read_candidates(tasks / "mood")
    assert mood.active_id == "student-l1" and mood.active.attach_layer == 4 - best

    assert main(["merge", "--tasks-dir", str(tasks), "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((model_folder(tmp_path / "out") / MANIFEST).read_text())
    entry = next(t for t in manifest["tasks"] if t["name"] == "mood")
    assert (entry["attach_layer"], entry["task_layers"]) == (4 - best, 1)
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "out"), "--task", "mood", TEXTS[0]]) == 0
    answer = json.loads(capsys.readouterr().out)
    bb = Backbone.load(bert_path)
    tok = bb.tokenizer()

    def answer_of(candidate: str) -> dict:
        spec, head = load_task(tasks / "mood" / CANDIDATES_DIR / candidate, bb, name="mood")
        model = StandaloneModel(bb.embeddings, list(bb.layers), head).eval()
        enc = encode(tok, bb.cfg.type_vocab_size, [TEXTS[0]], None, spec.max_length)
        with torch.no_grad():
            return interpret(spec, model(*enc.batch([0], tok.pad_token_id))[0]).to_dict()

    expected = answer_of("student-l1")
    assert answer["label"] == expected["label"]
    assert answer["scores"] == pytest.approx(expected["scores"], abs=1e-5)
    assert answer["scores"] != pytest.approx(answer_of(f"student-l{best}")["scores"], abs=1e-5), \
        "the head active before the plan answers otherwise"
