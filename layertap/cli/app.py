"""The ``layertap`` command: a thin layer over the library; errors are one line, never a traceback.

:func:`build_parser` assembles the subcommands that :mod:`.models`, :mod:`.extract`, :mod:`.analysis`,
:mod:`.encode`, :mod:`.train` and :mod:`.process` define; :func:`main` runs one and maps what it
raises to an exit code (:data:`EXIT_CODES`). Parsing imports no torch: each command imports the heavy
parts of the library when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from layertap._version import __version__
from layertap.cli.analysis import add_analysis_commands, add_report
from layertap.cli.encode import add_encode_command
from layertap.cli.extract import (
    EXAMPLES,
    add_export,
    add_extract,
    add_launch,
    add_merge,
    add_plan,
    add_slurm,
    add_verify,
)
from layertap.cli.formatting import Parser
from layertap.cli.models import add_layers, add_models, add_text
from layertap.cli.process import add_ensemble, add_process
from layertap.cli.train import add_train_commands
from layertap.errors import LayertapError, LayertapFailure, set_cli_spelling

log = logging.getLogger("layertap")

#: The one table from what the library raises to the command's exit code (the most specific class wins).
#: 2: bad input (fix the command); 1: the environment failed (fix it, run the same command again).
#: 130 (Ctrl-C) and 0 are main()'s own.
EXIT_CODES: dict[type[BaseException], int] = {
    LayertapFailure: 1,
    LayertapError: 2,
}


def exit_code_for(err: BaseException) -> int:
    """The exit code of the ``layertap`` command for a library exception, from :data:`EXIT_CODES`.

    Args:
        err: what the command raised.

    Returns:
        The code of the nearest class of ``err`` in the table (2 for one not listed).

    Example:
        >>> from layertap.errors import StorageError
        >>> exit_code_for(StorageError("disk full")), exit_code_for(LayertapError("unknown layer"))
        (1, 2)
    """
    return next((EXIT_CODES[c] for c in type(err).__mro__ if c in EXIT_CODES), 2)


def build_parser() -> argparse.ArgumentParser:
    """The ``layertap`` argument parser with every subcommand (in the order ``layertap --help`` lists them).

    Returns:
        The parser; ``parse_args(...).func(args)`` runs the command.

    Example:
        >>> build_parser().parse_args(["layers", "alexnet"]).weights
        'random'
    """
    parser = Parser(
        prog="layertap",
        description="Tap the hidden layers of vision models: list models and layers, extract activations "
        "for image folders to disk, export them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("--version", action="version", version=f"layertap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_models(sub)
    add_layers(sub)
    extract = add_extract(sub)
    add_plan(sub)
    add_text(sub)
    add_analysis_commands(sub)
    add_encode_command(sub)
    add_train_commands(sub)
    add_process(sub)
    add_ensemble(sub)
    add_verify(sub)
    add_report(sub)
    add_merge(sub)
    add_slurm(sub, extract)
    add_launch(sub, extract)
    add_export(sub)
    return parser


INTERRUPTED = "layertap: interrupted; run the same command again to resume"


def _quiet_interrupt(_signum: int, _frame: object) -> None:
    """SIGINT once the command is over (interpreter shutdown: atexit handlers, worker and thread
    joins): exit at once with one line instead of a KeyboardInterrupt traceback."""
    try:
        print(INTERRUPTED, file=sys.stderr, flush=True)
    finally:
        os._exit(130)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``layertap`` command. Returns the exit code: 0, 1 (environment), 2 (bad input), 130 (Ctrl-C).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``, and then a Ctrl-C during interpreter
            shutdown also exits quietly with 130).

    Returns:
        The exit code (:data:`EXIT_CODES` for library errors).

    Example:
        >>> main(["layers", "alexnet", "--input-size", "0", "0"])  # doctest: +SKIP
        2
    """
    set_cli_spelling(True)
    model_name = None
    # Our handler lives only while the command runs: a later library call in the same process (a
    # notebook, a test) must not write to a stderr that may be gone by then.
    saved_logging = (log.handlers[:], log.propagate, log.level)
    try:
        parser = build_parser()
        words = sys.argv[1:] if argv is None else list(argv)
        if words[:1] == ["plan"] and not {"-h", "--help"} & set(words[1:]):
            words = ["extract", *words[1:], "--dry-run"]  # plan = extract --dry-run (same arguments)
        args = parser.parse_args(words)
        model_name = args.model  # every subcommand defines it (formatting.add_command)
        # Our own logger only: libraries (open_clip, timm, ...) keep their default (warnings only).
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("layertap: %(message)s"))
        log.handlers[:] = [handler]
        log.propagate = False
        log.setLevel(logging.WARNING if args.quiet else logging.INFO)
        args.func(args)
    except LayertapError as err:
        msg = str(err)
        if isinstance(model_name, str):  # name the model instead of the placeholder
            msg = msg.replace("'layertap layers MODEL'", f"'layertap layers {model_name}'")
        print(f"layertap: error: {msg}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        if argv is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _quiet_interrupt)  # a second Ctrl-C: no traceback either
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    finally:
        set_cli_spelling(False)
        log.handlers[:], log.propagate = saved_logging[0], saved_logging[1]
        log.setLevel(saved_logging[2])
        if argv is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _quiet_interrupt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
