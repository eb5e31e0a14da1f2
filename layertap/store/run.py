"""Store: one directory per run — per-layer chunked Zarr arrays, a JSON manifest, a resume cursor.

Layout of a run directory::

    manifest.json        what was run (model, weights, transform, layers, images, options) + status
    progress.json        the resume cursor: rows committed and the image position they reach
    arrays/<layer>/      one Zarr array per layer, rows = images in manifest order
    checksums.tsv        CRC-32 of each chunk, appended when it is committed
    damaged.json         chunks that verify found damaged (until the extract command repairs them)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layertap.errors import LayertapError

log = logging.getLogger("layertap")

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = "arrays"
LOCK = ".lock"
#: a chunk of the widest layer holds about this many bytes (bounds memory and lost work on a kill)
CHUNK_BYTES = 16 << 20
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (new or renamed files) survive a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. a file system that cannot open directories: nothing more can be done
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # directories that cannot be fsynced
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new file, never half (the
    file is fsynced before the rename; see :func:`write_json_atomic` for the directory too)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers (and a resumed run) see the old or the new file, never half,
    also after a power loss (the file and then its directory entry are fsynced)."""
    write_text_atomic(path, json.dumps(obj, indent=1))
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_run_json(path: Path, fix: str) -> dict[str, Any]:
    """Read a run's JSON file (manifest or cursor); a damaged one is one error that says ``fix``.

    Args:
        path: the file.
        fix: what the user can do about it, appended to the message.

    Returns:
        The JSON object.
    """
    try:
        obj = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = str(err).splitlines()[0][:80] if str(err) else type(err).__name__
        raise LayertapError(f"{path} is damaged ({reason}); {fix}", exit_code=1) from None
    if not isinstance(obj, dict):
        raise LayertapError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object); {fix}", exit_code=1)
    return obj


def check_manifest(m: dict[str, Any], path: Path) -> dict[str, Any]:
    """Refuse, in one line, a manifest whose structure is broken (hand-edited, truncated by a tool)."""
    fix = "restore it, or re-run the extract command with --overwrite to redo the run"
    layers = m.get("layers", {})
    ok = isinstance(m.get("spec", {}), dict) and isinstance(layers, dict)
    ok = ok and all(isinstance(v, dict) and isinstance(v.get("shape"), list) and "dtype" in v for v in layers.values())
    if ok and m.get("status") == "complete":
        imgs = m.get("images")
        ok = isinstance(imgs, dict) and isinstance(imgs.get("rows"), list)
    if not ok or "status" not in m:
        raise LayertapError(f"{path / MANIFEST} is damaged (required fields missing); {fix}", exit_code=1)
    return m


def check_progress(p: dict[str, Any], n_rows: int) -> str | None:
    """What is wrong with a cursor (``progress.json``) for arrays of ``n_rows`` rows, or None."""
    rows, nxt, skipped = p.get("rows"), p.get("next_image"), p.get("skipped")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rows, nxt)) or not isinstance(skipped, list):
        return "fields missing or of the wrong type"
    if rows < 0 or nxt < 0:
        return "negative position"
    if rows > n_rows or rows > nxt:
        return f"{rows} rows committed, beyond the {min(n_rows, nxt)} possible"
    return None


