"""Reading a run: :class:`Run` (one directory per run) and :class:`LayerArray` (one stored layer).

A run directory (see :mod:`layertap.store.files` for its files) holds one chunked Zarr array per layer, a
manifest (:mod:`layertap.store.manifest`) and, while it is being written (:mod:`layertap.store.writer`), a
resume cursor. Rows are committed one whole chunk at a time and the cursor is written atomically *after*
the chunk, so a reader serves exactly the committed rows, and resuming rewrites exactly the chunks that may
be incomplete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from layertap.errors import LayertapError, StorageError, close_matches
from layertap.store.blocks import iter_row_blocks
from layertap.store.chunks import bf16_to_float32, chunk_key, chunk_nbytes, read_checksums, zarr_open
from layertap.store.files import ARRAYS, MANIFEST, PROGRESS, read_run_json
from layertap.store.labels import run_html, to_pandas, to_xarray
from layertap.store.manifest import Manifest, read_manifest, row_label
from layertap.store.verify import VerifyResult, check_run, damage_message, read_damaged

__all__ = ["LayerArray", "Run", "VerifyResult", "check_progress", "open_run", "verify_run"]


def check_progress(p: dict[str, Any], n_rows: int) -> str | None:
    """What is wrong with a cursor (``progress.json``) for arrays of ``n_rows`` rows, or None.

    Args:
        p: the cursor: ``rows`` committed, ``next_image`` (where work resumes), ``skipped`` images.
        n_rows: the rows the arrays hold.

    Returns:
        A short reason, or None when the cursor can be trusted.

    Example:
        >>> check_progress({"rows": 4, "next_image": 4, "skipped": []}, 10) is None
        True
        >>> check_progress({"rows": 12, "next_image": 12, "skipped": []}, 10)
        '12 rows committed, beyond the 10 possible'
    """
    rows, nxt, skipped = p.get("rows"), p.get("next_image"), p.get("skipped")
    if not (isinstance(rows, int) and isinstance(nxt, int)) or isinstance(rows, bool) or isinstance(nxt, bool):
        return "fields missing or of the wrong type"
    if not isinstance(skipped, list):
        return "fields missing or of the wrong type"
    if rows < 0 or nxt < 0:
        return "negative position"
    if rows > n_rows or rows > nxt:
        return f"{rows} rows committed, beyond the {min(n_rows, nxt)} possible"
    return None


class LayerArray:
    """Read access to one stored layer: numpy-style slicing, chunk by chunk, never all at once.

    ``shape`` is (images, ...features); ``dtype`` is what indexing returns (bfloat16 layers are
    stored as their 16-bit patterns and returned as float32). ``np.asarray(arr)`` loads it all.

    Args:
        path: the array's directory (``run/arrays/<layer>``).
        stored_dtype: the dtype the manifest records (``float32``, ``float16`` or ``bfloat16``).
        rows: the rows that may be read (a run still being written: its committed rows); None: all.

    Raises:
        LayertapError: the array is missing or damaged.

    Example:
        >>> arr = lt.open_run("runs/resnet18")["avgpool"]  # doctest: +SKIP
        >>> arr.shape, arr[:2].shape, sum(len(b) for _, b in arr.iter_chunks())  # doctest: +SKIP
        ((100, 512, 1, 1), (2, 512, 1, 1), 100)
    """

    def __init__(self, path: Path, stored_dtype: str, rows: int | None = None):
        try:
            self._z = zarr_open(path)
        except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing or broken array
            raise StorageError(
                f"the array {path} is missing or damaged ({type(err).__name__}); re-run the extract command "
                "to repair the run") from None
        self.stored_dtype = stored_dtype
        self.shape: tuple[int, ...] = tuple(self._z.shape)
        #: rows that may be read: fewer than the array's while a run is still being written
        self._rows = self.shape[0] if rows is None else min(rows, self.shape[0])
        self.shape = (self._rows, *self.shape[1:])
        self.chunk_rows: int = int(self._z.chunks[0])
        self.dtype = np.dtype("float32") if stored_dtype == "bfloat16" else np.dtype(self._z.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        """The number of axes (the image axis included)."""
        return len(self.shape)

    def _key(self, key: Any) -> Any:
        """``key`` with its row part bounded by the committed rows (a run still being written)."""
        if self._rows == self._z.shape[0]:
            return key
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest) if rest else ()
        n = self._rows
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            first = slice(start, max(start, stop), step) if step > 0 else np.arange(start, stop, step)
        elif isinstance(first, (int, np.integer)):
            if not -n <= first < n:
                raise IndexError(f"row {first} out of range for {n} committed rows")
            first = int(first) % n
        else:
            idx = np.asarray(first)
            if idx.dtype == bool:
                if idx.shape[0] != n:
                    raise IndexError(f"boolean index of {idx.shape[0]} rows for {n} committed rows")
                idx = np.flatnonzero(idx)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"row index out of range for {n} committed rows")
            first = np.where(idx < 0, idx + n, idx)
        return (first, *rest)

    def __getitem__(self, key: Any) -> np.ndarray:
        data = np.asarray(self._z[self._key(key)])
        return bf16_to_float32(data) if self.stored_dtype == "bfloat16" else data

    def raw(self, key: Any) -> np.ndarray:
        """Rows as stored (bfloat16 as uint16 bit patterns), for copying without conversion.

        Args:
            key: a numpy-style index (rows first).

        Returns:
            The rows, in the stored dtype.
        """
        return np.asarray(self._z[self._key(key)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)

    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, block)`` over the rows, ``rows`` at a time (default: one chunk).

        Args:
            rows: rows per block (default: the chunk rows, so every chunk is read once).

        Returns:
            An iterator of ``(first row, block)`` (see :func:`~layertap.store.blocks.iter_row_blocks`).
        """
        return iter_row_blocks(self, rows or self.chunk_rows)

    def __repr__(self) -> str:
        return f"LayerArray(shape={self.shape}, dtype={self.stored_dtype})"


