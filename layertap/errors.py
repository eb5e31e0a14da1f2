"""The exceptions layertap raises for problems a user can fix, and how messages spell options.

Two kinds, told apart by class (never by a number on the exception; the ``layertap`` command maps
classes to exit codes in :data:`layertap.cli.app.EXIT_CODES`):

* :class:`LayertapError` itself: the request is wrong (an unknown model or layer, a bad option
  value, a file that is not what it should be). Fix the call and try again.
* :class:`LayertapFailure` and its subclasses: the request was fine but could not be carried out
  here (a missing optional package, a full or read-only disk, a damaged run, a device or download
  that is not available, a job that failed). Fix the environment and run the same call again.

Messages are one line that says what to do. A message that names an option spells it as the user
does: ``weights='random'`` in Python, ``--weights random`` while the ``layertap`` command runs
(:func:`option_spelling`, :func:`option_name`).
"""

from __future__ import annotations

import difflib


class LayertapError(Exception):
    """A problem with the user's input, phrased as one line that says what to do.

    Example:
        >>> try:
        ...     raise StorageError("disk full while writing acts: free space and run the same command again")
        ... except LayertapError as err:
        ...     print(isinstance(err, LayertapFailure), err)
        True disk full while writing acts: free space and run the same command again
    """


class LayertapFailure(LayertapError):
    """The input was fine, but the environment failed it (disk, device, network, packages, a job)."""


class MissingDependencyError(LayertapFailure):
    """An optional package is not installed; the message names the ``pip install 'layertap[extra]'``."""


class StorageError(LayertapFailure):
    """A run or file cannot be written or read: disk full, no permission, damaged, locked, incomplete."""


class UnavailableError(LayertapFailure):
    """A device or a download is not available here (no CUDA, published weights out of reach)."""


class JobFailedError(LayertapFailure):
    """A long job failed on its own terms: training diverged, a shard process failed."""


def close_matches(name: str, candidates: list[str], n: int = 5) -> str:
    """A short 'did you mean' clause listing the candidates closest to ``name``.

    Args:
        name: what the user typed.
        candidates: the valid names.
        n: at most this many suggestions.

    Returns:
        ``" (did you mean: a, b?)"``, or ``""`` when nothing is close.

    Example:
        >>> close_matches("clasifier.4", ["classifier.4", "features.0"])
        ' (did you mean: classifier.4?)'
    """
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not hits:
        # Prefix / substring matches catch 'layer' -> 'layer1', which difflib ranks low.
        hits = [c for c in candidates if name.lower() in c.lower()][:n]
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


#: True while the ``layertap`` command runs: messages then name its flags, not Python's keywords
_cli_spelling = False


def set_cli_spelling(on: bool) -> None:
    """Make :func:`option_spelling` answer with command-line flags (the CLI sets this while it runs).

    Args:
        on: True while the ``layertap`` command runs, False again when it returns.

    Example:
        >>> set_cli_spelling(True); print(option_spelling("weights", "random")); set_cli_spelling(False)
        --weights random
    """
    global _cli_spelling
    _cli_spelling = on


def option_spelling(name: str, value: object = True) -> str:
    """An option with its value as the user spells it.

    Args:
        name: the Python keyword (``"weights"``, ``"chunk_rows"``).
        value: its value; True (the default) for a flag.

    Returns:
        ``--weights random`` / ``--overwrite`` on the command line, ``weights='random'`` /
        ``overwrite=True`` in Python.

    Example:
        >>> option_spelling("weights", "random")
        "weights='random'"
    """
    if _cli_spelling:
        flag = option_name(name)
        return flag if value is True else f"{flag} {value}"
    return f"{name}={value!r}"


def option_name(name: str) -> str:
    """An option's name as the user spells it: ``--chunk-rows`` on the command line, ``chunk_rows`` in Python.

    Args:
        name: the Python keyword.

    Returns:
        The flag while the ``layertap`` command runs, else ``name`` itself.

    Example:
        >>> f"{option_name('chunk_rows')} must be at least 1"
        'chunk_rows must be at least 1'
    """
    return f"--{name.replace('_', '-')}" if _cli_spelling else name
