"""`centra add-task`: train a task from its recipe (or from flags, which write the recipe), create an
untrained one, or remove one. The training flags are the settings declared in centra.train.settings,
one flag per field; training itself is centra.train.recipe.add_task."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from centra.core import DEFAULT_TASKS_DIR, INPUTS, KINDS
from centra.errors import CentraError

if TYPE_CHECKING:
    from centra.train.report import Thresholds, TrainingReport

# add-task flags that say what a new recipe trains on (centra.train.recipe.recipe_from_settings)
DATA_FLAGS = ("kind", "train", "dev", "text_column", "pair_column", "label_column", "label_names", "header",
              "label_delimiter")


def columns_from(args: argparse.Namespace):
    """The --text-column, --pair-column, --label-column... flags as data columns (evaluate reads them too)."""
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


INIT_SETTINGS = ("seed", "max_length", "pooling", "max_labels", "attach_layer")  # what an untrained task takes


def _add_untrained(args: argparse.Namespace, tasks_dir: Path) -> int:
    from centra.core.backbone import Backbone
    from centra.core.task import init_task, save_task
    from centra.publish import check_writable_parent

    if args.kind is None or args.attach_layer is None or args.task_layers is None:
        raise CentraError("--init-only needs --kind, --attach-layer and --task-layers")
    from centra.train.settings import DECLARED, flag_of

    ignored = [flag_of(d.name) for d in DECLARED if d.name not in INIT_SETTINGS and getattr(args, d.name) is not None]
    if ignored:  # said, not silently dropped
        raise CentraError(f"--init-only trains nothing: {', '.join(ignored)} would have no effect")
    check_writable_parent(tasks_dir / args.name)
    labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    backbone = Backbone.load(args.backbone)
    spec, head = init_task(backbone, args.name, args.kind, labels, args.attach_layer, args.task_layers,
                           input=args.input, max_length=args.max_length, pooling=args.pooling or "mean",
                           seed=args.seed or 0)
    if args.max_labels is not None:
        spec = replace(spec, max_labels=args.max_labels)
        spec.validate("--max-labels")
    save_task(tasks_dir / args.name, spec, head)
    print(f"wrote untrained task {args.name!r} ({args.kind}, attach layer {args.attach_layer}, "
          f"{args.task_layers} task layers) to {tasks_dir / args.name}")
    return 0


def _add_trained(args: argparse.Namespace, tasks_dir: Path) -> int:
    from centra.train.recipe import add_task
    from centra.train.settings import DECLARED, SettingError, flag_of

    data = {k: getattr(args, k) for k in DATA_FLAGS if getattr(args, k) is not None}
    given = {d.name: getattr(args, d.name) for d in DECLARED}
    try:
        report, _ = add_task(tasks_dir, args.name, data=data or None, given=given, backbone=args.backbone,
                             root=Path(args.data) if args.data else None)
    except SettingError as exc:  # it names settings by field: say the flags that set them
        raise CentraError(exc.named(flag_of)) from None
    print(summarize(report))
    return 0


def summarize(report: TrainingReport) -> str:
    metric = report.metric

    def score(dev: dict) -> str:  # a multilabel branch is chosen at its tuned thresholds: show both
        return f"{100 * dev[metric]:.2f}" + (f" ({100 * dev['tuned'][metric]:.2f} tuned)" if "tuned" in dev else "")

    lines = [f"task {report.task!r}: {report.train_examples} train / {report.dev_examples} dev examples, "
             f"dev {metric} (x100)"]
    ref = report.reference
    if ref is not None:
        epochs = ref.epochs_setting if ref.epochs_setting is not None else len(ref.log.epochs)
        lines.append(f"  full fine-tuning ({ref.layers} layers{' and embeddings' if ref.embeddings else ''}, "
                     f"{epochs} epochs): {100 * ref.log.dev[metric]:.2f}{tuned_note(ref.thresholds)}")
    for t in report.teachers:
        if t.log is not None:
            mark = "  <- teacher" if t.chosen else ""
            trained = round(t.log.epochs_trained, 2)
            lines.append(f"  teacher L={t.trainable_layers} (attach {t.attach_layer}): {score(t.log.dev)} "
                         f"({trained:g} epoch{'s' if trained != 1 else ''}){mark}")
    for s in report.students:
        joint = f" (exit of a joint student of {s.log.joint} layers)" if s.log.joint else ""
        lines.append(f"  student l={s.task_layers}: {score(s.log.dev)}{joint}")
    if report.search is not None:
        s = report.search
        lines.append(f"teacher search ({s.method}): {round(s.epochs_trained, 2):g} epochs of {s.epochs_full_search} "
                     f"({round(s.layer_epochs, 2):g} of {s.layer_epochs_full_search} layer-epochs), {s.seconds:.1f} s"
                     + (f", {s.per_reference:.2f}x the full fine-tuning" if s.per_reference is not None else ""))
    c = report.chosen
    lines.append(f"chosen: attach layer {c.attach_layer}, {c.task_layers} task layers, "
                 f"dev {metric} {100 * c.scores[metric]:.2f}{tuned_note(report.thresholds)}")
    if report.candidates:
        lines.append(f"kept for `centra plan`: {', '.join(k.id for k in report.candidates)}")
    cache = report.cache
    lines.append(f"trunk cache: {cache.seconds:.1f} s, {cache.nbytes / 2**20:.0f} MiB; recomputing the frozen "
                 f"layers every epoch would have cost ~{cache.estimated_seconds_without_cache:.1f} s")
    lines.append("wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    return "\n".join(lines)


def tuned_note(thresholds: Thresholds | None) -> str:
    """'; thresholds tuned on dev, held out: micro_f1 a -> b, macro_f1 c -> d; labels per text p (gold g)'
    for a multilabel run, else ''."""
    if thresholds is None:
        return ""
    tail = thresholds.tail()
    limit = f"; at most {thresholds.max_labels} labels per text" + (
        " (from the training labels; --max-labels sets another)" if thresholds.max_labels_from == "data" else "") \
        if thresholds.max_labels else ""
    labels = (f"; {tail}" if tail else "") + limit
    return "; thresholds tuned on dev, held out: " + ", ".join(
        f"{m} {100 * v:.2f} -> {100 * thresholds.tuned[m]:.2f}" for m, v in thresholds.at_half.items()) + labels


def add_column_args(p) -> None:
    p.add_argument("--text-column", help="column (header name or 0-based index) of the text")
    p.add_argument("--pair-column", help="column of the second text: makes a text-pair task")
    p.add_argument("--label-column", action="append", help="label column (repeat: several 0/1 multilabel columns)")
    p.add_argument("--label-names", help="names for integer label ids: a,b,c or @file (one per line)")
    p.add_argument("--label-delimiter", help="separator of a multilabel list in one column (default ',')")
    p.add_argument("--header", choices=["auto", "yes", "no"],
                   help="auto (default): a header when a column is named, else sniffed")


def add_setting_flags(group) -> None:
    """One flag per declared training setting: its type, choices, help and default from the field."""
    from centra.train.settings import DECLARED

    for d in DECLARED:
        shown = f" [{d.default_text}]" if d.default_text else ""
        how = {"action": "store_const", "const": True} if d.type is bool else \
            {"type": d.type, "choices": d.choices, "metavar": d.metavar}
        group.add_argument(d.flag, dest=d.name, help=flag_help(d.help + shown), **how)


def flag_help(text: str) -> str:
    """A help text as argparse takes it: it formats help with %, so a literal one (a "99%") is doubled."""
    return text.replace("%", "%%")


def add_parsers(sub, common) -> None:
    p = sub.add_parser("add-task", parents=[common],
                       help="train a task from its recipe or flags; or create an untrained one; or remove one")
    p.add_argument("--tasks-dir", default=DEFAULT_TASKS_DIR, help=f"folder of task folders (default: "
                   f"{DEFAULT_TASKS_DIR})")
    p.add_argument("--name", help="the task: trains from TASKS_DIR/NAME/recipe.json unless data flags are given")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--backbone", help="backbone folder, 'default' or a name of `centra backbone list`")
    p.add_argument("--data", help="folder that recipe data paths are relative to (default: $CENTRA_DATA or "
                   "../shared/data)")
    p.add_argument("--remove", metavar="NAME", help="remove task NAME from --tasks-dir")
    g = p.add_argument_group("data (training; these flags write the task's recipe)")
    add_column_args(g)
    g.add_argument("--train", help="training file (.tsv, .csv, .jsonl)")
    g.add_argument("--dev", help="dev file, same layout: picks L, epochs, student layers")
    add_setting_flags(p.add_argument_group("training settings (defaults in brackets; given flags are saved in "
                                           "the recipe)"))
    g = p.add_argument_group("untrained tasks (also --attach-layer, --max-length, --pooling, --seed)")
    g.add_argument("--init-only", action="store_true", help="no training: copy backbone layers, fresh head")
    g.add_argument("--labels", help="comma-separated labels (regression: the value's name, default 'value')")
    g.add_argument("--input", choices=INPUTS, default="single")
    g.add_argument("--task-layers", type=int, help="number of task layers l (copies of layers k+1..k+l)")
    p.set_defaults(func=cmd_add_task)
