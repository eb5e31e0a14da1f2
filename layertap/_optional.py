"""Optional dependencies: import one where it is needed, or fail with the one-line install hint.

Heavy or rarely needed packages (scipy, scikit-learn, matplotlib, h5py, rsatoolbox, himalaya,
open_clip, ...) are never imported at ``import layertap``: the function that needs one calls
:func:`require` and gets the module, or a :class:`~layertap.errors.MissingDependencyError` naming the
``pip install 'layertap[extra]'`` that provides it (raised ``from None``: the CLI shows one line).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from layertap.errors import MissingDependencyError


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import an optional package (or one of its submodules), or fail with the install hint.

    Args:
        module: the module to import, e.g. ``"scipy.io"`` or ``"rsatoolbox.data"``.
        extra: the layertap extra that installs it (``pip install 'layertap[extra]'``).
        what: what needs it, for the message (e.g. ``"MDS plots"``); None says "this".

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: one line (the environment, not the input: CLI exit code 1), raised ``from None``.

    Example:
        >>> sio = require("scipy.io", "rsa", "reading .mat files")
        >>> sio.__name__
        'scipy.io'
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{what or 'this'} needs the optional package '{module.split('.')[0]}': pip install 'layertap[{extra}]'"
        ) from None


def package_available(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it.

    Args:
        package: a top-level package name, e.g. ``"matplotlib"``.

    Returns:
        True when it is importable; False when it is not installed or its import was blocked on purpose
        (``sys.modules[package] = None``, as tests do to pretend it is missing).

    Example:
        >>> package_available("numpy")
        True
    """
    if package in sys.modules:
        return sys.modules[package] is not None  # None: import blocked on purpose
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False
