"""Reading for post-processing: a layer (or several, side by side) as 2-D float64 blocks of rows, with
per-block steps (centering, normalization) applied on the way. Memory is one block, never the images."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from layertap.errors import LayertapError
from layertap.store.blocks import iter_row_blocks, rows_for_bytes
from layertap.store.run import LayerArray, Run, open_run

Step = Callable[[np.ndarray], np.ndarray]


class Blocks:
    """Rows of one or more arrays as ``(start, block)`` with block (rows, D) float64, D = all units.

    Several arrays (same number of rows) are flattened and concatenated side by side; ``steps``
    are applied to each block in order (e.g. centering, then normalization). Each array is read
    with :func:`layertap.store.blocks.iter_row_blocks`, one block at a time.

    Args:
        arrays: LayerArrays or numpy arrays (rows, ...) with the same number of rows.
        rows: rows per block (default :func:`block_rows` of the total width).
        steps: functions applied to every (rows, D) float64 block, in order.

    Raises:
        LayertapError: no arrays, or arrays with different numbers of rows.

    Example:
        >>> b = Blocks([np.ones((5, 2)), np.zeros((5, 3))], rows=2)
        >>> [(start, x.shape) for start, x in b]
        [(0, (2, 5)), (2, (2, 5)), (4, (1, 5))]
    """

    def __init__(self, arrays: Sequence[LayerArray | np.ndarray], rows: int | None = None, steps: Sequence[Step] = ()):
        if not arrays:
            raise LayertapError("no layers given")
        self.arrays = list(arrays)
        self.n = int(self.arrays[0].shape[0])
        if any(int(a.shape[0]) != self.n for a in self.arrays):
            raise LayertapError(f"layers differ in number of rows: {[a.shape[0] for a in self.arrays]}")
        self.dims = [int(np.prod(a.shape[1:])) for a in self.arrays]
        self.dim = sum(self.dims)
        self.row_shape: tuple[int, ...] = tuple(self.arrays[0].shape[1:]) if len(self.arrays) == 1 else (self.dim,)
        self.rows = rows or block_rows(self.dim)
        self.steps = list(steps)

    def with_steps(self, *steps: Step) -> Blocks:
        """The same rows with ``steps`` applied after the present ones.

        Args:
            *steps: functions of a (rows, D) float64 block.

        Returns:
            A new :class:`Blocks` (this one is unchanged).
        """
        return Blocks(self.arrays, self.rows, [*self.steps, *steps])

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        readers = [iter_row_blocks(a, self.rows, flatten=True) for a in self.arrays]
        for blocks in zip(*readers, strict=True):
            start, parts = blocks[0][0], [b for _, b in blocks]
            x = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)).astype(np.float64)
            for step in self.steps:
                x = step(x)
            yield start, x

    def load(self) -> np.ndarray:
        """All rows at once: only for data known to be small.

        Returns:
            (n, D) float64 with the steps applied.
        """
        out = np.empty((self.n, self.dim), dtype=np.float64)
        for start, x in self:
            out[start : start + len(x)] = x
        return out


def block_rows(dim: int) -> int:
    """Rows per block so that a float64 block of ``dim`` units is about the store's CHUNK_BYTES (at most 4096 rows).

    Args:
        dim: units per row.

    Returns:
        Rows per block (>= 1); the budget is read when called, so tests can shrink it.

    Example:
        >>> block_rows(4096)
        512
    """
    return rows_for_bytes(8 * dim)


def as_blocks(data: Any, layer: str | None = None) -> Blocks:
    """``data`` as :class:`Blocks`: a Run (+ ``layer``), a run directory, a LayerArray, an array, or Blocks.

    Args:
        data: what to read.
        layer: the layer of a run (needed when it stores several).

    Returns:
        The blocks.

    Raises:
        LayertapError: a run with several layers and no ``layer``, or an array with fewer than 2 axes.

    Example:
        >>> as_blocks(np.zeros((3, 2, 2))).dim
        4
    """
    if isinstance(data, Blocks):
        return data
    if isinstance(data, (str, os.PathLike)):
        data = open_run(data)
    if isinstance(data, Run):
        if layer is None:
            if len(data.layers) != 1:
                raise LayertapError(f"run {data.path} has layers {data.layers}; say which one (layer=...)")
            layer = data.layers[0]
        return Blocks([data[layer]])
    if isinstance(data, LayerArray):
        return Blocks([data])
    arr = np.asarray(data)
    if arr.ndim < 2:
        raise LayertapError(f"expected (images, units...) activations, got shape {arr.shape}")
    return Blocks([arr])


def column_mean(blocks: Blocks) -> np.ndarray:
    """Mean of every unit over all rows, accumulated block by block.

    Args:
        blocks: the rows.

    Returns:
        (D,) float64.

    Example:
        >>> column_mean(Blocks([np.array([[1.0, 2.0], [3.0, 4.0]])])).tolist()
        [2.0, 3.0]
    """
    total = np.zeros(blocks.dim, dtype=np.float64)
    for _, x in blocks:
        total += x.sum(axis=0)
    return total / max(1, blocks.n)


def subtract(mean: np.ndarray) -> Step:
    """A step subtracting ``mean`` from every row (centering).

    Args:
        mean: (D,) values.

    Returns:
        The step.

    Example:
        >>> subtract(np.array([1.0, 1.0]))(np.array([[1.0, 2.0]])).tolist()
        [[0.0, 1.0]]
    """
    return lambda x: x - mean


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Every row scaled to unit l2 norm (an all-zero row stays zero).

    Args:
        x: (rows, D) block.

    Returns:
        The scaled rows.

    Example:
        >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
        [[0.6, 0.8], [0.0, 0.0]]
    """
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)  # an all-zero vector stays zero


def require_finite(x: np.ndarray) -> np.ndarray:
    """``x`` unchanged, or a one-line error when it holds NaN or inf (nothing can be fitted to them).

    Args:
        x: (rows, D) block.

    Returns:
        ``x``.

    Raises:
        LayertapError: NaN/inf values, counted.

    Example:
        >>> require_finite(np.ones((2, 2))).shape
        (2, 2)
    """
    if not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        raise LayertapError(
            f"cannot fit PCA: the activations hold NaN/inf values ({int(bad.sum())} values in "
            f"{int(bad.any(axis=1).sum())} images of one block); the run's manifest counts them per layer "
            "('values'): drop those images or fix what makes the model produce them"
        )
    return x
