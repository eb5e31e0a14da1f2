"""Layer-by-layer similarity of stored runs, and every layer of a run against a reference (brain data,
behaviour, a model RDM): RDM comparisons or CKA, chosen by one ``method`` name (:data:`METHODS`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from layertap.analysis.alignment import cka
from layertap.analysis.compare import compare_vectors, warn_left_out
from layertap.analysis.matrices import load_matrix
from layertap.analysis.rdms import is_rdm, rdm, upper_triangle
from layertap.analysis.results import LayerSimilarity, ReferenceScores
from layertap.errors import LayertapError, close_matches
from layertap.globs import match_names
from layertap.store.run import Run, open_complete_run

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


def select_layers(run: Run, layers: Sequence[str] | str | None) -> list[str]:
    """Stored layers of ``run`` named by ``layers``, in the order asked (each layer once).

    Globs follow the one layer-name dialect of :mod:`layertap.globs` (the one extraction uses):
    ``*`` stays within one dotted component (``classifier.*``), ``**`` crosses dots (``layer4.**``,
    or ``**`` for every layer).

    Args:
        run: the run.
        layers: names or globs; None = all stored layers.

    Returns:
        The stored layer names.

    Raises:
        LayertapError: a name or glob matches no stored layer (with suggestions).

    Example:
        >>> select_layers(run, ["features.*", "classifier.4"])  # doctest: +SKIP
        ['features.2', 'features.5', 'classifier.4']
    """
    if layers is None:
        return run.layers
    if isinstance(layers, str):
        layers = [layers]
    chosen: list[str] = []
    for name in layers:
        hits = [name] if name in run else match_names(name, run.layers)
        if not hits:
            # the one glob dialect: say so where the old analysis dialect (* across dots) would have matched
            hint = " ('*' stays within one dotted part of a name; '**' crosses dots)" if "*" in name else ""
            raise LayertapError(f"run {run.path} has no layer '{name}'{close_matches(name, run.layers)}{hint}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def parse_method(method: str) -> tuple[str, str, bool]:
    """Split a :data:`METHODS` name into (kind, measure, unbiased).

    Args:
        method: e.g. ``"rdm-spearman"`` or ``"cka-rbf-unbiased"``.

    Returns:
        ``(kind, measure, unbiased)``: ``("rdm", "spearman", False)``, ``("cka", "rbf", True)``.

    Raises:
        LayertapError: an unknown method.

    Example:
        >>> parse_method("cka-rbf-unbiased")
        ('cka', 'rbf', True)
    """
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
) -> LayerSimilarity:
    """Similarity of every tapped layer of ``run_a`` with every layer of ``run_b`` (default: ``run_a``).

    Both runs must hold the same images in the same order. Within one run every measure is symmetric,
    so each pair is computed once, and a layer with itself is 1. Memory: the RDM methods keep one
    (N, N) float64 RDM per layer (8*N^2 bytes each).

    Args:
        run_a: a complete Run or run directory.
        run_b: a second run over the same images (None: ``run_a`` with itself).
        layers_a: names or globs (:func:`select_layers`) of ``run_a``'s layers (default all).
        layers_b: of ``run_b``'s layers (default: ``layers_a`` within one run, all for two runs).
        method: a :data:`METHODS` name: ``"rdm-pearson" | "rdm-spearman" | "rdm-kendall_tau_a"`` (RDMs
            with ``metric``, compared over their upper triangles) or ``"cka-linear" | "cka-rbf"``
            (optionally ``-unbiased``).
        metric: the RDM dissimilarity (rdm-* methods).
        block_rows: images per block when computing RDMs.
        rdms: (N, N) RDMs of ``run_a``'s layers already computed with ``metric`` (e.g. for figures),
            used instead of computing them again (rdm-* methods only).

    Returns:
        A :class:`~layertap.analysis.results.LayerSimilarity`: ``.matrix`` (len(rows), len(cols)) float64,
        ``.rows`` (layers of run_a), ``.cols``; labels are prefixed ``A:``/``B:`` when two runs are
        compared. It unpacks as ``matrix, rows, cols``.

    Raises:
        LayertapError: an unknown method or layer, an unfinished run, or runs over different images.

    Example:
        >>> sim = layer_similarity("./acts", method="cka-linear")  # doctest: +SKIP
        >>> sim.matrix.shape, sim.rows  # doctest: +SKIP
    """
    kind, what, unbiased = parse_method(method)
    ra = open_complete_run(run_a)
    rb = ra if run_b is None else open_complete_run(run_b)
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
        value, left_out = compare_vectors(x, y, what)
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
        warn_left_out(max(missing), n * (n - 1) // 2, f"{len(missing)} layer comparison(s), up to")
    prefix = ("", "") if same else ("A:", "B:")
    return LayerSimilarity.of(out, [prefix[0] + n for n in la], [prefix[1] + n for n in lb], method, metric)


def compare_to_reference(
    run: Run | str | os.PathLike[str],
    reference: Any,
    layers: Sequence[str] | str | None = None,
    method: str = "rdm-spearman",
    metric: str = "correlation",
    key: str | None = None,
    block_rows: int | None = None,
    *,
    keep_rdms: bool = False,
) -> ReferenceScores:
    """Similarity of each layer of ``run`` with a reference (brain data, behaviour, a model RDM).

    A square, symmetric, zero-diagonal reference (or a condensed vector) is an (N, N) RDM, missing
    pairs (NaN, see :func:`~layertap.analysis.rdms.is_rdm`) allowed and left out of every comparison;
    anything else is a response matrix (N images x units) whose RDM (``metric``) is computed for the
    ``rdm-*`` methods, or which is compared directly with the ``cka-*`` methods (CKA needs a response
    matrix). Rows must follow the run's image order.

    Args:
        run: a complete Run or run directory.
        reference: an array, or a file read by :func:`~layertap.analysis.matrices.load_matrix`
            (.npy, .csv, .tsv, .txt, .mat, .h5).
        layers: names or globs (default all).
        method: a :data:`METHODS` name.
        metric: the RDM dissimilarity (rdm-* methods).
        key: the variable/dataset of a .mat/.h5 file holding several 2-D ones.
        block_rows: images per block when computing layer RDMs.
        keep_rdms: also hand back the (N, N) RDMs the rdm-* scores were computed from (``.rdms`` per
            layer, ``.reference_rdm``), e.g. for bootstrap CIs, so nothing computes them twice (costs
            8*N^2 bytes per layer).

    Returns:
        A :class:`~layertap.analysis.results.ReferenceScores`: ``{layer: similarity}`` in layer order,
        with ``.method``, ``.metric`` (and ``.rdms``, ``.reference_rdm`` with ``keep_rdms``).

    Raises:
        LayertapError: an unknown method or layer, a reference with another number of rows, or an RDM
            reference with a cka-* method.

    Example:
        >>> scores = compare_to_reference("./acts", "brain_rdm.npy", method="rdm-spearman")  # doctest: +SKIP
        >>> scores.to_pandas()  # doctest: +SKIP
    """
    kind, what, unbiased = parse_method(method)
    r = open_complete_run(run)
    ref = load_matrix(reference, key)
    n = len(r.images)
    if ref.shape[0] != n:
        raise LayertapError(f"reference has {ref.shape[0]} rows but the run has {n} images (same images, same order)")
    ref_is_rdm = is_rdm(ref)
    if kind == "cka" and ref_is_rdm:
        raise LayertapError(
            "the reference is an RDM; CKA needs a response matrix (images x units): use an rdm-* method"
        )
    kept: dict[str, np.ndarray] | None = {} if keep_rdms and kind == "rdm" else None
    ref_rdm = None
    if kind == "rdm":
        ref_rdm = ref if ref_is_rdm else rdm(ref, metric, labels=r.images, what="reference")
        ref_rep = upper_triangle(ref_rdm)
        ref_missing = int(np.isnan(ref_rep).sum())
        warn_left_out(ref_missing, ref_rep.size, "reference (in every layer's comparison)")
    else:
        ref_rep = ref
    out: dict[str, float] = {}
    for layer in select_layers(r, layers):
        if kind == "rdm":
            square = rdm(r[layer], metric, block_rows, labels=r.images, what=layer)
            if kept is not None:
                kept[layer] = square
            out[layer], left_out = compare_vectors(upper_triangle(square), ref_rep, what)
            if left_out != ref_missing:  # the layer's own NaN (constant images, warned about by rdm)
                warn_left_out(left_out, ref_rep.size, layer)
        else:
            out[layer] = cka(r[layer], ref_rep, what, unbiased)
    return ReferenceScores(out, method, metric, kept, ref_rdm if kept is not None else None)