class Run:
    """A finished (or in-progress) run directory: ``run["avgpool"]`` is a :class:`LayerArray`.

    A run still being written serves only its committed rows (``len(run.images)`` of them). Opening
    checks that every chunk file of those rows is there at its full size (a cheap ``stat``; see
    :meth:`verify` for checksums) and refuses a damaged run in one line rather than serve zeros;
    ``check=False`` opens it anyway (``damage`` then lists what is wrong).

    Args:
        path: the run directory.
        check: refuse a run with missing or damaged chunks (one line that says which rows are lost).

    Raises:
        LayertapError: not a run, its manifest or cursor damaged, a newer manifest schema, or (``check``)
            damaged chunks.

    Example:
        >>> run = Run("runs/resnet18")  # doctest: +SKIP
        >>> run.layers, len(run.images), run["avgpool"].shape, run.manifest.model["name"]  # doctest: +SKIP
        (['avgpool'], 100, (100, 512, 1, 1), 'torchvision:resnet18')
    """

    def __init__(self, path: str | os.PathLike[str], check: bool = True):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise LayertapError(f"{self.path} is not a layertap run (no {MANIFEST})")
        #: what the run is (:class:`~layertap.store.manifest.Manifest`; also readable as its JSON mapping)
        self.manifest: Manifest = read_manifest(self.path)
        #: rows that may be read: all of them once complete, else those behind the cursor
        self.rows: int | None = None
        self._progress: dict[str, Any] = {"rows": 0, "next_image": 0, "skipped": []}
        if not self.complete:
            self._read_cursor()
        self._sums: dict[tuple[str, int], tuple[int, int]] | None = None
        #: per layer, the chunks that are missing or damaged (filled by the check on open)
        self.damage: dict[str, dict[int, str]] = self.check_chunks() if self.layers else {}
        for layer, chunks in read_damaged(self.path).items():  # what the last verify found
            if layer in self.manifest.layers:
                self.damage[layer] = {**chunks, **self.damage.get(layer, {})}
        if check and self.damage:
            raise StorageError(damage_message(self))

    def _read_cursor(self) -> None:
        """A running run: find how many rows are committed (none before the first commit)."""
        p = self.path / PROGRESS
        if p.is_file():
            prog = read_run_json(p, "re-run the extract command to redo the unfinished part")
            n_images = int(self.manifest.spec.get("n_images", 1 << 62))
            problem = check_progress(prog, n_images)
            if problem:
                raise StorageError(
                    f"{p} is damaged ({problem}); re-run the extract command to redo the unfinished part")
            self._progress = prog
        self.rows = int(self._progress["rows"])

    def check_chunks(self) -> dict[str, dict[int, str]]:
        """Per layer, the chunks of the readable rows whose file is missing or too short.

        Returns:
            ``{layer: {chunk: problem}}`` for damaged layers only (empty when all is well).
        """
        damage: dict[str, dict[int, str]] = {}
        for layer, info in self.manifest.layers.items():
            path = self.path / ARRAYS / layer
            try:
                z = zarr_open(path)
            except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing array
                n = len(self.manifest.rows) if self.complete else self.rows or 0
                chunks = max(1, -(-n // (self.manifest.chunk_rows or max(1, n))))
                damage[layer] = dict.fromkeys(range(chunks), f"array missing ({type(err).__name__})")
                continue
            rows = z.shape[0] if self.rows is None else min(self.rows, z.shape[0])
            n_images = len(self.manifest.rows)
            if self.complete and self.manifest.images is not None and z.shape[0] != n_images:
                damage[layer] = {0: f"array of {z.shape[0]} rows for {n_images} images"}
                continue
            if list(z.shape[1:]) != list(info["shape"]):
                damage[layer] = {0: f"array of shape {list(z.shape[1:])}, not {info['shape']}"}
                continue
            size = chunk_nbytes(z)
            # Arrays made before chunk files were fsynced and checksummed ('/'-separated keys) left
            # all-zero chunks unwritten (zarr's default): there a missing file is only lost rows if
            # the chunk was committed since (it then has a checksum).
            sep = getattr(getattr(z.metadata, "chunk_key_encoding", None), "separator", ".")
            bad: dict[int, str] = {}
            for c in range(-(-rows // int(z.chunks[0]))):
                key = chunk_key(z, c)
                if key is None:
                    break
                try:
                    got = os.stat(path / key).st_size
                except FileNotFoundError:
                    if sep == "." or (layer, c) in self._checksums():
                        bad[c] = "missing"
                    continue
                if size is not None and got != size:
                    bad[c] = f"{got} bytes, not {size}"
            if bad:
                damage[layer] = bad
        return damage

    def _checksums(self) -> dict[tuple[str, int], tuple[int, int]]:
        """The checksum log, read once (only needed for arrays of older runs)."""
        if self._sums is None:
            self._sums = read_checksums(self.path)
        return self._sums

    def verify(self) -> VerifyResult:
        """Check every chunk: present, full size, and equal to the checksum recorded at commit.

        Returns:
            What was found (see :func:`verify_run`).
        """
        return check_run(Run(self.path, check=False))

    @property
    def complete(self) -> bool:
        """Whether the run is finished (else it is being written, or was interrupted)."""
        return self.manifest.complete

    @property
    def layers(self) -> list[str]:
        """The stored layers, in the order they were stored."""
        return list(self.manifest.layers)

    def __getitem__(self, layer: str) -> LayerArray:
        info = self.manifest.layers.get(layer)
        if info is None:
            raise LayertapError(f"run {self.path} has no layer '{layer}'{close_matches(layer, self.layers)}")
        return LayerArray(self.path / ARRAYS / layer, info["dtype"], self.rows)

    def __contains__(self, layer: str) -> bool:
        return layer in self.manifest.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def _rows(self) -> list[dict[str, Any]]:
        """The manifest's image rows, one per readable row (committed rows of a running run)."""
        imgs = self.manifest.images
        if not isinstance(imgs, dict) or not isinstance(imgs.get("rows"), list):
            raise LayertapError(f"{self.path} has no image list yet (started by an older layertap); let it finish")
        if self.rows is None:
            return imgs["rows"]
        # While running, the manifest lists every image (none skipped yet) and the cursor the skipped.
        skipped = {int(i) for i, _ in self._progress["skipped"]}
        nxt = int(self._progress["next_image"])
        return [r for i, r in enumerate(imgs["rows"][:nxt]) if i not in skipped][: self.rows]

    @property
    def images(self) -> list[str]:
        """One name per stored row: the image path (relative to ``manifest['images']['root']``); for a
        row of a video (several rows share one file) or a stimulus array its ``id`` when one was given,
        else the file plus ``#frame`` or ``#first-last`` (clips) (see :func:`row_label`)."""
        return [row_label(r) for r in self._rows()]

    @property
    def targets(self) -> np.ndarray | None:
        """The class index of every row (images in class folders), or None."""
        rows = self._rows()
        if not rows or "target" not in rows[0]:
            return None
        return np.array([r["target"] for r in rows], dtype=np.int64)

    @property
    def classes(self) -> list[str] | None:
        """The class names (``targets`` index them), or None."""
        return (self.manifest.images or {}).get("classes")

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """The images that could not be decoded: ``{"path", "reason", "index"}`` each (they have no row)."""
        if self.rows is not None:
            paths = [r["path"] for r in self.manifest.rows]
            return [
                {"path": paths[int(i)] if int(i) < len(paths) else "", "reason": str(r), "index": int(i)}
                for i, r in self._progress["skipped"]
            ]
        return list((self.manifest.images or {}).get("skipped", []))

    def __repr__(self) -> str:
        n = len(self.manifest.rows) if self.rows is None else self.rows
        return f"Run({str(self.path)!r}, {n} images, layers={self.layers}, status={self.manifest.status})"

    def to_xarray(self, layer: str) -> Any:
        """``self[layer]`` as a labelled ``xarray.DataArray`` (see :func:`layertap.store.labels.to_xarray`).

        Args:
            layer: the layer.

        Returns:
            The DataArray (all rows loaded).
        """
        return to_xarray(self, layer)

    def to_pandas(self, layer: str) -> Any:
        """A 2-D layer as a ``pandas.DataFrame`` indexed by image path (see :func:`layertap.store.labels.to_pandas`).

        Args:
            layer: the layer.

        Returns:
            The DataFrame (all rows loaded).
        """
        return to_pandas(self, layer)

    def _repr_html_(self) -> str:
        return run_html(self)


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a run directory written by :func:`layertap.extract` (or merged, or postprocessed).

    Args:
        path: the run directory.

    Returns:
        The :class:`Run`.

    Raises:
        LayertapError: see :class:`Run`.

    Example:
        >>> run = open_run("runs/resnet18")  # doctest: +SKIP
        >>> feats = run["avgpool"][:100]  # doctest: +SKIP
    """
    return Run(path)


def open_complete_run(run: Run | str | os.PathLike[str]) -> Run:
    """Open a run and refuse an unfinished one (its arrays hold zero rows where work is missing).

    What every reader of finished runs (process, analysis, encode, export) opens its input with.

    Args:
        run: a Run or a run directory.

    Returns:
        The opened, complete run.

    Raises:
        LayertapError: the run is not complete (re-running its extract command finishes it).

    Example:
        >>> run = open_complete_run("./acts")  # doctest: +SKIP
    """
    run = run if isinstance(run, Run) else open_run(run)
    if not run.complete:
        raise LayertapError(f"{run.path} is not complete; run the same extract command again to finish it first")
    return run


def verify_run(path: str | os.PathLike[str]) -> VerifyResult:
    """Check a run: manifest and cursor readable, every chunk file present at full size, and every
    chunk's content equal to the CRC-32 recorded when it was committed. Reads the whole run. The
    damaged chunks are recorded in ``damaged.json`` (removed when none are found): later opens
    refuse them and re-running the extract command recomputes them, without reading the run again.

    Args:
        path: the run directory.

    Returns:
        A :class:`VerifyResult`; ``summary`` is one line. A run whose metadata cannot be read
        raises :class:`LayertapError` instead.

    Example:
        >>> result = verify_run("runs/resnet18")  # doctest: +SKIP
        >>> result.ok, result.summary  # doctest: +SKIP
        (True, 'ok: runs/resnet18 (complete, 4 rows, 1 layers, 2 chunks, 2 checksums verified)')
    """
    return check_run(Run(path, check=False))
