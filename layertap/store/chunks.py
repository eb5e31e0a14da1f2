"""Chunk files: creating and opening a layer's Zarr array, the name and size of a chunk's file, its checksum,
and bfloat16 bit patterns (stored as uint16).

Why Zarr rather than HDF5: every chunk is its own file, so a process killed mid-write (kill -9,
a full disk) can damage at most the chunk being written, never the rest of the store; HDF5 keeps
all metadata in one file that such a kill can leave unreadable.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from layertap.store.files import CHECKSUMS
from layertap.store.labels import dims_for


def chunk_key(z: Any, chunk: int) -> str | None:
    """The file name (relative to the array's directory) of row-chunk ``chunk``.

    Args:
        z: the zarr array.
        chunk: the chunk's index along the rows.

    Returns:
        E.g. ``"c.3.0.0.0"``; None for arrays whose key encoding is unknown (zarr 2).

    Example:
        >>> chunk_key(zarr_open(Path("run/arrays/fc")), 3)  # doctest: +SKIP
        'c.3.0'
    """
    enc = getattr(getattr(z, "metadata", None), "chunk_key_encoding", None)
    if enc is None or not hasattr(enc, "encode_chunk_key"):
        return None
    return enc.encode_chunk_key((chunk,) + (0,) * (len(z.shape) - 1))


def chunk_nbytes(z: Any) -> int | None:
    """Bytes of one stored chunk file when the array is stored raw (no compression), else None.

    Args:
        z: the zarr array.

    Returns:
        The size every chunk file has (padding included), or None when compressed (sizes vary).

    Example:
        >>> chunk_nbytes(zarr_open(Path("run/arrays/fc")))  # doctest: +SKIP
        16384
    """
    codecs = getattr(getattr(z, "metadata", None), "codecs", None)
    if codecs is None or len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
        return None
    return int(np.prod(z.chunks)) * np.dtype(z.dtype).itemsize


def zarr_create(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str) -> Any:
    """Create (or replace) one layer's array as the store lays it out.

    Args:
        path: the array's directory (``run/arrays/<layer>``).
        shape: (rows, ...units).
        chunks: (chunk rows, ...units): a chunk holds whole rows.
        dtype: the stored dtype (``uint16`` for bfloat16 bit patterns).

    Returns:
        The zarr array, opened for writing (every chunk written as a file, zeros included).

    Example:
        >>> z = zarr_create(Path("run/arrays/fc"), (10, 512), (4, 512), "float32")  # doctest: +SKIP
    """
    import zarr  # heavy: only where a store is written or read

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
        return z.with_config({"write_empty_chunks": True})  # type: ignore[call-overload]  # a plain dict is accepted
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype, compressor=None, fill_value=0)


def zarr_open(path: Path, mode: str = "r") -> Any:
    """Open one layer's array.

    Args:
        path: the array's directory.
        mode: ``"r"`` to read, ``"r+"`` to write.

    Returns:
        The zarr array (zarr's own errors for a missing or broken array).

    Example:
        >>> zarr_open(Path("run/arrays/fc")).shape  # doctest: +SKIP
        (10, 512)
    """
    import zarr

    z = zarr.open_array(str(path), mode=mode)
    # Every committed chunk is a file, also an all-zero one: a missing file then means lost rows.
    if mode != "r" and hasattr(z, "with_config"):
        return z.with_config({"write_empty_chunks": True})  # type: ignore[call-overload]  # a plain dict is accepted
    return z


def read_checksums(path: Path) -> dict[tuple[str, int], tuple[int, int]]:
    """The chunk checksums recorded at commit: ``{(layer, chunk): (rows, crc32)}`` (last entry wins:
    a resumed run appends the rewritten chunk again; a line torn by a kill is ignored).

    Args:
        path: the run directory.

    Returns:
        The checksums (empty when the run has none: older runs).

    Example:
        >>> read_checksums(Path("run"))[("fc", 0)]  # doctest: +SKIP
        (4, 3735928559)
    """
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
    """CRC-32 of a block of rows as stored (zlib's crc32 releases the GIL: cheap in the writer thread).

    Args:
        block: the rows, in their stored dtype.

    Returns:
        The CRC-32 of their bytes (C order).

    Example:
        >>> chunk_crc(np.zeros(4, np.uint8))
        558161692
    """
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1).data)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch does.

    Args:
        x: float32 values.

    Returns:
        Their bfloat16 bit patterns, as uint16.

    Example:
        >>> bf16_bits(np.array([1.0], np.float32))
        array([16256], dtype=uint16)
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values (exact).

    Args:
        bits: bfloat16 bit patterns.

    Returns:
        float32 values.

    Example:
        >>> bf16_to_float32(np.array([16256], np.uint16))
        array([1.], dtype=float32)
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)
