"""`centra add-task`: train a task from its recipe (or from flags, which write the recipe), create an
untrained one, or remove one."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from centra.errors import CentraError

DEFAULT_TASKS_DIR = "tasks"
# add-task flags that are training settings (recipe.training), by their dest name
SETTINGS = ("layers", "search", "first_rung", "student_layers", "threshold", "epochs", "batch_size", "lr", "head_lr",
            "metric", "alpha", "temperature", "seed", "max_train_examples", "max_length", "pooling", "reference",
            "teacher_logits", "attach_layer", "cache_gb")
DATA_FLAGS = ("kind", "train", "dev", "text_column", "pair_column", "label_column", "label_names", "header",
              "label_delimiter")


def columns_from(args: argparse.Namespace):
    from centra.train.data import Columns

    if not args.text_column or not args.label_column:
        raise CentraError("give --text-column and --label-column")
    return Columns(text=args.text_column, labels=args.label_column, pair=args.pair_column,
                   header=args.header or "auto", label_delimiter=args.label_delimiter or ",")


def cmd_add_task(args: argparse.Namespace) -> int:
    from centra.core.task import NAME_RE

    tasks_dir = Path(args.tasks_dir)
    if args.remove:
        from centra.core.task import remove_task

        if not NAME_RE.match(args.remove):
            raise CentraError(f"--remove {args.remove!r}: a task name is 1-64 letters, digits, '_' or '-'")
        had_recipe = (tasks_dir / args.remove / "recipe.json").is_file()
        remove_task(tasks_dir / args.remove)
        print(f"removed task {args.remove!r}{' and its recipe' if had_recipe else ''} from {tasks_dir}")
        return 0
    if args.name is None:
        raise CentraError("add-task needs --name (or --remove NAME)")
    if not NAME_RE.match(args.name):
        raise CentraError(f"task name {args.name!r} must be 1-64 letters, digits, '_' or '-'")
    if args.init_only:
        return _add_untrained(args, tasks_dir)
    return _add_trained(args, tasks_dir)


def _add_untrained(args: argparse.Namespace, tasks_dir: Path) -> int:
    from centra.core.backbone import Backbone
    from centra.core.task import init_task, save_task
    from centra.io import check_writable_parent

    if args.kind is None or args.attach_layer is None or args.task_layers is None:
        raise CentraError("--init-only needs --kind, --attach-layer and --task-layers")
    check_writable_parent(tasks_dir / args.name)
    labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    backbone = Backbone.load(args.backbone)
    spec, head = init_task(backbone, args.name, args.kind, labels, args.attach_layer, args.task_layers,
                           input=args.input, max_length=args.max_length, pooling=args.pooling or "mean",
                           seed=args.seed or 0)
    save_task(tasks_dir / args.name, spec, head)
    print(f"wrote untrained task {args.name!r} ({args.kind}, attach layer {args.attach_layer}, "
          f"{args.task_layers} task layers) to {tasks_dir / args.name}")
    return 0


def recipe_from_flags(args: argparse.Namespace, root: Path):
    """A new recipe from --kind/--train/--dev/columns and the training flags given."""
    from centra.train.recipe import Recipe, Training

    missing = [flag for flag, value in (("--kind", args.kind), ("--train", args.train), ("--dev", args.dev))
               if value is None]
    if missing:
        raise CentraError(f"training from flags needs {', '.join(missing)} (or a recipe in the task folder)")
    columns_from(args)
    label_names = args.label_names
    if label_names and label_names.startswith("@"):  # a names file: stored like the data files
        label_names = "@" + _data_path(label_names[1:], root)
    data = {"train": _data_path(args.train, root), "dev": _data_path(args.dev, root),
            "text_column": args.text_column, "pair_column": args.pair_column, "label_column": args.label_column,
            "label_names": label_names, "header": args.header or "auto",
            "label_delimiter": args.label_delimiter or ","}
    settings = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    if settings.get("teacher_logits"):
        settings["teacher_logits"] = _data_path(settings["teacher_logits"], root)
    return Recipe(args.name, args.kind, data, Training(**settings), args.backbone or "default")


def _data_path(value: str, root: Path) -> str:
    """Stored relative to the data root when the file lies under it, else absolute."""
    path = Path(value).resolve()
    if not path.is_file():
        raise CentraError(f"{value}: file not found")
    try:
        return path.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _add_trained(args: argparse.Namespace, tasks_dir: Path) -> int:
    from centra.core.backbone import Backbone
    from centra.core.task import RECIPE_FILE
    from centra.io import check_writable_parent
    from centra.train.pipeline import train_task
    from centra.train.recipe import data_root, job_from, read_recipe

    root = data_root(Path(args.data) if args.data else None)
    folder = tasks_dir / args.name
    from_flags = any(getattr(args, k) is not None for k in DATA_FLAGS)
    if from_flags:
        recipe = recipe_from_flags(args, root)
    elif (folder / RECIPE_FILE).is_file():
        recipe = read_recipe(folder)
        given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
        if given:  # settings given on the command line update the recipe
            recipe = replace(recipe, training=replace(recipe.training, **given))
        if args.backbone:
            recipe = replace(recipe, backbone=args.backbone)
    else:
        raise CentraError(f"{folder / RECIPE_FILE}: file not found: give a recipe, or --kind, --train, --dev, "
                          "--text-column and --label-column (which write one), or --init-only")
    check_writable_parent(folder)
    backbone = Backbone.load(recipe.backbone)
    job = job_from(recipe, root, backbone.fingerprint)
    if from_flags or given_settings(args):
        job = replace(job, recipe=recipe.to_dict())
    report, _ = train_task(job, backbone, tasks_dir)
    print(summarize(report))
    return 0


def given_settings(args: argparse.Namespace) -> bool:
    return args.backbone is not None or any(getattr(args, k) is not None for k in SETTINGS)


def summarize(report: dict) -> str:
    metric = report["metric"]

    def score(dev: dict) -> str:  # a multilabel branch is chosen at its tuned thresholds: show both
        return f"{100 * dev[metric]:.2f}" + (f" ({100 * dev['tuned'][metric]:.2f} tuned)" if "tuned" in dev else "")

    lines = [f"task {report['task']!r}: {report['train_examples']} train / {report['dev_examples']} dev examples, "
             f"dev {metric} (x100)"]
    if "reference" in report:
        ref = report["reference"]
        lines.append(f"  full fine-tuning ({ref['layers']} layers{' and embeddings' if 'embeddings' in ref else ''}, "
                     f"{ref.get('epochs_setting', len(ref['epochs']))} epochs): "
                     f"{100 * report['reference']['dev'][metric]:.2f}{tuned_note(report['reference'])}")
    for t in report["teachers"]:
        if "trainable_layers" in t:
            mark = "  <- teacher" if t["chosen"] else ""
            trained = round(t.get("epochs_trained", 0), 2)
            epochs = f" ({trained:g} epoch{'s' if trained != 1 else ''})" if "epochs_trained" in t else ""
            lines.append(f"  teacher L={t['trainable_layers']} (attach {t['attach_layer']}): "
                         f"{score(t['dev'])}{epochs}{mark}")
    for s in report["students"]:
        lines.append(f"  student l={s['task_layers']}: {score(s['dev'])}")
    if "search" in report:
        s = report["search"]
        lines.append(f"teacher search ({s['method']}): {round(s['epochs_trained'], 2):g} epochs of "
                     f"{s['epochs_full_search']} ({round(s['layer_epochs'], 2):g} of {s['layer_epochs_full_search']} "
                     f"layer-epochs), {s['seconds']:.1f} s"
                     + (f", {s['per_reference']:.2f}x the full fine-tuning" if "per_reference" in s else ""))
    c = report["chosen"]
    lines.append(f"chosen: attach layer {c['attach_layer']}, {c['task_layers']} task layers, "
                 f"dev {metric} {100 * c[metric]:.2f}{tuned_note(report)}")
    if report.get("candidates"):
        lines.append(f"kept for `centra plan`: {', '.join(c['id'] for c in report['candidates'])}")
    cache = report["cache"]
    lines.append(f"trunk cache: {cache['seconds']:.1f} s, {cache['bytes'] / 2**20:.0f} MiB; recomputing the "
                 f"frozen layers every epoch would have cost ~{cache['estimated_seconds_without_cache']:.1f} s")
    lines.append("wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def tuned_note(run: dict) -> str:
    """'; thresholds tuned on dev: micro_f1 a -> b, macro_f1 c -> d' for a multilabel run, else ''."""
    if "thresholds" not in run:
        return ""
    t = run["thresholds"]
    return "; thresholds tuned on dev: " + ", ".join(f"{m} {100 * v:.2f} -> {100 * t['tuned'][m]:.2f}"
                                                     for m, v in t["at_0.5"].items())


def add_column_args(p) -> None:
    p.add_argument("--text-column", help="column (header name or 0-based index) of the text")
    p.add_argument("--pair-column", help="column of the second text: makes a text-pair task")
    p.add_argument("--label-column", action="append", help="label column (repeat: several 0/1 multilabel columns)")
    p.add_argument("--label-names", help="names for integer label ids: a,b,c or @file (one per line)")
    p.add_argument("--label-delimiter", help="separator of a multilabel list in one column (default ',')")
    p.add_argument("--header", choices=["auto", "yes", "no"],
                   help="auto (default): a header when a column is named, else sniffed")


# shown in --help; the values live in centra.train.recipe.Training (imported only when a command runs)
DEFAULTS = {"epochs": 3, "batch_size": 32, "lr": 1e-4, "head_lr": 1e-3, "alpha": 1.0, "temperature": 2.0,
            "cache_gb": 4.0}


def add_parsers(sub, common) -> None:
    from centra.cli import positive_int

    defaults = DEFAULTS
    p = sub.add_parser("add-task", parents=[common],
                       help="train a task from its recipe or flags; or create an untrained one; or remove one")
    p.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help="folder of task folders (default: tasks)")
    p.add_argument("--name", help="the task: trains from TASKS_DIR/NAME/recipe.json unless data flags are given")
    p.add_argument("--kind", choices=["multiclass", "multilabel", "regression"])
    p.add_argument("--backbone", help="backbone folder or 'default'")
    p.add_argument("--data", help="folder that recipe data paths are relative to (default: $CENTRA_DATA or "
                   "../shared/data)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-length", type=int, help="tokens per input (default 128 or the backbone's limit)")
    p.add_argument("--pooling", choices=["mean", "cls"])
    p.add_argument("--remove", metavar="NAME", help="remove task NAME from --tasks-dir")
    g = p.add_argument_group("data (training; these flags write the task's recipe)")
    add_column_args(g)
    g.add_argument("--train", help="training file (.tsv, .csv, .jsonl)")
    g.add_argument("--dev", help="dev file, same layout: picks L, epochs, student layers")
    g.add_argument("--max-train-examples", type=positive_int, help="random subset of the training file (seeded)")
    g = p.add_argument_group("training (defaults in brackets; given flags are saved in the recipe)")
    g.add_argument("--layers", help="teacher search: trainable top layers MIN:MAX [1:5 on 6 layers]")
    g.add_argument("--search", choices=["halving", "full"], help="teacher search: successive halving (every L "
                   "one epoch, the better half goes on, resumed) or every L for all epochs [halving]")
    g.add_argument("--first-rung", type=float, metavar="EPOCHS", help="halving: epochs every L trains before the "
                   "first cut; later rungs double it. Below 1 only on large training sets [1]")
    g.add_argument("--student-layers", type=int, help="fix the student's task layers l (1-3)")
    g.add_argument("--threshold", type=float, help="mixed allocation: add a layer while it gains >= c dev "
                   "points [1.0]")
    g.add_argument("--epochs", type=int, help=f"[{defaults['epochs']}]")
    g.add_argument("--batch-size", type=int, help=f"[{defaults['batch_size']}]")
    g.add_argument("--lr", type=float, help=f"learning rate of transformer layers [{defaults['lr']}]")
    g.add_argument("--head-lr", type=float, help=f"learning rate of pooler + classifier [{defaults['head_lr']}]")
    g.add_argument("--metric", help="dev metric that picks models [accuracy, micro_f1, pearson]")
    g.add_argument("--alpha", type=float, help=f"weight of the distillation loss [{defaults['alpha']}]")
    g.add_argument("--temperature", type=float, help=f"distillation temperature F [{defaults['temperature']}]")
    g.add_argument("--teacher-logits", help="JSONL table of an external teacher's logits, one row per train row")
    g.add_argument("--reference", action="store_const", const=True,
                   help="also fine-tune the whole model (embeddings and every layer, 3 epochs), to compare")
    g.add_argument("--cache-gb", type=float, help=f"memory cap of the run's trunk caches, then disk "
                   f"[{defaults['cache_gb']}]")
    g = p.add_argument_group("untrained tasks")
    g.add_argument("--init-only", action="store_true", help="no training: copy backbone layers, fresh head")
    g.add_argument("--labels", help="comma-separated labels (regression: the value's name, default 'value')")
    g.add_argument("--input", choices=["single", "pair"], default="single")
    g.add_argument("--attach-layer", type=int, help="trunk layer k the branch reads (0 = embeddings)")
    g.add_argument("--task-layers", type=int, help="number of task layers l (copies of layers k+1..k+l)")
    p.set_defaults(func=cmd_add_task)
