"""Rows in blocks: how many rows a chunk (or a block read at once) holds, and reading a layer block by block.

Every place that sizes a chunk or a block of rows (the run writer, postprocessing, the RDM code, the
exporters) asks :func:`rows_for_bytes`; every place that streams a layer's rows uses :func:`iter_row_blocks`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

#: a chunk of the widest layer holds about this many bytes (bounds memory and lost work on a kill)
CHUNK_BYTES = 16 << 20
#: the most rows a chunk or block holds, however narrow a row is
MAX_BLOCK_ROWS = 4096
#: the dtypes a layer can be stored in
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
#: bytes per stored value of each storage dtype (bfloat16 is stored as its 16-bit pattern)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def rows_for_bytes(
    row_bytes: int, budget: int | None = None, *, n_rows: int | None = None, limit: int | None = MAX_BLOCK_ROWS
) -> int:
    """Rows per chunk or block so that one holds about ``budget`` bytes.

    Args:
        row_bytes: bytes of one row (e.g. its units times the item size).
        budget: bytes wanted per chunk or block; default :data:`CHUNK_BYTES` (read when called).
        n_rows: if given, never more rows than this (the rows there are).
        limit: if given, never more rows than this (default :data:`MAX_BLOCK_ROWS`).

    Returns:
        The rows (at least 1).

    Example:
        >>> rows_for_bytes(4 * 1000)  # float32 rows of 1000 units in 16 MiB
        4096
        >>> rows_for_bytes(4 * 1_000_000, n_rows=3)
        3
    """
    rows = (CHUNK_BYTES if budget is None else budget) // max(1, row_bytes)
    if limit is not None:
        rows = min(rows, limit)
    if n_rows is not None:
        rows = min(rows, n_rows)
    return max(1, rows)


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

    Example:
        >>> fit_chunk_rows(41, 1)
        1
        >>> fit_chunk_rows(64, 100)  # 2 chunks of 51 rows: 2 rows of padding (2%)
        51
    """
    n = max(1, n_rows)
    for r in range(max(1, min(limit, n)), 0, -1):
        if -(-n // r) * r - n <= waste * n:
            return r
    return 1


def iter_row_blocks(
    array: Any, rows: int, *, flatten: bool = False, dtype: Any = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Read an array's rows ``rows`` at a time, never all at once.

    Args:
        array: anything with ``shape`` and row slicing: a :class:`~layertap.store.run.LayerArray`, a numpy
            array, a memory map.
        rows: rows per block (the last block may be shorter).
        flatten: give each block as (rows, units) (the trailing axes flattened).
        dtype: convert each block to this dtype (no copy when it already is).

    Returns:
        An iterator of ``(first row, block)``.

    Example:
        >>> [(start, len(b)) for start, b in iter_row_blocks(np.zeros((5, 2)), 2)]
        [(0, 2), (2, 2), (4, 1)]
    """
    n = int(array.shape[0])
    step = max(1, int(rows))
    for start in range(0, n, step):
        block = np.asarray(array[start : start + step])
        if flatten:
            block = block.reshape(len(block), -1)
        if dtype is not None:
            block = block.astype(dtype, copy=False)
        yield start, block
