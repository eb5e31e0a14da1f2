"""How every ``layertap`` command looks: one help formatter, one parser class, one way to add a subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written, and each option's default shown (unless its help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings or action.nargs == 0:
            return text  # said already, nothing to show, a positional, or a flag (its default is its absence)
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Argument errors in one line with a pointer to this command's --help (not a 12-line usage block)."""

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 and one line: ``PROG: error: MESSAGE (see 'PROG --help')``.

        Args:
            message: argparse's description of the problem.

        Raises:
            SystemExit: always (status 2).
        """
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


Command = Callable[[argparse.Namespace], None]


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Command | None,
    *,
    help: str,  # noqa: A002 - argparse's name
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    """Add one subcommand with the shared formatter, and the defaults that :func:`layertap.cli.app.main` reads.

    Every subcommand then defines ``func`` (what runs; None for a command with sub-subcommands, whose
    leaves set it), ``quiet`` (False unless the command adds ``--quiet``) and ``model`` (None unless
    the command takes a model; error messages then name it).

    Args:
        sub: the parent's subparsers action.
        name: the subcommand's name.
        func: the function that runs it, given the parsed arguments.
        help: one line for the parent's command list.
        description: the paragraph at the top of its --help.
        epilog: its examples section (``examples:`` then ``layertap ...`` lines).

    Returns:
        The subcommand's parser, to add arguments to.

    Example:
        >>> import argparse
        >>> parser = Parser(prog="layertap")
        >>> sub = parser.add_subparsers(dest="command")
        >>> p = add_command(sub, "hello", None, help="say hello", description="Say hello.",
        ...                 epilog="example: layertap hello")
        >>> parser.parse_args(["hello"]).quiet
        False
    """
    p = sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)
    p.set_defaults(func=func, quiet=False, model=None)
    return p
