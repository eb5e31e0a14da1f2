"""Export a run's layers to other file formats, streaming chunk by chunk (bounded memory).

Formats (``export(run, fmt)``), each written with the image index (row, path, target, class) in
array row order, and always with ``images.csv`` beside the files:

=========== ================================ ===================================================
``fmt``     files                            notes
=========== ================================ ===================================================
npy         ``<layer>.npy``                  streamed into a memory-mapped .npy
txt         ``<layer>.txt``                  images x units (conv maps flattened, C order)
h5          ``activations.h5``               one chunked dataset per layer + ``images/*``
mat         ``<layer>.mat``                  MATLAB v5 (scipy); v7.3 when a layer > 2 GB
mat73       ``<layer>.mat``                  MATLAB v7.3 (HDF5 layout, written with h5py)
pt          ``activations.pt``               ``torch.save`` dict {layer: tensor, "images", ...}
parquet     ``<layer>.parquet``              small matrices only (<= MAX_TABLE_VALUES values)
csv         ``<layer>.csv``                  small matrices only (<= MAX_TABLE_VALUES values)
=========== ================================ ===================================================

Memory: every writer reads one stored chunk at a time, except MATLAB v5, whose writer (scipy)
needs the whole layer in memory (at most ``MAT5_MAX_BYTES``; larger layers go to v7.3).

Helpers for old pipelines: :func:`tensor2slices` / :func:`slices2tensor` (lossless N-D <-> 2-D
text with the shape in a header line) and :func:`split_activations` / :func:`merge_activations`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.errors import LayertapError
from layertap.store.blocks import iter_row_blocks, rows_for_bytes
from layertap.store.files import disk_error
from layertap.store.run import LayerArray, Run, open_complete_run

log = logging.getLogger("layertap")

#: csv/parquet refuse layers with more values (images x units) than this: use npy or h5.
MAX_TABLE_VALUES = 10_000_000
#: MATLAB v5 files hold variables below 2 GiB; a larger layer is written as v7.3 (HDF5).
MAT5_MAX_BYTES = 2**31 - 2**20
#: target size of one HDF5 chunk (rows of a layer), bytes
H5_CHUNK_BYTES = 4 << 20


# -- the image index ------------------------------------------------------------------------------
@dataclass
class _Index:
    paths: list[str]
    targets: np.ndarray | None  # int64 (images,)
    classes: list[str] | None  # class name per row
    class_names: list[str] | None  # the run's class list (target -> name)


def _index(run: Run, text: bool = False) -> _Index:
    """The image index of ``run``. ``text``: names as valid Unicode text (see :func:`text_name`), for
    formats that store UTF-8 (h5, MATLAB, parquet); otherwise exactly as in the manifest."""
    rows = run.manifest.rows
    has_t = bool(rows) and "target" in rows[0]
    has_c = bool(rows) and "class" in rows[0]
    idx = _Index(
        paths=[r["path"] for r in rows],
        targets=np.array([r["target"] for r in rows], dtype=np.int64) if has_t else None,
        classes=[str(r["class"]) for r in rows] if has_c else None,
        class_names=run.classes,
    )
    if not text:
        return idx
    return _Index(
        paths=[text_name(p) for p in idx.paths],
        targets=idx.targets,
        classes=None if idx.classes is None else [text_name(c) for c in idx.classes],
        class_names=None if idx.class_names is None else [text_name(c) for c in idx.class_names],
    )


def text_name(name: str) -> str:
    """A file (or folder) name as valid Unicode text: bytes that are not UTF-8 (kept by Python as
    lone surrogates, 'surrogateescape') become ``\\xNN`` escapes, e.g. ``b'\\xff.png'`` -> ``'\\\\xff.png'``.
    Valid names are returned unchanged."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file name decoded to: escape it as a code point
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


# Row fields of videos and stimulus arrays (several rows per file) that locate each row in its file.
INDEX_EXTRA = ("id", "frame", "time", "sample_time", "start", "end", "index")


