"""`centra demo`: the tasks of tasks/ trained (only what is missing or stale), merged into one
graph on the default backbone, answering texts; with the overhead, verify and timings."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from centra.core import DEFAULT_TASKS_DIR
from centra.errors import CentraError

if TYPE_CHECKING:  # the heavy imports happen when the demo runs, not when the CLI parses
    from centra.core.backbone import Backbone
    from centra.runtime.engine import Engine
    from centra.train.recipe import Recipe

# Untrained fallback (no data): name, kind, labels, input, attach layer, task layers
DEMO_TASKS = [
    ("sentiment", "multiclass", ["negative", "neutral", "positive"], "single", 4, 2),
    ("intent", "multiclass", ["question", "complaint", "request", "praise"], "single", 3, 1),
    ("topics", "multilabel", ["billing", "delivery", "product", "app"], "single", 2, 1),
    ("urgency", "regression", ["urgency"], "single", 5, 1),
    ("same_issue", "multiclass", ["different", "same"], "pair", 4, 1),
]


def run_demo(tasks_dir: Path, workdir: Path, data: Path | None = None, untrained: bool = False) -> int:
    import torch

    from centra.core.backbone import Backbone
    from centra.core.merge import overhead_table, plan_merge, write_merged
    from centra.core.overhead import extra_pass_warnings
    from centra.core.task import RECIPE_FILE, init_task, remove_task, save_task, task_dirs
    from centra.runtime.engine import Engine
    from centra.runtime.verify import SAMPLE_PAIRS, SAMPLE_TEXTS, count_layers_run, verify
    from centra.train.recipe import data_files, data_root, read_recipe

    torch.manual_seed(0)
    backbone = Backbone.load("default")
    print(f"backbone: {backbone.backbone_id} ({backbone.cfg.num_layers} layers, hidden "
          f"{backbone.cfg.hidden_size}, {backbone.fingerprint[:19]}...)")
    root = data_root(data)
    recipes = [read_recipe(f) for f in task_dirs(tasks_dir) if (f / RECIPE_FILE).is_file()] \
        if Path(tasks_dir).is_dir() else []
    have_data = bool(recipes) and all(p.is_file() for r in recipes for p in data_files(r, root).values())
    out = workdir / "model"
    if untrained or not have_data:
        if not untrained:
            why = f"{root}: demo data not found (set CENTRA_DATA or --data)" if recipes else \
                f"no recipes in {tasks_dir}"
            print(f"\n{why}; using untrained tasks.")
        print("\nUNTRAINED DEMO TASKS: the branches are copies of backbone layers with freshly initialised "
              "classifiers, so their answers are meaningless; the demo shows the merged graph, not quality.")
        merge_dir = workdir / "untrained-tasks"
        for folder in task_dirs(merge_dir) if merge_dir.is_dir() else []:
            if folder.name not in {row[0] for row in DEMO_TASKS}:
                remove_task(folder)
        for seed, (name, kind, labels, input_kind, attach, layers) in enumerate(DEMO_TASKS):
            spec, head = init_task(backbone, name, kind, labels, attach, layers, input=input_kind, seed=seed)
            save_task(merge_dir / name, spec, head)
    else:
        merge_dir = tasks_dir
        print(f"\ntasks in {tasks_dir} (data from {root}); training only what is missing or stale:")
        backbones = {"default": backbone}
        for recipe in recipes:
            if recipe.backbone not in backbones:
                backbones[recipe.backbone] = Backbone.load(recipe.backbone)
            bb = backbones[recipe.backbone]
            _train_if_stale(recipe, tasks_dir, root, bb, f"{recipe.name:<11}")
        for line in quality_lines(tasks_dir, [r.name for r in recipes]):
            print(line)
    plan = plan_merge([merge_dir])
    backbone = plan.backbone
    manifest = write_merged(plan, out)
    print(f"\nmerged {len(manifest.tasks)} tasks into {out} (version {manifest.version})")
    print(overhead_table(manifest))
    for line in extra_pass_warnings(plan.specs):
        print(f"  note: {line}")

    engine = Engine.load(out)
    counted = count_layers_run(engine, SAMPLE_TEXTS, SAMPLE_PAIRS)
    print(f"layers run for one request of every task, counted by forward hooks: {counted} "
          f"({'equals' if counted == manifest.overhead_layers else 'DIFFERS from'} the manifest's "
          f"{manifest.overhead_layers})")
    texts, pairs = SAMPLE_TEXTS[:6], SAMPLE_PAIRS[:6]
    label = "answers (untrained)" if merge_dir != tasks_dir else "answers"
    _through_grpc(out, texts, pairs, label, engine.predict(texts, pairs))

    print("\nverify: merged vs standalone per task")
    for check in verify(engine):
        print(f"  {check.name:<11} max |diff| = {check.max_abs_diff:.2e}")

    _timing(engine, backbone)
    if merge_dir == tasks_dir:
        shadowed = [r for r in recipes if r.name == SHADOWED] or [r for r in recipes if r.kind == "multiclass"]
        if shadowed:
            _shadow_step(tasks_dir, workdir, out, root, shadowed[0], backbones[shadowed[0].backbone])
    return 0


SHADOWED = "sentiment"  # retrained with other settings, shadowed, promoted (else the first multiclass task)
SHADOW_ROWS = 256  # dev texts the shadowed server answers
CANDIDATE_SETTINGS = {"layers": "2:2", "student_layers": 2}  # the candidate's other settings
CANDIDATES_DIR = "candidates"  # under the demo's workdir


def _train_if_stale(recipe: Recipe, tasks_dir: Path, root: Path, backbone: Backbone, shown: str) -> None:
    """Train `recipe` into tasks_dir/NAME unless that folder is up to date; say which, as `shown`."""
    from centra.train.pipeline import train_task
    from centra.train.recipe import job_from, stale_reason

    reason = stale_reason(tasks_dir / recipe.name, recipe, root, backbone.fingerprint)
    if reason is None:
        print(f"  {shown} up to date, reused")
        return
    print(f"  {shown} {reason}: training ({recipe.kind}, {recipe.training.max_train_examples or 'all'} train "
          "examples)...")
    start = time.perf_counter()
    chosen = train_task(job_from(recipe, root, backbone.fingerprint), backbone, tasks_dir)[0].chosen
    tuned = " (tuned thresholds, as served)" if chosen.tuned else ""
    print(f"  {shown} dev {chosen.metric}{tuned} {100 * chosen.served:.1f}, attach layer {chosen.attach_layer} + "
          f"{chosen.task_layers} task layer(s), {time.perf_counter() - start:.0f} s")


def _shadow_step(tasks_dir: Path, workdir: Path, out: Path, root: Path, active: Recipe, backbone: Backbone) -> None:
    """Retrain one task with other settings into workdir/candidates, publish a version in which it is that
    task's candidate head, serve it to dev texts, print the shadow report, promote it (each run publishes
    these two versions after the demo's own merge)."""
    from prometheus_client import generate_latest

    from centra.client import Client
    from centra.core.merge import plan_merge, write_merged
    from centra.core.versions import model_folder
    from centra.export.engines import promote
    from centra.io import sha256_file
    from centra.measure.shadow import report as shadow_report
    from centra.measure.shadow import shadow_figures
    from centra.serve.app import load_engine
    from centra.serve.background import BackgroundServer
    from centra.serve.shadow import Shadow
    from centra.train.data import load_examples
    from centra.train.recipe import job_from

    recipe = active.with_settings(CANDIDATE_SETTINGS)
    settings = ", ".join(f"{key} {value}" for key, value in CANDIDATE_SETTINGS.items())
    if recipe.sha256 == active.sha256:
        print(f"\nshadow and promote: skipped ({active.name}'s recipe already has {settings})")
        return
    folder = workdir / CANDIDATES_DIR / recipe.name
    print(f"\nshadow and promote: {recipe.name} retrained with {settings} as a candidate head")
    job = job_from(recipe, root, backbone.fingerprint)
    _train_if_stale(recipe, folder.parent, root, backbone, str(folder))
    manifest = write_merged(plan_merge([tasks_dir], candidates={recipe.name: folder}), out)
    print(f"  published {out} version {manifest.version}: {recipe.name} answers with its active head, the "
          f"candidate runs beside it (centra merge --candidate {recipe.name}={folder})")
    dev, _ = load_examples(job.dev, job.kind, job.columns, label_names=job.label_names)
    texts, pairs = dev.texts[:SHADOW_ROWS], dev.pairs[:SHADOW_ROWS] if dev.pairs else None
    shadow = Shadow()
    with BackgroundServer(load_engine(out, 32), shadow=shadow) as server, Client(server.target, timeout=60) as client:
        for start in range(0, len(texts), 32):
            client.classify(texts[start:start + 32], tasks=[recipe.name],
                            pairs=pairs[start:start + 32] if pairs else None)
    print(f"  {len(texts)} dev texts classified; the shadow report (centra shadow report --metrics URL):")
    for line in shadow_report(shadow_figures(generate_latest(shadow.metrics.registry).decode())).splitlines():
        print(f"    {line}".rstrip())

    def files(version: Path) -> dict[str, str]:  # every other task's files, by path: their sha256
        return {str(f.relative_to(version)): sha256_file(f) for f in sorted((version / "tasks").rglob("*"))
                if f.is_file() and f.relative_to(version / "tasks").parts[0] != recipe.name}

    before = files(model_folder(out))
    manifest = promote(out, recipe.name, progress=False)
    same = files(model_folder(out)) == before
    print(f"  centra promote {recipe.name}: version {manifest.version} answers with the candidate head; every "
          f"other task's files as they were: {'yes' if same else 'NO'}")


