"""Hand-off to rsatoolbox (``pip install 'layertap[rsa]'``): a layer as an ``rsatoolbox.data.Dataset``,
RDMs as an ``rsatoolbox.rdm.RDMs``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.analysis.matrices import load_matrix
from layertap.analysis.rdms import is_rdm, rdm, upper_triangle
from layertap.analysis.rows import RowBlocks
from layertap.analysis.similarity import select_layers
from layertap.errors import LayertapError
from layertap.store.run import Run, open_complete_run


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

    Loads the whole layer into memory (8*N*P bytes). Needs ``pip install 'layertap[rsa]'``.

    Args:
        run_or_array: a Run / run path (then ``layer`` is required) or an (N, ...) array.
        layer: the layer to hand over (a name or a glob matching it).
        targets: one class index per image (default: the run's).
        classes: class names (default: the run's).
        images: image paths (default: the run's).

    Returns:
        The Dataset; obs_descriptors ``image``, ``target`` and ``class`` where known; descriptors
        ``layer``, ``run``, ``model``.

    Raises:
        MissingDependencyError: rsatoolbox is not installed.
        LayertapError: no layer named for a run, or descriptors of the wrong length.

    Example:
        >>> ds = to_rsatoolbox("./acts", "avgpool")  # doctest: +SKIP
    """
    data_mod = require("rsatoolbox.data", "rsa", "to_rsatoolbox")
    run = None
    if isinstance(run_or_array, (Run, str, os.PathLike)):
        run = open_complete_run(run_or_array)
        if layer is None:
            raise LayertapError(f"name the layer to hand over (one of: {', '.join(run.layers)})")
        source: Any = run[select_layers(run, layer)[0]]
    else:
        source = run_or_array
    measurements = RowBlocks(source).all()
    descriptors: dict[str, Any] = {}
    if layer is not None:
        descriptors["layer"] = layer
    if run is not None:
        descriptors["run"] = str(run.path)
        model = run.manifest.model
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

    Needs ``pip install 'layertap[rsa]'``.

    Args:
        rdms: a Run / run path (the RDM of each of ``layers`` is computed with ``metric``), one (N, N)
            RDM, a list of them, or a ``{name: RDM}`` mapping.
        layers: names or globs of a run's layers (default all).
        metric: the dissimilarity (computed for a run; recorded as ``dissimilarity_measure``).
        names: one name per RDM (default: the layers, the mapping's keys, or ``rdm0``, ``rdm1``...).
        targets: one class index per image (default: the run's).
        classes: class names (default: the run's).
        images: image paths (default: the run's).
        block_rows: images per block when computing RDMs.

    Returns:
        The RDMs; rdm_descriptors ``layer``; pattern_descriptors ``image``/``target``/``class`` where known.

    Raises:
        MissingDependencyError: rsatoolbox is not installed.
        LayertapError: matrices that are not RDMs of one size, or a wrong number of names.

    Example:
        >>> rdms = rdms_to_rsatoolbox("./acts", ["layer3", "avgpool"])  # doctest: +SKIP
    """
    rdm_mod = require("rsatoolbox.rdm", "rsa", "rdms_to_rsatoolbox")
    run = None
    if isinstance(rdms, (Run, str, os.PathLike)):
        run = open_complete_run(rdms)
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