def write_index(run: Run, path: Path) -> None:
    """``images.csv``: one line per stored row (row, path, target, class), in array order; runs of
    videos or stimulus arrays add the columns of :data:`INDEX_EXTRA` their rows have."""
    rows = run.manifest.rows
    extra = [k for k in INDEX_EXTRA if any(r.get(k) is not None for r in rows)]
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "target", "class", *extra])
        for i, r in enumerate(rows):
            w.writerow([i, r["path"], r.get("target", ""), r.get("class", ""), *("" if r.get(k) is None else r[k]
                                                                               for k in extra)])


def _out_dtype(arr: LayerArray, allow_half: bool = True) -> np.dtype:
    # MATLAB, csv and parquet have no (portable) half type; float16 is widened, exactly.
    return np.dtype(np.float32) if arr.dtype == np.float16 and not allow_half else arr.dtype


def _float_fmt(dtype: np.dtype) -> str:
    """printf format that round-trips ``dtype`` exactly through text."""
    if dtype.kind in "iub":
        return "%d"
    return {2: "%.5g", 4: "%.9g"}.get(dtype.itemsize, "%.17g")


# -- per-layer writers ----------------------------------------------------------------------------
def _write_npy(run: Run, layer: str, path: Path) -> None:
    arr = run[layer]
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=arr.dtype, shape=arr.shape)
    for start, block in arr.iter_chunks():
        mm[start : start + len(block)] = block
    mm.flush()
    del mm


def _write_txt(run: Run, layer: str, path: Path) -> None:
    # 2-D only (images x units), no header: np.loadtxt(path) gives the matrix back exactly.
    arr = run[layer]
    fmt = _float_fmt(arr.dtype)
    with open(path, "w", encoding="ascii") as f:
        for _, block in arr.iter_chunks():
            np.savetxt(f, block.reshape(len(block), -1), fmt=fmt)


def _check_table(run: Run, layer: str, fmt: str) -> None:
    shape = run[layer].shape
    n = int(np.prod(shape))
    if n > MAX_TABLE_VALUES:
        raise LayertapError(
            f"layer '{layer}' has {shape[0]} images x {n // max(1, shape[0])} units = {n} values, more than the "
            f"{MAX_TABLE_VALUES} a {fmt} table holds; export it as npy or h5"
        )


def _unit_names(d: int) -> list[str]:
    return [f"u{j}" for j in range(d)]


def _write_csv(run: Run, layer: str, path: Path) -> None:
    arr = run[layer]
    idx = _index(run)
    d = int(np.prod(arr.shape[1:]))
    fmt = _float_fmt(_out_dtype(arr, allow_half=False))
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "target", "class", *_unit_names(d)])
        for start, block in arr.iter_chunks():
            flat = block.reshape(len(block), -1).astype(_out_dtype(arr, allow_half=False), copy=False)
            for i, values in enumerate(flat, start):
                t = "" if idx.targets is None else int(idx.targets[i])
                c = "" if idx.classes is None else idx.classes[i]
                w.writerow([i, idx.paths[i], t, c, *(fmt % v for v in values.tolist())])


def _write_parquet(run: Run, layer: str, path: Path) -> None:
    pa, pq = require("pyarrow", "export", "Parquet export"), require("pyarrow.parquet", "export", "Parquet export")
    arr = run[layer]
    idx = _index(run, text=True)
    d = int(np.prod(arr.shape[1:]))
    dtype = _out_dtype(arr, allow_half=False)
    fields = [pa.field("row", pa.int64()), pa.field("path", pa.string())]
    if idx.targets is not None:
        fields.append(pa.field("target", pa.int64()))
    if idx.classes is not None:
        fields.append(pa.field("class", pa.string()))
    unit_type = pa.from_numpy_dtype(dtype)
    fields += [pa.field(name, unit_type) for name in _unit_names(d)]
    meta = {b"layertap.layer": layer.encode(), b"layertap.shape": repr(tuple(arr.shape)).encode()}
    schema = pa.schema(fields, metadata=meta)
    with pq.ParquetWriter(str(path), schema) as writer:
        for start, block in arr.iter_chunks():
            stop = start + len(block)
            cols = [pa.array(np.arange(start, stop, dtype=np.int64)), pa.array(idx.paths[start:stop])]
            if idx.targets is not None:
                cols.append(pa.array(idx.targets[start:stop]))
            if idx.classes is not None:
                cols.append(pa.array(idx.classes[start:stop]))
            flat = block.reshape(len(block), -1).astype(dtype, copy=False)
            cols += [pa.array(np.ascontiguousarray(flat[:, j])) for j in range(d)]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))  # one row group per chunk


