"""Stimulus arrays as the image source: an .npy file or an HDF5 dataset of N images.

``stimuli.npy`` (memory-mapped) or ``stimuli.h5:dataset`` (read with h5py), shaped
(N, H, W, C) with C = 1, 3 or 4, or (N, H, W) for grayscale; ``uint8``, or float in [0, 1].
Rows are in array order. Each batch reads its rows in one slice, in the decode workers, so the
array is never loaded whole. Float images are taken as displayed images: scaled to 8 bits
(``round(255 * x)``, what saving them as PNG does) and then given to the model's transform like
any decoded image, so every model source's preprocessing applies unchanged. An image with
values outside [0, 1] (or NaN) is a recorded skip. ``ids`` name the rows (a table of one id per
row, optionally with a class column).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from layertap._optional import require
from layertap.data.images import ImageSet, to_rgb
from layertap.errors import LayertapError

H5_EXTENSIONS = (".h5", ".hdf5", ".hdf")


def split_array_path(path: str | os.PathLike[str]) -> tuple[Path, str | None] | None:
    """Split a stimulus-array path into its file and HDF5 dataset.

    Args:
        path: ``stimuli.npy``, ``stimuli.h5`` or ``stimuli.h5:dataset``.

    Returns:
        (file, dataset or None), or None for anything that is not an array file.

    Example:
        >>> split_array_path("stimuli.h5:images"), split_array_path("a.jpg")
        ((PosixPath('stimuli.h5'), 'images'), None)
    """
    text = os.fspath(path)
    if text.lower().endswith(".npy"):
        return Path(text), None
    for ext in H5_EXTENSIONS:
        low = text.lower()
        if low.endswith(ext):
            return Path(text), None
        pos = low.rfind(ext + ":")
        if pos >= 0:
            return Path(text[: pos + len(ext)]), text[pos + len(ext) + 1 :] or None
    return None


def _open_array(file: Path, dataset: str | None) -> tuple[Any, Any]:
    """(array-like, file handle or None) for an .npy (memory-mapped) or an HDF5 dataset."""
    if not file.is_file():
        raise LayertapError(f"stimulus array not found: {file}")
    if file.suffix.lower() == ".npy":
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False), None
        except (ValueError, OSError) as err:
            raise LayertapError(f"cannot read {file} as a .npy array: {str(err).splitlines()[0]}") from None
    h5py = require("h5py", "export")
    try:
        handle = h5py.File(file, "r")
    except OSError as err:
        raise LayertapError(f"cannot open {file} as HDF5: {str(err).splitlines()[0]}") from None
    names: list[str] = []
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    if dataset is None:
        if len(names) != 1:
            handle.close()
            raise LayertapError(
                f"{file} holds {len(names)} datasets; name one as {file.name}:DATASET ({', '.join(names[:8]) or '-'})"
            )
        dataset = names[0]
    if dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
        handle.close()
        raise LayertapError(f"{file} has no dataset '{dataset}' (datasets: {', '.join(names[:8]) or '-'})")
    return handle[dataset], handle


def _check_shape(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    ok_shape = len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3, 4))
    if not ok_shape:
        raise LayertapError(
            f"{where} has shape {shape}; expected (N, H, W, C) with C 1, 3 or 4, or (N, H, W) for grayscale"
        )
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise LayertapError(f"{where} has dtype {dtype}; expected uint8, or float with values in [0, 1]")
    if shape[0] == 0:
        raise LayertapError(f"{where} holds no images (N = 0)")


def read_ids(path: str | os.PathLike[str], n: int) -> tuple[list[str], list[str] | None]:
    """Row ids (and classes, if there is a class column) for a stimulus array.

    Args:
        path: a .txt with one id per line, or a .csv/.tsv with an ``id`` (or ``name``/``stimulus``/``path``)
            column and optionally a ``class`` column.
        n: the array's number of rows (the file must have as many).

    Returns:
        (ids, classes or None).

    Raises:
        LayertapError: a missing file or column, or a row count other than ``n``.

    Example:
        >>> read_ids("stimuli_ids.tsv", n=1854)  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise LayertapError(f"ids file not found: {p}")
    labels: list[str] | None = None
    if p.suffix.lower() in (".csv", ".tsv"):
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            cols = {c.lower().strip(): c for c in reader.fieldnames or []}
            icol = next((cols[c] for c in ("id", "name", "stimulus", "image", "path", "file") if c in cols), None)
            if icol is None:
                raise LayertapError(f"{p} has no 'id' column (columns: {', '.join(cols.values())})")
            lcol = next((cols[c] for c in ("class", "label", "category", "target") if c in cols), None)
            rows = list(reader)
        ids = [str(r[icol]).strip() for r in rows]
        if lcol is not None:
            labels = [str(r[lcol]).strip() for r in rows]
    else:
        with open(p, encoding="utf-8") as f:
            ids = [ln.strip() for ln in f if ln.strip()]
    if len(ids) != n:
        raise LayertapError(f"{p} has {len(ids)} ids but the array holds {n} images; give one id per image, in order")
    return ids, labels


