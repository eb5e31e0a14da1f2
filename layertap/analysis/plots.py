"""Figures for representational analysis: RDM heatmaps, layer-similarity matrices, 2-D MDS embeddings.

matplotlib (and scikit-learn for MDS) are an optional extra: ``pip install 'layertap[plots]'``.
Figures are drawn on a private Agg canvas, never through ``pyplot``, so the caller's backend and
open figures are left alone. The file type follows the path's suffix (``.png``, ``.svg``, ``.pdf``);
PNGs are ``figsize * dpi`` pixels exactly (no tight bounding box).
"""

from __future__ import annotations

import inspect
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.analysis.matrices import load_matrix
from layertap.analysis.rdms import is_rdm, rdm
from layertap.errors import LayertapError
from layertap.store.files import disk_error

#: above this many classes, class names are not written on the axes (they would overlap)
MAX_CLASS_LABELS = 40
#: tick and legend font size (pt): readable when a 6-inch figure is printed at one-column width (~3.5 in)
TICK_FONT = 9
#: colour-bar labels: what an RDM's entries are, by metric, and what a similarity is, by method
METRIC_LABELS = {
    "correlation": "1 - Pearson r",
    "euclidean": "Euclidean distance",
    "sqeuclidean": "squared Euclidean distance",
    "cosine": "1 - cosine similarity",
}
METHOD_LABELS = {
    "rdm-spearman": "Spearman \u03c1 between RDMs",
    "rdm-pearson": "Pearson r between RDMs",
    "rdm-kendall_tau_a": "Kendall \u03c4a between RDMs",
    "cka-linear": "linear CKA",
    "cka-rbf": "RBF CKA",
    "cka-linear-unbiased": "linear CKA (unbiased)",
    "cka-rbf-unbiased": "RBF CKA (unbiased)",
}


def _title(ax: Any, title: str, width_in: float) -> None:
    """Set a title wrapped to the figure's width (a long one would be cut off at the edges)."""
    ax.set_title(textwrap.fill(title, max(20, int(width_in * 8))))


def measure_label(name: str) -> str:
    """The readable name of an RDM metric or a similarity method, for axes and colour bars.

    Args:
        name: a metric (``correlation``) or method (``rdm-spearman``); anything else is returned as is.

    Returns:
        The label, e.g. ``1 - Pearson r``.

    Example:
        >>> measure_label("correlation")
        '1 - Pearson r'
    """
    return METRIC_LABELS.get(name) or METHOD_LABELS.get(name) or name


def _limits(values: np.ndarray) -> tuple[float, float]:
    """Colour limits spanning the finite data (a constant matrix gets a small band around its value)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:  # a narrow band around the value (a fixed +-0.5 would push a correlation of 0.98 past 1)
        pad = max(abs(lo) * 0.02, 1e-3)
        return lo - pad, hi + pad
    return lo, hi
#: above this many classes, no boundary lines are drawn (they would cover the matrix)
MAX_CLASS_LINES = 200


def _figure(figsize: tuple[float, float]) -> Any:
    require("matplotlib", "plots", "plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf", "jpg", "jpeg"):
        raise LayertapError(f"cannot save a figure as '{path.suffix or path.name}': use a .png, .svg or .pdf path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format=fmt)
    except OSError as err:
        raise disk_error(err, path) from None
    return path


def _labels_for(targets: np.ndarray, classes: Sequence[str] | None) -> list[str]:
    """Class names for targets (integer indices into ``classes``); the target itself otherwise."""
    if classes is None or not np.issubdtype(targets.dtype, np.integer):
        return [str(t) for t in targets]
    return [str(classes[t]) if 0 <= t < len(classes) else str(t) for t in targets]


def _class_order(n: int, targets: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Row order grouping images by class (stable: original order within a class), sorted targets."""
    if targets is None:
        return np.arange(n), None
    t = np.asarray(targets)
    if t.shape != (n,):
        raise LayertapError(f"targets has {t.size} entries but there are {n} images")
    order = np.argsort(t, kind="stable")
    return order, t[order]