SHOWN_LABELS = 3  # labels of a multilabel answer printed per text
MIN_GAIN = 0.01  # a trained task within 1 point of its baseline learned nothing worth showing


def per_text(report) -> str:
    """', x labels per text (gold y)' of a multilabel report, held out; '' when it lacks them."""
    tail = report.thresholds.tail() if report.thresholds is not None else ""
    return f", {tail}" if tail else ""


def quality_lines(tasks_dir: Path, names: list[str]) -> list[str]:
    """Each task's dev metric (at its tuned thresholds for multilabel tasks, as served) beside the same
    metric of a model that learned nothing (report.json's baseline), flagging a task that does not beat it."""
    from centra.core.task import REPORT_FILE
    from centra.train.report import TrainingReport, read_report

    lines = ["\ndev metrics of the served branches, against a constant answer (a model that learned nothing):"]
    for name in names:
        path = Path(tasks_dir) / name / REPORT_FILE
        report = read_report(path) if path.is_file() else TrainingReport()
        chosen, base = report.chosen, report.baseline
        metric = chosen.metric if chosen is not None else None
        if metric is None or metric not in base:
            lines.append(f"  {name:<11} no dev metric and baseline in {path}")
            continue
        tuned = "" if chosen.tuned is None else (f" ({100 * chosen.scores[metric]:.1f} at 0.5, thresholds tuned on dev)"
                                                 f" scored held out (cross-fitted){per_text(report)}")
        verdict = "" if chosen.served - base[metric] >= MIN_GAIN else "  <- DOES NOT BEAT ITS BASELINE"
        lines.append(f"  {name:<11} {metric} {100 * chosen.served:5.1f}{tuned}; baseline {100 * base[metric]:5.1f} "
                     f"({base['answer']}){verdict}")
    return lines


