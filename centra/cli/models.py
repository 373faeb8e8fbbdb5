"""Commands over merged models: merge, predict, verify, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from centra.cli import flags_named, positive_int
from centra.core import DEFAULT_TASKS_DIR, ENGINES, INT8_FP32
from centra.core.table import table
from centra.errors import CentraError

if TYPE_CHECKING:
    from centra.core.manifest import EngineInfo


def cmd_merge(args: argparse.Namespace) -> int:
    from centra.core.merge import overhead_table
    from centra.core.overhead import pass_warnings
    from centra.export.engines import merge

    out = Path(args.out)
    with flags_named("merge"):
        manifest = merge(args.tasks_dir, out, engine=args.engine, precision=args.precision,
                         calibration=args.calibration, max_batch=args.max_batch, backbone=args.backbone,
                         keep_versions=args.keep_versions, keep_fp32=args.keep_fp32,
                         int8_fp32=tuple(args.int8_fp32 or ()), candidates=candidate_args(args.candidate))
    print(f"merged {len(manifest.tasks)} tasks on {manifest.backbone.id} into {out} (version {manifest.version})")
    print(overhead_table(manifest))
    if manifest.engine is not None:
        print_engine(manifest.engine)
    for line in pass_warnings(list(manifest.trunk_passes)):
        print(f"centra: warning: {line}", file=sys.stderr)
    return 0


def candidate_args(values: list[str] | None) -> dict[str, str]:
    """--candidate TASK=FOLDER, repeatable: task name -> folder (one per task)."""
    found: dict[str, str] = {}
    for value in values or ():
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise CentraError(f"merge: --candidate expects TASK=FOLDER, not {value!r}")
        if name in found:
            raise CentraError(f"merge: --candidate names task {name!r} twice")
        found[name] = folder
    return found


def print_engine(info: EngineInfo) -> None:
    """The export's checks (and for ONNX the fusions ONNX Runtime made), as merge's last lines."""
    if info.name == "tensorrt":
        print(f"tensorrt {info.tensorrt} on {info.device}: {len(info.graphs)} {info.precision} plans, "
              f"batch 1-{info.max_batch}, sequence 1-{info.max_length}")
        for name, r in info.check["tasks"].items():
            print(f"tensorrt: {name}: label agreement with PyTorch fp32 {r['agreement']:.0%}; mean error "
                  f"{r['relative_error']:.1%} of the logit size; max |tensorrt - torch| {r['max_abs_diff']:.1e}")
        return
    parity = info.parity or {}
    reused = sum(1 for g in info.graphs if g.get("reused"))
    worst = max(parity, key=parity.get) if parity else None
    print(f"onnx: {len(info.graphs)} graphs (opset {info.opset}; {len(info.graphs) - reused} exported, {reused} "
          "reused from earlier versions), fp32 parity: max |onnx - torch| "
          + (f"{parity[worst]:.1e} ({worst}; tolerance {info.tolerance:g})" if worst else "n/a (no record)"))
    for precision, counts in info.fusions.items():
        found = ", ".join(f"{op} {n}" for op, n in counts.items()) or "none"
        print(f"onnx: {precision} graphs after ORT_ENABLE_ALL: {found}")
    if info.int8 is not None:
        floor = info.int8["min_agreement"]
        if info.int8.get("int8_fp32"):
            print(f"onnx: int8 graphs keep {', '.join(info.int8['int8_fp32'])} in fp32")
        for name, r in info.int8["tasks"].items():
            clear = "n/a" if r["decided_agreement"] is None else f"{r['decided_agreement']:.0%}"
            print(f"onnx: int8 {name}: label agreement with fp32 {r['agreement']:.0%} of {info.int8['samples']} "
                  f"samples, {clear} of the {r['decided']} answers fp32 decides clearly (floor {floor:.0%}); "
                  f"mean error {r['relative_error']:.0%} of the logit size; max |int8 - fp32| "
                  f"{r['max_abs_diff']:.1e}")


def read_inputs(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The texts (the arguments, or stdin's non-blank lines) and their --pair texts: one --pair applies to
    every text."""
    texts = args.texts
    if not texts or texts == ["-"]:
        try:
            texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        except UnicodeDecodeError:
            raise CentraError("stdin is not UTF-8 text") from None
    pairs = args.pair
    if pairs is not None and len(pairs) == 1 and len(texts) > 1:
        pairs = pairs * len(texts)
    return texts, pairs


def cmd_predict(args: argparse.Namespace) -> int:
    from centra.runtime.engine import Engine

    engine = Engine.load(Path(args.model), batch_size=args.batch_size, engine=args.engine)
    texts, pairs = read_inputs(args)
    with flags_named():
        answers = engine.predict(texts, pairs, args.task, max_labels=args.max_labels)
    for answer in answers:
        print(json.dumps(answer, ensure_ascii=False))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from centra.runtime.engine import Engine
    from centra.runtime.verify import verify

    if not args.tolerance >= 0:
        raise CentraError(f"--tolerance must be >= 0, not {args.tolerance}")
    engine = Engine.load(Path(args.model), engine=args.engine)
    checks = verify(engine)
    print(f"version {engine.version} ({engine.runtime}); reference: standalone models built from "
          f"{checks[0].reference}")
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from centra.cli.tasks import columns_from
    from centra.runtime.engine import Engine
    from centra.train.evaluate import evaluate

    columns = columns_from(args)
    engines = Engine.load_many(Path(args.model), [args.engine] + ([args.against] if args.against else []),
                               args.batch_size)  # both loaded (and refused) before any work
    result = evaluate(engines[0], args.task, Path(args.data), columns, args.label_names, args.by,
                      engines[1] if args.against else None)
    if args.by is not None:
        print(segment_table(result))
    print(json.dumps(result, ensure_ascii=False))
    return 0


