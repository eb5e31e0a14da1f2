"""Names a package exports but imports on first use (PEP 562), so ``import layertap`` stays light.

``layertap/__init__.py`` (the ``lt.*`` table) and ``layertap/training/__init__.py`` both use :func:`lazy_exports`;
the command line builds its parser without importing torch because of it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build a package's module-level ``__getattr__`` and ``__dir__`` over a table of lazily imported names.

    Args:
        package: The package's ``__name__``.
        names: Exported name -> the submodule (relative to ``package``, dotted) that defines it under that name.
        submodules: Submodules exported as attributes (``lt.analysis``), imported on first use too.

    Returns:
        ``(__getattr__, __dir__)``. ``__getattr__`` imports the defining module on first use and stores the
        object in the package's namespace, so later lookups are plain attribute reads; an unknown name raises
        ``AttributeError``. ``__dir__`` lists the package's attributes plus every lazy name.

    Example:
        >>> # in mypkg/__init__.py
        >>> __getattr__, __dir__ = lazy_exports(__name__, {"load": "io.reader"}, submodules=("plots",))
    """
    table = dict(names)
    subs = tuple(submodules)

    def __getattr__(name: str) -> Any:
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *subs, *table})

    return __getattr__, __dir__
