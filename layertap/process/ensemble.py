"""Feature-map ensembles (Shahmohammadi et al., COLING 2020): flattened feature maps of several layers
concatenated (optionally with the penultimate layer), then reduced with PCA."""

from __future__ import annotations

import os

import numpy as np

from layertap.errors import LayertapError
from layertap.process.blocks import Blocks, l2_normalize
from layertap.process.pca import PCA
from layertap.store.run import Run, open_complete_run
from layertap.store.writer import DerivedRunWriter


def feature_map_ensemble(
    run: Run | str | os.PathLike[str],
    layers: list[str],
    penultimate: str | None = None,
    n_components: int | float | None = None,
    *,
    pca: PCA | None = None,
    method: str = "auto",
    normalize_layers: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    return_pca: bool = False,
) -> np.ndarray | tuple[np.ndarray, PCA]:
    """Feature-map ensemble (Shahmohammadi et al., COLING 2020): concatenate, then reduce with PCA.

    Each of ``layers`` (conv / max-pool maps) is flattened per image, the layers (plus
    ``penultimate``) are concatenated side by side, and PCA keeps ``n_components``. Rows are read
    block by block; components are ordered by decreasing variance.

    Args:
        run: a complete Run or run directory.
        layers: the feature-map layers.
        penultimate: a layer appended last (e.g. ``"classifier.4"``), or None.
        n_components: k, a variance fraction, or None for all.
        pca: a fitted PCA (from ``return_pca=True``) to apply the same reduction to new images.
        method: the PCA method (``"auto"``, ``"exact"``, ``"incremental"``).
        normalize_layers: l2-normalise each layer's vector first, so that wide maps do not dominate.
        out: also write the scores as layer ``ensemble`` of a new run there.
        overwrite: replace a finished run at ``out``.
        return_pca: also return the PCA.

    Returns:
        Scores (images, k) float32, or ``(scores, pca)`` with ``return_pca``.

    Raises:
        LayertapError: no layers, an unknown layer, or an unfinished run.

    Example:
        >>> scores, pca = feature_map_ensemble(  # doctest: +SKIP
        ...     "./acts", ["features.2", "features.5"], "classifier.4", 100, return_pca=True)
    """
    src = open_complete_run(run)
    names = [*layers, *([penultimate] if penultimate else [])]
    if not names:
        raise LayertapError("feature_map_ensemble needs at least one layer")
    arrays = [src[name] for name in names]
    blocks = Blocks(arrays)
    if normalize_layers:
        bounds = np.cumsum([0, *blocks.dims])

        def per_layer_l2(x: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [l2_normalize(x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], axis=1
            )

        blocks = blocks.with_steps(per_layer_l2)
    model = pca if pca is not None else PCA(n_components, method=method)
    if not model.fitted:
        model.fit(blocks)
    scores = model.transform(blocks)
    if out is not None:
        dest = DerivedRunWriter(src, out, overwrite, owned=("pca",))
        try:
            path = model.save(dest.path / "pca" / "ensemble.npz")
            dest.write("ensemble", Blocks([scores]), (scores.shape[1],), {"module": None, "derived_from": names})
            dest.complete(
                {
                    "steps": [
                        {
                            "op": "feature_map_ensemble",
                            "layers": list(layers),
                            "penultimate": penultimate,
                            "normalize_layers": normalize_layers,
                            "pca": {**model.record(), "file": str(path.relative_to(dest.path))},
                        }
                    ],
                    "layers": names,
                }
            )
        except BaseException:
            dest.discard()
            raise
    return (scores, model) if return_pca else scores
