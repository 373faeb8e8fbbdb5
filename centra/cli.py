"""`centra` command line: merge, predict, verify, add-task, demo.

Every command is a thin wrapper over a package function. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from centra.errors import CentraError


def cmd_merge(args: argparse.Namespace) -> int:
    from centra.merge import overhead_table, plan_merge, write_merged

    plan = plan_merge([Path(d) for d in args.tasks_dir], args.backbone)
    manifest = write_merged(plan, Path(args.out))
    print(f"merged {len(manifest['tasks'])} tasks on {manifest['backbone']['id']} into {args.out}")
    print(overhead_table(manifest))
    lengths = {(t["input"], t["max_length"]) for t in manifest["tasks"]}
    if len(lengths) > len({i for i, _ in lengths}):
        print("note: tasks use different max_length values; the trunk runs once per distinct "
              "(input, max_length)", file=sys.stderr)
    return 0


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts and args.texts != ["-"]:
        return args.texts
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def cmd_predict(args: argparse.Namespace) -> int:
    from centra.engine import Engine

    engine = Engine.load(Path(args.model), batch_size=args.batch_size)
    texts = read_texts(args)
    pairs = args.pair
    if pairs is not None and len(pairs) == 1 and len(texts) > 1:
        pairs = pairs * len(texts)  # one --pair applies to every text
    for answer in engine.predict(texts, pairs, args.task):
        print(json.dumps(answer, ensure_ascii=False))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from centra.engine import Engine
    from centra.verify import verify

    engine = Engine.load(Path(args.model))
    checks = verify(engine)
    print(f"reference: standalone models built from {checks[0].reference}")
    worst = 0.0
    for check in checks:
        verdict = "ok" if check.ok(args.tolerance) else "FAIL"
        print(f"{check.name:<24} max |merged - standalone| = {check.max_abs_diff:.3e}  {verdict}")
        worst = max(worst, check.max_abs_diff)
    if worst > args.tolerance:
        print(f"centra: error: merged outputs differ from standalone by {worst:.3e} > {args.tolerance:g}",
              file=sys.stderr)
        return 1
    print(f"all {len(checks)} tasks within {args.tolerance:g}")
    return 0


def cmd_add_task(args: argparse.Namespace) -> int:

    tasks_dir = Path(args.tasks_dir)
    if args.remove:
        from centra.fsutil import remove_dir
        from centra.task import NAME_RE

        folder = tasks_dir / args.remove
        if not NAME_RE.match(args.remove) or not folder.is_dir():
            raise CentraError(f"{folder}: no such task")
        remove_dir(folder)
        print(f"removed task {args.remove!r} from {tasks_dir}")
        return 0
    missing = [flag for flag, value in (("--name", args.name), ("--kind", args.kind)) if value is None]
    if missing:
        raise CentraError(f"add-task needs {' and '.join(missing)}")
    if args.init_only:
        return _add_untrained(args, tasks_dir)
    return _add_trained(args, tasks_dir)


def _add_untrained(args: argparse.Namespace, tasks_dir: Path) -> int:
    from centra.backbone import Backbone
    from centra.task import init_task, save_task

    if args.attach_layer is None or args.task_layers is None:
        raise CentraError("--init-only needs --attach-layer and --task-layers")
    labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    backbone = Backbone.load(args.backbone)
    spec, head = init_task(backbone, args.name, args.kind, labels, args.attach_layer, args.task_layers,
                           input=args.input, max_length=args.max_length, pooling=args.pooling, seed=args.seed)
    save_task(tasks_dir / args.name, spec, head)
    print(f"wrote untrained task {args.name!r} ({args.kind}, attach layer {args.attach_layer}, "
          f"{args.task_layers} task layers) to {tasks_dir / args.name}")
    return 0


def parse_range(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        lo, _, hi = value.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise CentraError(f"--layers {value!r}: expected MIN:MAX, e.g. 1:5") from None


def columns_from(args: argparse.Namespace):
    from centra.data import Columns

    if not args.text_column or not args.label_column:
        raise CentraError("training needs --text-column and --label-column")
    return Columns(text=args.text_column, labels=args.label_column, pair=args.pair_column,
                   header=args.header, label_delimiter=args.label_delimiter)


def _add_trained(args: argparse.Namespace, tasks_dir: Path) -> int:
    from centra.backbone import Backbone
    from centra.data import parse_label_names
    from centra.finetune import TrainConfig
    from centra.pipeline import TaskJob, train_task
    from centra.task import NAME_RE

    if not args.train or not args.dev:
        raise CentraError("add-task needs --train and --dev files (or --init-only for an untrained task)")
    if not NAME_RE.match(args.name):
        raise CentraError(f"task name {args.name!r} must be 1-64 letters, digits, '_' or '-'")
    if args.student_layers is not None and args.threshold is not None:
        raise CentraError("give --student-layers or --threshold, not both")
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                     seed=args.seed, metric=args.metric, alpha=args.alpha, temperature=args.temperature)
    job = TaskJob(name=args.name, kind=args.kind, train=Path(args.train), dev=Path(args.dev),
                  columns=columns_from(args), label_names=parse_label_names(args.label_names),
                  layers=parse_range(args.layers), student_layers=args.student_layers,
                  threshold=1.0 if args.threshold is None else args.threshold, reference=args.reference,
                  teacher_logits=Path(args.teacher_logits) if args.teacher_logits else None,
                  attach_layer=args.attach_layer, max_train_examples=args.max_train_examples,
                  max_length=args.max_length, pooling=args.pooling, cache_gb=args.cache_gb, train_config=tc)
    report, _ = train_task(job, Backbone.load(args.backbone), tasks_dir)
    print(summarize(report))
    return 0


def summarize(report: dict) -> str:
    metric = report["metric"]
    lines = [f"task {report['task']!r}: {report['train_examples']} train / {report['dev_examples']} dev examples, "
             f"dev {metric} (x100)"]
    if "reference" in report:
        lines.append(f"  full fine-tuning ({report['reference']['layers']} layers): "
                     f"{100 * report['reference']['dev'][metric]:.2f}")
    for t in report["teachers"]:
        if "trainable_layers" in t:
            mark = "  <- teacher" if t["chosen"] else ""
            lines.append(f"  teacher L={t['trainable_layers']} (attach {t['attach_layer']}): "
                         f"{100 * t['dev'][metric]:.2f}{mark}")
    for s in report["students"]:
        lines.append(f"  student l={s['task_layers']}: {100 * s['dev'][metric]:.2f}")
    c = report["chosen"]
    lines.append(f"chosen: attach layer {c['attach_layer']}, {c['task_layers']} task layers, overhead "
                 f"{c['overhead']} layers, dev {metric} {100 * c[metric]:.2f}")
    cache = report["cache"]
    lines.append(f"trunk cache: {cache['seconds']:.1f} s, {cache['bytes'] / 2**20:.0f} MiB; recomputing the "
                 f"frozen layers every epoch would have cost ~{cache['estimated_seconds_without_cache']:.1f} s")
    lines.append("wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from centra.data import load_examples, parse_label_names
    from centra.engine import Engine
    from centra.metrics import compute

    engine = Engine.load(Path(args.model), batch_size=args.batch_size)
    if args.task not in engine.specs:
        raise CentraError(f"unknown task {args.task!r} (known: {', '.join(sorted(engine.specs))})")
    spec = engine.specs[args.task]
    labels = None if spec.kind == "regression" else spec.labels
    examples, _ = load_examples(Path(args.data), spec.kind, columns_from(args), labels=labels,
                                label_names=parse_label_names(args.label_names))
    logits = engine.logits(examples.texts, examples.pairs, [args.task])[args.task].numpy()
    scores = compute(spec.kind, logits, examples.targets, spec.thresholds)
    print(json.dumps({"task": args.task, "examples": len(examples), **{k: round(v, 6) for k, v in scores.items()}}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from centra.demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None, Path(args.data) if args.data else None,
                    args.untrained)


def add_column_args(p) -> None:
    p.add_argument("--text-column", help="column (header name or 0-based index) of the text")
    p.add_argument("--pair-column", help="column of the second text: makes a text-pair task")
    p.add_argument("--label-column", action="append", help="label column (repeat: several 0/1 multilabel columns)")
    p.add_argument("--label-names", help="names for integer label ids: a,b,c or @file (one per line)")
    p.add_argument("--label-delimiter", default=",", help="separator of a multilabel list in one column")
    p.add_argument("--header", choices=["auto", "yes", "no"], default="auto",
                   help="auto: a header when a column is named, else sniffed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="centra", description="Serve many BERT-family classifiers "
                                     "that share one frozen encoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="validate task folders and build one merged model folder")
    p.add_argument("--tasks-dir", action="append", required=True, help="folder of task folders (repeatable)")
    p.add_argument("--out", required=True, help="merged model folder to write (replaced atomically)")
    p.add_argument("--backbone", help="backbone folder or 'default' (default: the one the tasks name)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("predict", help="classify texts with a merged model, one JSON line per text and task")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--task", action="append", help="task to run (repeatable; default: all that fit the input)")
    p.add_argument("--pair", action="append", help="second text of a pair (once, or once per text)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("texts", nargs="*", help="texts to classify ('-' or none: one per line on stdin)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("verify", help="check merged outputs against each task's standalone model")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |difference| of logits")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("add-task", help="train (or create untrained, or remove) one task folder")
    p.add_argument("--tasks-dir", required=True)
    p.add_argument("--name")
    p.add_argument("--kind", choices=["multiclass", "multilabel", "regression"])
    p.add_argument("--backbone", help="backbone folder or 'default'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, help="tokens per input (default 128 or the backbone's limit)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--remove", metavar="NAME", help="remove task NAME from --tasks-dir")
    g = p.add_argument_group("data (training)")
    add_column_args(g)
    g.add_argument("--train", help="training file (.tsv, .csv, .jsonl)")
    g.add_argument("--dev", help="dev file, same layout: picks L, epochs, student layers")
    g.add_argument("--max-train-examples", type=int, help="random subset of the training file (seeded)")
    g = p.add_argument_group("training")
    g.add_argument("--layers", help="teacher search: trainable top layers MIN:MAX (default 1:5 on 6 layers)")
    g.add_argument("--student-layers", type=int, help="fix the student's task layers l (1-3)")
    g.add_argument("--threshold", type=float, help="mixed allocation: add a layer while it gains >= c dev "
                   "points (default 1.0)")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate of transformer layers")
    g.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of pooler + classifier")
    g.add_argument("--metric", help="dev metric that picks models (default: accuracy, micro_f1, pearson)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the distillation loss")
    g.add_argument("--temperature", type=float, default=2.0, help="distillation temperature F")
    g.add_argument("--teacher-logits", help="JSONL table of an external teacher's logits, one row per train row")
    g.add_argument("--reference", action="store_true", help="also fine-tune all layers, for comparison")
    g.add_argument("--cache-gb", type=float, default=4.0, help="memory cap of the trunk cache (then disk)")
    g = p.add_argument_group("untrained tasks")
    g.add_argument("--init-only", action="store_true", help="no training: copy backbone layers, fresh head")
    g.add_argument("--labels", help="comma-separated labels (regression: the value's name, default 'value')")
    g.add_argument("--input", choices=["single", "pair"], default="single")
    g.add_argument("--attach-layer", type=int, help="trunk layer k the branch reads (0 = embeddings)")
    g.add_argument("--task-layers", type=int, help="number of task layers l (copies of layers k+1..k+l)")
    p.set_defaults(func=cmd_add_task)

    p = sub.add_parser("evaluate", help="dev metrics of one task of a merged model on a labelled file")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, help="labelled file (.tsv, .csv, .jsonl)")
    p.add_argument("--batch-size", type=int, default=64)
    add_column_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="merge several tasks on the default backbone and classify texts")
    p.add_argument("--workdir", help="where to write tasks/ and merged/ (default: a temp folder); trained "
                   "tasks found there are reused")
    p.add_argument("--data", help="data folder holding glue/ (default: $CENTRA_DATA or "
                   "../shared/data)")
    p.add_argument("--untrained", action="store_true", help="skip training: --init-only tasks")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CentraError as exc:
        print(f"centra: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("centra: interrupted", file=sys.stderr)
        return 130


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
