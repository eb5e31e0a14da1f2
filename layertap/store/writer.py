"""Writing a run: :class:`RunWriter` (an extraction or a merge: rows of every layer, chunk by chunk, resumable)
and :class:`DerivedRunWriter` (a postprocessed copy of a run: whole layers, one after another).

Both write the manifest through :func:`~layertap.store.manifest.write_manifest` and create arrays through
:func:`~layertap.store.chunks.zarr_create`. The order of writes is what makes a run survive a kill or a power
loss: a chunk's files are written and fsynced, its CRC-32 appended to ``checksums.tsv`` (fsynced), and only
then the cursor (``progress.json``) moved past it, atomically; ``status: complete`` is written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from layertap._version import __version__
from layertap.errors import LayertapError, StorageError, option_name, option_spelling
from layertap.store.blocks import fit_chunk_rows, rows_for_bytes
from layertap.store.chunks import chunk_crc, chunk_key, zarr_create, zarr_open
from layertap.store.files import (
    ARRAYS,
    CHECKSUMS,
    DAMAGED,
    LOCK,
    MANIFEST,
    PROGRESS,
    disk_error,
    fsync_dir,
    fsync_file,
    read_json,
    read_run_json,
    write_json_atomic,
)
from layertap.store.manifest import LayerInfo, Manifest, StorageInfo, read_manifest, spec_diff, write_manifest
from layertap.store.run import Run, check_progress
from layertap.store.verify import damage_message

log = logging.getLogger("layertap")


def _copy_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``; through torch for float arrays, whose copy is multi-threaded and fast
    for the transposing copy out of channels_last feature maps."""
    if src.dtype in (np.float32, np.float16) and src.dtype == dst.dtype and dst.size > 65536:
        import torch

        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        dst[...] = src


