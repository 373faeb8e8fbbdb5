"""`centra soak`: a bounded soak of `centra serve` on loopback (clients through every door, bad input, slow
connections, re-merges, SIGHUPs).

The work is centra.measure.soak's; this module checks the options, prints the figures (the last line: one
JSON object), and exits 1 when an answer was wrong or a status code unexpected.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import flags_named


def cmd_soak(args: argparse.Namespace) -> int:
    from centra.measure.soak import SoakOptions, run_soak
    from centra.progress import progress_line

    options = SoakOptions(minutes=args.minutes, clients=args.clients, seed=args.seed, engine=args.engine)
    with flags_named("soak"):
        options.check()

    def progress(line: str) -> None:
        progress_line(f"soak: {line}", enabled=not args.json_only)

    figures = run_soak(Path(args.model), options, progress)
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
    for door, entry in f["doors"].items():
        print(f"  door {door:<9} {entry['calls']:>7,} calls; {entry['checked']:,} answers checked, {entry['wrong']} "
              f"wrong, {entry['ambiguous']} ambiguous; {entry['unexpected_codes']} unexpected codes")
    slow = f["slow_connections"]
    print(f"slow connections: heads {slow['heads']['opened']} opened, {slow['heads']['closed_by_server']} closed by "
          f"the server; bodies {slow['bodies']['opened']} opened, {slow['bodies']['closed_by_server']} closed "
          f"(answered {slow['answered'] or 'nothing'})")
    print(f"answers checked against in-process predict: {f['checked']:,}; wrong: {f['wrong_answers']}; by a version "
          f"name of several contents, none loaded agreeing (unchecked): {f['ambiguous_unchecked']}")
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
                       help="run `centra serve` under mixed good and bad calls through every door, slow connections, "
                            "re-merges and SIGHUPs for N minutes")
    p.add_argument("--model", required=True, help="merged model folder (copied; never changed)")
    p.add_argument("--minutes", type=positive_float, required=True, help="how long to run")
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calls and actions (default 0)")
    p.add_argument("--engine", choices=("torch", "onnx"),
                   help="runtime of the server and the reference (default: the one each version's manifest names)")
    p.add_argument("--json-only", action="store_true", help="print only the JSON line (no progress, no table)")
    p.set_defaults(func=cmd_soak)
