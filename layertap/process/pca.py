"""PCA of stored activations: exact (SVD) for small layers, incremental (scikit-learn IncrementalPCA over
blocks of rows) for large ones; k components or a fraction of the variance; ``save``/``load``."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.errors import LayertapError
from layertap.process.blocks import Blocks, as_blocks, block_rows, require_finite
from layertap.store.files import disk_error
from layertap.store.run import LayerArray, Run


class PCA:
    """Principal components of activations (images x units), fitted exactly or incrementally.

    For a fraction, the incremental fit keeps ``min(images, units, max_components)`` components,
    then cuts. Fitted attributes (float64): ``components_`` (k, D), ``mean_`` (D,),
    ``explained_variance_`` (k,), ``explained_variance_ratio_`` (k,) (of the total variance of all D
    units), ``singular_values_`` (k,), ``n_samples_``, ``input_shape_`` (one row's shape), ``method_``.
    Each component's sign is fixed so that its largest-magnitude loading is positive.

    Args:
        n_components: an int k, a float in (0, 1) (the fewest components whose explained variance
            reaches that fraction of the total), or None (all: min(images, units), at most
            ``max_components`` when incremental).
        method: ``"exact"`` (SVD of the whole centred matrix, float64), ``"incremental"``
            (scikit-learn IncrementalPCA, ``partial_fit`` on batches of ``batch_rows`` >= components
            rows, the batches ``IncrementalPCA(batch_size=batch_rows).fit`` uses, so memory is
            O(batch_rows x units)), or ``"auto"`` (exact when the float64 matrix fits in ``memory_limit``).
        max_components: the most components an incremental fit of a fraction or of all keeps.
        batch_rows: rows per incremental batch (default: about 16 MB of float64).
        memory_limit: bytes of the float64 matrix up to which ``"auto"`` fits exactly.

    Raises:
        LayertapError: an unknown method, or an n_components out of range.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 8))
        >>> pca = PCA(3).fit(x)
        >>> pca.transform(x).shape, pca.method_
        ((50, 3), 'exact')
    """

    def __init__(
        self,
        n_components: int | float | None = None,
        *,
        method: str = "auto",
        max_components: int = 1024,
        batch_rows: int | None = None,
        memory_limit: int = 256 << 20,
    ) -> None:
        if method not in ("auto", "exact", "incremental"):
            raise LayertapError(f"PCA method must be auto, exact or incremental, not '{method}'")
        if isinstance(n_components, float) and not 0 < n_components < 1:
            raise LayertapError(f"a fraction of variance must be in (0, 1), got {n_components}")
        if isinstance(n_components, (int, np.integer)) and not isinstance(n_components, bool) and n_components < 1:
            raise LayertapError(f"n_components must be at least 1, got {n_components}")
        if isinstance(n_components, np.integer):  # plain Python numbers keep the manifest JSON-able
            n_components = int(n_components)
        elif isinstance(n_components, np.floating):
            n_components = float(n_components)
        self.n_components = n_components
        self.method = method
        self.max_components = int(max_components)
        self.batch_rows = batch_rows
        self.memory_limit = int(memory_limit)

    # -- fitting -------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run (or the PCA was loaded)."""
        return hasattr(self, "components_")

    @property
    def n_components_(self) -> int:
        """The number of components kept by the fit."""
        self._check_fitted()
        return int(self.components_.shape[0])

    def params(self) -> dict[str, Any]:
        """The constructor's parameters (what the manifest records of a template).

        Returns:
            ``{"n_components", "method", "max_components", "batch_rows"}``.
        """
        return {
            "n_components": self.n_components,
            "method": self.method,
            "max_components": self.max_components,
            "batch_rows": self.batch_rows,
        }

    def fit(self, data: Blocks | Run | LayerArray | np.ndarray | str | os.PathLike[str], layer: str | None = None) -> PCA:
        """Fit on ``data``, read block by block (exact fits load it once).

        Args:
            data: a Run (+ ``layer``), a run directory, a LayerArray, an array (images, ...) or Blocks.
            layer: the layer of a run that stores several.

        Returns:
            ``self``, fitted.

        Raises:
            LayertapError: fewer than 2 images, more components than min(images, units), or NaN/inf values.
        """
        blocks = as_blocks(data, layer).with_steps(require_finite)  # SVD on NaN: LinAlgError, no reason
        n, d = blocks.n, blocks.dim
        if n < 2:
            raise LayertapError(f"PCA needs at least 2 images, got {n}")
        k_req = self.n_components
        if isinstance(k_req, (int, np.integer)) and not isinstance(k_req, bool) and k_req > min(n, d):
            raise LayertapError(f"n_components={k_req} exceeds min(images, units) = {min(n, d)}")
        method = self.method
        if method == "auto":
            method = "exact" if n * d * 8 <= self.memory_limit else "incremental"
        if method == "exact":
            self._fit_exact(blocks)
        else:
            self._fit_incremental(blocks)
        self.method_ = method
        self.n_samples_ = n
        self.input_shape_ = blocks.row_shape
        self._select()
        return self

    def _fit_exact(self, blocks: Blocks) -> None:
        x = blocks.load()
        self.mean_ = x.mean(axis=0)
        x -= self.mean_
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        self.singular_values_ = s
        self.components_ = vt
        self.explained_variance_ = s**2 / (blocks.n - 1)
        total = float(np.sum(s**2))
        self.explained_variance_ratio_ = s**2 / total if total > 0 else np.zeros_like(s)

    def _fit_incremental(self, blocks: Blocks) -> None:
        IncrementalPCA = require("sklearn.decomposition", "postprocess", "incremental PCA").IncrementalPCA  # noqa: N806
        n, d = blocks.n, blocks.dim
        k_req = self.n_components
        if isinstance(k_req, (int, np.integer)) and not isinstance(k_req, bool):
            k_fit = int(k_req)
        else:  # a fraction or all: fit enough components, cut in _select
            k_fit = min(n, d, self.max_components)
        batch = max(k_fit, self.batch_rows or block_rows(d))
        ipca = IncrementalPCA(n_components=k_fit)
        # The batches of IncrementalPCA(batch_size=batch).fit (sklearn's gen_batches): `batch` rows
        # each, except that a remainder of fewer than k_fit rows (too few for a partial_fit) joins
        # the last batch. Rows are read at most `batch` at a time, so at most ~2 batches are held.
        buf: list[np.ndarray] = []
        held = fitted = 0
        for _, x in Blocks(blocks.arrays, min(blocks.rows, batch), blocks.steps):
            buf.append(x)
            held += len(x)
            while held >= batch and fitted + batch + k_fit <= n:
                cat = np.concatenate(buf)
                ipca.partial_fit(cat[:batch])
                buf, held, fitted = [cat[batch:]], held - batch, fitted + batch
        if held:
            ipca.partial_fit(np.concatenate(buf))
        self.mean_ = np.asarray(ipca.mean_, dtype=np.float64)
        self.components_ = np.asarray(ipca.components_, dtype=np.float64)
        self.singular_values_ = np.asarray(ipca.singular_values_, dtype=np.float64)
        self.explained_variance_ = np.asarray(ipca.explained_variance_, dtype=np.float64)
        self.explained_variance_ratio_ = np.asarray(ipca.explained_variance_ratio_, dtype=np.float64)

    def _select(self) -> None:
        """Keep the requested components and fix their signs."""
        k_req = self.n_components
        avail = self.components_.shape[0]
        if k_req is None:
            k = avail
        elif isinstance(k_req, float):
            cum = np.cumsum(self.explained_variance_ratio_)
            reached = np.nonzero(cum >= k_req - 1e-12)[0]
            if len(reached):
                k = int(reached[0]) + 1
            else:
                k = avail
                warnings.warn(
                    f"the {avail} fitted components explain {cum[-1]:.3f} of the variance, less than {k_req}; "
                    "keeping all of them (raise max_components or use method='exact')",
                    stacklevel=3,
                )
        else:
            k = min(int(k_req), avail)
        for name in ("components_", "singular_values_", "explained_variance_", "explained_variance_ratio_"):
            setattr(self, name, getattr(self, name)[:k].copy())
        # Deterministic signs (SVD signs are arbitrary): the largest |loading| of each component > 0.
        signs = np.sign(self.components_[np.arange(k), np.argmax(np.abs(self.components_), axis=1)])
        self.components_ *= np.where(signs == 0, 1.0, signs)[:, None]

    # -- applying ------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise LayertapError("this PCA is not fitted yet: call fit() first or PCA.load(path)")

    def _project(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) @ self.components_.T

    def transform(
        self, data: Blocks | Run | LayerArray | np.ndarray | str | os.PathLike[str], layer: str | None = None
    ) -> np.ndarray:
        """Scores of ``data`` (same units as the fit), block by block.

        Args:
            data: as in :meth:`fit`.
            layer: as in :meth:`fit`.

        Returns:
            (images, k) float32.

        Raises:
            LayertapError: not fitted, or data with another number of units.
        """
        self._check_fitted()
        blocks = as_blocks(data, layer)
        if blocks.dim != self.components_.shape[1]:
            raise LayertapError(f"this PCA was fitted on {self.components_.shape[1]} units, the data have {blocks.dim}")
        out = np.empty((blocks.n, self.n_components_), dtype=np.float32)
        for start, x in blocks:
            out[start : start + len(x)] = self._project(x)
        return out

    def fit_transform(
        self, data: Blocks | Run | LayerArray | np.ndarray | str | os.PathLike[str], layer: str | None = None
    ) -> np.ndarray:
        """:meth:`fit`, then :meth:`transform` of the same data.

        Args:
            data: as in :meth:`fit`.
            layer: as in :meth:`fit`.

        Returns:
            (images, k) float32.
        """
        return self.fit(data, layer).transform(data, layer)

    def inverse_transform(self, scores: np.ndarray) -> np.ndarray:
        """Back to unit space: the rank-k approximation of the data.

        Args:
            scores: (images, k).

        Returns:
            (images, D) float64.
        """
        self._check_fitted()
        return np.asarray(scores, dtype=np.float64) @ self.components_ + self.mean_

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fit to an .npz (no pickles), so ``PCA.load(path).transform`` applies it to new images.

        Args:
            path: the file (parent folders are created; no ``.npz`` is appended).

        Returns:
            ``path``.

        Raises:
            StorageError: the file cannot be written.
        """
        self._check_fitted()
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:  # a file object keeps np.savez from appending '.npz'
                np.savez(
                    f,
                    components=self.components_,
                    mean=self.mean_,
                    explained_variance=self.explained_variance_,
                    explained_variance_ratio=self.explained_variance_ratio_,
                    singular_values=self.singular_values_,
                    input_shape=np.asarray(self.input_shape_, dtype=np.int64),
                    meta=np.asarray(
                        json.dumps({**self.params(), "method_": self.method_, "n_samples_": self.n_samples_})
                    ),
                )
        except OSError as err:
            raise disk_error(err, path) from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PCA:
        """A fit written by :meth:`save`.

        Args:
            path: the .npz file.

        Returns:
            The fitted PCA.

        Raises:
            LayertapError: not a PCA saved by layertap.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                pca = cls(meta["n_components"], method=meta["method"], max_components=meta["max_components"])
                pca.batch_rows = meta["batch_rows"]
                pca.components_ = z["components"]
                pca.mean_ = z["mean"]
                pca.explained_variance_ = z["explained_variance"]
                pca.explained_variance_ratio_ = z["explained_variance_ratio"]
                pca.singular_values_ = z["singular_values"]
                pca.input_shape_ = tuple(int(s) for s in z["input_shape"])
        except (OSError, KeyError, ValueError) as err:
            raise LayertapError(f"{path} is not a PCA saved by layertap ({err})") from None
        pca.method_, pca.n_samples_ = meta["method_"], meta["n_samples_"]
        return pca

    def record(self) -> dict[str, Any]:
        """What the manifest records about a fit.

        Returns:
            The parameters, ``method_``, ``k`` and the total ``explained_variance_ratio``.
        """
        self._check_fitted()
        return {
            **self.params(),
            "method_": self.method_,
            "k": self.n_components_,
            "explained_variance_ratio": float(np.sum(self.explained_variance_ratio_)),
        }

    def __repr__(self) -> str:
        fit = f", k={self.n_components_}, method_={self.method_}" if self.fitted else ""
        return f"PCA(n_components={self.n_components!r}, method={self.method!r}{fit})"
