"""Store: one directory per run — per-layer chunked Zarr arrays, a JSON manifest, a resume cursor.

Layout of a run directory::

    manifest.json        what was run (model, weights, transform, layers, images, options) + status
    progress.json        the resume cursor: rows committed and the image position they reach
    arrays/<layer>/      one Zarr array per layer, rows = images in manifest order
    .lock                locked (fcntl.lockf) by the process writing the run

Why Zarr rather than HDF5: every chunk is its own file, so a process killed mid-write (kill -9,
a full disk) can damage at most the chunk being written, never the rest of the store; HDF5 keeps
all metadata in one file that such a kill can leave unreadable. Rows are committed one whole
chunk at a time and the cursor is written atomically *after* the chunk, so resuming rewrites
exactly the chunks that may be incomplete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LayertapError

log = logging.getLogger("layertap")

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = "arrays"
LOCK = ".lock"
#: a chunk of the widest layer holds about this many bytes (bounds memory and lost work on a kill)
CHUNK_BYTES = 16 << 20
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers (and a resumed run) see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def disk_error(err: OSError, where: Path) -> LayertapError:
    """Turn an OS write failure into a one-line error that says the run can be resumed."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return LayertapError(
            f"disk full while writing {where}: free space and run the same command again to resume "
            "(everything written so far is kept)",
            exit_code=1,
        )
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return LayertapError(f"cannot write to {where} ({err.strerror}): choose a writable --out", exit_code=1)
    return LayertapError(f"cannot write {where}: {err.strerror or err}", exit_code=1)


def _zarr_create(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str) -> Any:
    import zarr

    # Uncompressed: activations are dense floats that barely compress, and the CPU is the model's.
    if int(zarr.__version__.split(".")[0]) >= 3:
        return zarr.create_array(
            store=str(path), shape=shape, chunks=chunks, dtype=dtype, compressors=None, fill_value=0, overwrite=True
        )
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype, compressor=None, fill_value=0)


def _zarr_open(path: Path, mode: str = "r") -> Any:
    import zarr

    return zarr.open_array(str(path), mode=mode)


def _copy_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``; through torch for float arrays, whose copy is multi-threaded and fast
    for the transposing copy out of channels_last feature maps."""
    if src.dtype in (np.float32, np.float16) and src.dtype == dst.dtype and dst.size > 65536:
        import torch

        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        dst[...] = src


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class LayerArray:
    """Read access to one stored layer: numpy-style slicing, chunk by chunk, never all at once.

    ``shape`` is (images, ...features); ``dtype`` is what indexing returns (bfloat16 layers are
    stored as their 16-bit patterns and returned as float32). ``np.asarray(arr)`` loads it all.
    """

    def __init__(self, path: Path, stored_dtype: str):
        self._z = _zarr_open(path)
        self.stored_dtype = stored_dtype
        self.shape: tuple[int, ...] = tuple(self._z.shape)
        self.chunk_rows: int = int(self._z.chunks[0])
        self.dtype = np.dtype("float32") if stored_dtype == "bfloat16" else np.dtype(self._z.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        data = np.asarray(self._z[key])
        return bf16_to_float32(data) if self.stored_dtype == "bfloat16" else data

    def raw(self, key: Any) -> np.ndarray:
        """Rows as stored (bfloat16 as uint16 bit patterns), for copying without conversion."""
        return np.asarray(self._z[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)

    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, block)`` over the rows, ``rows`` at a time (default: one chunk)."""
        step = rows or self.chunk_rows
        for start in range(0, self.shape[0], step):
            yield start, self[start : start + step]

    def __repr__(self) -> str:
        return f"LayerArray(shape={self.shape}, dtype={self.stored_dtype})"


