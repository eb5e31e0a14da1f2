"""The one exception type layertap raises for problems a user can fix."""

from __future__ import annotations


class LayertapError(Exception):
    """A problem with the user's input or environment, phrased as one line that says what to do.

    The CLI prints ``str(err)`` on one line and exits with ``exit_code`` (2 for bad input such
    as an unknown model or layer, 1 for failures of the environment such as a full disk).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def close_matches(name: str, candidates: list[str], n: int = 5) -> str:
    """A short 'did you mean' clause listing the candidates closest to ``name``."""
    import difflib

    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not hits:
        # Prefix / substring matches catch 'layer' -> 'layer1', which difflib ranks low.
        hits = [c for c in candidates if name.lower() in c.lower()][:n]
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


#: True while the ``layertap`` command runs: messages then name its flags, not Python's keywords
_cli_spelling = False


def set_cli_spelling(on: bool) -> None:
    """Make :func:`option_spelling` answer with command-line flags (the CLI sets this while it runs)."""
    global _cli_spelling
    _cli_spelling = on


def option_spelling(name: str, value: object = True) -> str:
    """An option as the user spells it: ``--overwrite`` / ``--weights random`` on the command line,
    ``overwrite=True`` / ``weights='random'`` in Python."""
    if _cli_spelling:
        flag = f"--{name.replace('_', '-')}"
        return flag if value is True else f"{flag} {value}"
    return f"{name}={value!r}"