def _write_mat(run: Run, layer: str, path: Path) -> None:
    """MATLAB v5 below MAT5_MAX_BYTES (scipy.io.savemat), v7.3 above."""
    arr = run[layer]
    nbytes = int(np.prod(arr.shape)) * _out_dtype(arr, allow_half=False).itemsize
    if nbytes > MAT5_MAX_BYTES:
        _write_mat73(run, layer, path)
        return
    savemat = require("scipy.io", "export", "MATLAB export").savemat
    data = np.empty(arr.shape, dtype=_out_dtype(arr, allow_half=False))
    for start, block in arr.iter_chunks():  # scipy needs it all; fill without a second full copy
        data[start : start + len(block)] = block
    idx = _index(run, text=True)
    mdict: dict[str, Any] = {
        "activations": data,
        "layer": layer,
        "row": np.arange(len(data), dtype=np.int64),
        "path": _cell(idx.paths),
    }
    if idx.targets is not None:
        mdict["target"] = idx.targets
    if idx.classes is not None:
        mdict["class_name"] = _cell(idx.classes)
    if idx.class_names is not None:
        mdict["classes"] = _cell(idx.class_names)
    savemat(str(path), mdict, format="5", do_compression=False, oned_as="column")


def _cell(strings: list[str]) -> np.ndarray:
    """A column cell array of strings for savemat."""
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = s
    return cell


# -- MATLAB v7.3: HDF5 with a 512-byte MATLAB header and MATLAB_class attributes ---------------------
# MATLAB stores arrays column-major, so an array MATLAB sees as (n, c, h, w) is the HDF5 dataset of
# shape (w, h, c, n): we write the transpose, and MATLAB (and mat73/hdf5storage) read (n, c, h, w).
_MATLAB_CLASS = {
    "float64": "double",
    "float32": "single",
    "int64": "int64",
    "int32": "int32",
    "uint16": "uint16",
    "uint8": "uint8",
}


def _mat73_header() -> bytes:
    text = f"MATLAB 7.3 MAT-file, Platform: layertap, Created on: {time.strftime('%a %b %d %H:%M:%S %Y')} HDF5 schema 1.00 ."
    head = text.encode("ascii")[:116].ljust(116, b" ")
    # 8 bytes subsystem offset (unused), version 0x0200, endian indicator 'IM' (little-endian).
    return head + b"\x00" * 8 + b"\x00\x02" + b"IM"


def _mat73_attrs(obj: Any, matlab_class: str) -> None:
    obj.attrs.create("MATLAB_class", np.bytes_(matlab_class))


def _mat73_char(group: Any, name: str, s: str) -> Any:
    """A MATLAB char row vector (UTF-16 code units, uint16) as dataset ``group[name]``."""
    if not s:  # MATLAB writes empty arrays as their dims, flagged MATLAB_empty
        ds = group.create_dataset(name, data=np.zeros(2, dtype=np.uint64))
        _mat73_attrs(ds, "char")
        ds.attrs.create("MATLAB_empty", np.uint8(1))
        return ds
    units = np.frombuffer(s.encode("utf-16-le", "surrogatepass"), dtype="<u2")
    ds = group.create_dataset(name, data=units.reshape(-1, 1))  # HDF5 (L, 1) = MATLAB (1, L)
    _mat73_attrs(ds, "char")
    ds.attrs.create("MATLAB_int_decode", np.int32(2))
    return ds