class RunWriter:
    """Writes one run: creates or resumes the directory, buffers rows into whole chunks, commits.

    ``spec`` identifies the job (model, weights, layers, images, options); re-running the same
    spec on an unfinished directory resumes it, a different spec is refused unless ``overwrite``.
    The directory is locked (``fcntl.lockf``) while the writer is open.

    Args:
        path: the run directory (created if missing).
        spec: the job's identity (JSON-able).
        overwrite: replace whatever run ``path`` holds.

    Raises:
        LayertapError: another process writes ``path``; ``path`` holds another job (without
            ``overwrite``); its manifest is damaged; the disk is not writable.

    Example:
        >>> with RunWriter(out, spec) as w:  # doctest: +SKIP
        ...     w.begin(Manifest(model=provenance))
        ...     w.create_layers({"fc": {"shape": [10]}}, n_rows=len(images), dtype="float32", chunk_rows=None)
        ...     w.add({"fc": feats}, image_indices=[0, 1])
        ...     w.finish(len(images))
        ...     w.complete(finished=now, images=images_section)
    """

    def __init__(self, path: str | os.PathLike[str], spec: dict[str, Any], *, overwrite: bool = False):
        self.path = Path(path)
        self.spec = spec
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / LOCK, "a+")
        except OSError as err:
            raise disk_error(err, self.path) from None
        try:
            # POSIX record locks belong to this process only: forked decode workers do not inherit them,
            # so a kill -9 of the main process frees the directory at once.
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise StorageError(
                f"another layertap process is writing to {self.path}; wait for it to finish or choose another {option_name('out')}") from None
        self.already_complete = False
        #: the run's manifest: None until an unfinished or complete run is found, or :meth:`begin` is called
        self.manifest: Manifest | None = None
        self.progress: dict[str, Any] = {"rows": 0, "next_image": 0, "skipped": []}
        manifest_path = self.path / MANIFEST
        #: per layer, damaged chunks of a complete run (re-running the extract command repairs them)
        self.damage: dict[str, dict[int, str]] = {}
        self._found = False
        if manifest_path.is_file() and not overwrite:
            try:
                old = read_manifest(self.path, "restore it, or pass --overwrite to redo the run")
            except LayertapError:
                self.close()
                raise
            if old.spec != spec:
                self.close()
                diff = spec_diff(old.spec, spec)
                raise LayertapError(
                    f"{self.path} holds a different run (differs in: {', '.join(diff) or 'format'}); "
                    f"pass {option_spelling('overwrite')} to replace it or choose another {option_name('out')}"
                )
            self.manifest, self._found = old, True
            if old.complete:
                self.already_complete = True
                if not old.layers:
                    return
                try:
                    # Cheap (stat per chunk, no reads): 'nothing to do' must not read a 100 GB run.
                    # Checksum damage is found by 'layertap verify', which records it for this check.
                    done = Run(self.path, check=False)
                except LayertapError:
                    self.close()
                    raise
                self.damage = done.damage
                if not self.damage:
                    return
                log.warning("%s", damage_message(done, self.damage))
            elif (self.path / PROGRESS).is_file():
                self.progress = self._read_progress()
        else:
            for stale in (MANIFEST, PROGRESS, ARRAYS, CHECKSUMS, DAMAGED):
                p = self.path / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        self.arrays: dict[str, Any] = {}
        self._buffers: dict[str, np.ndarray] = {}
        self._row_images: list[int] = []
        self._pending_skips: list[tuple[int, str]] = []
        self._pool: Any = None  # the background chunk writer (one thread), started by the first full chunk
        self._inflight: deque[Any] = deque()  # Futures of the chunks being written, in order
        self._spares: list[dict[str, np.ndarray]] = []  # written chunk buffers, for reuse
        self._batch_rows = 0  # the most rows one add() brought: that many may wait to be written
        self._failed: BaseException | None = None  # the first failed chunk write: nothing after it commits
        self.chunk_rows: int = self.manifest.chunk_rows if self.manifest else 0
        if self.has_layers:
            self._open_arrays()
        self._next_row = int(self.progress["rows"])  # where the next chunk goes (the writer thread lags)

    def _read_progress(self) -> dict[str, Any]:
        """The cursor; a damaged one (garbled, negative, beyond the arrays) restarts the run from
        its first image, with a warning: rows behind a cursor that cannot be trusted are redone."""
        p = self.path / PROGRESS
        n_images = int(self.spec.get("n_images", 1 << 62))
        try:
            prog = read_run_json(p, "")
            problem = check_progress(prog, n_images)
        except LayertapError:
            problem = "not readable"
        if problem is None:
            return prog
        log.warning("%s is damaged (%s); starting this run over from its first image", p, problem)
        return {"rows": 0, "next_image": 0, "skipped": []}

    # -- state ----------------------------------------------------------------------------------
    @property
    def resume_image(self) -> int:
        """Image position (in the run's image order) from which work still has to be done."""
        return int(self.progress["next_image"])

    @property
    def has_layers(self) -> bool:
        """Whether the run's arrays exist (they are created for the first batch)."""
        return bool(self.manifest and self.manifest.layers)

    @property
    def started(self) -> bool:
        """Whether ``path`` held a run of this job already (unfinished or complete) when the writer opened."""
        return self._found

    def begin(self, manifest: Manifest | Mapping[str, Any]) -> None:
        """Record what is being run (status 'running') before any row is computed.

        Args:
            manifest: what the run records (its ``spec`` and ``status`` are set here). A mapping is read as
                the manifest's JSON object.
        """
        if self.has_layers:
            return  # resuming: layers, chunking and arrays are already fixed
        if not isinstance(manifest, Manifest):
            manifest = Manifest.from_dict(manifest)
        self.manifest = manifest.updated(spec=self.spec, status="running")
        self._save_manifest()

    def create_layers(self, layers: dict[str, LayerInfo], n_rows: int, dtype: str, chunk_rows: int | None) -> None:
        """Create one array per layer (after :meth:`begin`).

        Args:
            layers: per layer its info; ``shape`` excludes the image axis (``dtype`` is set here).
            n_rows: the rows the arrays will hold.
            dtype: the storage dtype (one of :data:`~layertap.store.blocks.STORAGE_DTYPES`).
            chunk_rows: rows per chunk; None: about :data:`~layertap.store.blocks.CHUNK_BYTES` of the widest layer.
        """
        assert self.manifest is not None, "begin() first"
        widest = (
            max(int(np.prod(v["shape"])) for v in layers.values())
            * np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize
        )
        # No more rows per chunk than the run holds, and (unless asked for) a last chunk nearly full:
        # zarr stores every chunk at full size, padding included.
        if chunk_rows:
            self.chunk_rows = max(1, min(int(chunk_rows), n_rows))
        else:
            self.chunk_rows = fit_chunk_rows(rows_for_bytes(widest), n_rows)
        for info in layers.values():
            info["dtype"] = dtype
        self.manifest.layers = layers
        self.manifest.storage = _storage(self.chunk_rows)
        try:
            (self.path / ARRAYS).mkdir(exist_ok=True)
            for name, info in layers.items():
                zarr_create(
                    self.path / ARRAYS / name,
                    (n_rows, *info["shape"]),
                    (self.chunk_rows, *info["shape"]),
                    "uint16" if dtype == "bfloat16" else dtype,
                )
            self._save_manifest()
        except OSError as err:
            raise disk_error(err, self.path) from None
        self._open_arrays()

    def _open_arrays(self) -> None:
        assert self.manifest is not None
        layers = self.manifest.layers
        n_rows = int(self.manifest.spec.get("n_images", 0))
        self.arrays = {}
        for name, info in layers.items():
            try:
                self.arrays[name] = zarr_open(self.path / ARRAYS / name, "r+")
            except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing array
                if self.already_complete:
                    n_rows = len(self.manifest.rows)
                elif self.progress["rows"]:
                    log.warning("%s: the array of %s is missing (%s); starting over", self.path, name, err)
                    self.progress = {"rows": 0, "next_image": 0, "skipped": []}
                stored = "uint16" if info["dtype"] == "bfloat16" else info["dtype"]
                self.arrays[name] = zarr_create(
                    self.path / ARRAYS / name, (n_rows, *info["shape"]), (self.chunk_rows, *info["shape"]), stored
                )
        rows = int(self.progress["rows"])
        for name, arr in self.arrays.items():
            info = layers[name]
            if self.already_complete:  # repairing: keep every row
                self._buffers[name] = np.empty((self.chunk_rows, *info["shape"]), dtype=arr.dtype)
                continue
            # Drop chunks past the cursor (possibly half-written by a killed run), then regrow.
            full = arr.shape
            arr.resize((rows, *full[1:]))
            arr.resize(full)
            self._buffers[name] = np.empty(
                (self.chunk_rows, *info["shape"]), dtype="uint16" if info["dtype"] == "bfloat16" else info["dtype"]
            )

    def _save_manifest(self) -> None:
        assert self.manifest is not None
        write_manifest(self.path, self.manifest)

    # -- writing --------------------------------------------------------------------------------
    def add(self, features: dict[str, np.ndarray], image_indices: list[int]) -> None:
        """Append rows (one per image in ``image_indices``); commits every full chunk.

        Full chunks are written, in order, by a background thread while the caller computes the
        next batch (the model releases the GIL); at most one call's worth of rows (rounded up to
        whole chunks) waits to be written, and an error in writing (e.g. a full disk) is raised
        by the next call.

        Args:
            features: per layer, the rows (in the stored dtype; bfloat16 as uint16 bit patterns).
            image_indices: the image (position in the run's image order) of each row, increasing.
        """
        n = len(image_indices)
        self._batch_rows = max(self._batch_rows, n)
        done = 0
        while done < n:
            fill = len(self._row_images)
            take = min(n - done, self.chunk_rows - fill)
            for name, buf in self._buffers.items():
                _copy_rows(buf[fill : fill + take], features[name][done : done + take])
            self._row_images.extend(image_indices[done : done + take])
            done += take
            if len(self._row_images) == self.chunk_rows:
                self._flush(background=True)

    def skip(self, image_index: int, reason: str) -> None:
        """Record that an image has no row (it could not be decoded); committed with the next chunk.

        Args:
            image_index: the image's position in the run's image order.
            reason: why (one line).
        """
        self._pending_skips.append((image_index, reason))

    def _wait(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` chunks are in flight, re-raising a write error."""
        while len(self._inflight) > keep:
            self._spares.append(self._inflight.popleft().result())

    def _flush(self, background: bool = False) -> None:
        if not background:
            # First let the writer thread commit what it holds: with no rows of its own, this
            # commit's position is the cursor, which is stale while a chunk is still in flight.
            self._wait()
        rows = self._row_images
        next_image = rows[-1] + 1 if rows else self.resume_image
        skips = [s for s in self._pending_skips if s[0] < next_image]
        self._pending_skips = [s for s in self._pending_skips if s[0] >= next_image]
        buffers = self._buffers
        self._row_images = []
        r0, self._next_row = self._next_row, self._next_row + len(rows)
        if not background:  # nothing went in flight since the wait above
            self._commit(buffers, r0, len(rows), next_image, skips)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="layertap-writer")
        # Up to one batch of rows in flight, so writing overlaps the next forward pass.
        self._wait(keep=max(0, -(-self._batch_rows // self.chunk_rows) - 1))
        self._buffers = self._spares.pop() if self._spares else {k: np.empty_like(v) for k, v in buffers.items()}
        self._inflight.append(self._pool.submit(self._commit, buffers, r0, len(rows), next_image, skips))

    def _commit(
        self, buffers: dict[str, np.ndarray], r0: int, n: int, next_image: int, skips: list[tuple[int, str]]
    ) -> dict[str, np.ndarray]:
        """Write ``n`` rows at row ``r0`` of every array, fsync them and record their checksums,
        then move the cursor: a kill or power loss in between loses only this chunk (a resumed run
        rewrites it). After a failed write nothing queued behind it commits: the cursor stays at
        the failed chunk and the same command resumes there. Returns the buffers for reuse."""
        if self._failed is not None:
            raise self._failed
        try:
            if n:
                self._write_chunk(buffers, r0, n)
            self.progress = {
                "rows": r0 + n,
                "next_image": next_image,
                "skipped": self.progress["skipped"] + [[i, r] for i, r in skips],
            }
            write_json_atomic(self.path / PROGRESS, self.progress)
        except OSError as err:
            self._failed = disk_error(err, self.path)
            raise self._failed from None
        except BaseException as err:
            self._failed = err
            raise
        return buffers

    def _write_chunk(self, buffers: dict[str, np.ndarray], r0: int, n: int) -> None:
        """Write rows ``r0 .. r0+n`` (one chunk) of every layer; fsync the chunk files and their
        directory, and append their CRC-32 to the checksum log (fsynced too) before returning."""
        chunk = r0 // self.chunk_rows
        lines = []
        dirs: set[Path] = set()
        for name, arr in self.arrays.items():
            block = buffers[name][:n]
            arr[r0 : r0 + n] = block
            lines.append(f"{name}\t{chunk}\t{n}\t{chunk_crc(block)}\n")
            key = chunk_key(arr, chunk)
            if key is not None:
                f = self.path / ARRAYS / name / key
                fsync_file(f)
                dirs.update(f.parents[i] for i in range(key.count("/") + 1))
        for d in dirs:
            fsync_dir(d)
        with open(self.path / CHECKSUMS, "ab+") as log_file:
            # A line torn by a kill must not swallow this chunk's first line (it is then ignored).
            end = log_file.seek(0, os.SEEK_END)
            if end:
                log_file.seek(end - 1)
                if log_file.read(1) != b"\n":
                    lines.insert(0, "\n")
            log_file.write("".join(lines).encode())
            log_file.flush()
            os.fsync(log_file.fileno())

    def rewrite_chunk(self, chunk: int, buffers: dict[str, np.ndarray], n: int) -> None:
        """Repair: write chunk ``chunk`` (``n`` rows) of a complete run again, as it was committed.

        Args:
            chunk: the chunk's index.
            buffers: per layer, the chunk's rows (at least ``n``).
            n: the rows the chunk holds.
        """
        try:
            self._write_chunk(buffers, chunk * self.chunk_rows, n)
        except OSError as err:
            raise disk_error(err, self.path) from None

    def repaired(self) -> None:
        """Every damaged chunk is rewritten: forget the damage that verify recorded."""
        self.damage = {}
        try:
            (self.path / DAMAGED).unlink(missing_ok=True)
        except OSError as err:
            raise disk_error(err, self.path / DAMAGED) from None

    def finish(self, n_images: int) -> list[tuple[int, str]]:
        """Write the last partial chunk and trim the arrays to the rows stored.

        Args:
            n_images: the images of the run (the cursor ends there).

        Returns:
            Every skipped image as (image index, reason), in order.
        """
        self._flush()
        rows = int(self.progress["rows"])
        skipped = self.progress["skipped"] + [[i, r] for i, r in self._pending_skips]
        self._pending_skips = []
        self.progress = {**self.progress, "next_image": n_images, "skipped": skipped}
        try:
            for name, arr in self.arrays.items():
                arr.resize((rows, *arr.shape[1:]))
                fsync_file(self.path / ARRAYS / name / "zarr.json")  # the new shape, before 'complete'
        except FileNotFoundError:
            pass  # zarr v2 layout: its metadata file has another name
        except OSError as err:
            raise disk_error(err, self.path) from None
        return self.skipped

    def complete(self, manifest_update: Mapping[str, Any] | None = None, **sections: Any) -> None:
        """Mark the run complete: from now on re-running the same command does nothing.

        Args:
            manifest_update: top-level manifest fields to set (e.g. ``finished``, ``images``, ``values``).
            **sections: more fields to set, as keywords.
        """
        assert self.manifest is not None, "begin() first"
        self._wait()
        self.manifest = self.manifest.updated(**{**(manifest_update or {}), **sections}, status="complete")
        self._save_manifest()
        (self.path / PROGRESS).unlink(missing_ok=True)

    @property
    def skipped(self) -> list[tuple[int, str]]:
        """The skipped images committed so far, as (image index, reason)."""
        return [(int(i), str(r)) for i, r in self.progress["skipped"]]

    def close(self) -> None:
        """Wait for the chunks in flight, stop the writer thread and unlock the directory (idempotent)."""
        if getattr(self, "_inflight", None):
            try:
                self._wait()  # an error here is already being raised by add/finish or is moot
            except Exception as err:  # noqa: BLE001
                log.debug("pending chunk write failed while closing: %s", err)
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown()
            self._pool = None
        if not self._lock.closed:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _storage(chunk_rows: int) -> StorageInfo:
    """The manifest's ``storage`` section of a run written here (uncompressed Zarr)."""
    return {"format": "zarr", "chunk_rows": chunk_rows, "compression": None}


class RowBlocks(Protocol):
    """Rows of a layer given block by block: ``n`` rows in all, iterated as ``(first row, block)``."""

    n: int

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]: ...


class DerivedRunWriter:
    """Writes a run derived from a complete one (a postprocessed copy): the source's manifest with its layers
    replaced, the new layers written whole, one after another, and a ``postprocessing`` record appended.

    The output is an ordinary run (:func:`~layertap.store.run.open_run` opens it). Until :meth:`complete`
    its manifest says ``running`` and names the source under ``postprocessing_unfinished``: an output left
    by a killed process is replaced by the next one without ``overwrite``.

    Args:
        src: the source run (complete).
        out: the new run directory (missing, empty, or an unfinished derived output).
        overwrite: replace a run already at ``out``.
        owned: further folders of ``out`` that the derived output writes (e.g. ``"pca"``): removed when the
            output is replaced or discarded.

    Raises:
        LayertapError: ``out`` is the source, holds a run (without ``overwrite``) or other files.

    Example:
        >>> dest = DerivedRunWriter(run, "runs/centred", overwrite=False)  # doctest: +SKIP
        >>> dest.write("fc", blocks, (512,), {"module": "fc", "derived_from": "fc"})  # doctest: +SKIP
        >>> centred = dest.complete({"steps": [{"op": "center"}], "layers": ["fc"]})  # doctest: +SKIP
    """

    def __init__(self, src: Run, out: str | os.PathLike[str], overwrite: bool, owned: tuple[str, ...] = ()) -> None:
        self.src, self.path, self._owned = src, Path(out), (ARRAYS, *owned)
        if self.path.resolve() == src.path.resolve():
            raise LayertapError("the output must be a new directory, not the source run")
        self._created = not self.path.exists()
        if (self.path / MANIFEST).is_file():
            # An unfinished output of an interrupted process (killed: nothing could clean up) is ours to replace.
            if not overwrite and not unfinished_derived(self.path):
                raise LayertapError(
                    f"{self.path} already holds a run; pass {option_spelling('overwrite')} or choose another output"
                )
            for stale in self._owned:
                shutil.rmtree(self.path / stale, ignore_errors=True)
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise LayertapError(f"{self.path} is not empty and not a run; choose another output")
        self.manifest = src.manifest.copy().updated(
            layers={}, status="running", postprocessing_unfinished=str(src.path)
        )
        self.chunk_rows: list[int] = []
        try:
            (self.path / ARRAYS).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_error(err, self.path) from None
        write_manifest(self.path, self.manifest)

    def write(self, name: str, blocks: RowBlocks, row_shape: tuple[int, ...], info: dict[str, Any]) -> None:
        """Create layer ``name`` (rows, *row_shape) float32 and fill it from ``blocks``.

        Output chunks hold about :data:`~layertap.store.blocks.CHUNK_BYTES` of the output (a PCA output is far
        narrower than its input): blocks are buffered and written one whole chunk at a time, never fragments.

        Args:
            name: the layer's name in the new run.
            blocks: its rows, block by block (any block sizes).
            row_shape: the shape of one row.
            info: the layer's manifest entry (``shape`` and ``dtype`` are set here).
        """
        rows = rows_for_bytes(4 * max(1, int(np.prod(row_shape))))
        buf: list[np.ndarray] = []
        held, written = 0, 0
        try:
            z = zarr_create(self.path / ARRAYS / name, (blocks.n, *row_shape), (rows, *row_shape), "float32")
            for _, x in blocks:
                buf.append(x.astype(np.float32).reshape(len(x), *row_shape))
                held += len(x)
                while held >= rows or (held and written + held == blocks.n):
                    cat = np.concatenate(buf)
                    take = min(rows, held)
                    z[written : written + take] = cat[:take]
                    buf, held, written = [cat[take:]], held - take, written + take
        except OSError as err:
            raise disk_error(err, self.path) from None
        self.manifest.layers[name] = {**info, "shape": list(row_shape), "dtype": "float32"}  # type: ignore[typeddict-item]
        self.chunk_rows.append(rows)

    def discard(self) -> None:
        """Remove what this output wrote (after a failure): no unfinished run is left behind."""
        for stale in self._owned:
            shutil.rmtree(self.path / stale, ignore_errors=True)
        for name in (MANIFEST, MANIFEST + ".tmp"):
            (self.path / name).unlink(missing_ok=True)
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty

    def complete(self, record: dict[str, Any]) -> Run:
        """Finish the run: append ``record`` (with the source and layertap's version) to ``postprocessing``.

        Args:
            record: what was done (``steps``, ``layers``).

        Returns:
            The new run, opened.
        """
        record = {**record, "source": str(self.src.path), "layertap": __version__}
        steps = [*(self.src.manifest.postprocessing or []), record]
        self.manifest = self.manifest.updated(
            postprocessing=steps,
            # A different spec: the extract command of the source run must not mistake this for its own.
            spec={**self.manifest.spec, "postprocessing": steps},
            storage=_storage(min(self.chunk_rows or [0])),
            status="complete",
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            postprocessing_unfinished=None,
        )
        write_manifest(self.path, self.manifest)
        return Run(self.path)


def unfinished_derived(path: Path) -> bool:
    """Whether ``path`` holds an unfinished derived output (safe to replace), not a run of its own.

    Args:
        path: a directory with a manifest.

    Returns:
        True when its manifest is readable, not complete, and names a source under ``postprocessing_unfinished``.
    """
    try:
        manifest = read_json(path / MANIFEST)
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict) and manifest.get("status") != "complete" and "postprocessing_unfinished" in manifest
    )
