"""Representational dissimilarity matrices (RDMs) of stored activations, in memory or streamed to disk,
and cross-validated (crossnobis) distances.

Conventions: an RDM is an (N, N) float64 matrix, symmetric with an exactly zero diagonal; its
"upper triangle" is the condensed vector of the N(N-1)/2 entries above the diagonal (row-major,
the order of ``np.triu_indices(N, k=1)`` and of ``scipy.spatial.distance.squareform``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layertap.analysis.rows import RowBlocks
from layertap.errors import LayertapError
from layertap.store.files import disk_error

log = logging.getLogger("layertap")
METRICS = ("correlation", "cosine", "euclidean")


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise LayertapError(f"unknown RDM metric '{metric}'; choose one of {', '.join(METRICS)}")
    return metric


def _prepare(block: np.ndarray, metric: str, col_mean: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ready for a dot product: unit vectors (correlation/cosine) or centered rows + squared norms."""
    if metric == "euclidean":
        # Centering the columns does not change distances but reduces cancellation in |a|^2+|b|^2-2ab.
        centered = block - col_mean
        return centered, np.einsum("ij,ij->i", centered, centered)
    if metric == "correlation":
        block = block - block.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    with np.errstate(invalid="ignore", divide="ignore"):
        # A constant (correlation) or all-zero (cosine) row has no direction: its distances are NaN.
        return block / norms[:, None], None


def _rdm_blocks(
    X: Any, metric: str, block_rows: int | None, undefined: list[int] | None = None
) -> tuple[int, Iterator[tuple[int, int, np.ndarray]]]:
    """(N, generator of (i0, j0, D[i0:i1, j0:j1]) for block pairs with j0 >= i0).

    ``undefined``, if given, receives the indices of rows whose distances are all NaN (constant
    rows for correlation, zero rows for cosine, non-finite values), as the generator reaches them.
    """
    _check_metric(metric)
    rows = RowBlocks(X)
    step = rows.default_block(block_rows)
    col_mean = None
    if metric == "euclidean":
        col_mean = np.zeros(rows.p)
        for _, block in rows.blocks(step):
            col_mean += block.sum(axis=0)
        col_mean /= rows.n

    def gen() -> Iterator[tuple[int, int, np.ndarray]]:
        for i0 in range(0, rows.n, step):
            a, na = _prepare(rows.get(i0, i0 + step), metric, col_mean)
            if undefined is not None:  # every row is an `a` row exactly once
                bad = ~np.isfinite(a).all(axis=1) | (na is not None and ~np.isfinite(na))
                undefined.extend(int(i) for i in i0 + np.flatnonzero(bad))
            for j0 in range(i0, rows.n, step):
                b, nb = (a, na) if j0 == i0 else _prepare(rows.get(j0, j0 + step), metric, col_mean)
                dot = a @ b.T
                if na is not None and nb is not None:  # euclidean: centered rows and their squared norms
                    # clip: rounding can make tiny squared distances negative
                    d = np.sqrt(np.maximum(na[:, None] + nb[None, :] - 2.0 * dot, 0.0))
                else:
                    d = 1.0 - dot
                if j0 == i0:
                    d = (d + d.T) / 2.0  # exactly symmetric and ...
                    np.fill_diagonal(d, 0.0)  # ... exactly zero on the diagonal (rounding leaves ~1e-16)
                yield i0, j0, d

    return rows.n, gen()


def _warn_undefined(undefined: list[int], n: int, metric: str, labels: Sequence[str] | None, what: str) -> None:
    """Warn once, naming the images whose distances are all NaN (nothing to compare them by)."""
    if not undefined:
        return
    names = [str(labels[i]) if labels is not None else f"row {i}" for i in undefined]
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    cause = {"correlation": "constant", "cosine": "all-zero"}.get(metric, "non-finite")
    log.warning(
        "%s%d of %d images have %s activations, so their %s distances are NaN and left out of comparisons: %s",
        f"{what}: " if what else "",
        len(undefined),
        n,
        cause,
        metric,
        shown,
    )


