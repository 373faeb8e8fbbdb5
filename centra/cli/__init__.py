"""`centra` command line: add-task, plan, merge, predict, verify, evaluate, demo, results.

Every command is a thin wrapper over package functions. Options are checked before any compute.
Bad input prints one line (`centra: error: ...`) and exits 2; `--debug` adds the traceback. Only
this layer imports every other one, and nothing imports it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

from centra.errors import CentraError


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as one-line CentraErrors (no usage block)."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        raise CentraError(f"{command}: {message}" if command else message)


def save_figure(fig, path) -> None:
    """A matplotlib figure written as PNG through a temp file and a rename, so a killed run never leaves
    a half-written plot under the name asked for; the figure is closed either way."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(str(staged), dpi=120, format="png")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
        plt.close(fig)


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    from centra.cli import bench, bench_server, demo, models, plan, results, serve, soak, tasks, triton

    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = Parser(prog="centra", description="Serve many BERT-family classifiers that share one frozen encoder.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    tasks.add_parsers(sub, common)
    plan.add_parsers(sub, common)
    models.add_parsers(sub, common)
    demo.add_parser(sub, common)
    results.add_parser(sub, common)
    serve.add_parsers(sub, common)
    bench_server.add_parsers(sub, common)
    soak.add_parsers(sub, common)
    bench.add_parsers(sub, common)
    triton.add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CentraError as exc:
        return _fail(str(exc), debug, 2)
    except OSError as exc:  # an unwritable folder, a full disk: the user's to fix, so one line too
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return _fail(f"{where}{exc.strerror or exc}", debug, 2)
    except KeyboardInterrupt:
        print("centra: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _fail(f"internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback",
                     debug, 1)


def _fail(message: str, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exc()
    print(f"centra: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
