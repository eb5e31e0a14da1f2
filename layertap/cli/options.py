"""Options shared by several ``layertap`` commands, defined once, with one default each.

Defaults, and why:

* ``--workers``: ``None`` = one image-decoding process per spare core, at most 8
  (:func:`layertap.data.images.default_workers`), in every command that decodes images (extract,
  plan, train ipcl, train linear-probe). Decoding is what keeps a model waiting on the CPU; ``0``
  decodes in the main process (what the training commands did before: their random crops come from
  per-image seeds in ``train ipcl``, but ``train linear-probe --augment crop-flip`` draws them in the
  workers, so its numbers depend on ``--workers``, as they always did).
* ``--device``: ``auto`` = the best available (cuda, then mps, then cpu), everywhere.
* ``--quiet``: off; on, no progress bar and no info messages, everywhere it exists.
* ``--seed``: 0 everywhere (each command's help says what it seeds).
* ``--batch-size``: per command, on purpose: for extraction it only trades memory for speed (64);
  for training it is a hyperparameter of the objective (ipcl 128, linear-probe 256), and changing
  it would change the trained numbers.

Values are checked at parse time by :func:`positive` / :func:`non_negative` where the library has
no check of its own that already says it in the CLI's words.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Callable
from typing import Any

from layertap.errors import LayertapError

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (default: the best available)"
WORKERS_HELP = "image decoding processes (default: one per spare core, at most 8; 0: decode in this process)"


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse ``type`` that reads ``kind`` (int or float) and refuses zero and negative values.

    Args:
        kind: ``int`` or ``float``.

    Returns:
        The converter; it raises ``argparse.ArgumentTypeError`` ("must be positive, got -1").

    Example:
        >>> positive(int)("3")
        3
    """

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def non_negative(kind: type) -> Callable[[str], Any]:
    """Like :func:`positive`, but 0 is allowed ("must be 0 or more, got -1").

    Args:
        kind: ``int`` or ``float``.

    Returns:
        The converter.

    Example:
        >>> non_negative(int)("0")
        0
    """

    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_device(group: argparse._ActionsContainer) -> None:
    """``--device`` (default ``auto``).

    Args:
        group: the parser or argument group.
    """
    group.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_workers(group: argparse._ActionsContainer) -> None:
    """``--workers`` (default: one per spare core; see the module docstring for why).

    Args:
        group: the parser or argument group.
    """
    group.add_argument("--workers", type=int, default=None, metavar="N", help=WORKERS_HELP)


def add_quiet(group: argparse._ActionsContainer, what: str = "no progress bar or info messages") -> None:
    """``--quiet`` / ``-q`` (off). :func:`layertap.cli.app.main` then logs warnings only.

    Args:
        group: the parser or argument group.
        what: what it silences in this command.
    """
    group.add_argument("--quiet", "-q", action="store_true", help=what)


def add_batch_size(group: argparse._ActionsContainer, default: int, help: str, *aliases: str) -> None:  # noqa: A002
    """``--batch-size`` with this command's default (see the module docstring for why it differs).

    Args:
        group: the parser or argument group.
        default: the command's default.
        help: what a batch is in this command (the formatter appends the default).
        *aliases: other spellings, e.g. ``--batch_size``.
    """
    group.add_argument("--batch-size", *aliases, type=positive(int), default=default, help=help)


def add_seed(group: argparse._ActionsContainer, what: str, *aliases: str) -> None:
    """``--seed`` (default 0).

    Args:
        group: the parser or argument group.
        what: what it seeds, e.g. "seed for random weights" (the formatter appends the default).
        *aliases: other spellings, e.g. ``--rnd_seed``.
    """
    group.add_argument("--seed", *aliases, type=int, default=0, help=what)


def add_model_option(group: argparse._ActionsContainer, help: str = "model option for the source") -> None:  # noqa: A002
    """``--option KEY=VALUE`` (repeatable), read by :func:`model_options`.

    Args:
        group: the parser or argument group.
        help: what the options do for this command.
    """
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=help)