def _mat73_cellstr(f: Any, name: str, strings: list[str]) -> None:
    """A MATLAB n x 1 cell of strings: object references into the ``#refs#`` group."""
    import h5py

    refs = f.require_group("#refs#")
    out = np.empty((1, len(strings)), dtype=h5py.ref_dtype)  # HDF5 (1, n) = MATLAB (n, 1)
    for i, s in enumerate(strings):
        out[0, i] = _mat73_char(refs, f"{name}_{i}", s).ref
    ds = f.create_dataset(name, data=out, dtype=h5py.ref_dtype)
    _mat73_attrs(ds, "cell")


def _mat73_numeric(f: Any, name: str, data: np.ndarray) -> None:
    data = data.reshape(-1, 1) if data.ndim == 1 else data  # MATLAB arrays are at least 2-D
    ds = f.create_dataset(name, data=data.T)
    _mat73_attrs(ds, _MATLAB_CLASS[data.dtype.name])


def _write_mat73(run: Run, layer: str, path: Path) -> None:
    h5py = require("h5py", "export", "HDF5 export")
    arr = run[layer]
    dtype = _out_dtype(arr, allow_half=False)
    idx = _index(run, text=True)
    mshape = arr.shape if arr.ndim > 1 else (*arr.shape, 1)
    hshape = tuple(reversed(mshape))  # (..., n): images on the last HDF5 axis
    row_bytes = max(1, int(np.prod(mshape[1:])) * dtype.itemsize)
    rows = rows_for_bytes(row_bytes, H5_CHUNK_BYTES, n_rows=arr.shape[0], limit=None)
    with h5py.File(path, "w", userblock_size=512) as f:
        ds = f.create_dataset("activations", shape=hshape, dtype=dtype, chunks=(*hshape[:-1], rows))
        _mat73_attrs(ds, _MATLAB_CLASS[dtype.name])
        for start, block in arr.iter_chunks():
            ds[..., start : start + len(block)] = block.astype(dtype, copy=False).reshape(len(block), *mshape[1:]).T
        _mat73_char(f, "layer", layer)
        _mat73_numeric(f, "row", np.arange(arr.shape[0], dtype=np.int64))
        _mat73_cellstr(f, "path", idx.paths)
        if idx.targets is not None:
            _mat73_numeric(f, "target", idx.targets)
        if idx.classes is not None:
            _mat73_cellstr(f, "class_name", idx.classes)
        if idx.class_names is not None:
            _mat73_cellstr(f, "classes", idx.class_names)
    with open(path, "r+b") as fh:  # h5py leaves the userblock zeroed; MATLAB reads its header there
        fh.write(_mat73_header())


# -- whole-run writers ----------------------------------------------------------------------------
_RESERVED = ("images", "targets", "class_names", "manifest")


def _check_reserved(layers: list[str], fmt: str) -> None:
    bad = [name for name in layers if name in _RESERVED]
    if bad:
        raise LayertapError(f"layer name '{bad[0]}' is reserved in {fmt} exports; export it as npy instead")


