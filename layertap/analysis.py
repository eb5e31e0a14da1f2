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
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LayertapError, close_matches
from .storage import LayerArray, Run, disk_error, open_run

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


def _rdm_blocks(X: Any, metric: str, block_rows: int | None) -> tuple[int, Iterator[tuple[int, int, np.ndarray]]]:
    """(N, generator of (i0, j0, D[i0:i1, j0:j1]) for block pairs with j0 >= i0)."""
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


def rdm(X: Any, metric: str = "correlation", block_rows: int | None = None) -> np.ndarray:
    """Representational dissimilarity matrix of the images (rows) of ``X``.

    ``X``: (N, ...) numpy array or LayerArray; trailing axes are flattened to P features.
    ``metric``: ``"correlation"`` (1 - Pearson r between two images' feature vectors, in [0, 2]),
    ``"cosine"`` (1 - cosine similarity, in [0, 2]) or ``"euclidean"`` (distance, in the units of X).
    Returns (N, N) float64, symmetric, zero diagonal. A constant row (correlation) or zero row
    (cosine) gives NaN distances, as ``scipy.spatial.distance.pdist`` does.

    Computed in blocks of ``block_rows`` images (default: about 128 MB of float64 per block):
    memory is the result, 8*N^2 bytes (N=50,000: 20 GB; use :func:`rdm_to_disk` then), plus two
    blocks and one block x block product. A LayerArray is read about N / (2 * block_rows) times.
    """
    n, blocks = _rdm_blocks(X, metric, block_rows)
    out = np.empty((n, n), dtype=np.float64)
    for i0, j0, d in blocks:
        out[i0 : i0 + d.shape[0], j0 : j0 + d.shape[1]] = d
        out[j0 : j0 + d.shape[1], i0 : i0 + d.shape[0]] = d.T
    return out


def rdm_to_disk(
    X: Any, path: str | os.PathLike[str], metric: str = "correlation", block_rows: int | None = None
) -> Path:
    """Like :func:`rdm`, but stream the (N, N) float64 RDM into the ``.npy`` file ``path``.

    Only two row blocks and one block x block result are in memory at a time, so N = 50,000
    images (a 20 GB RDM) needs no 20 GB of RAM; the file needs 8*N^2 bytes (+128) of disk.
    Open the result lazily with ``np.load(path, mmap_mode="r")``. Returns ``path``.
    """
    path = Path(path)
    n, blocks = _rdm_blocks(X, metric, block_rows)
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


def compare_rdms(a: Any, b: Any, method: str = "spearman") -> float:
    """Similarity of two RDMs over their upper triangles (diagonal excluded).

    ``a``, ``b``: (N, N) RDMs or condensed vectors of N(N-1)/2 entries. ``method``: ``"pearson"``
    (linear correlation), ``"spearman"`` (correlation of average ranks) or ``"kendall_tau_a"``.
    Returns a unitless float in [-1, 1] (NaN if one RDM is constant).
    """
    x, y = upper_triangle(a), upper_triangle(b)
    if x.shape != y.shape:
        raise LayertapError(f"RDMs differ in size: {x.size} and {y.size} pairs")
    if method == "pearson":
        return _pearson(x, y)
    if method == "spearman":
        return _pearson(rank_average(x), rank_average(y))
    if method in ("kendall_tau_a", "kendall", "tau_a"):
        return kendall_tau_a(x, y)
    raise LayertapError(f"unknown RDM comparison '{method}'; choose one of {', '.join(RDM_COMPARISONS)}")


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
) -> tuple[np.ndarray, list[str], list[str]]:
    """Similarity of every tapped layer of ``run_a`` with every layer of ``run_b`` (default: ``run_a``).

    ``method``: ``"rdm-pearson" | "rdm-spearman" | "rdm-kendall_tau_a"`` (RDMs with ``metric``,
    compared over their upper triangles) or ``"cka-linear" | "cka-rbf"`` (optionally
    ``-unbiased``). Layers are names or glob patterns (default: all). Both runs must hold the same
    images in the same order. Returns ``(matrix, row_labels, col_labels)``: (len(rows), len(cols))
    float64, rows = layers of run_a; labels are prefixed ``A:``/``B:`` when two runs are compared.

    Memory: the RDM methods keep one (N, N) float64 RDM per layer (8*N^2 bytes each).
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

    def rep(run: Run, which: int, layer: str) -> Any:
        key = (0 if same else which, layer)
        if key not in cache:
            cache[key] = upper_triangle(rdm(run[layer], metric, block_rows)) if kind == "rdm" else run[layer]
        return cache[key]

    out = np.empty((len(la), len(lb)))
    done: dict[tuple[str, str], float] = {}  # within one run every measure is symmetric: compute a pair once
    for i, a in enumerate(la):
        for j, b in enumerate(lb):
            if same and a == b:
                out[i, j] = 1.0  # a layer with itself: 1 by definition (saves the N x N work)
                continue
            pair = (min(a, b), max(a, b)) if same else (a, b)
            if pair not in done:
                x, y = rep(ra, 0, a), rep(rb, 1, b)
                done[pair] = compare_rdms(x, y, what) if kind == "rdm" else cka(x, y, what, unbiased)
            out[i, j] = done[pair]
    prefix = ("", "") if same else ("A:", "B:")
    return out, [prefix[0] + n for n in la], [prefix[1] + n for n in lb]


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
    """Square, symmetric and zero on the diagonal (within ``rtol`` of the largest entry)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        return False
    scale = max(float(np.nanmax(np.abs(matrix))), 1e-300)
    tol = rtol * scale
    return bool(np.all(np.abs(np.diag(matrix)) <= tol) and np.allclose(matrix, matrix.T, rtol=0, atol=tol))


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
    square, symmetric, zero-diagonal matrix (or a condensed vector) is an (N, N) RDM; anything else
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
    ref_rep = (upper_triangle(ref) if ref_is_rdm else upper_triangle(rdm(ref, metric))) if kind == "rdm" else ref
    out: dict[str, float] = {}
    for layer in select_layers(r, layers):
        if kind == "rdm":
            out[layer] = compare_rdms(upper_triangle(rdm(r[layer], metric, block_rows)), ref_rep, what)
        else:
            out[layer] = cka(r[layer], ref_rep, what, unbiased)
    return out


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
