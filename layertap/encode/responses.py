"""Response matrices (brain or behaviour) matched to a run's images by stimulus id.

A response file holds (stimuli x targets) values, or repeated measurements (repetitions x stimuli
x targets, NaN where a stimulus was not repeated). Its rows are matched to the run's images by
*stimulus id*, never by position alone: an id matches an image by its path relative to the image
root, that path without the suffix, its file name, or its file stem (``cat/img01.jpg``,
``cat/img01``, ``img01.jpg``, ``img01``). Ids come from ``stimuli`` (a list, or a .txt/.tsv/.csv
file) or from the first, non-numeric column of a .csv/.tsv response file.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from layertap.errors import LayertapError

log = logging.getLogger("layertap")

#: column names taken as the stimulus id in a table of ids (first match wins, case-insensitive)
ID_COLUMNS = ("stimulus", "stimulus_id", "stim", "id", "image", "filename", "file", "path", "name")
#: column names taken as the ROI label in a table of ROI labels
ROI_COLUMNS = ("roi", "region", "area", "label")


@dataclass
class Responses:
    """Responses aligned with a run: row i of ``data`` is run image ``rows[i]``.

    Attributes:
        data: (stimuli, targets) float64, the mean over repetitions where repeats were given.
        rows: (stimuli,) int, the run row of each stimulus.
        ids: stimulus ids, in ``data`` order.
        repeats: (repetitions, stimuli, targets) float64 with NaN where missing, or None.
        rois: ``{roi: target indices}`` (a target may be in several ROIs), or None.
        roi_labels: one ROI label per target when ROIs were given as labels, else None.
        dropped_stimuli: ids that were not found in the run and were dropped (``on_missing="drop"``).
        unused_images: run images without responses (not used).
        files: the files the responses, ids, repeats and ROIs were read from.
    """

    data: np.ndarray
    rows: np.ndarray
    ids: list[str]
    repeats: np.ndarray | None = None
    rois: dict[str, np.ndarray] | None = None
    roi_labels: np.ndarray | None = None
    dropped_stimuli: list[str] = field(default_factory=list)
    unused_images: int = 0
    files: list[Path] = field(default_factory=list)


# -- reading files ---------------------------------------------------------------------------------


def _is_num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s.strip().lower() in ("nan", "")


def _read_table(path: Path) -> list[list[str]]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [r for r in csv.reader(f, delimiter=delim) if r and any(c.strip() for c in r)]
    except OSError as err:
        raise LayertapError(f"cannot read {path} ({err.strerror})") from None


def _table_matrix(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """A numeric .csv/.tsv; a header row is skipped; a non-numeric first column is the stimulus ids."""
    rows = _read_table(path)
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
        raise LayertapError(f"{path} is not a numeric table of responses ({err})") from None


def _h5_array(path: Path, key: str | None) -> np.ndarray:
    from layertap.analysis.similarity import require

    h5py = require("h5py", "encode", "reading .h5 / MATLAB v7.3 files")
    try:
        with h5py.File(path, "r") as f:
            found: list[str] = []
            f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
            numeric = [n for n in found if np.issubdtype(f[n].dtype, np.number) and f[n].ndim >= 1]
            if key is not None:
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise LayertapError(f"{path} has no dataset '{key}' (it has: {', '.join(numeric) or 'none'})")
                name = key
            elif len(numeric) == 1:
                name = numeric[0]
            else:
                raise LayertapError(
                    f"{path} holds {len(numeric)} numeric datasets ({', '.join(numeric) or 'none'}); "
                    "name one with --key / key="
                )
            arr = np.asarray(f[name][()])
            # MATLAB v7.3 writes arrays column-major: reverse the axes to get MATLAB's shape back.
            if path.suffix.lower() == ".mat":
                arr = arr.T
            return arr
    except OSError as err:
        raise LayertapError(f"cannot read {path} as HDF5 ({err})") from None


def _mat_array(path: Path, key: str | None) -> np.ndarray:
    from layertap.analysis.similarity import require

    sio = require("scipy.io", "encode", "reading .mat files")
    try:
        data = sio.loadmat(path)
    except NotImplementedError:  # v7.3 is HDF5
        return _h5_array(path, key)
    except (ValueError, OSError) as err:
        raise LayertapError(f"cannot read {path} as a .mat file ({err})") from None
    arrays = {
        k: v
        for k, v in data.items()
        if not k.startswith("__") and isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.number)
    }
    if key is not None:
        if key not in arrays:
            raise LayertapError(f"{path} has no numeric variable '{key}' (it has: {', '.join(arrays) or 'none'})")
        return arrays[key]
    if len(arrays) != 1:
        raise LayertapError(
            f"{path} holds {len(arrays)} numeric variables ({', '.join(arrays) or 'none'}); name one with --key / key="
        )
    return next(iter(arrays.values()))


def load_array(source: Any, key: str | None = None) -> tuple[np.ndarray, list[str] | None]:
    """A numeric array (any number of axes) and, for tables, the stimulus ids in its first column.

    Args:
        source: an array, or a path to .npy, .h5/.hdf5 (dataset ``key``), .mat (variable ``key``;
            v7.3 files are read with h5py), .csv or .tsv.
        key: dataset/variable name where the file holds several.

    Returns:
        ``(array as float64, ids or None)``.
    """
    ids = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise LayertapError(f"file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as err:
                raise LayertapError(f"cannot read {path} as a numeric .npy file ({err})") from None
        elif suffix in (".h5", ".hdf5", ".hdf"):
            arr = _h5_array(path, key)
        elif suffix == ".mat":
            arr = _mat_array(path, key)
        elif suffix in (".csv", ".tsv", ".txt"):
            arr, ids = _table_matrix(path)
        else:
            raise LayertapError(f"{path}: unsupported file type '{suffix}'; use .npy, .h5, .mat, .csv or .tsv")
    else:
        arr = np.asarray(source)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise LayertapError(f"responses must be real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False), ids


def read_labels(source: Any, columns: Sequence[str], column: str | None = None, what: str = "ids") -> list[str]:
    """One label per line of a .txt, a column of a .tsv/.csv (with a header naming it), or a sequence.

    Args:
        source: a path or a sequence of labels.
        columns: header names to look for (case-insensitive) when ``column`` is not given.
        column: the header name of the column to read.
        what: what the labels are, for messages.

    Returns:
        The labels as stripped strings.
    """
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, np.ndarray) and source.ndim != 1:
            raise LayertapError(f"{what} must be one-dimensional, got shape {source.shape}")
        return [str(s).strip() for s in source]
    path = Path(source)
    if not path.is_file():
        raise LayertapError(f"file {path} does not exist")
    if path.suffix.lower() == ".npy":
        return read_labels(np.load(path, allow_pickle=False), columns, column, what)
    if path.suffix.lower() not in (".tsv", ".csv"):
        try:
            return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except OSError as err:
            raise LayertapError(f"cannot read {path} ({err.strerror})") from None
    rows = _read_table(path)
    if not rows:
        raise LayertapError(f"{path} is empty")
    header = [c.strip().lower() for c in rows[0]]
    if column is not None:
        if column.lower() not in header:
            raise LayertapError(f"{path} has no column '{column}' (columns: {', '.join(rows[0])})")
        idx = header.index(column.lower())
    else:
        hits = [header.index(c) for c in columns if c in header]
        if hits:
            idx = hits[0]
        elif len(rows[0]) == 1:
            return [r[0].strip() for r in rows]  # one column, no header
        else:
            raise LayertapError(
                f"{path}: which column holds the {what}? name it {columns[0]!r} or pass --stimulus-column / column="
            )
    return [r[idx].strip() for r in rows[1:] if len(r) > idx]


# -- matching ids to images ------------------------------------------------------------------------


def _norm(s: str) -> str:
    s = s.strip().replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return s


def image_keys(images: Sequence[str]) -> list[dict[str, list[int]]]:
    """Lookup tables, most specific first: relative path, path without suffix, file name, file stem."""
    tables: list[dict[str, list[int]]] = [{}, {}, {}, {}]
    for i, img in enumerate(images):
        p = PurePosixPath(_norm(img))
        for table, key in zip(tables, (str(p), str(p.with_suffix("")), p.name, p.stem), strict=True):
            table.setdefault(key, []).append(i)
    return tables


def match_ids(ids: Sequence[str], images: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Run rows of each stimulus id.

    Args:
        ids: stimulus ids (paths, path stems, file names or stems).
        images: the run's image paths, in row order.

    Returns:
        ``(rows, missing)``: rows[i] is the run row of ids[i] (-1 where not found); ``missing`` are
        the positions of ids not found. An id that names several images (two folders holding
        ``img01.jpg``) raises a :class:`LayertapError`.
    """
    tables = image_keys(images)
    rows = np.full(len(ids), -1, dtype=np.int64)
    missing: list[int] = []
    for i, raw in enumerate(ids):
        s = _norm(str(raw))
        for table in tables:
            hit = table.get(s)
            if hit is None:
                continue
            if len(hit) > 1:
                names = ", ".join(images[j] for j in hit[:3])
                raise LayertapError(
                    f"stimulus id '{raw}' matches {len(hit)} images ({names}); use ids with the folder, e.g. '{images[hit[0]]}'"
                )
            rows[i] = hit[0]
            break
        else:
            missing.append(i)
    return rows, missing


