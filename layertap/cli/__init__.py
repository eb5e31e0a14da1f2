"""The command line, a thin layer over the library: ``layertap extract|plan|report|...``.

:mod:`.main` builds the parser and dispatches; :mod:`.analysis`, :mod:`.encode` and :mod:`.train` add
their subcommands. Library modules never import from here.
"""

from layertap.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
