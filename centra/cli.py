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
    from centra.task import init_task, save_task

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
    if not args.init_only:
        raise CentraError("training a task needs the training pipeline; use --init-only for an untrained "
                          "task built from the backbone's layers")
    if args.attach_layer is None or args.task_layers is None:
        raise CentraError("--init-only needs --attach-layer and --task-layers")
    from centra.backbone import Backbone

    labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    backbone = Backbone.load(args.backbone)
    spec, head = init_task(backbone, args.name, args.kind, labels, args.attach_layer, args.task_layers,
                           input=args.input, max_length=args.max_length, pooling=args.pooling, seed=args.seed)
    save_task(tasks_dir / args.name, spec, head)
    print(f"wrote untrained task {args.name!r} ({args.kind}, attach layer {args.attach_layer}, "
          f"{args.task_layers} task layers) to {tasks_dir / args.name}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from centra.demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None)


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

    p = sub.add_parser("add-task", help="create (or remove) a task folder")
    p.add_argument("--tasks-dir", required=True)
    p.add_argument("--name")
    p.add_argument("--kind", choices=["multiclass", "multilabel", "regression"])
    p.add_argument("--labels", help="comma-separated labels (regression: the value's name, default 'value')")
    p.add_argument("--input", choices=["single", "pair"], default="single")
    p.add_argument("--init-only", action="store_true", help="no training: copy backbone layers, fresh head")
    p.add_argument("--attach-layer", type=int, help="trunk layer k the branch reads (0 = embeddings)")
    p.add_argument("--task-layers", type=int, help="number of task layers l (copies of layers k+1..k+l)")
    p.add_argument("--max-length", type=int, help="tokens per input (default 128 or the backbone's limit)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--backbone", help="backbone folder or 'default'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remove", metavar="NAME", help="remove task NAME from --tasks-dir")
    p.set_defaults(func=cmd_add_task)

    p = sub.add_parser("demo", help="merge several tasks on the default backbone and classify texts")
    p.add_argument("--workdir", help="where to write tasks/ and merged/ (default: a temp folder)")
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