@dataclass
class ArraySet(ImageSet):
    """The images of a stimulus array, one row per array index (``index[i]``).

    Example:
        >>> stimuli = open_stimuli("stimuli.npy")  # doctest: +SKIP
        >>> len(stimuli), stimuli.row_fields(0)  # doctest: +SKIP
    """

    file: str = ""
    dataset: str | None = None
    index: list[int] = field(default_factory=list)
    ids: list[str] | None = None

    @classmethod
    def from_path(  # type: ignore[override]
        cls, path: str | os.PathLike[str], *, ids: str | os.PathLike[str] | None = None
    ) -> ArraySet:
        """Open ``stimuli.npy`` or ``stimuli.h5[:dataset]``.

        Args:
            path: the array file (with ``:dataset`` for HDF5 files of several datasets).
            ids: optional table of row ids (see :func:`read_ids`); a class column gives targets.
        Returns:
            the ArraySet, rows in array order.
        """
        split = split_array_path(path)
        if split is None:
            raise LayertapError(f"{path} is not a stimulus array (.npy, or .h5/.hdf5 with :DATASET)")
        file, dataset = split
        arr, handle = _open_array(file, dataset)
        try:
            shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
            name = arr.name.lstrip("/") if handle is not None else None
        finally:
            if handle is not None:
                handle.close()
        where = f"{file.name}:{name}" if name else file.name
        _check_shape(shape, dtype, where)
        n = shape[0]
        id_list, labels = read_ids(ids, n) if ids is not None else (None, None)
        root = str(file.resolve().parent)
        paths = [str(file.resolve()) + (f":{name}" if name else "") + f"[{i}]" for i in range(n)]
        targets = classes = None
        if labels is not None:
            classes = sorted(set(labels))
            targets = [classes.index(c) for c in labels]
        selection = {
            "array": {
                "file": str(file.resolve()),
                "dataset": name,
                "shape": list(shape),
                "dtype": str(dtype),
                "float_to_uint8": "round(255 * x)" if dtype != np.uint8 else None,
                "ids": str(Path(ids).resolve()) if ids is not None else None,
            }
        }
        return cls(
            paths=paths,
            root=root,
            targets=targets,
            classes=classes,
            layout="array",
            selection=selection,
            file=str(file.resolve()),
            dataset=name,
            index=list(range(n)),
            ids=id_list,
        )

    def _take(self, idx: Sequence[int], **selection: Any) -> ArraySet:
        idx = list(idx)
        base = super()._take(idx, **selection)
        return replace(
            base, index=[self.index[i] for i in idx], ids=None if self.ids is None else [self.ids[i] for i in idx]
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.paths, self.targets, self.ids]).encode())
        return h.hexdigest()[:16]

    def row_fields(self, i: int) -> dict[str, Any]:
        """Row i's manifest fields beyond ``path``: its array index and id."""
        out: dict[str, Any] = {"index": self.index[i]}
        if self.ids is not None:
            out["id"] = self.ids[i]
        return out

    def row_batches(self, transform: Callable[[Any], torch.Tensor]) -> torch.utils.data.Dataset:
        """Per batch of rows, the array rows read in one slice (in a worker)."""
        return _ArrayRows(self, transform)


def array_to_image(a: np.ndarray) -> Any:
    """One array image as an RGB PIL image.

    Args:
        a: (H, W) or (H, W, C) with C = 1, 3 or 4; uint8, or floats in [0, 1] (scaled to 8 bits with round(255x)).

    Returns:
        The RGB image.

    Example:
        >>> array_to_image(np.zeros((4, 5), dtype=np.float32)).size
        (5, 4)
    """
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"float values must lie in [0, 1] (found {np.nanmin(a):g}..{np.nanmax(a):g} or NaN)")
        a = np.rint(a * 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    mode = {2: "L", 3: {3: "RGB", 4: "RGBA"}.get(a.shape[-1] if a.ndim == 3 else 0)}[a.ndim]
    return to_rgb(Image.fromarray(np.ascontiguousarray(a), mode))


class _ArrayRows(torch.utils.data.Dataset):
    """Reads one batch of rows per item (one slice of the array), opened once per worker."""

    def __init__(self, arrays: ArraySet, transform: Callable[[Any], torch.Tensor]):
        self.s = arrays
        self.transform = transform
        self._arr: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.s)

    def _array(self) -> Any:
        if self._arr is None or self._pid != os.getpid():  # h5py handles must not cross a fork
            self._arr, _ = _open_array(Path(self.s.file), self.s.dataset)
            self._pid = os.getpid()
        return self._arr

    def __getitem__(self, rows: list[int]) -> list[tuple[int, torch.Tensor | None, str | None]]:
        index = [self.s.index[i] for i in rows]
        lo, hi = min(index), max(index) + 1
        block = self._array()[lo:hi] if hi - lo <= 2 * len(index) else None
        out: list[tuple[int, torch.Tensor | None, str | None]] = []
        for i, k in zip(rows, index, strict=True):
            try:
                a = np.asarray(block[k - lo] if block is not None else self._array()[k])
                out.append((i, self.transform(array_to_image(a)), None))
            except Exception as err:  # noqa: BLE001 - a bad image is this row's skip reason
                out.append((i, None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]))
        return out
