"""One-line errors for every command-line tool of unirep (train, evaluate, predict,
experiments, models).

A bad argument, a missing or unreadable file, a corrupt checkpoint: the tool prints one
line, ``error: <what>: <why>``, on stderr and exits with status 2, instead of a traceback.
``--debug`` (any tool) or ``UNIREP_DEBUG=1`` shows the full traceback instead. An error of
a kind not listed in :func:`describe` is a bug, and keeps its traceback.

Each tool builds its parser with :class:`ArgumentParser` and runs as
``sys.exit(run(main))``; ``main(argv)`` itself raises as before, for callers in Python.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

EXIT_USAGE = 2  # what argparse uses for a bad command line: one status for every bad input
DEBUG_FLAG = "--debug"
DEBUG_ENV = "UNIREP_DEBUG"


class CLIError(Exception):
    """A bad input the user can fix: ``what`` (an option, a file) and ``why``."""

    def __init__(self, what: str, why: str):
        self.what, self.why = what, why
        super().__init__(f"{what}: {why}")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``error: argument --steps:
    ...``, status 2, no usage block), with the ``--debug`` option of every tool."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                          help=f"on an error, show the full traceback instead of one line (also {DEBUG_ENV}=1)")

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(kind: type, low, inclusive: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


#: argparse ``type=`` checks for counts and sizes.
positive_int = _number(int, 1, True, "an integer >= 1")
non_negative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a number > 0")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--backend``, as the tools that run a trained model take them."""
    from unirep_kernels.backends import NAMES

    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--backend", default="auto", choices=("auto",) + NAMES,
                        help="normalization kernels' backend (default auto)")


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def describe(exc: BaseException) -> Optional[str]:
    """``<what>: <why>`` for the errors a user can cause; None for anything else (a bug)."""
    from unirep_kernels.backends import BackendUnavailableError

    if isinstance(exc, OSError) and exc.filename is not None:  # missing, unreadable, a folder for a file
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, (CLIError, ValueError, BackendUnavailableError)):  # incl. DataFormatError, CheckpointError
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return None


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
        prog: Optional[str] = None) -> int:
    """Run a tool's ``main(argv)`` and turn the errors of :func:`describe`, and a
    ``SystemExit`` with a message, into one line and status 2. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if debug:
        return main(argv) or 0
    try:
        return main(argv) or 0
    except SystemExit as exc:  # argparse (status 2 after its line, 0 after --help), or a message
        if not isinstance(exc.code, str):
            return 0 if exc.code is None else exc.code
        message = exc.code
        if prog and message.startswith(prog + ": "):
            message = message[len(prog) + 2:]
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = describe(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
