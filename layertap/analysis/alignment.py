"""Centered kernel alignment (CKA) and HSIC between two representations of the same images."""

from __future__ import annotations

from typing import Any

import numpy as np

from layertap.analysis.rows import RowBlocks, rows_per_block
from layertap.errors import LayertapError


def _centered_cross_products(rx: RowBlocks, ry: RowBlocks, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Xc'Yc, Xc'Xc, Yc'Yc (Xc: column-centered X), accumulated over row blocks.

    The data are shifted by the first block's column means before accumulating (the shifted-data
    algorithm), which keeps sum(x y) - n mean(x) mean(y) free of catastrophic cancellation.
    """
    sx, sy = rx.get(0, step).mean(axis=0), ry.get(0, step).mean(axis=0)
    cxy = np.zeros((rx.p, ry.p))
    cxx = np.zeros((rx.p, rx.p))
    cyy = np.zeros((ry.p, ry.p))
    tx, ty = np.zeros(rx.p), np.zeros(ry.p)
    for (_, bx), (_, by) in zip(rx.blocks(step), ry.blocks(step), strict=True):
        bx, by = bx - sx, by - sy
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

    Args:
        K: (n, n) Gram matrix of one representation.
        L: (n, n) Gram matrix of the other.
        unbiased: use the unbiased estimator.

    Returns:
        HSIC (float).

    Raises:
        LayertapError: unbiased with fewer than 4 images.

    Example:
        >>> X = np.random.default_rng(0).normal(size=(6, 3))
        >>> hsic(X @ X.T, X @ X.T) > 0
        True
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

    Memory: linear biased CKA uses the feature-space formula ||Yc'Xc||_F^2 / (||Xc'Xc||_F ||Yc'Yc||_F)
    (Xc, Yc column-centered), accumulated over row blocks, when its (P_x + P_y)^2 products are
    smaller than N x N Gram matrices, so many images with modest feature counts are cheap; otherwise
    (and always for rbf or unbiased) two N x N float64 Gram matrices and the full data are in memory.

    Args:
        X: (N, ...) array or LayerArray (features flattened).
        Y: (N, ...) array or LayerArray (the feature counts may differ from X's).
        kernel: ``"linear"`` or ``"rbf"`` (Gaussian with bandwidth ``sigma`` x the median distance
            between images, taken over distinct pairs).
        unbiased: use the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021), which corrects
            the upward bias of CKA when N is small relative to the number of features.
        sigma: the rbf bandwidth as a fraction of the median distance (default 0.8, as in Kornblith et al.).

    Returns:
        A unitless float: 1 for identical representations (up to rotation and isotropic scaling of the
        features for the linear kernel), near 0 for unrelated ones (unbiased CKA can be slightly negative).

    Raises:
        LayertapError: an unknown kernel, different numbers of images, ``sigma <= 0``.

    Example:
        >>> X = np.random.default_rng(0).normal(size=(20, 5))
        >>> round(cka(X, 3 * X), 6)
        1.0
    """
    if kernel not in ("linear", "rbf"):
        raise LayertapError(f"unknown CKA kernel '{kernel}'; choose linear or rbf")
    rx, ry = RowBlocks(X), RowBlocks(Y)
    if rx.n != ry.n:
        raise LayertapError(f"CKA needs the same images in both representations, got {rx.n} and {ry.n} rows")
    if kernel == "linear" and not unbiased and (rx.p + ry.p) ** 2 <= 2 * rx.n**2:
        step = rows_per_block(rx.n, rx.p + ry.p)
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