def segment_table(result: dict) -> str:
    """One row per segment and one for all rows: examples, then each metric in points (x100)."""
    metrics = [k for k in next(iter(result["segments"].values())) if k != "examples"]
    rows = [(result["by"], "examples", *metrics)]
    for value, m in [*result["segments"].items(), ("(all)", result)]:
        rows.append((value, str(m["examples"]), *(f"{100 * m[k]:.2f}" for k in metrics)))
    return f"task {result['task']!r} by {result['by']!r} (metrics x100)\n" + table(rows, right=range(1, len(rows[0])))


def add_engine_arg(p) -> None:
    p.add_argument("--engine", choices=ENGINES, help="runtime to run the model with (default: the one the model "
                   "was merged for; torch always works)")


def add_input_args(p) -> None:
    """The inputs of predict and classify: --task, --pair and the texts."""
    p.add_argument("--task", action="append", help="task to run (repeatable; default: all that fit the input)")
    p.add_argument("--pair", action="append", help="second text of a pair (once, or once per text)")
    p.add_argument("texts", nargs="*", help="texts to classify ('-' or none: one per line on stdin)")


def add_parsers(sub, common) -> None:
    from centra.cli.tasks import add_column_args

    p = sub.add_parser("merge", parents=[common], help="validate task folders and publish one merged model")
    p.add_argument("--tasks-dir", action="append", help=f"folder of task folders (repeatable; default: "
                   f"{DEFAULT_TASKS_DIR})")
    p.add_argument("--out", required=True, help="merged model folder: each merge publishes a new version in it")
    p.add_argument("--backbone", help="backbone folder, 'default' or a name of `centra backbone list` "
                   "(default: the one the tasks name)")
    p.add_argument("--keep-versions", type=positive_int, default=3, help="versions kept in OUT (default 3)")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="runtime the version is served with by default: torch, onnx (ONNX graphs exported and "
                   "checked against torch) or tensorrt (plans built on this machine's GPU); the torch files are "
                   "always kept")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="onnx: fp32 (default) or int8 (dynamic quantization, checked by label agreement); tensorrt: "
                   "fp16 (default), fp32 or int8 (QDQ calibrated on --calibration)")
    p.add_argument("--keep-fp32", action="store_true", help="onnx int8: keep the fp32 graphs in the version too "
                   "(by default it holds the int8 graphs it serves and the torch files)")
    p.add_argument("--int8-fp32", action="append", choices=INT8_FP32, metavar="GROUP",
                   help="onnx int8: keep a group of nodes in fp32 (repeatable; default none): ffn-out, each layer's "
                   "FFN output projection; recovers most of int8's accuracy loss, at a cost in speed")
    p.add_argument("--calibration", help="tensorrt int8: texts to calibrate on, one per line (text<TAB>second text "
                   "for pair tasks; default: verify's samples; give a few hundred dev texts)")
    p.add_argument("--max-batch", type=positive_int, help="tensorrt: the largest batch of the plans' profile "
                   "(default 64; larger batches run in slices)")
    p.add_argument("--candidate", action="append", metavar="TASK=FOLDER",
                   help="publish FOLDER (a trained folder of the same task: same kind, labels and inputs; any "
                   "attach layer or depth) as TASK's candidate head beside its active one: served in shadow "
                   "(compared on live traffic) or as a canary (repeatable, once per task)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("predict", parents=[common],
                       help="classify texts with a merged model, one JSON line per text and task")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_engine_arg(p)
    add_input_args(p)
    p.add_argument("--max-labels", type=positive_int, help="multilabel tasks: at most this many labels per text, "
                   "the highest-scoring (never more than the task's own max_labels)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("verify", parents=[common], help="check merged outputs against each task's standalone model")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |difference| of logits "
                   "(default 1e-5)")
    add_engine_arg(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("evaluate", parents=[common], help="dev metrics of one task of a merged model on a file "
                       "(--by COLUMN: per segment)")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, help="labelled file (.tsv, .csv, .jsonl)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--by", metavar="COLUMN", help="also break the metrics down by the values of this column "
                   "(language, channel, product): a table, then the JSON line")
    add_engine_arg(p)
    p.add_argument("--against", choices=ENGINES, help="also run another engine of the same version on the data and "
                   "report its metrics, the share of answers alike and the metric deltas (e.g. --engine onnx "
                   "against torch for int8)")
    add_column_args(p)
    p.set_defaults(func=cmd_evaluate)
