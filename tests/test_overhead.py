"""Honest overhead: the manifest, the merge table and the demo count every trunk pass the engine makes,
and agree with the layers counted by forward hooks during a real call."""

from __future__ import annotations

import json

import pytest
from conftest import PAIRS, TEXTS
from helpers import perturb

from centra.cli import main
from centra.core.backbone import Backbone
from centra.core.merge import plan_merge, write_merged
from centra.core.overhead import extra_pass_warnings, overhead_layers, trunk_passes
from centra.core.task import init_task, save_task
from centra.core.versions import MANIFEST, model_folder
from centra.runtime.engine import Engine
from centra.runtime.verify import count_layers_run

# name, input, max_length, attach layer, task layers: three token groups on a 4-layer backbone
ROWS = [
    ("alpha", "single", 48, 1, 1),
    ("beta", "single", 48, 2, 2),
    ("gamma", "single", 32, 3, 1),  # other max_length: a pass of its own, 3 layers deep
    ("delta", "pair", 48, 2, 1),    # text pairs: a pass of its own, 2 layers deep
    ("eps", "pair", 48, 0, 2),      # shares delta's pass
]
EXPECTED = 2 + 3 + 2 + (1 + 2 + 1 + 1 + 2)  # passes (single,48) + (single,32) + (pair,48) + task layers


@pytest.fixture
def merged(bert_path, tmp_path):
    bb = Backbone.load(bert_path)
    for seed, (name, input_kind, max_length, attach, layers) in enumerate(ROWS):
        spec, head = init_task(bb, name, "multiclass", ["a", "b"], attach, layers, input=input_kind,
                               max_length=max_length, seed=seed)
        save_task(tmp_path / "tasks" / name, spec, perturb(head, seed))
    return tmp_path


def test_manifest_counts_every_trunk_pass(merged):
    plan = plan_merge([merged / "tasks"])
    assert [(p.input, p.max_length, p.depth) for p in trunk_passes(plan.specs)] == \
        [("single", 32, 3), ("single", 48, 2), ("pair", 48, 2)]
    manifest = write_merged(plan, merged / "out")
    assert manifest.overhead_layers == overhead_layers(plan.specs) == EXPECTED
    assert manifest.trunk_depth == 3 and manifest.single_task_layers == 4 * len(ROWS)


def test_hook_count_of_a_real_call_equals_the_manifest(merged):
    write_merged(plan_merge([merged / "tasks"]), merged / "out")
    engine = Engine.load(merged / "out", batch_size=2)  # count_layers_run puts all texts in one batch
    manifest = json.loads((model_folder(merged / "out") / MANIFEST).read_text())
    assert count_layers_run(engine, TEXTS, PAIRS) == manifest["overhead_layers"] == EXPECTED
    # A subset request runs only its own passes: alpha and gamma read other tokens (two passes).
    subset = [row for row in ROWS if row[0] in ("alpha", "gamma")]
    specs = [engine.specs[name] for name, *_ in subset]
    assert count_layers_run(engine, TEXTS, PAIRS, ["alpha", "gamma"]) == overhead_layers(specs) == 1 + 3 + 1 + 1
    # Without pairs, the pair tasks are not run and their pass is not made.
    singles = [s for s in engine.specs.values() if s.input == "single"]
    assert count_layers_run(engine, TEXTS) == overhead_layers(singles) == 2 + 3 + 4


def test_merge_table_and_warnings_give_the_same_count(merged, capsys):
    assert main(["merge", "--tasks-dir", str(merged / "tasks"), "--out", str(merged / "out")]) == 0
    captured = capsys.readouterr()
    assert f"overhead: {EXPECTED} layers per request (trunk passes: 3 [single, max_length 32] + " \
           "2 [single, max_length 48] + 2 [pair, max_length 48]; task layers: 7) vs 20" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("centra: warning:")]
    # the main group is (single, 48) with two tasks (ties with the pair group go to single texts)
    assert len(warnings) == 2
    assert "task 'gamma' (single input, max_length 32)" in warnings[0] and "+3 layers" in warnings[0]
    assert "'delta', 'eps' (pair input, max_length 48)" in warnings[1] and "+2 layers" in warnings[1]


def test_one_token_group_has_no_warning(merged):
    plan = plan_merge([merged / "tasks"])
    singles48 = [s for s in plan.specs if s.encoding_key == ("single", 48)]
    assert extra_pass_warnings(singles48) == []
    assert overhead_layers(singles48) == 2 + 1 + 2


def test_one_token_group_type_everywhere(merged):
    """The engine, the manifest and bench group tasks by the same TokenGroup, built from the specs."""
    from centra.core.overhead import TokenGroup, token_groups
    from centra.measure.bench_batches import make_batches

    plan = plan_merge([merged / "tasks"])
    groups = token_groups(plan.specs)
    assert groups == [TokenGroup("single", 48, ("alpha", "beta"), 2), TokenGroup("pair", 48, ("delta", "eps"), 2),
                      TokenGroup("single", 32, ("gamma",), 3)]  # in the order their first task appears
    assert trunk_passes(plan.specs) == [groups[2], groups[0], groups[1]]  # deepest first; ties: single texts
    manifest = write_merged(plan, merged / "out")
    assert list(manifest.trunk_passes) == trunk_passes(plan.specs)
    engine = Engine.load(merged / "out")
    assert engine.groups == token_groups(engine.specs.values()) and engine.group_of["eps"] is engine.groups[1]
    batches = make_batches(engine.tokenizer, engine.model.cfg, engine.specs, TEXTS, list(zip(TEXTS, PAIRS)), 2,
                           "realistic")
    assert list(batches[0].groups) == [g.key for g in groups]