def _write_h5(run: Run, layers: list[str], path: Path) -> None:
    """``/<layer>`` (images, ...) chunked along rows; ``/images/{row,path,target,class}``; ``/manifest``."""
    h5py = require("h5py", "export", "HDF5 export")
    import json

    _check_reserved(layers, "h5")
    idx = _index(run, text=True)
    with h5py.File(path, "w") as f:
        for layer in layers:
            arr = run[layer]
            row_bytes = max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize)
            rows = rows_for_bytes(row_bytes, H5_CHUNK_BYTES, n_rows=arr.shape[0], limit=None)
            ds = f.create_dataset(layer, shape=arr.shape, dtype=arr.dtype, chunks=(rows, *arr.shape[1:]))
            for start, block in arr.iter_chunks():
                ds[start : start + len(block)] = block
            ds.attrs["module"] = str(run.manifest.layers[layer].get("module", layer))
        g = f.create_group("images")
        g.create_dataset("row", data=np.arange(len(idx.paths), dtype=np.int64))
        g.create_dataset("path", data=idx.paths, dtype=h5py.string_dtype())
        if idx.targets is not None:
            g.create_dataset("target", data=idx.targets)
        if idx.classes is not None:
            g.create_dataset("class", data=idx.classes, dtype=h5py.string_dtype())
        if idx.class_names is not None:
            g.attrs["classes"] = json.dumps(idx.class_names)
        f.create_dataset("manifest", data=json.dumps(run.manifest.to_dict()), dtype=h5py.string_dtype())


def _write_pt(run: Run, layers: list[str], path: Path) -> None:
    """``torch.save({layer: Tensor, "images": [...], "targets": Tensor|None, "class_names", "manifest"})``.

    Each layer is first streamed into a temporary .npy memory map beside ``path`` and handed to
    torch as a tensor over that map, so torch.save writes it without holding the layer in memory
    (it needs that much free disk for a moment). Load with ``torch.load(path, mmap=True)``.
    """
    import torch

    _check_reserved(layers, "pt")
    idx = _index(run)
    tmp = [path.with_name(f".{path.name}.{i}.tmp.npy") for i in range(len(layers))]
    try:
        payload: dict[str, Any] = {}
        for layer, t in zip(layers, tmp, strict=True):
            arr = run[layer]
            mm = np.lib.format.open_memmap(t, mode="w+", dtype=arr.dtype, shape=arr.shape)
            for start, block in arr.iter_chunks():
                mm[start : start + len(block)] = block
            payload[layer] = torch.from_numpy(mm)
        payload["images"] = idx.paths
        payload["targets"] = None if idx.targets is None else torch.from_numpy(idx.targets)
        payload["class_names"] = idx.class_names
        payload["manifest"] = run.manifest.to_dict()
        torch.save(payload, path)
        del payload
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)


@dataclass(frozen=True)
class Writer:
    """One export format: file extension, whether it writes one file per layer, the writer."""

    ext: str
    write: Callable[..., None]  # per_layer: (run, layer, path); else (run, layers, path)
    per_layer: bool = True
    check: Callable[[Run, str, str], None] | None = None  # refuses a layer before anything is written


WRITERS: dict[str, Writer] = {
    "npy": Writer(".npy", _write_npy),
    "txt": Writer(".txt", _write_txt),
    "h5": Writer(".h5", _write_h5, per_layer=False),
    "mat": Writer(".mat", _write_mat),
    "mat73": Writer(".mat", _write_mat73),
    "pt": Writer(".pt", _write_pt, per_layer=False),
    "parquet": Writer(".parquet", _write_parquet, check=_check_table),
    "csv": Writer(".csv", _write_csv, check=_check_table),
}
#: formats that store names as UTF-8 text (non-UTF-8 file names are escaped there)
_UTF8_FORMATS = ("h5", "mat", "mat73", "parquet")
_ALIASES = {"hdf5": "h5", "mat7.3": "mat73", "mat-v7.3": "mat73", "torch": "pt", "pth": "pt", "text": "txt"}


def format_name(fmt: str) -> str:
    """The canonical export format for ``fmt`` ('.npy', 'hdf5', 'mat7.3', ...), or a one-line error."""
    name = fmt.lstrip(".").lower()
    name = _ALIASES.get(name, name)
    if name not in WRITERS:
        raise LayertapError(f"unknown export format '{fmt}'; choose one of {', '.join(WRITERS)}")
    return name