def plot_rdm(
    matrix: Any,
    path: str | os.PathLike[str],
    targets: Any = None,
    classes: Sequence[str] | None = None,
    *,
    title: str | None = None,
    cmap: str = "viridis",
    figsize: tuple[float, float] = (6.0, 5.0),
    dpi: int = 150,
    measure: str | None = None,
) -> Path:
    """Heatmap of an (N, N) RDM, rows/columns grouped by class, with class boundary lines and names.

    Without targets the RDM is drawn in its own order. Colours span the off-diagonal values.
    Needs ``pip install 'layertap[plots]'``.

    Args:
        matrix: an RDM array or a .npy/.csv/.mat path.
        path: the figure file (PNG/SVG/PDF by suffix).
        targets: (N,) integer class per image (e.g. ``run.targets``).
        classes: names indexed by target (``run.classes``).
        title: the figure title.
        cmap: the matplotlib colour map.
        figsize: inches.
        dpi: dots per inch of raster formats.
        measure: the metric (``correlation``, ``euclidean``, ...) or a label for the colour bar
            (default "dissimilarity").

    Returns:
        ``path``.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        LayertapError: not an RDM, or targets of the wrong length.

    Example:
        >>> plot_rdm(lt.analysis.rdm(run["avgpool"]), "rdm.png", run.targets, run.classes)  # doctest: +SKIP
    """
    d = load_matrix(matrix)
    if d.shape[0] != d.shape[1]:
        raise LayertapError(f"an RDM must be square, got shape {d.shape}")
    order, sorted_t = _class_order(d.shape[0], targets)
    d = d[np.ix_(order, order)]
    fig = _figure(figsize)
    ax = fig.add_subplot()
    off = d[~np.eye(d.shape[0], dtype=bool)] if d.shape[0] > 1 else d.ravel()
    lo, hi = _limits(off)  # the zero diagonal would otherwise set the lower limit
    im = ax.imshow(d, cmap=cmap, interpolation="nearest", vmin=lo, vmax=hi)
    fig.colorbar(im, ax=ax, label=measure_label(measure) if measure else "dissimilarity")
    if sorted_t is not None:
        starts = np.flatnonzero(np.r_[True, sorted_t[1:] != sorted_t[:-1]])
        ends = np.r_[starts[1:], len(sorted_t)]
        if len(starts) <= MAX_CLASS_LINES:
            for s in starts[1:]:
                ax.axhline(s - 0.5, color="white", linewidth=0.8)
                ax.axvline(s - 0.5, color="white", linewidth=0.8)
        if len(starts) <= MAX_CLASS_LABELS:
            centers = (starts + ends - 1) / 2.0
            names = _labels_for(sorted_t[starts], classes)
            ax.set_xticks(centers, names, rotation=90, fontsize=TICK_FONT)
            ax.set_yticks(centers, names, fontsize=TICK_FONT)
        else:
            ax.set_xlabel(f"images grouped by class ({len(starts)} classes)")
    else:
        ax.set_xlabel("image")
        ax.set_ylabel("image")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def plot_layer_similarity(
    matrix: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    cmap: str = "magma",
    annotate: bool | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
    measure: str | None = None,
    row_title: str | None = None,
    col_title: str | None = None,
) -> Path:
    """Heatmap of a layer x layer similarity matrix (from :func:`layertap.analysis.layer_similarity`).

    Colours span the data's range off the diagonal (a layer with itself is 1 by definition).

    Args:
        matrix: (rows, cols) similarities.
        row_labels: the row layers.
        col_labels: the column layers.
        path: the figure file (PNG/SVG/PDF by suffix).
        title: the figure title.
        cmap: the matplotlib colour map.
        annotate: write values in the cells (default: up to 15 x 15 cells).
        figsize: inches (default: grows with the number of layers).
        dpi: dots per inch of raster formats.
        measure: the method (``rdm-spearman``, ``cka-linear``, ...) or a label for the colour bar.
        row_title: names the row axis (e.g. the first model).
        col_title: names the column axis.

    Returns:
        ``path``.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> sim = lt.analysis.layer_similarity(run)  # doctest: +SKIP
        >>> plot_layer_similarity(sim.matrix, sim.rows, sim.cols, "layers.png")  # doctest: +SKIP
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
        raise LayertapError(f"matrix shape {m.shape} does not match {len(row_labels)} x {len(col_labels)} labels")
    if figsize is None:
        figsize = (max(4.0, 1.6 + 0.45 * m.shape[1]), max(3.5, 1.4 + 0.4 * m.shape[0]))
    fig = _figure(figsize)
    ax = fig.add_subplot()
    square = m.shape[0] == m.shape[1] and list(row_labels) == list(col_labels)
    lo, hi = _limits(m[~np.eye(m.shape[0], dtype=bool)] if square and m.shape[0] > 1 else m)
    im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, label=measure_label(measure) if measure else "similarity")
    ax.set_xticks(np.arange(m.shape[1]), list(col_labels), rotation=90, fontsize=TICK_FONT)
    ax.set_yticks(np.arange(m.shape[0]), list(row_labels), fontsize=TICK_FONT)
    if row_title:
        ax.set_ylabel(row_title)
    if col_title:
        ax.set_xlabel(col_title)
    if annotate if annotate is not None else max(m.shape) <= 15:
        mid = (lo + hi) / 2.0
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > mid else "white")
    if title:
        _title(ax, title, figsize[0])
    return _save(fig, path, dpi)


def mds_embedding(dissimilarities: np.ndarray, random_state: int = 0) -> np.ndarray:
    """(N, 2) metric MDS coordinates of an (N, N) RDM (scikit-learn SMACOF, fixed seed).

    Args:
        dissimilarities: an (N, N) RDM.
        random_state: the seed of SMACOF's initialisation.

    Returns:
        (N, 2) float64.

    Raises:
        MissingDependencyError: scikit-learn is not installed.

    Example:
        >>> mds_embedding(np.ones((3, 3)) - np.eye(3)).shape  # doctest: +SKIP
        (3, 2)
    """
    manifold = require("sklearn.manifold", "plots", "MDS plots")
    params = inspect.signature(manifold.MDS).parameters
    kwargs: dict[str, Any] = {"n_components": 2, "random_state": random_state}
    # scikit-learn 1.8 renamed dissimilarity="precomputed" to metric="precomputed" (and metric= to metric_mds=).
    if "metric_mds" in params:
        kwargs["metric"] = "precomputed"
    else:
        kwargs["dissimilarity"] = "precomputed"
    if "init" in params:
        kwargs["init"] = "classical_mds"  # deterministic start; silences the 1.10 default-change warning
    else:
        kwargs["n_init"] = 4
    d = np.asarray(dissimilarities, dtype=np.float64)
    if not np.isfinite(d).all():
        raise LayertapError("MDS needs finite dissimilarities (a constant image gives NaN correlation distances)")
    return np.asarray(manifold.MDS(**kwargs).fit_transform(d))


def plot_mds(
    data: Any,
    path: str | os.PathLike[str],
    targets: Any = None,
    classes: Sequence[str] | None = None,
    *,
    metric: str = "correlation",
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 5.0),
    dpi: int = 150,
    random_state: int = 0,
) -> Path:
    """2-D MDS embedding of the images, one dot per image coloured by class, with a legend.

    Args:
        data: an (N, N) RDM (square, symmetric, zero diagonal) or an (N, ...) response array /
            LayerArray whose RDM is computed with ``metric``.
        path: the figure file (PNG/SVG/PDF by suffix).
        targets: as in :func:`plot_rdm`.
        classes: as in :func:`plot_rdm`.
        metric: the dissimilarity when ``data`` is not an RDM.
        title: the figure title.
        figsize: inches.
        dpi: dots per inch of raster formats.
        random_state: the MDS seed.

    Returns:
        ``path``.

    Raises:
        MissingDependencyError: matplotlib or scikit-learn is not installed.

    Example:
        >>> plot_mds(run["avgpool"], "mds.png", run.targets, run.classes)  # doctest: +SKIP
    """
    if isinstance(data, (str, os.PathLike)):
        data = load_matrix(data)
    arr = data if isinstance(data, np.ndarray) else None
    d = arr.astype(np.float64) if arr is not None and arr.ndim == 2 and is_rdm(arr.astype(np.float64)) else None
    if d is None:
        d = rdm(data, metric)
    n = d.shape[0]
    if n < 3:
        raise LayertapError(f"MDS needs at least 3 images, got {n}")
    xy = mds_embedding(d, random_state)
    fig = _figure(figsize)
    ax = fig.add_subplot()
    if targets is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=18)
    else:
        t = np.asarray(targets)
        if t.shape != (n,):
            raise LayertapError(f"targets has {t.size} entries but there are {n} images")
        import matplotlib

        uniq = np.unique(t)
        colours = matplotlib.colormaps["tab20" if len(uniq) > 10 else "tab10"]
        for k, u in enumerate(uniq):
            sel = t == u
            ax.scatter(
                xy[sel, 0], xy[sel, 1], s=18, color=colours(k % colours.N), label=_labels_for(np.array([u]), classes)[0]
            )
        if len(uniq) <= MAX_CLASS_LABELS:
            ax.legend(fontsize=TICK_FONT, loc="best", frameon=False)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def plot_reference_bars(
    scores: dict[str, float],
    path: str | os.PathLike[str],
    ci: dict[str, tuple[float, float]] | None = None,
    *,
    measure: str | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """Bar chart of each layer's similarity with a reference, with confidence intervals.

    Args:
        scores: ``{layer: similarity}`` in layer order (from :func:`layertap.analysis.compare_to_reference`).
        path: the figure file (.png, .svg, .pdf).
        ci: ``{layer: (low, high)}`` (e.g. from :func:`layertap.analysis.results.bootstrap_ci`), drawn as error bars.
        measure: the method or a label for the value axis.
        title: the figure title.
        figsize: inches (default: grows with the number of layers).
        dpi: dots per inch of raster formats.

    Returns:
        ``path``.

    Example:
        >>> scores = lt.analysis.compare_to_reference(run, "brain_rdm.npy")  # doctest: +SKIP
        >>> plot_reference_bars(scores, "bars.png", measure=scores.method)  # doctest: +SKIP
    """
    layers = list(scores)
    values = np.array([scores[k] for k in layers], dtype=np.float64)
    if figsize is None:
        figsize = (max(4.0, 1.5 + 0.5 * len(layers)), 4.0)
    fig = _figure(figsize)
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    err = None
    if ci:
        lows = np.array([ci[k][0] for k in layers])
        highs = np.array([ci[k][1] for k in layers])
        err = np.vstack([values - lows, highs - values]).clip(min=0)
    ax.bar(x, values, color="#4c72b0", yerr=err, capsize=3, error_kw={"linewidth": 1})
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, layers, rotation=45 if len(layers) > 3 else 0, ha="right" if len(layers) > 3 else "center",
                  fontsize=TICK_FONT)
    ax.tick_params(axis="y", labelsize=TICK_FONT)
    label = measure_label(measure) if measure else "similarity"
    ax.set_ylabel(label + (" (95% bootstrap CI)" if ci else ""))
    ax.set_xlabel("layer")
    if title:
        _title(ax, title, figsize[0])
    return _save(fig, path, dpi)