def rdm(
    X: Any,
    metric: str = "correlation",
    block_rows: int | None = None,
    *,
    labels: Sequence[str] | None = None,
    what: str = "",
) -> np.ndarray:
    """Representational dissimilarity matrix of the images (rows) of ``X``.

    A constant row (correlation) or zero row (cosine) gives NaN distances, as
    ``scipy.spatial.distance.pdist`` does, and a warning (logger ``layertap``) naming those images.
    Computed in blocks of ``block_rows`` images: memory is the result, 8*N^2 bytes (N=50,000: 20 GB;
    use :func:`rdm_to_disk` then), plus two blocks and one block x block product. A LayerArray is
    read about N / (2 * block_rows) times.

    Args:
        X: (N, ...) numpy array or LayerArray; trailing axes are flattened to P features.
        metric: ``"correlation"`` (1 - Pearson r between two images' feature vectors, in [0, 2]),
            ``"cosine"`` (1 - cosine similarity, in [0, 2]) or ``"euclidean"`` (distance, in the units of X).
        block_rows: images per block (default: about 128 MB of float64 per block, at most 4096).
        labels: one name per row (e.g. ``run.images``) for the warning; by default rows are named by index.
        what: what ``X`` is (e.g. the layer), for the warning.

    Returns:
        (N, N) float64, symmetric, zero diagonal.

    Raises:
        LayertapError: an unknown metric, an empty or non-numeric input, ``block_rows < 1``.

    Example:
        >>> import numpy as np
        >>> rdm(np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])).round(6).tolist()
        [[0.0, 2.0], [2.0, 0.0]]
    """
    undefined: list[int] = []
    n, blocks = _rdm_blocks(X, metric, block_rows, undefined)
    out = np.empty((n, n), dtype=np.float64)
    for i0, j0, d in blocks:
        out[i0 : i0 + d.shape[0], j0 : j0 + d.shape[1]] = d
        out[j0 : j0 + d.shape[1], i0 : i0 + d.shape[0]] = d.T
    _warn_undefined(undefined, n, metric, labels, what)
    return out


def rdm_to_disk(
    X: Any,
    path: str | os.PathLike[str],
    metric: str = "correlation",
    block_rows: int | None = None,
    *,
    labels: Sequence[str] | None = None,
    what: str = "",
) -> Path:
    """Like :func:`rdm`, but stream the (N, N) float64 RDM into the ``.npy`` file ``path``.

    Only two row blocks and one block x block result are in memory at a time, so N = 50,000
    images (a 20 GB RDM) needs no 20 GB of RAM; the file needs 8*N^2 bytes (+128) of disk.
    Constant rows are warned about as in :func:`rdm`.

    Args:
        X: (N, ...) numpy array or LayerArray.
        path: the ``.npy`` file to write (parent folders are created).
        metric: as in :func:`rdm`.
        block_rows: as in :func:`rdm`.
        labels: as in :func:`rdm`.
        what: as in :func:`rdm`.

    Returns:
        ``path``; open the result lazily with ``np.load(path, mmap_mode="r")``.

    Raises:
        StorageError: the file cannot be written (full disk, permissions).

    Example:
        >>> path = rdm_to_disk(run["avgpool"], "rdm.npy")  # doctest: +SKIP
        >>> D = np.load(path, mmap_mode="r")  # doctest: +SKIP
    """
    path = Path(path)
    undefined: list[int] = []
    n, blocks = _rdm_blocks(X, metric, block_rows, undefined)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, n))
        last_row = -1
        for i0, j0, d in blocks:
            if i0 != last_row and last_row >= 0:
                mm.flush()  # hand finished row bands to the OS so dirty pages do not pile up
            last_row = i0
            mm[i0 : i0 + d.shape[0], j0 : j0 + d.shape[1]] = d
            mm[j0 : j0 + d.shape[1], i0 : i0 + d.shape[0]] = d.T
        mm.flush()
        del mm
    except OSError as err:
        raise disk_error(err, path) from None
    _warn_undefined(undefined, n, metric, labels, what)
    return path


# -- cross-validated distances --------------------------------------------------------------------