def export(
    run: Run | str | os.PathLike[str],
    fmt: str = "npy",
    out: str | os.PathLike[str] | None = None,
    layers: list[str] | None = None,
) -> list[Path]:
    """Write the layers of ``run`` in format ``fmt`` into ``out`` plus ``out/images.csv``.

    ``fmt`` is one of npy, txt, h5, mat, mat73, pt, parquet, csv (see the module docstring).
    Per-layer formats write ``out/<layer>.<ext>``; h5 and pt write one ``out/activations.<ext>``
    holding every layer. ``out`` defaults to ``RUN/export-<fmt>``. Every file carries (or sits
    beside) the image index in array row order.

    Args:
        run: the run (or its directory).
        fmt: the format: npy, txt, h5, mat, mat73, pt, parquet or csv.
        out: the folder to write into (default ``RUN/export-<fmt>``).
        layers: the layers to export (default all).

    Returns:
        The written paths (``images.csv`` among them).

    Raises:
        LayertapError: an unknown format or layer, a missing optional dependency, a layer too large for the
            format, or a write error.

    Example:
        >>> paths = lt.export("runs/resnet18", "h5", "exports/")  # doctest: +SKIP
        >>> [p.name for p in paths]  # doctest: +SKIP
        ['activations.h5', 'images.csv']
    """
    run = open_complete_run(run)
    fmt = format_name(fmt)
    w = WRITERS[fmt]
    names = list(layers or run.layers)
    for layer in names:
        run[layer]  # unknown layer: one error before anything is written
        if w.check is not None:
            w.check(run, layer, fmt)
    dest = Path(out) if out is not None else run.path / f"export-{fmt}"
    if fmt in _UTF8_FORMATS:
        escaped = [p for p in run.images if text_name(p) != p]
        if escaped:
            log.warning(
                "%d file name(s) are not UTF-8 (e.g. %s): written with \\xNN escapes; images.csv keeps the exact bytes",
                len(escaped),
                text_name(escaped[0]),
            )
    targets = [dest / f"{layer}{w.ext}" for layer in names] if w.per_layer else [dest / f"activations{w.ext}"]
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if w.per_layer:
            for layer, path in zip(names, targets, strict=True):
                w.write(run, layer, path)
        else:
            w.write(run, names, targets[0])
        write_index(run, dest / "images.csv")
    except BaseException as err:
        # No partial export: a half-written file would look like a finished one.
        for path in [*targets, dest / "images.csv"]:
            path.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise disk_error(err, dest) from None
        raise
    return [*targets, dest / "images.csv"]


# -- helpers for old pipelines: N-D activations as 2-D text, split / merge -----------------------------
_HEADER = re.compile(
    r"^#\s*(?:layertap slices:\s*)?(?:Array\s+)?shape[:=]\s*\(([\d,\s]*)\)(?:\s*dtype[:=]\s*(\w+))?", re.I
)


