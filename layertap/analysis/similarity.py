"""Representational analysis of stored activations: RDMs, RDM comparison, CKA, layer-by-layer similarity.

Everything returns plain numpy (float64). Inputs are numpy arrays or :class:`~layertap.storage.LayerArray`
(images x ...; trailing axes are flattened to one feature vector per image). A LayerArray is read
``block_rows`` images at a time, so activations larger than memory can be analysed.

Conventions: an RDM is an (N, N) float64 matrix, symmetric with an exactly zero diagonal; its
"upper triangle" is the condensed vector of the N(N-1)/2 entries above the diagonal (row-major,
the order of ``np.triu_indices(N, k=1)`` and of ``scipy.spatial.distance.squareform``).

Optional extras: ``rsatoolbox`` (``pip install 'layertap[rsa]'``) for :func:`to_rsatoolbox` and
:func:`rdms_to_rsatoolbox`; ``scipy`` (same extra) to read MATLAB ``.mat`` references.
"""

from __future__ import annotations

import csv
import fnmatch
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layertap.errors import LayertapError, close_matches
from layertap.store.run import LayerArray, Run, disk_error, open_run

log = logging.getLogger("layertap")
METRICS = ("correlation", "cosine", "euclidean")
RDM_COMPARISONS = ("pearson", "spearman", "kendall_tau_a")
#: methods of :func:`layer_similarity` / :func:`compare_to_reference`
METHODS = (
    "rdm-pearson",
    "rdm-spearman",
    "rdm-kendall_tau_a",
    "cka-linear",
    "cka-rbf",
    "cka-linear-unbiased",
    "cka-rbf-unbiased",
)
#: a row block (float64) is kept near this many bytes unless ``block_rows`` is given
BLOCK_BYTES = 128 << 20


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency or raise a one-line :class:`LayertapError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LayertapError(
            f"{what} needs the optional package '{module.split('.')[0]}': pip install 'layertap[{extra}]'",
            exit_code=1,
        ) from None


# -- row access -----------------------------------------------------------------------------------


class _Rows:
    """Uniform block access to an (N, ...) source as float64 rows of length P (trailing axes flattened)."""

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
        block = np.asarray(self._src[start:stop])
        return block.reshape(block.shape[0], -1).astype(np.float64, copy=False)

    def all(self) -> np.ndarray:
        return self.get(0, self.n)

    def default_block(self, block_rows: int | None) -> int:
        if block_rows is not None:
            if block_rows < 1:
                raise LayertapError(f"block_rows must be >= 1, not {block_rows}")
            return min(int(block_rows), self.n)
        # ~128 MB of float64 per block; at most 4096 rows so a result block stays <= 128 MB too.
        return max(1, min(self.n, 4096, BLOCK_BYTES // (8 * self.p)))


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
    rows = _Rows(X)
    step = rows.default_block(block_rows)
    col_mean = None
    if metric == "euclidean":
        col_mean = np.zeros(rows.p)
        for i0 in range(0, rows.n, step):
            col_mean += rows.get(i0, i0 + step).sum(axis=0)
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
                if metric == "euclidean":
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

    ``X``: (N, ...) numpy array or LayerArray; trailing axes are flattened to P features.
    ``metric``: ``"correlation"`` (1 - Pearson r between two images' feature vectors, in [0, 2]),
    ``"cosine"`` (1 - cosine similarity, in [0, 2]) or ``"euclidean"`` (distance, in the units of X).
    Returns (N, N) float64, symmetric, zero diagonal. A constant row (correlation) or zero row
    (cosine) gives NaN distances, as ``scipy.spatial.distance.pdist`` does, and a warning (logger
    ``layertap``) naming those images: ``labels`` (one name per row, e.g. ``run.images``) and
    ``what`` (e.g. the layer) make it readable; by default rows are named by index.

    Computed in blocks of ``block_rows`` images (default: about 128 MB of float64 per block):
    memory is the result, 8*N^2 bytes (N=50,000: 20 GB; use :func:`rdm_to_disk` then), plus two
    blocks and one block x block product. A LayerArray is read about N / (2 * block_rows) times.
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
    Open the result lazily with ``np.load(path, mmap_mode="r")``. Returns ``path``. Constant rows
    are warned about as in :func:`rdm` (``labels``, ``what``).
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

    ``X``: (n_obs, P) measurements (trailing axes flattened); ``conditions`` and ``runs``: one label
    per observation (runs are the independent partitions: runs, sessions, repetitions). Every
    condition must occur in every run, and there must be at least 2 runs.

    With mu_k^r the mean pattern of condition k in run r and d^r = mu_i^r - mu_j^r, the distance is
    ``mean over ordered pairs of different runs (A, B) of d^A . W . d^B / P``, with W = ``precision``
    ((P, P) noise precision matrix, or (P,) diagonal of one, for noise whitening) or the identity.
    This equals leave-one-run-out cross-validation (training pattern: mean of the other runs,
    test pattern: the left-out run, averaged over folds). Because A and B have independent noise,
    the estimate is unbiased: its expected value is 0 for identical conditions (so it can be
    negative) and delta' W delta / P for a true difference delta. Units: squared units of X per
    feature (whitened units with ``precision``).

    Returns ``(D, labels)``: D is (K, K) float64, symmetric, zero diagonal, in the order of ``labels``
    (the sorted unique conditions).
    """
    data = _Rows(X).all()
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


# -- comparing RDMs -------------------------------------------------------------------------------


def upper_triangle(r: Any) -> np.ndarray:
    """The N(N-1)/2 entries above the diagonal of a square RDM (a 1-D input is returned as is)."""
    a = np.asarray(r, dtype=np.float64)
    if a.ndim == 1:
        return a
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise LayertapError(f"an RDM must be square (N x N) or a condensed vector, got shape {a.shape}")
    return a[np.triu_indices(a.shape[0], k=1)]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    return float(np.dot(xc, yc) / denom) if denom > 0 else float("nan")


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (what Spearman's rho needs)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def _count_inversions(r: np.ndarray) -> int:
    """Pairs i < j with r[i] > r[j] for integer ranks r >= 0: bottom-up merge sort, O(n log^2 n) numpy."""
    n = r.size
    if n < 2:
        return 0
    m = int(r.max()) + 1
    idx = np.arange(n, dtype=np.int64)
    cur = r.astype(np.int64)  # invariant: sorted within consecutive blocks of width w
    total = 0
    w = 1
    while w < n:
        block = idx // (2 * w)
        right = (idx // w) % 2 == 1
        keys = block * m + cur
        # Left halves are sorted and offset by block, so their concatenation is globally sorted:
        # one searchsorted counts, for every right element, the larger elements of its left half.
        left_keys = keys[~right]
        hi = np.searchsorted(left_keys, block[right] * m + (m - 1), side="right")
        lo = np.searchsorted(left_keys, keys[right], side="right")
        total += int((hi - lo).sum())
        cur = np.sort(keys, kind="stable") - block * m  # merge: blocks of width 2w now sorted
        w *= 2
    return total


def _tied_pairs(same_as_previous: np.ndarray) -> int:
    """Pairs within runs of equal values of a sorted sequence, given ``s[i] == s[i-1]`` for i >= 1."""
    breaks = np.flatnonzero(np.r_[True, ~same_as_previous, True])
    counts = np.diff(breaks).astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau_a(x: Any, y: Any) -> float:
    """Kendall's tau-a: (concordant - discordant) / (n(n-1)/2); tied pairs count as neither.

    Unlike tau-b (``scipy.stats.kendalltau``), the denominator does not shrink with ties, so a
    model RDM with many tied values is not favoured (Nili et al. 2014). O(n log^2 n) time: a few
    seconds for the 2 million pairs of a 2000-image RDM.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    if y.size != n:
        raise LayertapError(f"tau-a needs vectors of equal length, got {n} and {y.size}")
    if n < 2:
        return float("nan")
    n0 = n * (n - 1) // 2
    by_y = np.argsort(y, kind="stable")
    y_sorted = y[by_y]
    y_same = y_sorted[1:] == y_sorted[:-1]
    y_rank = np.empty(n, dtype=np.int64)
    y_rank[by_y] = np.r_[0, np.cumsum(~y_same)]  # dense ranks: equal values, equal rank
    # Order by x, ties in x by y (two stable sorts): then the discordant pairs are the inversions of y.
    order = by_y[np.argsort(x[by_y], kind="stable")]
    xs, ys = x[order], y_rank[order]
    x_same = xs[1:] == xs[:-1]
    discordant = _count_inversions(ys)
    n1, n2 = _tied_pairs(x_same), _tied_pairs(y_same)
    n3 = _tied_pairs(x_same & (ys[1:] == ys[:-1]))  # tied in both (contiguous after the (x, y) sort)
    # concordant = n0 - (pairs tied in x or y) - discordant, with |tied in x or y| = n1 + n2 - n3
    return float((n0 - n1 - n2 + n3 - 2 * discordant) / n0)


def _shared_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Leave out the missing (NaN) pairs: ``(x, y, how many left out)``.

    Missing pairs of one RDM (a brain or behavioural RDM with pairs never measured, a layer RDM
    with a constant image) are left out of both. When *both* RDMs have missing pairs, they must be
    the same pairs (as rsatoolbox requires): different patterns are an error, because which pairs
    to trust is the user's decision, not ours.
    """
    if x.shape != y.shape:
        raise LayertapError(f"RDMs differ in size: {x.size} and {y.size} pairs")
    nx, ny = np.isnan(x), np.isnan(y)
    if not (nx.any() or ny.any()):
        return x, y, 0
    if nx.any() and ny.any() and not np.array_equal(nx, ny):
        raise LayertapError(
            f"both RDMs have missing (NaN) pairs, at different positions ({int((nx & ~ny).sum())} pairs missing only "
            f"in the first, {int((ny & ~nx).sum())} only in the second): set the same pairs to NaN in both "
            "(e.g. the union) to compare them over the pairs they share"
        )
    keep = ~(nx | ny)
    return x[keep], y[keep], int(x.size - keep.sum())


def _compare(x: np.ndarray, y: np.ndarray, method: str) -> tuple[float, int]:
    """(similarity over the shared pairs, number of pairs left out as missing)."""
    if method not in (*RDM_COMPARISONS, "kendall", "tau_a"):
        raise LayertapError(f"unknown RDM comparison '{method}'; choose one of {', '.join(RDM_COMPARISONS)}")
    x, y, left_out = _shared_pairs(x, y)
    if left_out and x.size < 2:
        raise LayertapError(f"the RDMs share {x.size} pair(s) that are not NaN; a comparison needs at least 2")
    if method == "pearson":
        return _pearson(x, y), left_out
    if method == "spearman":
        return _pearson(rank_average(x), rank_average(y)), left_out
    return kendall_tau_a(x, y), left_out


def _warn_left_out(left_out: int, total: int, what: str) -> None:
    if left_out:
        log.warning(
            "%s%d of %d pairs are missing (NaN) and were left out of the comparison",
            f"{what}: " if what else "",
            left_out,
            total,
        )


def compare_rdms(a: Any, b: Any, method: str = "spearman") -> float:
    """Similarity of two RDMs over their upper triangles (diagonal excluded).

    ``a``, ``b``: (N, N) RDMs or condensed vectors of N(N-1)/2 entries. ``method``: ``"pearson"``
    (linear correlation), ``"spearman"`` (correlation of average ranks) or ``"kendall_tau_a"``.
    Returns a unitless float in [-1, 1] (NaN if one RDM is constant).

    Missing pairs (NaN) are left out of both RDMs, with a warning (logger ``layertap``) saying how
    many: NaN at the same pairs in both (as rsatoolbox's ``compare`` does), or in one RDM only (which
    rsatoolbox refuses; here those pairs are left out of the other too). NaN in both RDMs at different
    pairs is a :class:`LayertapError`, as in rsatoolbox.
    """
    x, y = upper_triangle(a), upper_triangle(b)
    value, left_out = _compare(x, y, method)
    _warn_left_out(left_out, x.size, "")
    return value


# -- CKA ------------------------------------------------------------------------------------------


def _centered_cross_products(rx: _Rows, ry: _Rows, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Xc'Yc, Xc'Xc, Yc'Yc (Xc: column-centered X), accumulated over row blocks.

    The data are shifted by the first block's column means before accumulating (the shifted-data
    algorithm), which keeps sum(x y) - n mean(x) mean(y) free of catastrophic cancellation.
    """
    sx, sy = rx.get(0, step).mean(axis=0), ry.get(0, step).mean(axis=0)
    cxy = np.zeros((rx.p, ry.p))
    cxx = np.zeros((rx.p, rx.p))
    cyy = np.zeros((ry.p, ry.p))
    tx, ty = np.zeros(rx.p), np.zeros(ry.p)
    for i0 in range(0, rx.n, step):
        bx, by = rx.get(i0, i0 + step) - sx, ry.get(i0, i0 + step) - sy
        cxy += bx.T @ by
        cxx += bx.T @ bx
        cyy += by.T @ by
        tx += bx.sum(axis=0)
        ty += by.sum(axis=0)
    n = rx.n
    return cxy - np.outer(tx, ty) / n, cxx - np.outer(tx, tx) / n, cyy - np.outer(ty, ty) / n


def _gram(data: np.ndarray, kernel: str, sigma: float) -> np.ndarray:
    data = data - data.mean(axis=0)
    dot = data @ data.T
    if kernel == "linear":
        return dot
    sq_norms = np.diag(dot)
    sq = np.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * dot, 0.0)
    np.fill_diagonal(sq, 0.0)
    median = np.median(np.sqrt(sq[np.triu_indices(sq.shape[0], k=1)]))
    if median <= 0:
        raise LayertapError("RBF CKA: the median distance between images is 0 (identical images?)")
    bandwidth = sigma * median  # Kornblith et al.: a fraction of the median distance between images
    return np.exp(-sq / (2.0 * bandwidth**2))


def hsic(K: np.ndarray, L: np.ndarray, unbiased: bool = False) -> float:
    """HSIC of two (n, n) Gram matrices.

    Biased: tr(K H L H) / (n-1)^2 with H = I - 11'/n (Gretton et al. 2005). Unbiased (Song et al.
    2012), with K~, L~ the Grams with zeroed diagonals, n >= 4:
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
    """
    n = K.shape[0]
    if unbiased:
        if n < 4:
            raise LayertapError(f"unbiased HSIC/CKA needs at least 4 images, got {n}")
        k = K.copy()
        l_ = L.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l_, 0.0)
        k1, l1 = k.sum(axis=1), l_.sum(axis=1)
        value = (np.sum(k * l_) + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * np.dot(k1, l1)) / (
            n * (n - 3)
        )
        return float(value)
    # tr(K H L H) = sum((HKH) * L) without forming H: double-centre K.
    kc = K - K.mean(axis=0, keepdims=True)
    kc = kc - kc.mean(axis=1, keepdims=True)
    return float(np.sum(kc * L) / (n - 1) ** 2)


def cka(X: Any, Y: Any, kernel: str = "linear", unbiased: bool = False, sigma: float | None = None) -> float:
    """Centered kernel alignment (Kornblith et al. 2019) between two representations of the same N images.

    ``X``: (N, ...) and ``Y``: (N, ...) arrays or LayerArrays (features flattened; the feature
    counts may differ). ``kernel``: ``"linear"`` or ``"rbf"`` (Gaussian with bandwidth
    ``sigma`` x the median distance between images; ``sigma`` defaults to 0.8 as in Kornblith et al.;
    the median is taken over distinct pairs). ``unbiased``: use the unbiased HSIC estimator (Song et
    al. 2012; Nguyen et al. 2021), which corrects the upward bias of CKA when N is small relative to
    the number of features.

    Returns a unitless float: 1 for identical representations (up to rotation and isotropic scaling
    of the features for the linear kernel), near 0 for unrelated ones (unbiased CKA can be
    slightly negative).

    Memory: linear biased CKA uses the feature-space formula ||Yc'Xc||_F^2 / (||Xc'Xc||_F ||Yc'Yc||_F)
    (Xc, Yc column-centered), accumulated over row blocks, when its (P_x + P_y)^2 products are
    smaller than N x N Gram matrices, so many images with modest feature counts are cheap; otherwise
    (and always for rbf or unbiased) two N x N float64 Gram matrices and the full data are in memory.
    """
    if kernel not in ("linear", "rbf"):
        raise LayertapError(f"unknown CKA kernel '{kernel}'; choose linear or rbf")
    rx, ry = _Rows(X), _Rows(Y)
    if rx.n != ry.n:
        raise LayertapError(f"CKA needs the same images in both representations, got {rx.n} and {ry.n} rows")
    if kernel == "linear" and not unbiased and (rx.p + ry.p) ** 2 <= 2 * rx.n**2:
        step = max(1, min(rx.n, BLOCK_BYTES // (8 * (rx.p + ry.p))))
        cxy, cxx, cyy = _centered_cross_products(rx, ry, step)
        denom = np.linalg.norm(cxx) * np.linalg.norm(cyy)
        return float(np.sum(cxy * cxy) / denom) if denom > 0 else float("nan")
    s = 0.8 if sigma is None else float(sigma)
    if s <= 0:
        raise LayertapError(f"sigma must be > 0, not {sigma}")
    K, L = _gram(rx.all(), kernel, s), _gram(ry.all(), kernel, s)
    kl, kk, ll = hsic(K, L, unbiased), hsic(K, K, unbiased), hsic(L, L, unbiased)
    denom = np.sqrt(kk * ll)
    return float(kl / denom) if denom > 0 else float("nan")


# -- runs and layers ------------------------------------------------------------------------------


def _as_run(run: Run | str | os.PathLike[str]) -> Run:
    """Open a run and refuse an unfinished one (its arrays hold zero rows where work is missing)."""
    run = run if isinstance(run, Run) else open_run(run)
    if not run.complete:
        raise LayertapError(f"{run.path} is not complete; run the same extract command again to finish it first")
    return run


def select_layers(run: Run, layers: Sequence[str] | str | None) -> list[str]:
    """Stored layers of ``run`` named by ``layers`` (names or glob patterns; None = all), in that order."""
    if layers is None:
        return run.layers
    if isinstance(layers, str):
        layers = [layers]
    chosen: list[str] = []
    for name in layers:
        hits = [name] if name in run else [n for n in run.layers if fnmatch.fnmatchcase(n, name)]
        if not hits:
            raise LayertapError(f"run {run.path} has no layer '{name}'{close_matches(name, run.layers)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _parse_method(method: str) -> tuple[str, str, bool]:
    """'rdm-spearman' -> ('rdm', 'spearman', False); 'cka-rbf-unbiased' -> ('cka', 'rbf', True)."""
    if method not in METHODS:
        raise LayertapError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    kind, rest = method.split("-", 1)
    return kind, rest.removesuffix("-unbiased"), rest.endswith("-unbiased")


def layer_similarity(
    run_a: Run | str | os.PathLike[str],
    run_b: Run | str | os.PathLike[str] | None = None,
    layers_a: Sequence[str] | str | None = None,
    layers_b: Sequence[str] | str | None = None,
    method: str = "rdm-spearman",
    metric: str = "correlation",
    block_rows: int | None = None,
    *,
    rdms: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Similarity of every tapped layer of ``run_a`` with every layer of ``run_b`` (default: ``run_a``).

    ``method``: ``"rdm-pearson" | "rdm-spearman" | "rdm-kendall_tau_a"`` (RDMs with ``metric``,
    compared over their upper triangles) or ``"cka-linear" | "cka-rbf"`` (optionally
    ``-unbiased``). Layers are names or glob patterns (default: all). Both runs must hold the same
    images in the same order. Returns ``(matrix, row_labels, col_labels)``: (len(rows), len(cols))
    float64, rows = layers of run_a; labels are prefixed ``A:``/``B:`` when two runs are compared.

    Memory: the RDM methods keep one (N, N) float64 RDM per layer (8*N^2 bytes each).
    ``rdms``: (N, N) RDMs of ``run_a``'s layers already computed with ``metric`` (e.g. for figures),
    used instead of computing them again (RDM methods only).
    """
    kind, what, unbiased = _parse_method(method)
    ra = _as_run(run_a)
    rb = ra if run_b is None else _as_run(run_b)
    same = rb is ra or rb.path.resolve() == ra.path.resolve()
    if not same and ra.images != rb.images:
        raise LayertapError(
            f"{ra.path} and {rb.path} hold different images (or a different order); "
            "layer similarity needs the same images in the same order"
        )
    la = select_layers(ra, layers_a)
    lb = select_layers(rb, layers_b if (layers_b is not None or not same) else layers_a)
    cache: dict[tuple[int, str], Any] = {}
    if kind == "rdm" and rdms:
        cache.update({(0, layer): upper_triangle(np.asarray(d)) for layer, d in rdms.items()})

    def rep(run: Run, which: int, layer: str) -> Any:
        key = (0 if same else which, layer)
        if key not in cache:
            if kind == "rdm":
                cache[key] = upper_triangle(rdm(run[layer], metric, block_rows, labels=run.images, what=layer))
            else:
                cache[key] = run[layer]
        return cache[key]

    def similarity(x: Any, y: Any) -> float:
        if kind != "rdm":
            return cka(x, y, what, unbiased)
        value, left_out = _compare(x, y, what)
        if left_out:
            missing.append(left_out)
        return value

    out = np.empty((len(la), len(lb)))
    missing: list[int] = []  # pairs left out (NaN), per comparison that left some out
    done: dict[tuple[str, str], float] = {}  # within one run every measure is symmetric: compute a pair once
    for i, a in enumerate(la):
        for j, b in enumerate(lb):
            if same and a == b:
                out[i, j] = 1.0  # a layer with itself: 1 by definition (saves the N x N work)
                continue
            pair = (min(a, b), max(a, b)) if same else (a, b)
            if pair not in done:
                done[pair] = similarity(rep(ra, 0, a), rep(rb, 1, b))
            out[i, j] = done[pair]
    if missing:
        n = len(ra.images)
        _warn_left_out(max(missing), n * (n - 1) // 2, f"{len(missing)} layer comparison(s), up to")
    prefix = ("", "") if same else ("A:", "B:")
    from layertap.analysis.results import LayerSimilarity

    return LayerSimilarity.of(out, [prefix[0] + n for n in la], [prefix[1] + n for n in lb], method, metric)


def _numeric_csv(path: Path) -> np.ndarray:
    """A numeric CSV; a header row and/or a first column of labels are skipped."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]

    def is_num(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if rows and not all(is_num(c) for c in rows[0][1:] or rows[0]):
        rows = rows[1:]  # header
    if rows and not all(is_num(r[0]) for r in rows):
        rows = [r[1:] for r in rows]  # row labels
    try:
        return np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as err:
        raise LayertapError(f"{path} is not a numeric CSV matrix ({err})") from None


def load_matrix(reference: Any, key: str | None = None) -> np.ndarray:
    """A 2-D float64 matrix from an array or a ``.npy`` / ``.csv`` / ``.mat`` file.

    For ``.mat`` (read with ``scipy.io.loadmat``), the single 2-D numeric variable is taken, or the
    one named ``key``. A 1-D input of length N(N-1)/2 is expanded into an (N, N) RDM.
    """
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        if not path.is_file():
            raise LayertapError(f"reference file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as err:
                raise LayertapError(f"cannot read {path} as a numeric .npy file ({err})") from None
        elif suffix in (".csv", ".txt", ".tsv"):
            arr = _numeric_csv(path) if suffix == ".csv" else np.loadtxt(path, ndmin=2)
        elif suffix == ".mat":
            arr = _load_mat(path, key)
        else:
            raise LayertapError(f"reference {path}: unsupported file type '{suffix}'; use .npy, .csv or .mat")
    else:
        arr = np.asarray(reference)
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise LayertapError(f"reference must be a real numeric matrix, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim == 1:
        n = int(round((1 + np.sqrt(1 + 8 * arr.size)) / 2))
        if n * (n - 1) // 2 != arr.size:
            raise LayertapError(f"a 1-D reference must be a condensed RDM of N(N-1)/2 values, got {arr.size}")
        square = np.zeros((n, n))
        square[np.triu_indices(n, k=1)] = arr
        return square + square.T
    if arr.ndim != 2:
        raise LayertapError(f"reference must be a 2-D matrix, got shape {arr.shape}")
    return arr


def _load_mat(path: Path, key: str | None) -> np.ndarray:
    sio = require("scipy.io", "rsa", "reading .mat files")
    try:
        data = sio.loadmat(path)
    except NotImplementedError:
        raise LayertapError(
            f"{path} is a MATLAB v7.3 (HDF5) file; save it with save(..., '-v7') or convert it to .npy"
        ) from None
    except (ValueError, OSError) as err:
        raise LayertapError(f"cannot read {path} as a .mat file ({err})") from None
    variables = {
        k: v
        for k, v in data.items()
        if not k.startswith("__") and isinstance(v, np.ndarray) and v.ndim == 2 and np.issubdtype(v.dtype, np.number)
    }
    if key is not None:
        if key not in variables:
            raise LayertapError(
                f"{path} has no 2-D numeric variable '{key}' (it has: {', '.join(variables) or 'none'})"
            )
        return variables[key]
    if len(variables) != 1:
        raise LayertapError(
            f"{path} holds {len(variables)} 2-D numeric variables ({', '.join(variables) or 'none'}); choose one with key="
        )
    return next(iter(variables.values()))


def is_rdm(matrix: np.ndarray, rtol: float = 1e-6) -> bool:
    """Square, symmetric and zero on the diagonal (within ``rtol`` of the largest entry).

    Missing pairs are allowed: NaN at symmetric positions (``M[i, j]`` and ``M[j, i]`` both NaN)
    and a zero or NaN diagonal, as long as some pair off the diagonal is not NaN.
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


def compare_to_reference(
    run: Run | str | os.PathLike[str],
    reference: Any,
    layers: Sequence[str] | str | None = None,
    method: str = "rdm-spearman",
    metric: str = "correlation",
    key: str | None = None,
    block_rows: int | None = None,
) -> dict[str, float]:
    """Similarity of each layer of ``run`` with a reference (brain data, behaviour, a model RDM).

    ``reference``: array or path to ``.npy`` / ``.csv`` / ``.mat`` (``key`` picks the variable). A
    square, symmetric, zero-diagonal matrix (or a condensed vector) is an (N, N) RDM, missing pairs
    (NaN, see :func:`is_rdm`) allowed and left out of every comparison (:func:`compare_rdms`); anything else
    is a response matrix (N images x units) whose RDM (``metric``) is computed for the ``rdm-*``
    methods, or which is compared directly with the ``cka-*`` methods (CKA needs a response matrix).
    Rows must follow the run's image order. Returns ``{layer: similarity}`` in layer order.
    """
    kind, what, unbiased = _parse_method(method)
    r = _as_run(run)
    ref = load_matrix(reference, key)
    n = len(r.images)
    if ref.shape[0] != n:
        raise LayertapError(f"reference has {ref.shape[0]} rows but the run has {n} images (same images, same order)")
    ref_is_rdm = is_rdm(ref)
    if kind == "cka" and ref_is_rdm:
        raise LayertapError(
            "the reference is an RDM; CKA needs a response matrix (images x units): use an rdm-* method"
        )
    if kind == "rdm":
        ref_rep = upper_triangle(ref if ref_is_rdm else rdm(ref, metric, labels=r.images, what="reference"))
        ref_missing = int(np.isnan(ref_rep).sum())
        _warn_left_out(ref_missing, ref_rep.size, "reference (in every layer's comparison)")
    else:
        ref_rep = ref
    out: dict[str, float] = {}
    for layer in select_layers(r, layers):
        if kind == "rdm":
            layer_rdm = upper_triangle(rdm(r[layer], metric, block_rows, labels=r.images, what=layer))
            out[layer], left_out = _compare(layer_rdm, ref_rep, what)
            if left_out != ref_missing:  # the layer's own NaN (constant images, warned about by rdm)
                _warn_left_out(left_out, ref_rep.size, layer)
        else:
            out[layer] = cka(r[layer], ref_rep, what, unbiased)
    from layertap.analysis.results import ReferenceScores

    return ReferenceScores(out, method, metric)


# -- rsatoolbox hand-off --------------------------------------------------------------------------


def _pattern_descriptors(run: Run | None, n: int, targets: Any, classes: Any, images: Any) -> dict[str, list[Any]]:
    desc: dict[str, list[Any]] = {}
    if run is not None:
        images = run.images if images is None else images
        targets = run.targets if targets is None else targets
        classes = run.classes if classes is None else classes
    if images is not None:
        desc["image"] = [str(p) for p in images]
    if targets is not None:
        t = np.asarray(targets)
        desc["target"] = [int(v) if np.issubdtype(t.dtype, np.integer) else v for v in t.tolist()]
        if classes is not None:
            desc["class"] = [str(classes[int(v)]) for v in t]
    for k, v in desc.items():
        if len(v) != n:
            raise LayertapError(f"{k} has {len(v)} entries but there are {n} images")
    return desc


def to_rsatoolbox(
    run_or_array: Run | str | os.PathLike[str] | Any,
    layer: str | None = None,
    *,
    targets: Any = None,
    classes: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
) -> Any:
    """An ``rsatoolbox.data.Dataset`` of one layer: measurements (N images x P units, float64).

    ``run_or_array``: a Run / run path (then ``layer`` is required) or an (N, ...) array.
    obs_descriptors: ``image`` (path), ``target`` and ``class`` where known (from the run, or given);
    descriptors: ``layer``, ``run``, ``model``. Loads the whole layer into memory (8*N*P bytes).
    Needs ``pip install 'layertap[rsa]'``.
    """
    data_mod = require("rsatoolbox.data", "rsa", "to_rsatoolbox")
    run = None
    if isinstance(run_or_array, (Run, str, os.PathLike)):
        run = _as_run(run_or_array)
        if layer is None:
            raise LayertapError(f"name the layer to hand over (one of: {', '.join(run.layers)})")
        source: Any = run[select_layers(run, layer)[0]]
    else:
        source = run_or_array
    measurements = _Rows(source).all()
    descriptors: dict[str, Any] = {}
    if layer is not None:
        descriptors["layer"] = layer
    if run is not None:
        descriptors["run"] = str(run.path)
        model = run.manifest.get("model")
        if isinstance(model, dict) and model.get("name"):
            descriptors["model"] = str(model["name"])
        elif isinstance(model, str):
            descriptors["model"] = model
    obs = _pattern_descriptors(run, measurements.shape[0], targets, classes, images)
    return data_mod.Dataset(measurements, descriptors=descriptors, obs_descriptors=obs or None)


def rdms_to_rsatoolbox(
    rdms: Run | str | os.PathLike[str] | np.ndarray | Sequence[Any] | Mapping[str, Any],
    layers: Sequence[str] | str | None = None,
    *,
    metric: str = "correlation",
    names: Sequence[str] | None = None,
    targets: Any = None,
    classes: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
    block_rows: int | None = None,
) -> Any:
    """An ``rsatoolbox.rdm.RDMs`` holding one or more (N, N) RDMs.

    ``rdms``: a Run / run path (the RDM of each of ``layers``, default all, is computed with
    ``metric``), one (N, N) RDM, a list of them, or a ``{name: RDM}`` mapping. rdm_descriptors:
    ``layer`` (names); pattern_descriptors: ``image``/``target``/``class`` where known;
    dissimilarity_measure: ``metric``. Needs ``pip install 'layertap[rsa]'``.
    """
    rdm_mod = require("rsatoolbox.rdm", "rsa", "rdms_to_rsatoolbox")
    run = None
    if isinstance(rdms, (Run, str, os.PathLike)):
        run = _as_run(rdms)
        chosen = select_layers(run, layers)
        mats = [rdm(run[name], metric, block_rows) for name in chosen]
        labels: list[str] = chosen
    elif isinstance(rdms, Mapping):
        labels = [str(k) for k in rdms]
        mats = [load_matrix(v) for v in rdms.values()]
    else:
        arr = rdms if isinstance(rdms, np.ndarray) else None
        mats = [load_matrix(arr)] if arr is not None and arr.ndim == 2 else [load_matrix(v) for v in rdms]
        labels = [f"rdm{i}" for i in range(len(mats))]
    if names is not None:
        if len(names) != len(mats):
            raise LayertapError(f"{len(names)} names for {len(mats)} RDMs")
        labels = [str(n) for n in names]
    if len({m.shape for m in mats}) != 1 or not all(is_rdm(m) for m in mats):
        raise LayertapError("rdms_to_rsatoolbox needs square, symmetric, zero-diagonal RDMs of one size")
    n = mats[0].shape[0]
    vectors = np.stack([upper_triangle(m) for m in mats])
    pattern = _pattern_descriptors(run, n, targets, classes, images)
    return rdm_mod.RDMs(
        vectors,
        dissimilarity_measure=metric,
        rdm_descriptors={"layer": labels},
        pattern_descriptors=pattern or None,
    )
