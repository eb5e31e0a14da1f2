"""The command line, a thin layer over the library: ``layertap extract|plan|report|...``.

:mod:`.app` builds the parser from the subcommands that :mod:`.models`, :mod:`.extract`, :mod:`.analysis`,
:mod:`.encode`, :mod:`.train` and :mod:`.process` define, runs one, and maps library exceptions to exit
codes. :mod:`.formatting` is the one help formatter and parser class; :mod:`.options` holds the options
shared by several commands (one definition and one default each). Library modules never import from here.
"""

from layertap.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