class Run:
    """A finished (or in-progress) run directory: ``run["avgpool"]`` is a :class:`LayerArray`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise LayertapError(f"{self.path} is not a layertap run (no {MANIFEST})")
        self.manifest: dict[str, Any] = read_json(self.path / MANIFEST)

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def layers(self) -> list[str]:
        return list(self.manifest.get("layers", {}))

    def __getitem__(self, layer: str) -> LayerArray:
        info = self.manifest.get("layers", {}).get(layer)
        if info is None:
            from .errors import close_matches

            raise LayertapError(f"run {self.path} has no layer '{layer}'{close_matches(layer, self.layers)}")
        return LayerArray(self.path / ARRAYS / layer, info["dtype"])

    def __contains__(self, layer: str) -> bool:
        return layer in self.manifest.get("layers", {})

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    @property
    def images(self) -> list[str]:
        """Image paths (relative to ``manifest['images']['root']``), one per stored row."""
        return [r["path"] for r in self.manifest["images"]["rows"]]

    @property
    def targets(self) -> np.ndarray | None:
        rows = self.manifest["images"]["rows"]
        if not rows or "target" not in rows[0]:
            return None
        return np.array([r["target"] for r in rows], dtype=np.int64)

    @property
    def classes(self) -> list[str] | None:
        return self.manifest["images"].get("classes")

    @property
    def skipped(self) -> list[dict[str, str]]:
        return list(self.manifest["images"].get("skipped", []))

    def __repr__(self) -> str:
        n = len(self.manifest.get("images", {}).get("rows", []))
        return f"Run({str(self.path)!r}, {n} images, layers={self.layers}, status={self.manifest.get('status')})"


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a run directory written by :func:`layertap.extract`."""
    return Run(path)


