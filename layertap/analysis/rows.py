"""Row-block access to activations: an (N, ...) numpy array or a stored LayerArray as float64 rows.

Analyses read a LayerArray a block of rows at a time, so activations larger than memory can be
analysed; :data:`BLOCK_BYTES` bounds a block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from layertap.errors import LayertapError
from layertap.store.blocks import iter_row_blocks, rows_for_bytes
from layertap.store.run import LayerArray

#: a row block (float64) is kept near this many bytes unless ``block_rows`` is given
BLOCK_BYTES = 128 << 20


def rows_per_block(n: int, width: int, cap: int | None = None) -> int:
    """How many float64 rows of ``width`` values fit in :data:`BLOCK_BYTES` (at least 1, at most ``n``, ``cap``).

    Args:
        n: rows in all.
        width: float64 values per row.
        cap: an upper bound on the rows of a block (None: none).

    Returns:
        Rows per block (:func:`layertap.store.blocks.rows_for_bytes` with the analysis budget).

    Example:
        >>> rows_per_block(10_000, 1_000_000)
        16
    """
    return rows_for_bytes(8 * width, BLOCK_BYTES, n_rows=n, limit=cap)


class RowBlocks:
    """Uniform block access to an (N, ...) source as float64 rows of length P (trailing axes flattened).

    Args:
        X: a LayerArray (read a block at a time, never whole) or a real numeric array (N, ...), N, P >= 1.

    Raises:
        LayertapError: an input with fewer than 2 axes, no rows or features, or non-real values.

    Example:
        >>> rows = RowBlocks(np.ones((10, 2, 3)))
        >>> rows.n, rows.p, rows.get(0, 4).shape
        (10, 6, (4, 6))
    """

    def __init__(self, X: Any):
        if isinstance(X, LayerArray) or (hasattr(X, "iter_chunks") and hasattr(X, "shape")):
            self._src: Any = X
            shape = tuple(X.shape)
        else:
            arr = np.asarray(X)
            if arr.ndim < 2:
                raise LayertapError(f"expected an (images x features) array, got shape {arr.shape}")
            if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
                raise LayertapError(f"expected a real numeric array, got dtype {arr.dtype}")
            self._src = arr.reshape(arr.shape[0], -1)
            shape = self._src.shape
        self.n = int(shape[0])
        self.p = int(np.prod(shape[1:], dtype=np.int64))
        if self.n == 0 or self.p == 0:
            raise LayertapError(f"expected a non-empty (images x features) array, got shape {shape}")

    def get(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a (rows, P) float64 block.

        Args:
            start: first row.
            stop: one past the last row.

        Returns:
            The block (a view where the source is float64 already).
        """
        block = np.asarray(self._src[start:stop])
        return block.reshape(block.shape[0], -1).astype(np.float64, copy=False)

    def blocks(self, step: int) -> Iterator[tuple[int, np.ndarray]]:
        """All rows in order, ``step`` at a time (:func:`layertap.store.blocks.iter_row_blocks`).

        Args:
            step: rows per block.

        Returns:
            An iterator of ``(first row, (rows, P) float64 block)``.
        """
        return iter_row_blocks(self._src, step, flatten=True, dtype=np.float64)

    def all(self) -> np.ndarray:
        """All rows as (N, P) float64: only for data known to fit in memory.

        Returns:
            The rows.
        """
        return self.get(0, self.n)

    def default_block(self, block_rows: int | None) -> int:
        """Rows per block: ``block_rows`` if given, else about :data:`BLOCK_BYTES` of float64 (at most 4096 rows).

        Args:
            block_rows: rows asked for (None: the default).

        Returns:
            Rows per block (at most N).

        Raises:
            LayertapError: ``block_rows < 1``.
        """
        if block_rows is not None:
            if block_rows < 1:
                raise LayertapError(f"block_rows must be >= 1, not {block_rows}")
            return min(int(block_rows), self.n)
        # ~128 MB of float64 per block; at most 4096 rows so a result block stays <= 128 MB too.
        return rows_per_block(self.n, self.p, cap=4096)
