"""RSA against several subjects: each layer's RDM vs every subject's RDM, with the noise ceiling.

The layer's score is the mean over subjects of its similarity with each subject's RDM; the noise
ceiling's bounds are rsatoolbox's (:func:`layertap.encode.ceiling.rdm_noise_ceiling`): a model that
scores above the lower bound is as good as the subjects' mean RDM predicts a left-out subject.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from layertap.analysis.compare import compare_rdms
from layertap.analysis.matrices import load_array, load_matrix
from layertap.analysis.rdms import is_rdm, rdm, upper_triangle
from layertap.analysis.similarity import parse_method, select_layers
from layertap.encode.ceiling import rdm_noise_ceiling
from layertap.encode.encoding import read_rows
from layertap.encode.responses import match_ids, read_labels
from layertap.errors import LayertapError
from layertap.store.run import open_complete_run


def load_subject_rdms(sources: Sequence[Any] | Any, key: str | None = None) -> np.ndarray:
    """Subjects' RDMs as (subjects, N, N) float64.

    Args:
        sources: one file/array holding (subjects, N, N), or a list of files/arrays each holding one
            (N, N) RDM (or its condensed upper triangle).
        key: dataset/variable name in .h5/.mat files.

    Returns:
        (subjects, N, N) float64.

    Example:
        >>> subs = load_subject_rdms(["sub-01.npy", "sub-02.npy"])  # doctest: +SKIP
        >>> subs.shape  # doctest: +SKIP
        (2, 92, 92)
    """
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    mats: list[np.ndarray] = []
    for item in items:
        arr, _ = (
            load_array(item, key, what="subject RDMs")
            if isinstance(item, (str, os.PathLike))
            else (np.asarray(item, float), None)
        )
        if arr.ndim == 3:
            mats.extend(arr)
        else:
            mats.append(load_matrix(arr))
    if len({m.shape for m in mats}) != 1:
        raise LayertapError(f"subject RDMs have different sizes: {sorted({m.shape for m in mats})}")
    bad = [i for i, m in enumerate(mats) if not is_rdm(m)]
    if bad:
        raise LayertapError(f"subject RDM {bad[0]} is not square, symmetric and zero on the diagonal")
    if len(mats) < 2:
        raise LayertapError("the noise ceiling needs the RDMs of at least 2 subjects")
    return np.stack(mats)


def compare_to_subjects(
    run: Any,
    subject_rdms: Sequence[Any] | Any,
    layers: Sequence[str] | str | None = None,
    method: str = "rdm-spearman",
    metric: str = "correlation",
    stimuli: Any = None,
    key: str | None = None,
) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """Each layer's RDM against each subject's RDM, and the noise ceiling's (lower, upper) bounds.

    Args:
        run: a Run or run directory.
        subject_rdms: see :func:`load_subject_rdms`.
        layers: names or globs (default all).
        method: ``rdm-pearson``, ``rdm-spearman`` or ``rdm-kendall_tau_a``.
        metric: dissimilarity of the layer RDMs.
        stimuli: ids of the RDMs' rows/columns (matched to the run's images by path, stem or name);
            None: the RDMs follow the run's image order and size.
        key: dataset/variable name in .h5/.mat files.

    Returns:
        ``({layer: (subjects,) similarities}, (lower, upper))``.

    Example:
        >>> scores, (lower, upper) = compare_to_subjects("./acts", ["sub-01.npy", "sub-02.npy"])  # doctest: +SKIP
    """
    kind, what, _ = parse_method(method)
    if kind != "rdm":
        raise LayertapError(f"subject RDMs are compared with an rdm-* method, not {method}")
    r = open_complete_run(run)
    subs = load_subject_rdms(subject_rdms, key)
    n = subs.shape[1]
    if stimuli is None:
        if n != len(r.images):
            raise LayertapError(
                f"subject RDMs are {n}x{n} but the run has {len(r.images)} images: give --stimuli (ids of the rows)"
            )
        rows = None
    else:
        ids = read_labels(stimuli, ("stimulus", "stimulus_id", "id", "image", "path", "name"), None, "stimulus ids")
        if len(ids) != n:
            raise LayertapError(f"{len(ids)} stimulus ids for {n}x{n} RDMs")
        rows, missing = match_ids(ids, r.images)
        if missing:
            raise LayertapError(f"{len(missing)} stimulus ids are not images of the run (e.g. {ids[missing[0]]!r})")
    vecs = np.stack([upper_triangle(m) for m in subs])
    common = np.all(np.isfinite(vecs), axis=0)  # pairs missing (NaN) in any subject: left out everywhere
    vecs = vecs[:, common]
    ceiling = rdm_noise_ceiling(vecs, what)
    out: dict[str, np.ndarray] = {}
    for layer in select_layers(r, layers):
        data = r[layer] if rows is None else read_rows(r[layer], rows, np.dtype(np.float64))
        model = upper_triangle(rdm(data, metric))[common]
        out[layer] = np.array([compare_rdms(model, v, what) for v in vecs])
    return out, ceiling

