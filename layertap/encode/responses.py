"""Response matrices (brain or behaviour) matched to a run's images by stimulus id.

A response file holds (stimuli x targets) values, or repeated measurements (repetitions x stimuli
x targets, NaN where a stimulus was not repeated). Its rows are matched to the run's images by
*stimulus id*, never by position alone: an id matches an image by its path relative to the image
root, that path without the suffix, its file name, or its file stem (``cat/img01.jpg``,
``cat/img01``, ``img01.jpg``, ``img01``). Ids come from ``stimuli`` (a list, or a .txt/.tsv/.csv
file) or from the first, non-numeric column of a .csv/.tsv response file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from layertap.analysis.matrices import load_array, read_table
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

    Example:
        >>> resp = prepare_responses(run.images, "betas.npy", "stimulus_ids.txt")  # doctest: +SKIP
        >>> resp.data.shape, resp.rows[:3]  # doctest: +SKIP
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


def read_labels(source: Any, columns: Sequence[str], column: str | None = None, what: str = "ids") -> list[str]:
    """One label per line of a .txt, a column of a .tsv/.csv (with a header naming it), or a sequence.

    Args:
        source: a path or a sequence of labels.
        columns: header names to look for (case-insensitive) when ``column`` is not given.
        column: the header name of the column to read.
        what: what the labels are, for messages.

    Returns:
        The labels as stripped strings.

    Example:
        >>> read_labels(["a.jpg ", "b.jpg"], ID_COLUMNS)
        ['a.jpg', 'b.jpg']
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
    rows = read_table(path)
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
    """Lookup tables from id to run rows, most specific first: relative path, path without suffix, file name, file stem.

    Args:
        images: the run's image paths (relative to its image root).

    Returns:
        Four ``{key: [rows]}`` tables.

    Example:
        >>> image_keys(["cat/img01.jpg"])[3]
        {'img01': [0]}
    """
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

    Example:
        >>> rows, missing = match_ids(["img02", "cat/img01.jpg", "dog"], ["cat/img01.jpg", "cat/img02.jpg"])
        >>> rows.tolist(), missing
        ([1, 0, -1], [2])
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

    Example:
        >>> resp = prepare_responses(run.images, "betas.h5", "stimulus_ids.tsv", key="betas", rois="rois.txt")  # doctest: +SKIP
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
        rep, _ = load_array(repeats, repeats_key, what="repeats")
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