def resolve_workers(workers: int | None) -> int:
    """The ``--workers`` value as a number of processes, for functions that need one (the training loops).

    Args:
        workers: the parsed value; None means the shared default.

    Returns:
        ``workers``, or :func:`layertap.data.images.default_workers` for None.

    Raises:
        LayertapError: a negative count.
    """
    if workers is None:
        from layertap.data.images import default_workers  # imports torch: only once a command runs

        return default_workers()
    if workers < 0:
        raise LayertapError(f"--workers must be 0 (decode in this process) or more, got {workers}")
    return workers


def keyword_args(func: Callable[..., Any], args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The keyword-only arguments of ``func`` that the command line defines under the same name.

    No list of names is kept by hand: a new keyword of the library function is passed as soon as the
    command defines an option with that name (``dest``). Options spelled differently on the command line
    (``--quiet`` for ``progress``) are given in ``overrides``.

    Args:
        func: the library function the command calls.
        args: the parsed arguments.
        **overrides: values computed by the command; each must be a parameter of ``func``.

    Returns:
        ``{name: value}`` for ``func(..., **kwargs)``.

    Raises:
        TypeError: an override that ``func`` does not take (a programming error, caught by the tests).

    Example:
        >>> def f(a, *, b=1, c=2): ...
        >>> keyword_args(f, argparse.Namespace(a=0, b=5, x=9), c=3)
        {'b': 5, 'c': 3}
    """
    params = inspect.signature(func).parameters
    unknown = sorted(set(overrides) - set(params))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"{func.__name__}() takes no {', '.join(unknown)}")
    kwargs = {
        name: getattr(args, name)
        for name, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and hasattr(args, name)
    }
    kwargs.update(overrides)
    return kwargs


def model_options(items: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` items as keyword arguments for the source.

    A VALUE is read as JSON (numbers, true/false, objects); plain words stay strings
    (``transform=validation``). A VALUE that starts like a JSON object, list or string must be
    valid JSON: a typo there is one error saying where, not a confusing failure inside the source.

    Args:
        items: the ``--option`` arguments as given.

    Returns:
        {KEY: value}.

    Raises:
        LayertapError: an item without ``=``, or invalid JSON where JSON was meant.

    Example:
        >>> model_options(["transform=validation", "n=3"])
        {'transform': 'validation', 'n': 3}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LayertapError(f"--option '{item}': write KEY=VALUE, e.g. transform=validation")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as err:
            if value.lstrip()[:1] in ("{", "[", '"'):
                shown = value if len(value) <= 60 else value[:57] + "..."
                raise LayertapError(
                    f"--option {key}: invalid JSON at column {err.colno} ({err.msg}) in {shown!r}; "
                    f"""write e.g. {key}='{{"hidden_size": 384}}' (keys and strings in double quotes)"""
                ) from None
            out[key] = value
    return out


def pca_components(value: float | None) -> int | float | None:
    """A ``--pca K`` / ``--compress_acts K`` value: K >= 1 is a number of components, 0 < K < 1 a variance fraction.

    Args:
        value: the parsed number, or None.

    Returns:
        An int (components), the float fraction, or None.

    Example:
        >>> pca_components(64.0), pca_components(0.9)
        (64, 0.9)
    """
    return None if value is None else (int(value) if value >= 1 else value)


def option_strings(parser: argparse.ArgumentParser, *dests: str) -> dict[str, tuple[str, ...]]:
    """Every spelling of the options with these ``dest`` names, as the parser defines them.

    For code that must recognise options in a list of arguments (the Slurm script writer makes path
    options absolute) without keeping its own copy of their spellings.

    Args:
        parser: e.g. the ``extract`` parser.
        *dests: the options' ``dest`` names, e.g. ``"images"``, ``"out"``.

    Returns:
        ``{dest: ("--images", "--in_path", "-i"), ...}`` in the order given.

    Raises:
        KeyError: a dest the parser does not define.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--out", "-o")
        >>> option_strings(p, "out")
        {'out': ('--out', '-o')}
    """
    found = {a.dest: tuple(a.option_strings) for a in parser._actions if a.option_strings}
    return {d: found[d] for d in dests}