class RunWriter:
    """Writes one run: creates or resumes the directory, buffers rows into whole chunks, commits.

    ``spec`` identifies the job (model, weights, layers, images, options); re-running the same
    spec on an unfinished directory resumes it, a different spec is refused unless ``overwrite``.
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
            raise LayertapError(
                f"another layertap process is writing to {self.path}; wait for it to finish or choose another --out",
                exit_code=1,
            ) from None
        self.already_complete = False
        self.manifest: dict[str, Any] = {}
        self.progress: dict[str, Any] = {"rows": 0, "next_image": 0, "skipped": []}
        manifest_path = self.path / MANIFEST
        if manifest_path.is_file() and not overwrite:
            old = read_json(manifest_path)
            if old.get("spec") != spec:
                self.close()
                diff = sorted(
                    k for k in set(old.get("spec", {})) | set(spec) if old.get("spec", {}).get(k) != spec.get(k)
                )
                raise LayertapError(
                    f"{self.path} holds a different run (differs in: {', '.join(diff) or 'format'}); "
                    "pass --overwrite to replace it or choose another --out"
                )
            self.manifest = old
            if old.get("status") == "complete":
                self.already_complete = True
                return
            if (self.path / PROGRESS).is_file():
                self.progress = read_json(self.path / PROGRESS)
        else:
            for stale in (MANIFEST, PROGRESS, ARRAYS):
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
        self.chunk_rows: int = int(self.manifest.get("storage", {}).get("chunk_rows", 0))
        if self.manifest.get("layers"):
            self._open_arrays()

    # -- state ----------------------------------------------------------------------------------
    @property
    def resume_image(self) -> int:
        """Image position (in the run's image order) from which work still has to be done."""
        return int(self.progress["next_image"])

    @property
    def has_layers(self) -> bool:
        return bool(self.manifest.get("layers"))

    def begin(self, manifest: dict[str, Any]) -> None:
        """Record what is being run (status 'running') before any row is computed."""
        if self.manifest.get("layers"):
            return  # resuming: layers, chunking and arrays are already fixed
        self.manifest = {**manifest, "spec": self.spec, "status": "running"}
        self._save_manifest()

    def create_layers(self, layers: dict[str, dict[str, Any]], n_rows: int, dtype: str, chunk_rows: int | None) -> None:
        """Create one array per layer; ``layers[name]['shape']`` excludes the image axis."""
        widest = (
            max(int(np.prod(v["shape"])) for v in layers.values())
            * np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize
        )
        self.chunk_rows = int(chunk_rows or max(1, min(4096, CHUNK_BYTES // max(1, widest))))
        for info in layers.values():
            info["dtype"] = dtype
        self.manifest["layers"] = layers
        self.manifest["storage"] = {"format": "zarr", "chunk_rows": self.chunk_rows, "compression": None}
        try:
            (self.path / ARRAYS).mkdir(exist_ok=True)
            for name, info in layers.items():
                _zarr_create(
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
        layers = self.manifest["layers"]
        self.arrays = {name: _zarr_open(self.path / ARRAYS / name, "r+") for name in layers}
        rows = int(self.progress["rows"])
        for name, arr in self.arrays.items():
            # Drop chunks past the cursor (possibly half-written by a killed run), then regrow.
            full = arr.shape
            arr.resize((rows, *full[1:]))
            arr.resize(full)
            info = layers[name]
            self._buffers[name] = np.empty(
                (self.chunk_rows, *info["shape"]), dtype="uint16" if info["dtype"] == "bfloat16" else info["dtype"]
            )

    def _save_manifest(self) -> None:
        try:
            write_json_atomic(self.path / MANIFEST, self.manifest)
        except OSError as err:
            raise disk_error(err, self.path / MANIFEST) from None

    # -- writing --------------------------------------------------------------------------------
    def add(self, features: dict[str, np.ndarray], image_indices: list[int]) -> None:
        """Append rows (one per image in ``image_indices``); commits every full chunk.

        Full chunks are written, in order, by a background thread while the caller computes the
        next batch (the model releases the GIL); at most one call's worth of rows (rounded up to
        whole chunks) waits to be written, and an error in writing (e.g. a full disk) is raised
        by the next call."""
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
        self._pending_skips.append((image_index, reason))

    def _wait(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` chunks are in flight, re-raising a write error."""
        while len(self._inflight) > keep:
            self._spares.append(self._inflight.popleft().result())

    def _flush(self, background: bool = False) -> None:
        rows = self._row_images
        next_image = rows[-1] + 1 if rows else self.resume_image
        skips = [s for s in self._pending_skips if s[0] < next_image]
        self._pending_skips = [s for s in self._pending_skips if s[0] >= next_image]
        buffers = self._buffers
        self._row_images = []
        if not background:
            self._wait()
            self._commit(buffers, len(rows), next_image, skips)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="layertap-writer")
        # Up to one batch of rows in flight, so writing overlaps the next forward pass.
        self._wait(keep=max(0, -(-self._batch_rows // self.chunk_rows) - 1))
        self._buffers = self._spares.pop() if self._spares else {k: np.empty_like(v) for k, v in buffers.items()}
        self._inflight.append(self._pool.submit(self._commit, buffers, len(rows), next_image, skips))

    def _commit(
        self, buffers: dict[str, np.ndarray], n: int, next_image: int, skips: list[tuple[int, str]]
    ) -> dict[str, np.ndarray]:
        """Write ``n`` rows to every array, then move the cursor (a kill in between loses only
        this chunk: a resumed run rewrites it). Returns the buffers for reuse."""
        r0 = int(self.progress["rows"])
        try:
            for name, arr in self.arrays.items():
                arr[r0 : r0 + n] = buffers[name][:n]
            self.progress = {
                "rows": r0 + n,
                "next_image": next_image,
                "skipped": self.progress["skipped"] + [[i, r] for i, r in skips],
            }
            write_json_atomic(self.path / PROGRESS, self.progress)
        except OSError as err:
            raise disk_error(err, self.path) from None
        return buffers

    def finish(self, n_images: int) -> list[tuple[int, str]]:
        """Write the last partial chunk and trim the arrays to the rows stored.

        Returns every skipped image as (image index, reason), in order."""
        self._flush()
        rows = int(self.progress["rows"])
        skipped = self.progress["skipped"] + [[i, r] for i, r in self._pending_skips]
        self._pending_skips = []
        self.progress = {**self.progress, "next_image": n_images, "skipped": skipped}
        try:
            for arr in self.arrays.values():
                arr.resize((rows, *arr.shape[1:]))
        except OSError as err:
            raise disk_error(err, self.path) from None
        return self.skipped

    def complete(self, manifest_update: dict[str, Any]) -> None:
        """Mark the run complete: from now on re-running the same command does nothing."""
        self.manifest.update(manifest_update)
        self.manifest["status"] = "complete"
        self._save_manifest()
        (self.path / PROGRESS).unlink(missing_ok=True)

    @property
    def skipped(self) -> list[tuple[int, str]]:
        return [(int(i), str(r)) for i, r in self.progress["skipped"]]

    def close(self) -> None:
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


def shard_runs(out: str | os.PathLike[str]) -> list[Run]:
    """The shard runs under ``out/shards/``, in shard order."""
    from .cluster import SHARDS

    root = Path(out) / SHARDS
    dirs = sorted(d for d in root.glob("*-of-*") if (d / MANIFEST).is_file()) if root.is_dir() else []
    return [Run(d) for d in dirs]


def merge_shards(out: str | os.PathLike[str], shards: list[str | os.PathLike[str]] | None = None) -> Run:
    """Merge shard runs (default: all of ``out/shards/``) into the run ``out``.

    The result is the run an unsharded extraction would have written: the same spec (so the
    unsharded command finds it complete), the same image rows, skipped images and layer arrays,
    byte for byte. Refuses, naming them, while any shard is missing or unfinished. Resumable.
    """
    runs = [Run(s) for s in shards] if shards else shard_runs(out)
    if not runs:
        raise LayertapError(f"no shards to merge in {Path(out) / 'shards'}; run 'layertap extract --shard i/n' first")
    infos = [r.manifest.get("shard") for r in runs]
    if any(i is None for i in infos):
        bad = [str(r.path) for r, i in zip(runs, infos, strict=True) if i is None]
        raise LayertapError(f"not shard runs: {', '.join(bad)}")
    count = infos[0]["count"]
    by_index = {i["index"]: r for r, i in zip(runs, infos, strict=True) if i["count"] == count}
    missing = [i for i in range(count) if i not in by_index]
    unfinished = [i for i, r in sorted(by_index.items()) if not r.complete]
    if missing or unfinished or len(by_index) != len(runs):
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(map(str, missing))}")
        if unfinished:
            parts.append(f"unfinished: {', '.join(map(str, unfinished))}")
        if len(by_index) != len(runs):
            parts.append("shards of different counts were mixed")
        raise LayertapError(
            f"cannot merge {out} yet, shards of {count} {'; '.join(parts)}; run or resubmit those shards, then merge again",
            exit_code=1,
        )
    ordered = [by_index[i] for i in range(count)]
    parent_spec = ordered[0].manifest["shard"]["parent_spec"]
    if any(r.manifest["shard"]["parent_spec"] != parent_spec for r in ordered):
        raise LayertapError(f"the shards in {out} come from different jobs (model, layers, images or options differ)")
    first = ordered[0].manifest
    writer = RunWriter(out, parent_spec)
    with writer:
        if writer.already_complete:
            return Run(out)
        base = {
            k: v
            for k, v in first.items()
            if k not in ("shard", "spec", "status", "layers", "storage", "images", "finished")
        }
        writer.begin({**base, "merged_from": [str(r.path) for r in ordered]})
        n_total = sum(r.manifest["images"]["n_total"] for r in ordered)
        if not writer.has_layers:
            layers = {k: {kk: vv for kk, vv in v.items() if kk != "dtype"} for k, v in first["layers"].items()}
            dtype = next(iter(first["layers"].values()))["dtype"]
            writer.create_layers(layers, n_total, dtype, parent_spec.get("chunk_rows"))
        start = writer.resume_image
        rows_out, skipped_out = [], []
        for run in ordered:
            offset = run.manifest["shard"]["offset"]
            imgs = run.manifest["images"]
            rows_out.extend(imgs["rows"])
            skipped_out.extend({**sk, "index": offset + sk["index"]} for sk in imgs["skipped"])
            skipped_local = {sk["index"] for sk in imgs["skipped"]}
            glob = [offset + i for i in range(imgs["n_total"]) if i not in skipped_local]
            for sk in imgs["skipped"]:
                if offset + sk["index"] >= start:
                    writer.skip(offset + sk["index"], sk["reason"])
            arrays = {name: run[name] for name in first["layers"]}
            step = writer.chunk_rows
            for r0 in range(0, len(glob), step):
                ids = glob[r0 : r0 + step]
                keep = [k for k, g in enumerate(ids) if g >= start]
                if not keep:
                    continue
                lo = r0 + keep[0]
                block = {name: arr.raw(slice(lo, r0 + len(ids))) for name, arr in arrays.items()}
                writer.add(block, ids[keep[0] :])
        writer.finish(n_total)
        parent_images = first["shard"]["parent_images"]
        writer.complete(
            {
                "finished": first.get("finished"),
                "images": {**parent_images, "n_stored": len(rows_out), "rows": rows_out, "skipped": skipped_out},
            }
        )
    return Run(out)


def try_merge(out: str | os.PathLike[str]) -> Run | None:
    """Merge ``out``'s shards if every one is complete and nobody else is merging; else None."""
    runs = shard_runs(out)
    if not runs or not all(r.complete for r in runs):
        return None
    count = runs[0].manifest["shard"]["count"]
    if len(runs) < count:
        return None
    try:
        return merge_shards(out)
    except LayertapError as err:
        if "another layertap process" in str(err):
            return None  # a sibling shard is merging right now
        raise
