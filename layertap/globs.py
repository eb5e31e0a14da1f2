"""The one glob dialect for dotted layer names, shared by extraction (choosing layers to tap) and by
everything that reads a run (choosing stored layers to analyse, encode or export).

``*`` matches within one dotted component (``features.*`` = the direct children of ``features``),
``?`` one character of a component, ``[..]`` a set (``[!..]`` its complement), and ``**`` any number
of components (``layer4.**`` = everything inside ``layer4``; ``**`` alone = every layer). It lives
here, below both stages, so that reading a run never imports the extraction stage (or torch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The compiled regular expression of a layer-name glob (matches the whole name).

    Args:
        pattern: a glob such as ``"features.*"`` or ``"layer4.**"``.

    Returns:
        A compiled pattern; use ``.match(name)``.

    Example:
        >>> bool(glob_regex("features.*").match("features.3"))
        True
        >>> bool(glob_regex("features.*").match("features.3.conv"))
        False
    """
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def is_pattern(name: str) -> bool:
    """Whether ``name`` is a glob (holds ``*``, ``?`` or ``[``) rather than a plain layer name.

    Args:
        name: a layer name or glob.

    Returns:
        True for a glob.

    Example:
        >>> is_pattern("layer4.**"), is_pattern("layer4.0")
        (True, False)
    """
    return any(c in name for c in "*?[")


def match_names(pattern: str, names: Iterable[str]) -> list[str]:
    """The names a glob matches, in the order given (a plain name matches only itself).

    Args:
        pattern: a layer name or glob.
        names: the candidate names, e.g. a run's stored layers.

    Returns:
        The matching names.

    Example:
        >>> match_names("features.*", ["features.1", "features.1.conv", "classifier.4"])
        ['features.1']
    """
    if not is_pattern(pattern):
        return [n for n in names if n == pattern]
    rx = glob_regex(pattern)
    return [n for n in names if rx.match(n)]