def _slices_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """2-D layout of an N-D array: the last axis is the columns, all others stack into rows."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (shape[0], 1)
    return (int(np.prod(shape[:-1])), shape[-1])


def _iter_rows(acts: Any, rows: int = 256) -> Iterator[np.ndarray]:
    """Blocks of ``acts`` along its first axis (a LayerArray is read chunk by chunk)."""
    if isinstance(acts, LayerArray):
        rows = acts.chunk_rows
    else:
        acts = np.asarray(acts)
        if acts.ndim == 0:
            yield acts.reshape(1)
            return
    for _, block in iter_row_blocks(acts, rows):
        yield block


def tensor2slices(
    acts: np.ndarray | LayerArray | str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    file_name: str | np.ndarray | None = None,
) -> np.ndarray | Path:
    """N-D activations (images, c, h, w) -> 2-D matrix (images*c*h, w): stacked last-axis slices.

    Without ``out_path``, returns the matrix (``slices2tensor(matrix, acts.shape)`` inverts it).
    With ``out_path`` (a folder, plus ``file_name``; or a file path), writes it as text with a
    header line ``# layertap slices: shape=(...) dtype=...`` so the file alone restores the
    array (values printed with enough digits to round-trip the dtype exactly), and returns the
    path. A LayerArray is written chunk by chunk. The seed's argument order
    ``tensor2slices(out_path, file_name, features)`` is accepted too.

    Args:
        acts: the activations (numpy array or LayerArray), at least 2-D.
        out_path: a folder (with ``file_name``) or a file to write; None: return the matrix.
        file_name: the file's name inside ``out_path``.

    Returns:
        The matrix, or the written file's path.

    Example:
        >>> tensor2slices(np.zeros((2, 3, 4, 5))).shape
        (24, 5)
    """
    if isinstance(acts, (str, os.PathLike)):  # seed order: (out_path, file_name, features)
        acts, out_path, file_name = file_name, acts, out_path  # type: ignore[assignment]
    if acts is None or isinstance(acts, (str, os.PathLike)):
        raise LayertapError("tensor2slices needs the activations array")
    if not isinstance(acts, LayerArray):
        acts = np.asarray(acts)
    shape = tuple(int(s) for s in acts.shape)
    if out_path is None:
        return np.asarray(acts).reshape(_slices_shape(shape))
    path = Path(out_path) / str(file_name) if file_name is not None else Path(out_path)
    dtype = np.dtype(acts.dtype)
    fmt = _float_fmt(dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            f.write(f"# layertap slices: shape=({', '.join(map(str, shape))}) dtype={dtype.name}\n")
            for block in _iter_rows(acts):
                np.savetxt(f, block.reshape(-1, _slices_shape(shape)[1]), fmt=fmt)
    except OSError as err:
        raise disk_error(err, path) from None
    return path


def slices2tensor(
    source: np.ndarray | str | os.PathLike[str],
    shape_or_file: tuple[int, ...] | list[int] | str | None = None,
) -> np.ndarray:
    """Invert :func:`tensor2slices`: ``slices2tensor(matrix, shape)`` or ``slices2tensor(out_path, file_name)``.

    From a file, the shape (and dtype) come from its header line; the seed's header
    ``# Array shape: (...)`` is read too (as float64 unless a dtype is given).

    Args:
        source: the matrix, or a folder (with a file name) or file written by :func:`tensor2slices`.
        shape_or_file: the original shape (with a matrix), or the file name (with a folder).

    Returns:
        The N-D array.

    Example:
        >>> x = np.arange(24.0).reshape(2, 3, 4)
        >>> np.array_equal(slices2tensor(tensor2slices(x), x.shape), x)
        True
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source) / shape_or_file if isinstance(shape_or_file, str) else Path(source)
        try:
            with open(path, encoding="ascii") as f:
                m = _HEADER.match(f.readline())
                if m is None:
                    raise LayertapError(f"{path} has no '# layertap slices: shape=(...)' header line")
                shape = tuple(int(s) for s in m.group(1).replace(" ", "").split(",") if s)
                dtype = np.dtype(m.group(2) or "float64")
                matrix = np.loadtxt(f, dtype=dtype, ndmin=2)
        except OSError as err:
            raise LayertapError(f"cannot read {path}: {err.strerror or err}") from None
    else:
        if shape_or_file is None or isinstance(shape_or_file, str):
            raise LayertapError("slices2tensor(matrix, shape) needs the original shape")
        matrix, shape = np.asarray(source), tuple(int(s) for s in shape_or_file)
    if matrix.size != int(np.prod(shape)):
        raise LayertapError(f"a {matrix.shape} matrix cannot be reshaped to {shape}")
    return matrix.reshape(shape)


_PART = re.compile(r"^(?P<stem>.+)\.part(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>npy|txt)$")


