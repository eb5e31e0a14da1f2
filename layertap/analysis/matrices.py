"""The one reader of numeric matrices from files: references for RDM analysis, responses for encoding
models, subjects' RDMs.

Formats: ``.npy``; ``.h5``/``.hdf5`` (a dataset); ``.mat`` (MATLAB v5 via scipy, v7.3 via h5py);
``.csv``/``.tsv``/``.txt`` tables (a header row is skipped, a non-numeric first column is read as
row ids, an empty cell is NaN; ``.txt`` is comma-separated when its first line holds a comma,
else whitespace-separated, as ``np.loadtxt`` reads it).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.errors import LayertapError

#: suffixes read as tables of text
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")


def _is_num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s.strip().lower() in ("nan", "")


def read_table(path: Path) -> list[list[str]]:
    """The non-empty rows of a text table as lists of cells.

    Args:
        path: a ``.tsv`` (tab-separated), ``.csv`` (comma-separated) or ``.txt`` file (comma-separated
            when its first non-empty line holds a comma, else separated by runs of whitespace).

    Returns:
        The rows (blank rows left out), cells as read (not stripped).

    Raises:
        LayertapError: the file cannot be read.

    Example:
        >>> read_table(Path("ids.tsv"))  # doctest: +SKIP
        [['stimulus', 'note'], ['img01.jpg', 'z']]
    """
    suffix = path.suffix.lower()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if suffix == ".txt":
                lines = [line for line in f.read().splitlines() if line.strip()]
                if lines and "," not in lines[0]:
                    return [line.split() for line in lines]
                return [r for r in csv.reader(lines) if r and any(c.strip() for c in r)]
            delim = "\t" if suffix == ".tsv" else ","
            return [r for r in csv.reader(f, delimiter=delim) if r and any(c.strip() for c in r)]
    except OSError as err:
        raise LayertapError(f"cannot read {path} ({err.strerror})") from None


def _table_matrix(path: Path, what: str) -> tuple[np.ndarray, list[str] | None]:
    """A numeric table; a header row is skipped; a non-numeric first column is the row ids."""
    rows = read_table(path)
    if not rows:
        raise LayertapError(f"{path} is empty")
    if not all(_is_num(c) for c in rows[0][1:] or rows[0]):
        rows = rows[1:]
    ids = None
    if rows and not all(_is_num(r[0]) for r in rows):
        ids = [r[0].strip() for r in rows]
        rows = [r[1:] for r in rows]
    try:
        return np.array([[float(c) if c.strip() else np.nan for c in r] for r in rows], dtype=np.float64), ids
    except ValueError as err:
        raise LayertapError(f"{path} is not a numeric table of {what} ({err})") from None


def _variables(kind: str, ndim: int | None) -> str:
    return f"{ndim}-D numeric {kind}" if ndim else f"numeric {kind}"


def _h5_array(path: Path, key: str | None, ndim: int | None, extra: str) -> np.ndarray:
    h5py = require("h5py", extra, "reading .h5 / MATLAB v7.3 files")
    try:
        with h5py.File(path, "r") as f:
            found: list[str] = []
            f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
            numeric = [
                n
                for n in found
                if np.issubdtype(f[n].dtype, np.number) and f[n].ndim >= 1 and (ndim is None or f[n].ndim == ndim)
            ]
            if key is not None:
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise LayertapError(f"{path} has no dataset '{key}' (it has: {', '.join(numeric) or 'none'})")
                name = key
            elif len(numeric) == 1:
                name = numeric[0]
            else:
                raise LayertapError(
                    f"{path} holds {len(numeric)} {_variables('datasets', ndim)} ({', '.join(numeric) or 'none'}); "
                    "name one with --key / key="
                )
            arr = np.asarray(f[name][()])
            # MATLAB v7.3 writes arrays column-major: reverse the axes to get MATLAB's shape back.
            if path.suffix.lower() == ".mat":
                arr = arr.T
            return arr
    except OSError as err:
        raise LayertapError(f"cannot read {path} as HDF5 ({err})") from None


def _mat_array(path: Path, key: str | None, ndim: int | None, extra: str) -> np.ndarray:
    sio = require("scipy.io", extra, "reading .mat files")
    try:
        data = sio.loadmat(path)
    except NotImplementedError:  # v7.3 is HDF5
        return _h5_array(path, key, ndim, extra)
    except (ValueError, OSError) as err:
        raise LayertapError(f"cannot read {path} as a .mat file ({err})") from None
    arrays = {
        k: v
        for k, v in data.items()
        if not k.startswith("__")
        and isinstance(v, np.ndarray)
        and np.issubdtype(v.dtype, np.number)
        and (ndim is None or v.ndim == ndim)
    }
    if key is not None:
        if key not in arrays:
            raise LayertapError(
                f"{path} has no {_variables('variable', ndim)} '{key}' (it has: {', '.join(arrays) or 'none'})"
            )
        return arrays[key]
    if len(arrays) != 1:
        raise LayertapError(
            f"{path} holds {len(arrays)} {_variables('variables', ndim)} ({', '.join(arrays) or 'none'}); "
            "name one with --key / key="
        )
    return next(iter(arrays.values()))


def load_array(
    source: Any, key: str | None = None, *, what: str = "responses", ndim: int | None = None, extra: str = "encode"
) -> tuple[np.ndarray, list[str] | None]:
    """A numeric array (any number of axes) and, for tables, the row ids of its first column.

    Args:
        source: an array, or a path to .npy, .h5/.hdf5 (dataset ``key``), .mat (variable ``key``;
            v7.3 files are read with h5py), .csv, .tsv or .txt.
        key: dataset/variable name where the file holds several.
        what: what the array is, for messages (``"responses"``, ``"reference"``).
        ndim: in .h5/.mat files, consider only datasets/variables with this many axes (None: any).
        extra: the layertap extra named when scipy/h5py is missing.

    Returns:
        ``(array as float64, ids or None)``.

    Raises:
        LayertapError: a missing or unreadable file, an unsupported suffix, an ambiguous or absent
            ``key``, or values that are not real numbers.

    Example:
        >>> arr, ids = load_array("betas.h5", key="betas")  # doctest: +SKIP
    """
    ids = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise LayertapError(f"{what} file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as err:
                raise LayertapError(f"cannot read {path} as a numeric .npy file ({err})") from None
        elif suffix in (".h5", ".hdf5", ".hdf"):
            arr = _h5_array(path, key, ndim, extra)
        elif suffix == ".mat":
            arr = _mat_array(path, key, ndim, extra)
        elif suffix in TABLE_SUFFIXES:
            arr, ids = _table_matrix(path, what)
        else:
            raise LayertapError(f"{path}: unsupported file type '{suffix}'; use .npy, .h5, .mat, .csv or .tsv")
    else:
        arr = np.asarray(source)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise LayertapError(f"{what} must be real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False), ids


def load_matrix(reference: Any, key: str | None = None) -> np.ndarray:
    """A 2-D float64 matrix (a reference RDM or response matrix) from an array or a file.

    Files are read by :func:`load_array`; in .h5/.mat files only 2-D numeric variables are
    candidates (``key`` picks one). A 1-D input of length N(N-1)/2 is expanded into an (N, N) RDM.

    Args:
        reference: an array or a path to .npy, .csv, .tsv, .txt, .mat or .h5.
        key: the variable/dataset name where the file holds several 2-D ones.

    Returns:
        (rows, columns) float64.

    Raises:
        LayertapError: unreadable input, or not a 2-D matrix / condensed RDM.

    Example:
        >>> load_matrix([0.5, 0.2, 0.7]).shape  # a condensed 3 x 3 RDM
        (3, 3)
    """
    arr, _ = load_array(reference, key, what="reference", ndim=2, extra="rsa")
    arr = arr.astype(np.float64)  # a copy: the caller's array is never handed back
    if arr.ndim == 1:
        n = int(round((1 + np.sqrt(1 + 8 * arr.size)) / 2))
        if n * (n - 1) // 2 != arr.size:
            raise LayertapError(f"a 1-D reference must be a condensed RDM of N(N-1)/2 values, got {arr.size}")
        square = np.zeros((n, n))
        square[np.triu_indices(n, k=1)] = arr
        return square + square.T
    if arr.ndim != 2:
        raise LayertapError(f"reference must be a 2-D matrix, got shape {arr.shape}")
    return arr
