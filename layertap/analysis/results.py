"""Small result objects of the analysis functions: the numbers one attribute away, a
``pandas.DataFrame`` view (``.to_pandas()``) and a notebook view (``_repr_html_``).

They stay compatible with the plain values returned before: :class:`LayerSimilarity` unpacks like
the tuple ``(matrix, rows, cols)``; :class:`ReferenceScores` is a ``{layer: similarity}`` dict.
"""

from __future__ import annotations

import html
from typing import Any, NamedTuple

import numpy as np

from layertap._optional import require
from layertap.errors import LayertapError


class _Matrix(NamedTuple):
    matrix: np.ndarray
    rows: list[str]
    cols: list[str]


class LayerSimilarity(_Matrix):
    """Layer x layer similarity: ``.matrix`` (rows x cols float64), ``.rows``, ``.cols``, ``.method``, ``.metric``.

    A NamedTuple, so ``m, rows, cols = result`` (the older tuple form) still works.

    Example:
        >>> sim = LayerSimilarity.of(np.eye(2), ["a", "b"], ["a", "b"], "rdm-spearman", "correlation")
        >>> m, rows, cols = sim
        >>> rows, sim.method
        (['a', 'b'], 'rdm-spearman')
    """

    method: str
    metric: str

    @classmethod
    def of(cls, matrix: np.ndarray, rows: list[str], cols: list[str], method: str, metric: str) -> LayerSimilarity:
        """Build one with its method and metric.

        Args:
            matrix: (rows, cols) similarities.
            rows: the row layers.
            cols: the column layers.
            method: the :data:`~layertap.analysis.similarity.METHODS` name used.
            metric: the RDM dissimilarity used.

        Returns:
            The result.
        """
        out = cls(matrix, rows, cols)
        out.method, out.metric = method, metric
        return out

    def to_pandas(self) -> Any:
        """The matrix as a DataFrame: index = row layers, columns = column layers.

        Returns:
            A ``pandas.DataFrame`` (needs ``pip install 'layertap[labels]'``).
        """
        pd = require("pandas", "labels")
        return pd.DataFrame(self.matrix, index=pd.Index(self.rows, name="layer"), columns=pd.Index(self.cols, name="layer"))

    def _repr_html_(self) -> str:
        caption = f"layer similarity ({html.escape(self.method)}, {html.escape(self.metric)})"
        body = "".join(
            f"<tr><th>{html.escape(r)}</th>" + "".join(f"<td>{v:.3f}</td>" for v in row) + "</tr>"
            for r, row in zip(self.rows, self.matrix, strict=True)
        )
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.cols)
        return f"<table><caption>{caption}</caption><tr><th></th>{head}</tr>{body}</table>"


class ReferenceScores(dict):
    """``{layer: similarity with the reference}`` in layer order, with ``.method`` and ``.metric``.

    Attributes:
        method: the comparison (e.g. ``"rdm-spearman"``).
        metric: the RDM dissimilarity.
        rdms: ``{layer: (N, N) RDM}`` the scores were computed from, when asked for (``keep_rdms=True`` of
            :func:`~layertap.analysis.similarity.compare_to_reference`, rdm-* methods), else None.
        reference_rdm: the reference's (N, N) RDM in that case, else None.

    Example:
        >>> scores = ReferenceScores({"layer3": 0.21, "avgpool": 0.34}, "rdm-spearman", "correlation")
        >>> max(scores, key=scores.get), scores.method
        ('avgpool', 'rdm-spearman')
    """

    def __init__(
        self,
        scores: dict[str, float],
        method: str,
        metric: str,
        rdms: dict[str, np.ndarray] | None = None,
        reference_rdm: np.ndarray | None = None,
    ) -> None:
        super().__init__(scores)
        self.method, self.metric = method, metric
        self.rdms, self.reference_rdm = rdms, reference_rdm

    def to_pandas(self) -> Any:
        """One row per layer: columns ``layer``, ``similarity``, ``method``.

        Returns:
            A ``pandas.DataFrame`` (needs ``pip install 'layertap[labels]'``).
        """
        pd = require("pandas", "labels")
        return pd.DataFrame(
            {"layer": list(self), "similarity": list(self.values()), "method": [self.method] * len(self)}
        )

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in self.items())
        return (
            f"<table><caption>similarity to the reference ({html.escape(self.method)})</caption>"
            f"<tr><th>layer</th><th>similarity</th></tr>{rows}</table>"
        )


def bootstrap_ci(
    layer_rdm: np.ndarray,
    reference_rdm: np.ndarray,
    method: str = "rdm-spearman",
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap confidence interval (over images) of the similarity of two (N, N) RDMs.

    Images are resampled with replacement; pairs of an image with a copy of itself are left out
    (their distance is 0 by construction), as are NaN pairs.

    Args:
        layer_rdm, reference_rdm: square RDMs over the same images.
        method: ``rdm-spearman``, ``rdm-pearson`` or ``rdm-kendall_tau_a``.
        n_boot: bootstrap samples.
        seed: random seed of the resampling.
        level: coverage of the percentile interval.

    Returns:
        ``(low, high)``.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(12, 4))
        >>> rdm = np.abs(x[:, None] - x[None]).sum(-1)  # city-block distances
        >>> [round(v, 6) for v in bootstrap_ci(rdm, rdm)]  # an RDM with itself
        [1.0, 1.0]
    """
    stats = require("scipy.stats", "rsa", "bootstrap confidence intervals")
    kendalltau, pearsonr, rankdata = stats.kendalltau, stats.pearsonr, stats.rankdata
    if method not in ("rdm-spearman", "rdm-pearson", "rdm-kendall_tau_a"):
        raise LayertapError(f"bootstrap CIs are for rdm-spearman, rdm-pearson or rdm-kendall_tau_a, not {method}")
    a, b = np.asarray(layer_rdm, dtype=np.float64), np.asarray(reference_rdm, dtype=np.float64)
    n = a.shape[0]
    iu = np.triu_indices(n, k=1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = np.asarray(rng.integers(0, n, size=n))
        i, j = idx[iu[0]], idx[iu[1]]
        keep = i != j
        x, y = a[i[keep], j[keep]], b[i[keep], j[keep]]
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        if method == "rdm-spearman":
            values.append(pearsonr(rankdata(x), rankdata(y))[0])
        elif method == "rdm-pearson":
            values.append(pearsonr(x, y)[0])
        else:  # tau-a, the statistic compare_rdms reports; scipy's kendalltau is tau-b (larger with ties):
            # tau-a = (C - D) / n0 = tau-b * sqrt((n0 - ties x)(n0 - ties y)) / n0, ~4x faster than kendall_tau_a
            n0 = x.size * (x.size - 1) / 2
            tied = [float(np.sum(c * (c - 1) / 2)) for c in (np.unique(v, return_counts=True)[1] for v in (x, y))]
            values.append(kendalltau(x, y)[0] * np.sqrt((n0 - tied[0]) * (n0 - tied[1])) / n0)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)
