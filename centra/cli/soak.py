"""`centra soak`: a bounded soak of `centra serve` on loopback (clients, bad input, re-merges, SIGHUPs).

The work is centra.serve.soak's; this module checks the options, picks the re-merge's engine step (ONNX
graphs for a model served by ONNX Runtime), prints the figures (the last line: one JSON object), and exits
1 when an answer was wrong or a status code unexpected.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import flags_named
from centra.errors import CentraError


def merge_extend(model: Path, engine: str | None):
    """write_merged's `extend` for the soak's re-merges: ONNX graphs when the versions are served by ONNX
    Runtime (by --engine onnx, or by the model's manifest), else none."""
    from centra.core.versions import model_folder, read_manifest

    info = read_manifest(model_folder(model)).engine
    name = engine or (info.name if info is not None else "torch")
    if name == "torch":
        return None
    if name != "onnx":
        raise CentraError(f"soak: the model is served by {name!r}; soak runs --engine torch or onnx")
    from centra.export.engines import extender

    return extender("onnx", info.precision if info is not None else None, progress=False)


def cmd_soak(args: argparse.Namespace) -> int:
    from centra.progress import progress_line
    from centra.serve.soak import SoakOptions, run_soak

    options = SoakOptions(minutes=args.minutes, clients=args.clients, seed=args.seed, engine=args.engine)
    with flags_named("soak"):
        options.check()
    extend = merge_extend(Path(args.model), args.engine)

    def progress(line: str) -> None:
        progress_line(f"soak: {line}", enabled=not args.json_only)

    figures = run_soak(Path(args.model), options, extend, progress)
    if not args.json_only:
        print_figures(figures)
    print(json.dumps(figures, ensure_ascii=False))
    return 0 if figures["ok"] else 1


def print_figures(f: dict) -> None:
    print(f"{f['calls']:,} calls in {f['seconds']:g} s by {f['clients']} clients (seed {f['seed']}, engine "
          f"{f['engine']})")
    for name, entry in f["classes"].items():
        codes = ", ".join(f"{code} {count:,}" for code, count in sorted(entry["codes"].items()))
        print(f"  {name:<16} {entry['calls']:>7,}  {codes}")
    print(f"answers checked against in-process predict: {f['checked']:,}; wrong: {f['wrong_answers']}")
    for line in f["wrong_examples"]:
        print(f"  wrong: {line}")
    print(f"unexpected codes: {f['unexpected_codes']}; busy (RESOURCE_EXHAUSTED): {f['busy']}; NOT_FOUND for a "
          f"task a re-merge removed: {f['stale_not_found']}")
    for line in f["unexpected_examples"]:
        print(f"  unexpected: {line}")
    print(f"actions: {', '.join(f'{k} {v}' for k, v in f['actions'].items())}; server reloads: {f['reloads']['ok']} "
          f"ok, {f['reloads']['failed']} refused; versions answered: {len(f['versions_answered'])}")
    rss = f["rss_mb"]
    if rss.get("start") is not None:
        print(f"server RSS: start {rss['start']:.0f} MB (after {f['rss_warmup_s']:g} s), peak {rss['peak']:.0f} MB, "
              f"end {rss['end']:.0f} MB: drift {f['rss_drift_pct']:+.1f}%; least in the first and last windows "
              f"{rss['floor_first']:.0f} and {rss['floor_last']:.0f} MB: drift {f['rss_floor_drift_pct']:+.1f}%")
    print(f"server exit on SIGTERM: {f['server_exit_code']}; {'OK' if f['ok'] else 'FAILED'}")


def add_parsers(sub, common) -> None:
    from centra.cli import positive_float, positive_int

    p = sub.add_parser("soak", parents=[common],
                       help="run `centra serve` under mixed good and bad calls, re-merges and SIGHUPs for N minutes")
    p.add_argument("--model", required=True, help="merged model folder (copied; never changed)")
    p.add_argument("--minutes", type=positive_float, required=True, help="how long to run")
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calls and actions (default 0)")
    p.add_argument("--engine", choices=("torch", "onnx"),
                   help="runtime of the server and the reference (default: the one each version's manifest names)")
    p.add_argument("--json-only", action="store_true", help="print only the JSON line (no progress, no table)")
    p.set_defaults(func=cmd_soak)
