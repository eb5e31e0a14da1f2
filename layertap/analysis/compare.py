"""Comparing RDMs over their upper triangles: Pearson, Spearman and Kendall's tau-a, with missing (NaN)
pairs left out."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from layertap.analysis.rdms import upper_triangle
from layertap.errors import LayertapError

log = logging.getLogger("layertap")
RDM_COMPARISONS = ("pearson", "spearman", "kendall_tau_a")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    return float(np.dot(xc, yc) / denom) if denom > 0 else float("nan")


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (what Spearman's rho needs).

    Args:
        x: values (any shape; ranked flattened).

    Returns:
        (n,) float64 ranks.

    Example:
        >>> rank_average(np.array([10.0, 20.0, 10.0])).tolist()
        [1.5, 3.0, 1.5]
    """
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

    Args:
        x: values (flattened).
        y: values of the same length.

    Returns:
        tau-a in [-1, 1] (NaN for fewer than 2 values).

    Raises:
        LayertapError: different lengths.

    Example:
        >>> kendall_tau_a([1, 2, 3, 4], [1, 2, 4, 3])
        0.6666666666666666
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


def compare_vectors(x: np.ndarray, y: np.ndarray, method: str) -> tuple[float, int]:
    """Similarity of two condensed RDMs over the pairs both have (the engine of :func:`compare_rdms`).

    Args:
        x: a condensed RDM (upper triangle), NaN where a pair is missing.
        y: another, of the same length.
        method: ``"pearson"``, ``"spearman"`` or ``"kendall_tau_a"``.

    Returns:
        ``(similarity, number of pairs left out as missing)``; nothing is logged (callers warn once).

    Raises:
        LayertapError: an unknown method, different sizes, NaN at different pairs in both, or fewer
            than 2 shared pairs.

    Example:
        >>> compare_vectors(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]), "spearman")
        (0.5, 0)
    """
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


def warn_left_out(left_out: int, total: int, what: str) -> None:
    """Log one warning (logger ``layertap``) saying how many pairs were left out of a comparison as missing.

    Args:
        left_out: pairs left out (nothing is logged for 0).
        total: pairs in all.
        what: what was compared, prefixed to the message (may be empty).

    Example:
        >>> warn_left_out(4, 66, "reference")  # logs "reference: 4 of 66 pairs are missing (NaN) ..."
    """
    if left_out:
        log.warning(
            "%s%d of %d pairs are missing (NaN) and were left out of the comparison",
            f"{what}: " if what else "",
            left_out,
            total,
        )


def compare_rdms(a: Any, b: Any, method: str = "spearman") -> float:
    """Similarity of two RDMs over their upper triangles (diagonal excluded).

    Missing pairs (NaN) are left out of both RDMs, with a warning (logger ``layertap``) saying how
    many: NaN at the same pairs in both (as rsatoolbox's ``compare`` does), or in one RDM only (which
    rsatoolbox refuses; here those pairs are left out of the other too).

    Args:
        a: an (N, N) RDM or a condensed vector of N(N-1)/2 entries.
        b: another over the same N images.
        method: ``"pearson"`` (linear correlation), ``"spearman"`` (correlation of average ranks) or
            ``"kendall_tau_a"``.

    Returns:
        A unitless float in [-1, 1] (NaN if one RDM is constant).

    Raises:
        LayertapError: an unknown method, different sizes, or NaN in both RDMs at different pairs (as in
            rsatoolbox).

    Example:
        >>> compare_rdms([0.1, 0.5, 0.9], [0.2, 0.4, 1.0], method="pearson") > 0.9
        True
    """
    x, y = upper_triangle(a), upper_triangle(b)
    value, left_out = compare_vectors(x, y, method)
    warn_left_out(left_out, x.size, "")
    return value