def split_activations(
    source: np.ndarray | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    n_splits: int = 10,
    *,
    fmt: str | None = None,
    stem: str | None = None,
) -> list[Path]:
    """Split activations along the image axis into ``n_splits`` files ``<stem>.partIII-of-NNN.<fmt>``.

    ``source`` is an array or a .npy / .txt file (txt as written by :func:`tensor2slices` or a
    plain 2-D matrix). Parts differ in length by at most one row. ``fmt`` (npy or txt) defaults
    to the source file's format, npy for arrays.

    Args:
        source: the activations, or a .npy / .txt file of them.
        out_dir: the folder for the parts.
        n_splits: the number of parts.
        fmt: ``npy`` or ``txt``.
        stem: the parts' name stem (default the source file's, ``activations`` for arrays).

    Returns:
        The part paths, in order.

    Example:
        >>> parts = split_activations(np.zeros((10, 4)), "parts/", 3)  # doctest: +SKIP
        >>> [p.name for p in parts]  # doctest: +SKIP
        ['activations.part000-of-003.npy', 'activations.part001-of-003.npy', 'activations.part002-of-003.npy']
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.is_file():
            raise LayertapError(f"no such file: {p}")
        if p.suffix == ".npy":
            data = np.load(p, mmap_mode="r")  # parts are copied out one at a time
        else:
            with open(p, encoding="ascii") as f:
                has_header = _HEADER.match(f.readline()) is not None
            data = slices2tensor(p) if has_header else np.loadtxt(p, ndmin=2)
        fmt = fmt or ("npy" if p.suffix == ".npy" else "txt")
        stem = stem or p.stem
    else:
        data = np.asarray(source)
        fmt, stem = fmt or "npy", stem or "activations"
    if fmt not in ("npy", "txt"):
        raise LayertapError(f"split format must be npy or txt, not '{fmt}'")
    if data.ndim == 0 or not 1 <= n_splits <= len(data):
        raise LayertapError(f"cannot split {data.shape[0] if data.ndim else 0} rows into {n_splits} parts")
    out = Path(out_dir)
    width = max(3, len(str(n_splits)))
    bounds = np.linspace(0, len(data), n_splits + 1).round().astype(int)
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i in range(n_splits):
            path = out / f"{stem}.part{i:0{width}d}-of-{n_splits:0{width}d}.{fmt}"
            part = np.asarray(data[bounds[i] : bounds[i + 1]])
            if fmt == "npy":
                np.save(path, part)
            else:
                tensor2slices(part, path)
            paths.append(path)
    except OSError as err:
        raise disk_error(err, out) from None
    return paths


def merge_activations(
    directory: str | os.PathLike[str], *, stem: str | None = None, out: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """Concatenate the parts written by :func:`split_activations` in ``directory``, in order.

    Checks that every part 0..N-1 is there. ``stem`` picks one set when the folder holds
    several. With ``out`` (a .npy path) the merged array is also written there.

    Args:
        directory: the folder holding the parts.
        stem: which set of parts (when the folder holds several).
        out: a .npy file to write the merged array to as well.

    Returns:
        The merged array.

    Raises:
        LayertapError: no parts, several sets without ``stem``, or a part missing.

    Example:
        >>> merge_activations("parts/").shape  # doctest: +SKIP
        (10, 4)
    """
    d = Path(directory)
    sets: dict[tuple[str, int, str], dict[int, Path]] = {}
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        m = _PART.match(p.name)
        if m and (stem is None or m["stem"] == stem):
            sets.setdefault((m["stem"], int(m["n"]), m["ext"]), {})[int(m["i"])] = p
    if not sets:
        raise LayertapError(f"no '<stem>.partI-of-N.npy|txt' files in {d}")
    if len(sets) > 1:
        raise LayertapError(f"{d} holds several split sets ({', '.join(sorted({k[0] for k in sets}))}); pass stem=")
    (name, n, ext), parts = next(iter(sets.items()))
    missing = sorted(set(range(n)) - set(parts))
    if missing:
        raise LayertapError(f"split set '{name}' in {d} lacks part(s) {missing} of {n}")
    load = np.load if ext == "npy" else slices2tensor
    merged = np.concatenate([load(parts[i]) for i in range(n)], axis=0)
    if out is not None:
        np.save(out, merged)
    return merged