def crossnobis_rdm(
    X: Any, conditions: Sequence[Any] | np.ndarray, runs: Sequence[Any] | np.ndarray, precision: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-validated squared Euclidean (or Mahalanobis, "crossnobis") distances between conditions.

    With mu_k^r the mean pattern of condition k in run r and d^r = mu_i^r - mu_j^r, the distance is
    ``mean over ordered pairs of different runs (A, B) of d^A . W . d^B / P``, with W = ``precision``
    or the identity. This equals leave-one-run-out cross-validation (training pattern: mean of the
    other runs, test pattern: the left-out run, averaged over folds). Because A and B have independent
    noise, the estimate is unbiased: its expected value is 0 for identical conditions (so it can be
    negative) and delta' W delta / P for a true difference delta. Units: squared units of X per
    feature (whitened units with ``precision``).

    Args:
        X: (n_obs, P) measurements (trailing axes flattened).
        conditions: one condition label per observation.
        runs: one partition label per observation (runs, sessions, repetitions). Every condition must
            occur in every run, and there must be at least 2 runs.
        precision: (P, P) noise precision matrix, or (P,) diagonal of one, for noise whitening; None: identity.

    Returns:
        ``(D, labels)``: D is (K, K) float64, symmetric, zero diagonal, in the order of ``labels`` (the
        sorted unique conditions).

    Raises:
        LayertapError: mismatched label counts, fewer than 2 runs, a condition missing from a run, or a
            precision of the wrong shape.

    Example:
        >>> X = np.random.default_rng(0).normal(size=(8, 5))
        >>> D, labels = crossnobis_rdm(X, ["a", "b"] * 4, [0, 0, 1, 1, 2, 2, 3, 3])
        >>> D.shape, labels.tolist()
        ((2, 2), ['a', 'b'])
    """
    data = RowBlocks(X).all()
    cond = np.asarray(conditions)
    part = np.asarray(runs)
    if cond.shape != (data.shape[0],) or part.shape != (data.shape[0],):
        raise LayertapError(
            f"conditions and runs need one label per observation ({data.shape[0]}), "
            f"got {cond.shape[0] if cond.ndim else 0} and {part.shape[0] if part.ndim else 0}"
        )
    labels, ci = np.unique(cond, return_inverse=True)
    run_labels, ri = np.unique(part, return_inverse=True)
    k, m, p = len(labels), len(run_labels), data.shape[1]
    if m < 2:
        raise LayertapError("cross-validated distances need at least 2 runs (partitions)")
    sums = np.zeros((m, k, p))
    counts = np.zeros((m, k))
    np.add.at(sums, (ri, ci), data)
    np.add.at(counts, (ri, ci), 1)
    if (counts == 0).any():
        r, c = np.argwhere(counts == 0)[0]
        raise LayertapError(f"condition {labels[c]!r} has no observation in run {run_labels[r]!r}")
    mu = sums / counts[..., None]  # (runs, conditions, P)
    if precision is None:
        weighted = mu
    else:
        w = np.asarray(precision, dtype=np.float64)
        if w.shape == (p,):
            weighted = mu * w
        elif w.shape == (p, p):
            weighted = mu @ w
        else:
            raise LayertapError(f"precision must be ({p}, {p}) or ({p},), got {w.shape}")
    # Sum over ordered pairs A != B of mu_A W mu_B' = (sum_A mu_A) W (sum_B mu_B)' - sum_A mu_A W mu_A'.
    g = mu.sum(axis=0) @ weighted.sum(axis=0).T - np.einsum("rkp,rlp->kl", mu, weighted)
    g = (g + g.T) / (2.0 * m * (m - 1) * p)
    diag = np.diag(g)
    d = diag[:, None] + diag[None, :] - 2.0 * g
    np.fill_diagonal(d, 0.0)
    return d, labels


def upper_triangle(r: Any) -> np.ndarray:
    """The N(N-1)/2 entries above the diagonal of a square RDM (row-major, ``np.triu_indices(N, k=1)``).

    Args:
        r: an (N, N) RDM, or a condensed vector (returned as is).

    Returns:
        (N(N-1)/2,) float64.

    Raises:
        LayertapError: neither square nor 1-D.

    Example:
        >>> upper_triangle(np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]])).tolist()
        [1.0, 2.0, 3.0]
    """
    a = np.asarray(r, dtype=np.float64)
    if a.ndim == 1:
        return a
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise LayertapError(f"an RDM must be square (N x N) or a condensed vector, got shape {a.shape}")
    return a[np.triu_indices(a.shape[0], k=1)]


def is_rdm(matrix: np.ndarray, rtol: float = 1e-6) -> bool:
    """Whether ``matrix`` is an RDM: square, symmetric and zero on the diagonal (within ``rtol`` of the largest entry).

    Missing pairs are allowed: NaN at symmetric positions (``M[i, j]`` and ``M[j, i]`` both NaN)
    and a zero or NaN diagonal, as long as some pair off the diagonal is not NaN.

    Args:
        matrix: a 2-D array.
        rtol: tolerance, relative to the largest absolute entry.

    Returns:
        True for an RDM (a response matrix is not one).

    Example:
        >>> is_rdm(np.array([[0.0, 0.4], [0.4, 0.0]])), is_rdm(np.ones((2, 3)))
        (True, False)
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        return False
    missing = np.isnan(matrix)
    off_diagonal = ~np.eye(matrix.shape[0], dtype=bool)
    if not np.array_equal(missing, missing.T) or missing[off_diagonal].all():
        return False
    scale = max(float(np.max(np.abs(matrix[~missing]))), 1e-300)
    tol = rtol * scale
    diag = np.diag(matrix)
    diag_ok = np.all(np.isnan(diag) | (np.abs(diag) <= tol))
    return bool(diag_ok and np.allclose(matrix, matrix.T, rtol=0, atol=tol, equal_nan=True))
