"""Post-processing of stored activations into a NEW run: center, normalize, PCA, random projection.

Everything streams over a layer's rows (:mod:`layertap.process.blocks`): memory is bounded by one
block of rows (about 16 MB) plus what a step keeps (a mean vector, PCA components), never by the
number of images. The output directory is an ordinary run (``layertap.open_run`` opens it,
``layertap.export`` exports it), written by the store's :class:`~layertap.store.writer.DerivedRunWriter`:
the source manifest, with its ``layers`` replaced and a ``postprocessing`` record (steps and their
parameters) appended.

- :func:`postprocess` (and the shorthands :func:`center`, :func:`normalize`): the seed's
  ``--center_acts`` (subtract each unit's mean over images), ``--normalize_reps`` (scale each
  image's vector to unit l2 norm) and ``--compress_acts`` (PCA), composable in that order.
- :class:`~layertap.process.pca.PCA` (:mod:`.pca`), :class:`~layertap.process.projection.SparseRandomProjection`
  (:mod:`.projection`) and :func:`~layertap.process.ensemble.feature_map_ensemble` (:mod:`.ensemble`) live
  in their own modules.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from layertap.errors import LayertapError
from layertap.process.blocks import Blocks, column_mean, l2_normalize, subtract
from layertap.process.pca import PCA
from layertap.process.projection import SparseRandomProjection
from layertap.store.run import Run, open_complete_run
from layertap.store.writer import DerivedRunWriter


def postprocess(
    run: Run | str | os.PathLike[str],
    out: str | os.PathLike[str],
    layers: list[str] | None = None,
    *,
    center: bool = False,
    normalize: bool = False,
    pca: int | float | PCA | dict[str, PCA] | None = None,
    projection: int | SparseRandomProjection | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Run:
    """Write a new run at ``out`` with ``layers`` of ``run`` processed, in this order.

    1. ``center``: subtract each unit's mean over all images (two passes over the rows);
    2. ``normalize``: divide each image's (flattened) vector by its l2 norm;
    3. ``pca``: scores (images, k), fitted per layer on the data after steps 1-2; fits are saved to
       ``out/pca/<layer>.npz`` (``PCA.load`` applies them to new images); or ``projection``: (images, k).

    Without pca/projection a layer keeps its shape. Outputs are float32. The manifest keeps the
    source's images and model, and records every step with its parameters under ``postprocessing``.
    A failed output is removed; an unfinished one left by a killed process is replaced.

    Args:
        run: a complete Run or run directory.
        out: the new run's directory (not the source's).
        layers: the layers to process (default all).
        center: subtract each unit's mean over images.
        normalize: scale each image's vector to unit l2 norm.
        pca: k, a variance fraction, an unfitted :class:`~layertap.process.pca.PCA` as a template, or
            ``{layer: fitted PCA}``.
        projection: k or a :class:`~layertap.process.projection.SparseRandomProjection`.
        seed: the seed of a projection given as k.
        overwrite: replace a finished run at ``out``.

    Returns:
        The new :class:`~layertap.store.run.Run`.

    Raises:
        LayertapError: an unknown layer, nothing to do, both pca and projection, an unfinished source,
            or an ``out`` that holds another run (without ``overwrite``).

    Example:
        >>> new = postprocess("./acts", "./acts-pca", center=True, pca=100)  # doctest: +SKIP
        >>> new["avgpool"].shape  # doctest: +SKIP
        (1000, 100)
    """
    src = open_complete_run(run)
    names = list(layers or src.layers)
    for name in names:
        src[name]  # unknown layer: one error before anything is written
    if pca is not None and projection is not None:
        raise LayertapError("choose pca or projection, not both")
    if not (center or normalize or pca is not None or projection is not None):
        raise LayertapError("nothing to do: pass center, normalize, pca and/or projection")
    if isinstance(projection, (int, np.integer)):
        projection = SparseRandomProjection(int(projection), seed=seed)
    dest = DerivedRunWriter(src, out, overwrite, owned=("pca",))
    try:
        return _postprocess_into(dest, src, names, center, normalize, pca, projection)
    except BaseException:
        dest.discard()
        raise


def _postprocess_into(
    dest: DerivedRunWriter,
    src: Run,
    names: list[str],
    center: bool,
    normalize: bool,
    pca: int | float | PCA | dict[str, PCA] | None,
    projection: SparseRandomProjection | None,
) -> Run:
    """The body of :func:`postprocess`, writing into ``dest``."""
    steps: list[dict[str, Any]] = []
    if center:
        steps.append({"op": "center", "over": "images", "per": "unit"})
    if normalize:
        steps.append({"op": "normalize", "norm": "l2", "per": "image"})
    fits: dict[str, Any] = {}
    for name in names:
        blocks = Blocks([src[name]])
        if center:
            blocks = blocks.with_steps(subtract(column_mean(blocks)))
        if normalize:
            blocks = blocks.with_steps(l2_normalize)
        info = {"module": src.manifest.layers[name].get("module", name), "derived_from": name}
        if pca is not None:
            model = _pca_for(pca, name)
            if not model.fitted:
                try:
                    model.fit(blocks)
                except LayertapError as err:
                    raise type(err)(f"layer {name}: {err}") from None
            path = model.save(dest.path / "pca" / f"{name}.npz")
            fits[name] = {**model.record(), "file": str(path.relative_to(dest.path))}
            dest.write(name, blocks.with_steps(model._project), (model.n_components_,), info)
        elif projection is not None:
            dest.write(name, blocks.with_steps(projection.apply_numpy), (projection.n_components,), info)
        else:
            dest.write(name, blocks, tuple(src[name].shape[1:]), info)
    if pca is not None:
        template = pca if isinstance(pca, PCA) else PCA(pca) if not isinstance(pca, dict) else None
        steps.append({"op": "pca", **(template.params() if template else {}), "fits": fits})
    if projection is not None:
        steps.append({"op": "sparse_random_projection", **projection.record()})
    return dest.complete({"steps": steps, "layers": names})


def _pca_for(pca: int | float | PCA | dict[str, PCA], layer: str) -> PCA:
    if isinstance(pca, dict):
        if layer not in pca:
            raise LayertapError(f"no fitted PCA given for layer '{layer}'")
        return pca[layer]
    if isinstance(pca, PCA):
        return (
            pca
            if pca.fitted
            else PCA(pca.n_components, **{k: v for k, v in pca.params().items() if k != "n_components"})
        )
    return PCA(pca)


def center(
    run: Run | str | os.PathLike[str], out: str | os.PathLike[str], layers: list[str] | None = None, **kw: Any
) -> Run:
    """The seed's ``--center_acts``: a new run with each unit's mean over images subtracted.

    Args:
        run: a complete Run or run directory.
        out: the new run's directory.
        layers: the layers (default all).
        **kw: more options of :func:`postprocess` (``normalize``, ``pca``, ``overwrite``, ...).

    Returns:
        The new run.

    Example:
        >>> centred = center("./acts", "./acts-centred")  # doctest: +SKIP
    """
    return postprocess(run, out, layers, center=True, **kw)


def normalize(
    run: Run | str | os.PathLike[str], out: str | os.PathLike[str], layers: list[str] | None = None, **kw: Any
) -> Run:
    """The seed's ``--normalize_reps``: a new run with every image's vector scaled to unit l2 norm.

    Args:
        run: a complete Run or run directory.
        out: the new run's directory.
        layers: the layers (default all).
        **kw: more options of :func:`postprocess`.

    Returns:
        The new run.

    Example:
        >>> unit = normalize("./acts", "./acts-l2")  # doctest: +SKIP
    """
    return postprocess(run, out, layers, normalize=True, **kw)