# -- putting it together ---------------------------------------------------------------------------


def _roi_index(rois: Any, n_targets: int, column: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if isinstance(rois, Mapping):
        out: dict[str, np.ndarray] = {}
        for name, sel in rois.items():
            sel = np.asarray(sel)
            idx = np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64)
            if sel.dtype == bool and sel.shape != (n_targets,):
                raise LayertapError(f"ROI '{name}': a mask must have one entry per target ({n_targets}), got {sel.shape}")
            if idx.size and (idx.min() < 0 or idx.max() >= n_targets):
                raise LayertapError(f"ROI '{name}' has target indices outside 0..{n_targets - 1}")
            out[str(name)] = idx
        return out, None
    labels = np.array(read_labels(rois, ROI_COLUMNS, column, "ROI labels"), dtype=object)
    if len(labels) != n_targets:
        raise LayertapError(f"{len(labels)} ROI labels for {n_targets} targets: give one label per target (column)")
    names = list(dict.fromkeys(labels.tolist()))
    return {str(n): np.flatnonzero(labels == n) for n in names}, labels


def prepare_responses(
    images: Sequence[str],
    responses: Any,
    stimuli: Any = None,
    *,
    key: str | None = None,
    repeats: Any = None,
    repeats_key: str | None = None,
    rois: Any = None,
    stimulus_column: str | None = None,
    roi_column: str | None = None,
    on_missing: str = "error",
    transpose: bool = False,
) -> Responses:
    """Read responses (and repeats, ROIs) and align them with a run's images by stimulus id.

    Args:
        images: the run's image paths in row order (``run.images``).
        responses: (stimuli, targets) or (repetitions, stimuli, targets) array or file (see
            :func:`load_array`).
        stimuli: one id per response stimulus (a sequence or a .txt/.tsv/.csv file); optional when
            ``responses`` is a .csv/.tsv whose first column holds the ids.
        key: dataset/variable name in an .h5/.mat response file.
        repeats: (repetitions, stimuli, targets) for the noise ceiling when ``responses`` is already
            averaged; its stimuli axis follows the same ids as ``responses``.
        repeats_key: dataset/variable name in the repeats file.
        rois: one ROI label per target (sequence or .txt/.tsv/.csv/.npy), or ``{roi: indices or mask}``.
        stimulus_column, roi_column: column names in .tsv/.csv tables.
        on_missing: ``"error"`` (default) or ``"drop"`` (drop stimuli not in the run, reported).
        transpose: the response matrix is (targets, stimuli): transpose it.

    Returns:
        A :class:`Responses`.
    """
    if on_missing not in ("error", "drop"):
        raise LayertapError(f"on_missing must be 'error' or 'drop', not {on_missing!r}")
    files = [Path(x) for x in (responses, stimuli, repeats, rois) if isinstance(x, (str, os.PathLike))]
    arr, table_ids = load_array(responses, key)
    if transpose:
        if arr.ndim == 2:
            arr = arr.T
        elif arr.ndim == 3:
            arr = arr.transpose(0, 2, 1)
    if stimuli is not None:
        ids = read_labels(stimuli, ID_COLUMNS, stimulus_column, "stimulus ids")
    elif table_ids is not None:
        ids = table_ids
    else:
        raise LayertapError(
            "responses need stimulus ids to be matched to the run's images (never by position alone): "
            "pass --stimuli FILE / stimuli=[...] (e.g. stimuli=run.images), or a .csv/.tsv whose first column holds them"
        )
    n = len(ids)
    if arr.ndim not in (2, 3):
        raise LayertapError(
            f"responses must be (stimuli x targets) or (repetitions x stimuli x targets), got shape {arr.shape}"
        )
    stim_axis = arr.ndim - 2
    if arr.shape[stim_axis] != n:
        if arr.shape[stim_axis + 1] == n:
            raise LayertapError(
                f"responses of shape {arr.shape} look transposed ({n} stimulus ids match the target axis): "
                "pass --transpose / transpose=True"
            )
        if arr.ndim == 3 and arr.shape[0] == n:
            raise LayertapError(
                f"repeated responses must be (repetitions x stimuli x targets); got {arr.shape} with {n} stimulus ids first"
            )
        raise LayertapError(f"responses have {arr.shape[stim_axis]} stimuli but {n} stimulus ids were given")
    seen: dict[str, int] = {}
    for s in ids:
        seen[_norm(s)] = seen.get(_norm(s), 0) + 1
    dupes = [s for s, c in seen.items() if c > 1]
    if dupes:
        raise LayertapError(
            f"stimulus id '{dupes[0]}' appears {seen[dupes[0]]} times ({len(dupes)} duplicated ids); "
            "give repeated measurements as (repetitions x stimuli x targets) with NaN where missing"
        )
    rep = None
    if arr.ndim == 3:
        rep = arr
    elif repeats is not None:
        rep, _ = load_array(repeats, repeats_key)
        if transpose and rep.ndim == 3:
            rep = rep.transpose(0, 2, 1)
        if rep.ndim != 3 or rep.shape[1:] != arr.shape:
            raise LayertapError(
                f"repeats must be (repetitions x stimuli x targets) = (R, {arr.shape[0]}, {arr.shape[1]}), got {rep.shape}"
            )

    rows, missing = match_ids(ids, images)
    dropped: list[str] = []
    if missing:
        names = ", ".join(repr(ids[i]) for i in missing[:5])
        if on_missing == "error" or len(missing) == n:
            raise LayertapError(
                f"{len(missing)} of {n} stimulus ids are not images of the run (e.g. {names}); fix the ids, or pass "
                "--on-missing drop / on_missing='drop' to drop them"
            )
        dropped = [ids[i] for i in missing]
        log.warning("dropped %d of %d stimuli that are not in the run (e.g. %s)", len(missing), n, names)
    keep = np.flatnonzero(rows >= 0)
    everything = len(keep) == n  # no drop: index nothing (saves a copy of a large matrix)
    if rep is not None:
        rep = rep if everything else rep[:, keep]
        with np.errstate(all="ignore"):
            counts = np.sum(~np.isnan(rep), axis=0)
            data = np.where(counts > 0, np.nansum(rep, axis=0) / np.maximum(counts, 1), np.nan)
        if arr.ndim == 2:
            data = arr if everything else arr[keep]  # the given (averaged) matrix is what is fitted
    else:
        data = arr if everything else arr[keep]
    roi_map, roi_labels = (None, None) if rois is None else _roi_index(rois, data.shape[1], roi_column)
    return Responses(
        data=np.ascontiguousarray(data),
        rows=rows[keep],
        ids=[ids[i] for i in keep],
        repeats=rep,
        rois=roi_map,
        roi_labels=roi_labels,
        dropped_stimuli=dropped,
        unused_images=len(images) - len(keep),
        files=files,
    )