def _through_grpc(out: Path, texts: list[str], pairs: list[str], label: str, local: list[dict]) -> None:
    """Serve the published model on a free loopback port, ask it through the client, stop it."""
    from centra.client import Client
    from centra.serve.app import load_engine
    from centra.serve.background import BackgroundServer

    with BackgroundServer(load_engine(out, 32)) as server, Client(server.target, timeout=30) as client:
        print(f"\ngRPC server on {server.target} (centra serve --model {out}); ListTasks:")
        served = client.list_tasks()
        print(f"  model {served['model_version']} on {served['backbone_id']}, {served['overhead_layers']} layers "
              "per request")
        for task in served["tasks"]:
            print(f"  {task['name']:<11} {task['kind']:<10} {task['input']:<6} attach layer {task['attach_layer']} "
                  f"+ {task['task_layers']}: {', '.join(task['labels'])}")
        answers = client.classify(texts, pairs=pairs)
        print(f"\n{label}, one Classify call for all texts and tasks:")
        by_text: dict[str, list[str]] = {}
        for answer in answers:
            shown = answer.get("label", answer.get("labels", answer.get("value")))
            if isinstance(shown, list):  # the most likely labels first; a long set is cut for the screen
                shown = sorted(shown, key=lambda name: -answer["scores"][name])
                more = f"(+{len(shown) - SHOWN_LABELS} more)" if len(shown) > SHOWN_LABELS else ""
                shown = "+".join(shown[:SHOWN_LABELS]) + more or "-"
            by_text.setdefault(answer["text"], []).append(f"{answer['task']}={shown}")
        for text, parts in by_text.items():
            print(f"  {text[:58]!r}")
            print(f"      {'  '.join(parts)}")
    same = len(answers) == len(local) and all(
        {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"} and
        max(abs(a["scores"][k] - b["scores"][k]) for k in b["scores"]) < 1e-5 for a, b in zip(answers, local))
    print(f"  the same answers as in process: {'yes' if same else 'NO'}; server stopped")


def _timing(engine: Engine, backbone: Backbone, repeats: int = 3) -> None:
    """Merged graph vs one full fine-tuned-size model per task, same 32 texts (and pairs)."""
    import torch

    from centra.core.graph import StandaloneModel
    from centra.core.texts import SAMPLE_PAIRS, SAMPLE_TEXTS
    from centra.measure.bench_engines import full_depth_head

    texts, pairs = (SAMPLE_TEXTS * 4)[:32], (SAMPLE_PAIRS * 4)[:32]
    engine.logits(texts, pairs)  # warm-up

    def best(fn) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return min(times) * 1000

    merged_ms = best(lambda: engine.logits(texts, pairs))
    pad_id = engine.tokenizer.pad_token_id or 0
    separate = []
    for name, spec in engine.specs.items():
        # Serving a task as its own model: all N backbone layers under that task's classifier.
        head = full_depth_head(engine.model.heads[name], backbone.cfg.num_layers)
        enc = engine.encode(texts, pairs if spec.input == "pair" else None, spec.max_length)
        separate.append((StandaloneModel(backbone.embeddings, list(backbone.layers), head),
                         enc.batch(list(range(len(texts))), pad_id)))

    def run_separate() -> None:
        for model, batch in separate:
            model(*batch)

    separate_ms = best(run_separate)
    subset = sorted(engine.specs, key=lambda n: engine.specs[n].attach_layer)[:2]
    subset_ms = best(lambda: engine.logits(texts, pairs, subset))
    print(f"\ntiming, batch of {len(texts)} texts, best of {repeats}, {torch.get_num_threads()} threads:")
    rows = [(f"merged graph, all {len(engine.specs)} tasks", merged_ms, ""),
            (f"{len(engine.specs)} separate {backbone.cfg.num_layers}-layer models", separate_ms,
             f"({separate_ms / merged_ms:.1f}x the merged graph)"),
            (f"merged graph, only {' + '.join(subset)}", subset_ms,
             f"(trunk stops at layer {engine.model.depth_for(subset)})")]
    for label, ms, note in rows:
        print(f"  {label:<36} {ms:8.1f} ms  {note}".rstrip())


def cmd_demo(args: argparse.Namespace) -> int:
    from centra.core.merge import MODEL_KIND
    from centra.core.task import TASK_KIND
    from centra.publish import check_replaceable, check_writable_parent

    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CentraError(f"{workdir}: exists and is not a folder")
    check_writable_parent(workdir / "model")
    check_replaceable(workdir / "model", MODEL_KIND)  # before any training: never over a user's folder
    for made in (workdir / "untrained-tasks", workdir / CANDIDATES_DIR):  # task folders the demo (re)publishes
        if made.exists() and not made.is_dir():
            raise CentraError(f"{made}: exists and is not a folder")
        for folder in made.iterdir() if made.is_dir() else ():
            check_replaceable(folder, TASK_KIND)
    from centra.train.settings import SettingError, flag_of

    try:
        return run_demo(Path(args.tasks_dir), workdir, Path(args.data) if args.data else None, args.untrained)
    except SettingError as exc:  # settings come from the recipes (named as there); the data root is --data
        raise CentraError(exc.named(lambda name: flag_of(name) if name == "data" else name)) from None


def add_parser(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="train what is missing in tasks/, merge, classify texts")
    p.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help=f"folder of task recipes (default: "
                   f"{DEFAULT_TASKS_DIR})")
    p.add_argument("--workdir", default="demo-output", help="where the merged model goes (default: demo-output)")
    p.add_argument("--data", help="folder the recipes' data paths are relative to (default: $CENTRA_DATA or "
                   "../shared/data)")
    p.add_argument("--untrained", action="store_true", help="skip training: untrained --init-only tasks")
    p.set_defaults(func=cmd_demo)