def spec_diff(old: Any, new: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """The fields (dotted, e.g. ``model.options.scale``) in which two job specs differ."""
    if isinstance(old, dict) and isinstance(new, dict) and depth > 0:
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                out += spec_diff(old.get(k), new.get(k), f"{prefix}{k}.", depth - 1) or [f"{prefix}{k}"]
        return out
    return [prefix.rstrip(".")] if old != new and prefix else []


CHECKSUMS = "checksums.tsv"
#: chunks that ``verify`` found damaged (checksum mismatch): opening refuses them, re-running repairs them
DAMAGED = "damaged.json"


def read_damaged(path: Path) -> dict[str, dict[int, str]]:
    """The damage recorded by the last :func:`verify_run` of run ``path`` (``{}`` when none or unreadable)."""
    try:
        obj = read_json(path / DAMAGED)
        return {str(k): {int(c): str(why) for c, why in v.items()} for k, v in obj["chunks"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s is unreadable (%s); ignored (run 'layertap verify' again)", path / DAMAGED, err)
        return {}


def _record_damaged(path: Path, damage: dict[str, dict[int, str]]) -> None:
    """Record (or, when ``damage`` is empty, clear) what verify found, for the next open and re-run."""
    try:
        if damage:
            chunks = {k: {str(c): why for c, why in v.items()} for k, v in damage.items()}
            write_json_atomic(path / DAMAGED, {"chunks": chunks})
        else:
            (path / DAMAGED).unlink(missing_ok=True)
    except OSError as err:  # a read-only run: verify still reports; nothing could repair it there anyway
        log.debug("cannot record the damage in %s: %s", path / DAMAGED, err)


def chunk_key(z: Any, chunk: int) -> str | None:
    """The file name (relative to the array's directory) of row-chunk ``chunk``; None if unknown."""
    enc = getattr(getattr(z, "metadata", None), "chunk_key_encoding", None)
    if enc is None or not hasattr(enc, "encode_chunk_key"):
        return None
    return enc.encode_chunk_key((chunk,) + (0,) * (len(z.shape) - 1))


def chunk_nbytes(z: Any) -> int | None:
    """Bytes of one stored chunk file when the array is stored raw (no compression), else None."""
    codecs = getattr(getattr(z, "metadata", None), "codecs", None)
    if codecs is None or len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
        return None
    return int(np.prod(z.chunks)) * np.dtype(z.dtype).itemsize


def fit_chunk_rows(limit: int, n_rows: int, waste: float = 0.02) -> int:
    """Rows per chunk: at most ``limit``, and such that the last (padded) chunk wastes at most
    ``waste`` of the stored bytes. Zarr stores every chunk at full size, so 1 image in chunks
    of 41 rows would take 41 rows on disk; here it takes 1.

    Args:
        limit: the largest chunk wanted (memory, lost work on a kill).
        n_rows: the rows the arrays will hold.
        waste: the largest fraction of padding allowed.

    Returns:
        The chunk rows (>= 1).
    """
    n = max(1, n_rows)
    for r in range(max(1, min(limit, n)), 0, -1):
        if -(-n // r) * r - n <= waste * n:
            return r
    return 1


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

    from layertap.store.labels import dims_for

    # Uncompressed: activations are dense floats that barely compress, and the CPU is the model's.
    # Chunk files side by side (c.0.0, c.1.0): one directory to fsync per chunk, not one per axis.
    if int(zarr.__version__.split(".")[0]) >= 3:
        z = zarr.create_array(
            store=str(path),
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressors=None,
            fill_value=0,
            overwrite=True,
            chunk_key_encoding={"name": "default", "separator": "."},
            dimension_names=("image", *dims_for(shape[1:])),  # xarray & co. read them
        )
        return z.with_config({"write_empty_chunks": True})
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype, compressor=None, fill_value=0)


def _zarr_open(path: Path, mode: str = "r") -> Any:
    import zarr

    z = zarr.open_array(str(path), mode=mode)
    # Every committed chunk is a file, also an all-zero one: a missing file then means lost rows.
    return z.with_config({"write_empty_chunks": True}) if mode != "r" and hasattr(z, "with_config") else z


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

    def __init__(self, path: Path, stored_dtype: str, rows: int | None = None):
        try:
            self._z = _zarr_open(path)
        except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing or broken array
            raise LayertapError(
                f"the array {path} is missing or damaged ({type(err).__name__}); re-run the extract command "
                "to repair the run",
                exit_code=1,
            ) from None
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
        """Rows as stored (bfloat16 as uint16 bit patterns), for copying without conversion."""
        return np.asarray(self._z[self._key(key)])

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



def row_label(row: dict[str, Any]) -> str:
    """A row's name: the rows of a video share its file, so each gets a unique one.

    Args:
        row: a manifest row (``path`` and, for videos/arrays, ``id``, ``frame``, ``frames``).

    Returns:
        ``id`` when given, else ``path#first-last`` (a clip), ``path#frame`` (a frame), else ``path``
        (an image file; an array row's path is already ``file[index]``).
    """
    if row.get("id"):
        return str(row["id"])
    path = row["path"]
    if "frames" in row:
        return f"{path}#{row['frames'][0]}-{row['frames'][1]}"
    if "frame" in row:
        return f"{path}#{row['frame']}"
    return path


class Run:
    """A finished (or in-progress) run directory: ``run["avgpool"]`` is a :class:`LayerArray`.

    A run still being written serves only its committed rows (``len(run.images)`` of them). Opening
    checks that every chunk file of those rows is there at its full size (a cheap ``stat``; see
    :meth:`verify` for checksums) and refuses a damaged run in one line rather than serve zeros;
    ``check=False`` opens it anyway (``damage`` then lists what is wrong).
    """

    def __init__(self, path: str | os.PathLike[str], check: bool = True):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise LayertapError(f"{self.path} is not a layertap run (no {MANIFEST})")
        fix = "restore it, or re-run the extract command with --overwrite to redo the run"
        self.manifest: dict[str, Any] = check_manifest(read_run_json(self.path / MANIFEST, fix), self.path)
        #: rows that may be read: all of them once complete, else those behind the cursor
        self.rows: int | None = None
        self._progress: dict[str, Any] = {"rows": 0, "next_image": 0, "skipped": []}
        if not self.complete:
            self._read_cursor()
        self._sums: dict[tuple[str, int], tuple[int, int]] | None = None
        #: per layer, the chunks that are missing or damaged (filled by the check on open)
        self.damage: dict[str, dict[int, str]] = self.check_chunks() if self.layers else {}
        for layer, chunks in read_damaged(self.path).items():  # what the last verify found
            if layer in self.manifest.get("layers", {}):
                self.damage[layer] = {**chunks, **self.damage.get(layer, {})}
        if check and self.damage:
            raise LayertapError(damage_message(self), exit_code=1)

    def _read_cursor(self) -> None:
        """A running run: find how many rows are committed (none before the first commit)."""
        p = self.path / PROGRESS
        if p.is_file():
            prog = read_run_json(p, "re-run the extract command to redo the unfinished part")
            n_images = int(self.manifest.get("spec", {}).get("n_images", 1 << 62))
            problem = check_progress(prog, n_images)
            if problem:
                raise LayertapError(
                    f"{p} is damaged ({problem}); re-run the extract command to redo the unfinished part", exit_code=1
                )
            self._progress = prog
        self.rows = int(self._progress["rows"])

    def check_chunks(self) -> dict[str, dict[int, str]]:
        """Per layer, the chunks of the readable rows whose file is missing or too short.

        Returns:
            ``{layer: {chunk: problem}}`` for damaged layers only (empty when all is well).
        """
        damage: dict[str, dict[int, str]] = {}
        for layer, info in self.manifest.get("layers", {}).items():
            path = self.path / ARRAYS / layer
            try:
                z = _zarr_open(path)
            except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing array
                n = len(self.manifest.get("images", {}).get("rows", [])) if self.complete else self.rows or 0
                chunks = max(1, -(-n // int(self.manifest.get("storage", {}).get("chunk_rows") or max(1, n))))
                damage[layer] = dict.fromkeys(range(chunks), f"array missing ({type(err).__name__})")
                continue
            rows = z.shape[0] if self.rows is None else min(self.rows, z.shape[0])
            if self.complete and "images" in self.manifest and z.shape[0] != len(self.manifest["images"]["rows"]):
                damage[layer] = {0: f"array of {z.shape[0]} rows for {len(self.manifest['images']['rows'])} images"}
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
        """Check every chunk: present, full size, and equal to the checksum recorded at commit."""
        return verify_run(self.path)

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def layers(self) -> list[str]:
        return list(self.manifest.get("layers", {}))

    def __getitem__(self, layer: str) -> LayerArray:
        info = self.manifest.get("layers", {}).get(layer)
        if info is None:
            from layertap.errors import close_matches

            raise LayertapError(f"run {self.path} has no layer '{layer}'{close_matches(layer, self.layers)}")
        return LayerArray(self.path / ARRAYS / layer, info["dtype"], self.rows)

    def __contains__(self, layer: str) -> bool:
        return layer in self.manifest.get("layers", {})

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def _rows(self) -> list[dict[str, Any]]:
        """The manifest's image rows, one per readable row (committed rows of a running run)."""
        imgs = self.manifest.get("images")
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
        rows = self._rows()
        if not rows or "target" not in rows[0]:
            return None
        return np.array([r["target"] for r in rows], dtype=np.int64)

    @property
    def classes(self) -> list[str] | None:
        return self.manifest["images"].get("classes")

    @property
    def skipped(self) -> list[dict[str, str]]:
        if self.rows is not None:
            paths = [r["path"] for r in self.manifest.get("images", {}).get("rows", [])]
            return [
                {"path": paths[int(i)] if int(i) < len(paths) else "", "reason": str(r), "index": int(i)}
                for i, r in self._progress["skipped"]
            ]
        return list(self.manifest["images"].get("skipped", []))

    def __repr__(self) -> str:
        n = len(self.manifest.get("images", {}).get("rows", [])) if self.rows is None else self.rows
        return f"Run({str(self.path)!r}, {n} images, layers={self.layers}, status={self.manifest.get('status')})"

    def to_xarray(self, layer: str) -> Any:
        """``self[layer]`` as a labelled ``xarray.DataArray`` (see :func:`layertap.labels.to_xarray`)."""
        from layertap.store.labels import to_xarray

        return to_xarray(self, layer)

    def to_pandas(self, layer: str) -> Any:
        """A 2-D layer as a ``pandas.DataFrame`` indexed by image path (see :func:`layertap.labels.to_pandas`)."""
        from layertap.store.labels import to_pandas

        return to_pandas(self, layer)

    def _repr_html_(self) -> str:
        from layertap.store.labels import run_html

        return run_html(self)


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a run directory written by :func:`layertap.extraction`."""
    return Run(path)


def read_checksums(path: Path) -> dict[tuple[str, int], tuple[int, int]]:
    """The chunk checksums recorded at commit: ``{(layer, chunk): (rows, crc32)}`` (last entry wins:
    a resumed run appends the rewritten chunk again; a line torn by a kill is ignored)."""
    out: dict[tuple[str, int], tuple[int, int]] = {}
    try:
        with open(path / CHECKSUMS, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 4 and line.endswith("\n"):
                    try:
                        out[(parts[0], int(parts[1]))] = (int(parts[2]), int(parts[3]))
                    except ValueError:
                        continue
    except FileNotFoundError:
        pass
    return out


def chunk_crc(block: np.ndarray) -> int:
    """CRC-32 of a block of rows as stored (zlib's crc32 releases the GIL: cheap in the writer thread)."""
    import zlib

    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1))


def _row_ranges(rows: list[int]) -> str:
    """[0, 1, 2, 7] -> '0-2, 7'."""
    parts: list[str] = []
    for r in sorted(rows):
        if parts and r == parts[-1][1] + 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])  # type: ignore[arg-type]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)  # type: ignore[misc]


def lost_rows(run: Run, damage: dict[str, dict[int, str]]) -> list[int]:
    """The rows held by the damaged chunks, sorted."""
    rows: set[int] = set()
    n = len(run.manifest["images"]["rows"]) if run.complete else int(run.rows or 0)
    for layer, chunks in damage.items():
        c_rows = _chunk_rows_of(run, layer)
        for c in chunks:
            rows.update(range(c * c_rows, min((c + 1) * c_rows, n)))
    return sorted(rows)


def _chunk_rows_of(run: Run, layer: str) -> int:
    try:
        return int(_zarr_open(run.path / ARRAYS / layer).chunks[0])
    except Exception:  # noqa: BLE001 - a missing array: the run's chunking
        return max(1, int(run.manifest.get("storage", {}).get("chunk_rows") or 1))


def damage_message(run: Run, damage: dict[str, dict[int, str]] | None = None) -> str:
    """One line: which layers and chunks are damaged, which rows and images that loses, what to do."""
    damage = run.damage if damage is None else damage
    rows = lost_rows(run, damage)
    try:
        names = [run.images[r] for r in rows[:3]]
    except (LayertapError, IndexError):
        names = []
    where = "; ".join(
        f"{layer} chunk{'s' if len(ch) > 1 else ''} {', '.join(f'{c} ({why})' for c, why in sorted(ch.items())[:4])}"
        + (f" (+{len(ch) - 4} more)" if len(ch) > 4 else "")
        for layer, ch in damage.items()
    )
    example = f" e.g. {', '.join(names)}" if names else ""
    return (
        f"{run.path} is damaged: {where}; rows {_row_ranges(rows)} are lost ({len(rows)} images{example}); "
        "re-run the extract command to recompute them"
    )


@dataclass
class VerifyResult:
    """What :func:`verify_run` found."""

    path: Path
    ok: bool
    #: ``{layer: {chunk: problem}}`` for damaged chunks
    damage: dict[str, dict[int, str]]
    #: rows lost (in the damaged chunks) and their image paths
    rows_lost: list[int]
    images_lost: list[str]
    chunks_checked: int
    #: chunks whose content was compared with a checksum recorded at commit (older runs have none)
    checksummed: int
    summary: str


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
    """
    run = Run(path, check=False)
    damage = run.check_chunks() if run.layers else {}  # afresh: not what an earlier verify recorded
    sums = read_checksums(run.path)
    checked = checksummed = 0
    for layer in run.layers:
        if layer in damage and any(v.startswith("array") for v in damage[layer].values()):
            continue
        arr = run[layer]
        step = arr.chunk_rows
        for c in range(-(-len(arr) // step)):
            checked += 1
            if c in damage.get(layer, {}):
                continue
            want = sums.get((layer, c))
            if want is None:
                continue
            lo, hi = c * step, min((c + 1) * step, len(arr))
            try:
                got = (hi - lo, chunk_crc(arr.raw(slice(lo, hi))))
            except Exception as err:  # noqa: BLE001 - an undecodable chunk file
                damage.setdefault(layer, {})[c] = f"unreadable ({type(err).__name__})"
                continue
            checksummed += 1
            if got != want:
                damage.setdefault(layer, {})[c] = "checksum mismatch"
    rows = lost_rows(run, damage)
    try:
        images = run.images
        lost_images = [images[r] for r in rows if r < len(images)]
    except LayertapError:
        lost_images = []
    n = run.rows if run.rows is not None else len(run.manifest.get("images", {}).get("rows", []))
    _record_damaged(run.path, damage)
    if damage:
        summary = damage_message(run, damage)
    else:
        state = "complete" if run.complete else "unfinished"
        summary = (
            f"ok: {run.path} ({state}, {n} rows, {len(run.layers)} layers, {checked} chunks, "
            f"{checksummed} checksums verified)"
        )
    return VerifyResult(run.path, not damage, damage, rows, lost_images, checked, checksummed, summary)


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
        #: per layer, damaged chunks of a complete run (re-running the extract command repairs them)
        self.damage: dict[str, dict[int, str]] = {}
        if manifest_path.is_file() and not overwrite:
            try:
                fix = "restore it, or pass --overwrite to redo the run"
                old = check_manifest(read_run_json(manifest_path, fix), self.path)
            except LayertapError:
                self.close()
                raise
            if old.get("spec") != spec:
                self.close()
                diff = spec_diff(old.get("spec", {}), spec)
                raise LayertapError(
                    f"{self.path} holds a different run (differs in: {', '.join(diff) or 'format'}); "
                    "pass --overwrite to replace it or choose another --out"
                )
            self.manifest = old
            if old.get("status") == "complete":
                self.already_complete = True
                if not old.get("layers"):
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
        self.chunk_rows: int = int(self.manifest.get("storage", {}).get("chunk_rows", 0))
        if self.manifest.get("layers"):
            self._open_arrays()
        self._next_row = int(self.progress["rows"])  # where the next chunk goes (the writer thread lags)

    def _read_progress(self) -> dict[str, Any]:
        """The cursor; a damaged one (garbled, negative, beyond the arrays) restarts the run from
        its first image, with a warning: rows behind a cursor that cannot be trusted are redone."""
        p = self.path / PROGRESS
        n_images = int(self.manifest.get("spec", {}).get("n_images", 1 << 62))
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
        # No more rows per chunk than the run holds, and (unless asked for) a last chunk nearly full:
        # zarr stores every chunk at full size, padding included.
        if chunk_rows:
            self.chunk_rows = max(1, min(int(chunk_rows), n_rows))
        else:
            self.chunk_rows = fit_chunk_rows(max(1, min(4096, CHUNK_BYTES // max(1, widest))), n_rows)
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
        n_rows = int(self.manifest.get("spec", {}).get("n_images", 0))
        self.arrays = {}
        for name, info in layers.items():
            try:
                self.arrays[name] = _zarr_open(self.path / ARRAYS / name, "r+")
            except Exception as err:  # noqa: BLE001 - zarr raises several types for a missing array
                if self.already_complete:
                    n_rows = len(self.manifest["images"]["rows"])
                elif self.progress["rows"]:
                    log.warning("%s: the array of %s is missing (%s); starting over", self.path, name, err)
                    self.progress = {"rows": 0, "next_image": 0, "skipped": []}
                stored = "uint16" if info["dtype"] == "bfloat16" else info["dtype"]
                self.arrays[name] = _zarr_create(
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
        """Repair: write chunk ``chunk`` (``n`` rows) of a complete run again, as it was committed."""
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

        Returns every skipped image as (image index, reason), in order."""
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

    def complete(self, manifest_update: dict[str, Any]) -> None:
        """Mark the run complete: from now on re-running the same command does nothing."""
        self._wait()
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
    from layertap.shards.cluster import SHARDS

    root = Path(out) / SHARDS
    dirs = sorted(d for d in root.glob("*-of-*") if (d / MANIFEST).is_file()) if root.is_dir() else []
    return [Run(d) for d in dirs]


def merge_values(sections: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The manifest ``values`` section (NaN/inf and overflow counts per layer) of merged shards: the sums."""
    present = [s for s in sections if isinstance(s, dict)]
    if not present:
        return None
    out: dict[str, Any] = {k: v for k, v in present[0].items() if not isinstance(v, dict)}
    for section in present:
        for key, per_layer in section.items():
            if isinstance(per_layer, dict):
                total = out.setdefault(key, {})
                for layer, n in per_layer.items():
                    total[layer] = total.get(layer, 0) + int(n)
    return out


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
            f"cannot merge {out} yet ({count} shards expected; {'; '.join(parts)}): run or resubmit those shards, "
            "then merge again",
            exit_code=1,
        )
    ordered = [by_index[i] for i in range(count)]
    parent_spec = ordered[0].manifest["shard"]["parent_spec"]
    if any(r.manifest["shard"]["parent_spec"] != parent_spec for r in ordered):
        raise LayertapError(f"the shards in {out} come from different jobs (model, layers, images or options differ)")
    first = ordered[0].manifest
    # Shards with no rows (more shards than batches, or every image undecodable) have no arrays.
    shaped = next((r.manifest for r in ordered if r.manifest.get("layers")), None)
    if shaped is None:
        raise LayertapError(f"none of the images of the {count} shards in {out} could be decoded; nothing to merge")
    writer = RunWriter(out, parent_spec)
    if writer.already_complete and writer.damage:
        writer.close()
        writer = RunWriter(out, parent_spec, overwrite=True)  # the shards hold every row: merge again
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
            layers = {k: {kk: vv for kk, vv in v.items() if kk != "dtype"} for k, v in shaped["layers"].items()}
            dtype = next(iter(shaped["layers"].values()))["dtype"]
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
            if not glob:
                continue  # an empty shard, or one whose every image was skipped
            arrays = {name: run[name] for name in shaped["layers"]}
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
                "values": merge_values([r.manifest.get("values") for r in ordered]),
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
