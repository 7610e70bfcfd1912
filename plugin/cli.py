"""The ``optimum-adaround`` console script.

Each subcommand lives in ``commands/<name>.py`` and exposes ``add_parser(subparsers)`` (which sets
``func`` on its parser) ; this module only dispatches and maps errors to exit codes:
0 ok, 2 user error (one line on stderr, no traceback unless ``--debug``), 1 internal error, 130 Ctrl-C.
Any other exception is a bug: exit 1 with one line too (the traceback only with ``--debug``).
Running ``optimum-adaround`` with no subcommand runs the default job (``run``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from .graph_passes.errors import AdaroundError, UserError

# Subcommand modules under optimum.adaround.commands, in help order.
COMMANDS = ("run", "quantize", "predict", "eval", "export_onnx_quant")
DEFAULT_COMMAND = "run"


def build_parser() -> tuple[argparse.ArgumentParser, set[str]]:
    """The parser and the names of the subcommands it knows."""
    parser = argparse.ArgumentParser(
        prog="optimum-adaround",
        description="Calibrated adaptive rounding (GPTQ / AdaRound / learned scales) for ONNX LLMs.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser, set(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, names = build_parser()
    if not names.intersection(argv) and not {"-h", "--help"}.intersection(argv):
        # No subcommand given: run the default job, keeping global flags in front of it.
        argv = [*(a for a in argv if a == "--debug"), DEFAULT_COMMAND, *(a for a in argv if a != "--debug")]
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return run_guarded("optimum-adaround", lambda: args.func(args), debug=args.debug)


def run_guarded(prog: str, call: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run ``call`` and map what it raises to an exit code and one stderr line: 0 ok, 2 user error,
    1 a bug (internal error), 130 Ctrl-C. ``debug`` re-raises instead (full traceback). Every command line
    entry point (optimum-adaround, optimum-cli export onnx-quant) goes through here."""
    try:
        return int(call() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except UserError as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug (not raised on purpose): still one line and exit 1 unless --debug
        if debug:
            raise
        text = (
            str(e)
            if isinstance(e, AdaroundError)
            else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        )
        print(
            f"{prog}: internal error: {one_line(text)} (rerun with --debug for a traceback)", file=sys.stderr
        )
        return 1


def one_line(text: str) -> str:
    """``text`` on one line: a name read from a file may hold line breaks or other control characters (a
    damaged model's data file name), written escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


if __name__ == "__main__":
    sys.exit(main())
