"""`centra` command line: add-task, plan, merge, predict, verify, evaluate, demo, results.

Every command is a thin wrapper over package functions. Options are checked before any compute.
Bad input prints one line (`centra: error: ...`) and exits 2; `--debug` adds the traceback. Only
this layer imports every other one, and nothing imports it.
"""

from __future__ import annotations

import signal
import sys

if sys.argv[1:2] == ["serve"] and sys.platform != "win32":
    # `centra serve` handles SIGHUP (reload) once its loop runs; until then (imports, loading) a SIGHUP
    # must not kill it, so it is ignored from the first line centra runs (serve/app.py takes over)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import argparse
import math
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from centra.errors import CentraError, FieldError


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as one-line CentraErrors (no usage block)."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        raise CentraError(f"{command}: {message}" if command else message)


def number_type(kind: type, low: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a whole number (`kind` int) or a finite number (float) above `low`, or at least
    `low` when `inclusive`."""
    what, finite = ("a whole number", "") if kind is int else ("a number", "a finite number ")

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not (math.isfinite(number) and (number >= low if inclusive else number > low)):
            shown = number if kind is int else value
            raise argparse.ArgumentTypeError(f"must be {finite}{'>=' if inclusive else '>'} {low:g}, got {shown}")
        return number

    return parse


positive_int = number_type(int, 1, inclusive=True)
non_negative_int = number_type(int, 0, inclusive=True)
positive_float = number_type(float, 0.0)
non_negative_float = number_type(float, 0.0, inclusive=True)


# the fields whose flag is not --FIELD
FIELD_FLAGS = {"pairs": "--pair", "batches": "--batch", "cors_origins": "--cors-origin"}


def field_flag(name: str) -> str:
    """The flag that sets a library function's field: max_batch -> --max-batch."""
    return FIELD_FLAGS.get(name) or "--" + name.replace("_", "-")


@contextmanager
def flags_named(command: str = "") -> Iterator[None]:
    """Library refusals (FieldErrors, which name fields) raised inside re-raised with each field written as
    the flag that sets it, prefixed with the command: `with flags_named("merge"): merge(...)`."""
    try:
        yield
    except FieldError as exc:
        message = exc.named(field_flag)
        raise CentraError(f"{command}: {message}" if command and not message.startswith(f"{command}:")
                          else message) from None


def build_parser() -> argparse.ArgumentParser:
    from centra.cli import (
        backbones,
        bench,
        bench_scale,
        bench_server,
        demo,
        languages,
        models,
        plan,
        results,
        serve,
        shadow,
        soak,
        tasks,
        triton,
    )

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
    shadow.add_parsers(sub, common)
    bench_server.add_parsers(sub, common)
    soak.add_parsers(sub, common)
    bench.add_parsers(sub, common)
    bench_scale.add_parsers(sub, common)
    triton.add_parsers(sub, common)
    backbones.add_parsers(sub, common)
    languages.add_parser(sub, common)
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
