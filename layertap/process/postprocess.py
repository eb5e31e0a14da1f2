"""Post-processing of stored activations into a NEW run: center, normalize, PCA, random projection.

Everything streams over a layer's rows (``LayerArray.iter_chunks``): memory is bounded by one
block of rows (about 16 MB) plus what a step keeps (a mean vector, PCA components), never by the
number of images. The output directory is an ordinary run (``layertap.open_run`` opens it,
``layertap.export`` exports it): the source manifest, with its ``layers`` replaced and a
``postprocessing`` record (steps and their parameters) appended.

- :func:`postprocess` (and the shorthands :func:`center`, :func:`normalize`): the seed's
  ``--center_acts`` (subtract each unit's mean over images), ``--normalize_reps`` (scale each
  image's vector to unit l2 norm) and ``--compress_acts`` (PCA), composable in that order.
- :class:`PCA`: exact (SVD) for small layers, incremental (scikit-learn IncrementalPCA over
  blocks of rows) for large ones; k components or a fraction of the variance; ``save``/``load``.
- :class:`SparseRandomProjection`: very sparse Johnson–Lindenstrauss projection, applied with torch
  on any device (for use during extraction) or with numpy/scipy.
- :func:`feature_map_ensemble`: flattened feature maps of several layers concatenated (optionally
  with the penultimate layer), then PCA (Shahmohammadi et al., COLING 2020).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from layertap.errors import LayertapError, option_spelling
from layertap.store.run import (
    ARRAYS,
    CHUNK_BYTES,
    MANIFEST,
    LayerArray,
    Run,
    _zarr_create,
    disk_error,
    open_run,
    read_json,
    write_json_atomic,
)

Step = Callable[[np.ndarray], np.ndarray]


# -- reading: a layer (or several, side by side) as 2-D float64 blocks of rows ---------------------
class _Blocks:
    """Rows of one or more arrays as ``(start, block)`` with block (rows, D) float64, D = all units.

    Several arrays (same number of rows) are flattened and concatenated side by side; ``steps``
    are applied to each block in order (e.g. centering, then normalization).
    """

    def __init__(self, arrays: Sequence[LayerArray | np.ndarray], rows: int | None = None, steps: Sequence[Step] = ()):
        if not arrays:
            raise LayertapError("no layers given")
        self.arrays = list(arrays)
        self.n = int(self.arrays[0].shape[0])
        if any(int(a.shape[0]) != self.n for a in self.arrays):
            raise LayertapError(f"layers differ in number of rows: {[a.shape[0] for a in self.arrays]}")
        self.dims = [int(np.prod(a.shape[1:])) for a in self.arrays]
        self.dim = sum(self.dims)
        self.row_shape: tuple[int, ...] = tuple(self.arrays[0].shape[1:]) if len(self.arrays) == 1 else (self.dim,)
        self.rows = rows or _block_rows(self.dim)
        self.steps = list(steps)

    def with_steps(self, *steps: Step) -> _Blocks:
        return _Blocks(self.arrays, self.rows, [*self.steps, *steps])

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, self.rows):
            stop = min(self.n, start + self.rows)
            parts = [np.asarray(a[start:stop]).reshape(stop - start, -1) for a in self.arrays]
            x = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)).astype(np.float64)
            for step in self.steps:
                x = step(x)
            yield start, x

    def load(self) -> np.ndarray:
        """All rows at once (n, D) float64: only for data known to be small."""
        out = np.empty((self.n, self.dim), dtype=np.float64)
        for start, x in self:
            out[start : start + len(x)] = x
        return out


def _block_rows(dim: int) -> int:
    """Rows per block so that a float64 block is about CHUNK_BYTES."""
    return max(1, min(4096, CHUNK_BYTES // max(1, 8 * dim)))


def _as_blocks(data: Any, layer: str | None = None) -> _Blocks:
    if isinstance(data, _Blocks):
        return data
    if isinstance(data, (str, os.PathLike)):
        data = open_run(data)
    if isinstance(data, Run):
        if layer is None:
            if len(data.layers) != 1:
                raise LayertapError(f"run {data.path} has layers {data.layers}; say which one (layer=...)")
            layer = data.layers[0]
        return _Blocks([data[layer]])
    if isinstance(data, LayerArray):
        return _Blocks([data])
    arr = np.asarray(data)
    if arr.ndim < 2:
        raise LayertapError(f"expected (images, units...) activations, got shape {arr.shape}")
    return _Blocks([arr])


def column_mean(blocks: _Blocks) -> np.ndarray:
    """Mean of every unit over all rows, (D,) float64, accumulated block by block."""
    total = np.zeros(blocks.dim, dtype=np.float64)
    for _, x in blocks:
        total += x.sum(axis=0)
    return total / max(1, blocks.n)


def _subtract(mean: np.ndarray) -> Step:
    return lambda x: x - mean


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)  # an all-zero vector stays zero


def _require_finite(x: np.ndarray) -> np.ndarray:
    """``x`` unchanged, or a one-line error when it holds NaN or inf (nothing can be fitted to them)."""
    if not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        raise LayertapError(
            f"cannot fit PCA: the activations hold NaN/inf values ({int(bad.sum())} values in "
            f"{int(bad.any(axis=1).sum())} images of one block); the run's manifest counts them per layer "
            "('values'): drop those images or fix what makes the model produce them"
        )
    return x


# -- PCA ----------------------------------------------------------------------------------------------
class PCA:
    """Principal components of activations (images x units), fitted exactly or incrementally.

    ``n_components``: an int k, a float in (0, 1) (the fewest components whose explained
    variance reaches that fraction of the total), or None (all: min(images, units), at most
    ``max_components`` when incremental). ``method``: ``"exact"`` (SVD of the whole centred
    matrix, float64), ``"incremental"`` (scikit-learn IncrementalPCA, ``partial_fit`` on batches
    of ``batch_rows`` >= components rows, the batches ``IncrementalPCA(batch_size=batch_rows).fit``
    uses, so memory is O(batch_rows x units)), or ``"auto"``
    (exact when the float64 matrix fits in ``memory_limit`` bytes). For a fraction, the
    incremental fit keeps ``min(images, units, max_components)`` components, then cuts.

    Fitted attributes (float64): ``components_`` (k, D), ``mean_`` (D,), ``explained_variance_``
    (k,), ``explained_variance_ratio_`` (k,) (of the total variance of all D units),
    ``singular_values_`` (k,), ``n_samples_``, ``input_shape_`` (one row's shape), ``method_``.
    Each component's sign is fixed so that its largest-magnitude loading is positive.
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
        return hasattr(self, "components_")

    @property
    def n_components_(self) -> int:
        self._check_fitted()
        return int(self.components_.shape[0])

    def params(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "method": self.method,
            "max_components": self.max_components,
            "batch_rows": self.batch_rows,
        }

    def fit(self, data: Run | LayerArray | np.ndarray | str | os.PathLike[str], layer: str | None = None) -> PCA:
        """Fit on ``data``: a Run (+ ``layer``), a LayerArray or an array (images, ...)."""
        blocks = _as_blocks(data, layer).with_steps(_require_finite)  # SVD on NaN: LinAlgError, no reason
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

    def _fit_exact(self, blocks: _Blocks) -> None:
        x = blocks.load()
        self.mean_ = x.mean(axis=0)
        x -= self.mean_
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        self.singular_values_ = s
        self.components_ = vt
        self.explained_variance_ = s**2 / (blocks.n - 1)
        total = float(np.sum(s**2))
        self.explained_variance_ratio_ = s**2 / total if total > 0 else np.zeros_like(s)

    def _fit_incremental(self, blocks: _Blocks) -> None:
        try:
            from sklearn.decomposition import IncrementalPCA
        except ImportError:
            raise LayertapError("incremental PCA needs scikit-learn: pip install 'layertap[postprocess]'") from None
        n, d = blocks.n, blocks.dim
        k_req = self.n_components
        if isinstance(k_req, (int, np.integer)) and not isinstance(k_req, bool):
            k_fit = int(k_req)
        else:  # a fraction or all: fit enough components, cut in _select
            k_fit = min(n, d, self.max_components)
        batch = max(k_fit, self.batch_rows or _block_rows(d))
        ipca = IncrementalPCA(n_components=k_fit)
        # The batches of IncrementalPCA(batch_size=batch).fit (sklearn's gen_batches): `batch` rows
        # each, except that a remainder of fewer than k_fit rows (too few for a partial_fit) joins
        # the last batch. Rows are read at most `batch` at a time, so at most ~2 batches are held.
        buf: list[np.ndarray] = []
        held = fitted = 0
        for _, x in _Blocks(blocks.arrays, min(blocks.rows, batch), blocks.steps):
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
        self, data: Run | LayerArray | np.ndarray | str | os.PathLike[str], layer: str | None = None
    ) -> np.ndarray:
        """Scores (images, k) float32 of ``data`` (same units as the fit), block by block."""
        self._check_fitted()
        blocks = _as_blocks(data, layer)
        if blocks.dim != self.components_.shape[1]:
            raise LayertapError(f"this PCA was fitted on {self.components_.shape[1]} units, the data have {blocks.dim}")
        out = np.empty((blocks.n, self.n_components_), dtype=np.float32)
        for start, x in blocks:
            out[start : start + len(x)] = self._project(x)
        return out

    def fit_transform(
        self, data: Run | LayerArray | np.ndarray | str | os.PathLike[str], layer: str | None = None
    ) -> np.ndarray:
        return self.fit(data, layer).transform(data, layer)

    def inverse_transform(self, scores: np.ndarray) -> np.ndarray:
        """Back to unit space (images, D) float64: the rank-k approximation of the data."""
        self._check_fitted()
        return np.asarray(scores, dtype=np.float64) @ self.components_ + self.mean_

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fit to an .npz (no pickles), so ``PCA.load(path).transform`` applies it to new images."""
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
        """What the manifest records about a fit."""
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


# -- sparse random projection -------------------------------------------------------------------------
def johnson_lindenstrauss_min_dim(n_samples: int, eps: float = 0.1) -> int:
    """Smallest k with k >= 4 ln(n) / (eps^2/2 - eps^3/3) (Johnson–Lindenstrauss, Dasgupta & Gupta).

    Projecting n points to k dimensions with a random projection then keeps every pairwise
    squared distance within a factor (1 ± eps) of the original with high probability,
    whatever the original dimension D.
    """
    if not 0 < eps < 1:
        raise LayertapError(f"eps must be in (0, 1), got {eps}")
    if n_samples < 1:
        raise LayertapError(f"n_samples must be at least 1, got {n_samples}")
    return int(math.ceil(4 * math.log(n_samples) / (eps**2 / 2 - eps**3 / 3)))


class SparseRandomProjection:
    """Very sparse random projection (Achlioptas 2003; Li, Hastie & Church 2006): D units -> k.

    The D x k matrix R has entries ``+-sqrt(1 / (density * k))`` with probability density/2
    each and 0 otherwise (density ``"auto"`` = 1/sqrt(D)), so E[|xR|^2] = |x|^2. With
    k >= :func:`johnson_lindenstrauss_min_dim` (n, eps), pairwise squared distances among n
    points are preserved within (1 ± eps) with high probability: |xR - yR|^2 / |x - y|^2 in
    [1 - eps, 1 + eps].

    R depends only on (seed, D, k, density): it is drawn with numpy on the CPU and is the same on
    every device. ``proj(x)`` applies it with torch to a batch ``x`` (B, ...) on x's device
    (float32; a sparse CSR matrix, or dense when D*k*4 <= ``dense_max_bytes``) -> (B, k); this is
    the form to use during extraction. ``apply_numpy(x)`` does the same with scipy.sparse.
    """

    def __init__(
        self, n_components: int, seed: int = 0, density: float | str = "auto", *, dense_max_bytes: int = 16 << 20
    ) -> None:
        if int(n_components) < 1:
            raise LayertapError(f"n_components must be at least 1, got {n_components}")
        if density != "auto" and not (isinstance(density, (int, float)) and 0 < density <= 1):
            raise LayertapError(f"density must be 'auto' or in (0, 1], got {density!r}")
        self.n_components = int(n_components)
        self.seed = int(seed)
        self.density = density
        self.dense_max_bytes = int(dense_max_bytes)
        self._triplets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._torch: dict[tuple[int, str], Any] = {}

    def density_for(self, n_features: int) -> float:
        return 1 / math.sqrt(n_features) if self.density == "auto" else float(self.density)

    def triplets(self, n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nonzeros of R (D x k) as (unit index, component index, value), sorted by component."""
        d = int(n_features)
        if d not in self._triplets:
            k, density = self.n_components, self.density_for(d)
            rng = np.random.default_rng([self.seed, d, k])  # R depends on D and k too: no accidental reuse
            scale = math.sqrt(1 / (density * k))
            counts = rng.binomial(d, density, size=k)
            rows = [np.sort(rng.choice(d, size=int(c), replace=False)) for c in counts]  # CSR wants sorted
            unit = np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64)
            comp = np.repeat(np.arange(k, dtype=np.int64), counts)
            value = np.where(rng.integers(0, 2, size=len(unit)) == 1, scale, -scale)
            self._triplets[d] = (unit, comp, value)
        return self._triplets[d]

    def dense_matrix(self, n_features: int) -> np.ndarray:
        """R as a dense (D, k) float64 array (for inspection and small D)."""
        unit, comp, value = self.triplets(n_features)
        r = np.zeros((n_features, self.n_components), dtype=np.float64)
        r[unit, comp] = value
        return r

    def torch_matrix(self, n_features: int, device: Any = "cpu") -> Any:
        """R for torch on ``device``: dense (D, k) float32, or sparse CSR of R transposed (k, D)."""
        import torch

        key = (int(n_features), str(torch.device(device)))
        if key not in self._torch:
            d, k = key[0], self.n_components
            if d * k * 4 <= self.dense_max_bytes:
                mat = torch.from_numpy(self.dense_matrix(d).astype(np.float32))
            else:
                unit, comp, value = self.triplets(d)  # sorted by component = CSR rows of R^T
                crow = np.concatenate([[0], np.cumsum(np.bincount(comp, minlength=k))])
                with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are stable
                    warnings.simplefilter("ignore", UserWarning)
                    mat = torch.sparse_csr_tensor(
                        torch.from_numpy(crow),
                        torch.from_numpy(unit),
                        torch.from_numpy(value.astype(np.float32)),
                        size=(k, d),
                        check_invariants=True,  # once, at build time: cheap, and a bad matrix fails loudly
                    )
            self._torch[key] = mat.to(device)
        return self._torch[key]

    def __call__(self, x: Any) -> Any:
        """Project a torch batch ``x`` (B, ...) on its own device -> (B, k) float32."""
        import torch

        b = x.shape[0]
        flat = x.reshape(b, -1).float()
        mat = self.torch_matrix(flat.shape[1], flat.device)
        if mat.layout == torch.strided:
            return flat @ mat
        return (mat @ flat.T).T  # sparse (k, D) @ dense (D, B): the form torch's sparse kernels take

    def apply_numpy(self, x: np.ndarray) -> np.ndarray:
        """Project ``x`` (n, ...) -> (n, k) float32 on the CPU (scipy.sparse, float64 sums)."""
        try:
            from scipy import sparse
        except ImportError:
            raise LayertapError("apply_numpy needs scipy: pip install 'layertap[postprocess]'") from None
        x = np.asarray(x)
        flat = x.reshape(len(x), -1)
        unit, comp, value = self.triplets(flat.shape[1])
        rt = sparse.csr_matrix((value, (comp, unit)), shape=(self.n_components, flat.shape[1]))
        return np.asarray(rt @ flat.T.astype(np.float64)).T.astype(np.float32)

    def record(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "seed": self.seed, "density": self.density}

    def __repr__(self) -> str:
        return f"SparseRandomProjection(n_components={self.n_components}, seed={self.seed}, density={self.density!r})"


# -- writing a new run ------------------------------------------------------------------------------
class _NewRun:
    """A run directory derived from ``src``: same manifest, new layers, a postprocessing record."""

    def __init__(self, src: Run, out: str | os.PathLike[str], overwrite: bool) -> None:
        self.src, self.path = src, Path(out)
        if self.path.resolve() == src.path.resolve():
            raise LayertapError("the output must be a new directory, not the source run")
        self._created = not self.path.exists()
        if (self.path / MANIFEST).is_file():
            # An unfinished output of an interrupted postprocess (killed: nothing could clean up) is ours to replace.
            if not overwrite and not _unfinished_postprocess(self.path):
                raise LayertapError(
                    f"{self.path} already holds a run; pass {option_spelling('overwrite')} or choose another output"
                )
            for stale in (ARRAYS, "pca"):
                shutil.rmtree(self.path / stale, ignore_errors=True)
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise LayertapError(f"{self.path} is not empty and not a run; choose another output")
        self.manifest = copy.deepcopy(src.manifest)
        self.manifest["layers"] = {}
        self.manifest["status"] = "running"
        self.manifest[_UNFINISHED] = str(src.path)  # marks an unfinished postprocess output; removed when complete
        self.chunk_rows: list[int] = []
        try:
            (self.path / ARRAYS).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / MANIFEST, self.manifest)
        except OSError as err:
            raise disk_error(err, self.path) from None

    def write(self, name: str, blocks: _Blocks, row_shape: tuple[int, ...], info: dict[str, Any]) -> None:
        """Create layer ``name`` (rows, *row_shape) float32 and fill it from ``blocks``.

        Output chunks hold about CHUNK_BYTES of the output (a PCA output is far narrower than its
        input): blocks are buffered and written one whole chunk at a time, never chunk fragments.
        """
        width = max(1, int(np.prod(row_shape)))
        rows = max(1, min(4096, CHUNK_BYTES // (4 * width)))
        buf: list[np.ndarray] = []
        held, written = 0, 0
        try:
            z = _zarr_create(self.path / ARRAYS / name, (blocks.n, *row_shape), (rows, *row_shape), "float32")
            for _, x in blocks:
                buf.append(x.astype(np.float32).reshape(len(x), *row_shape))
                held += len(x)
                while held >= rows or (held and written + held == blocks.n):
                    cat = np.concatenate(buf)
                    take = min(rows, held)
                    z[written : written + take] = cat[:take]
                    buf, held, written = [cat[take:]], held - take, written + take
        except OSError as err:
            raise disk_error(err, self.path) from None
        self.manifest["layers"][name] = {**info, "shape": list(row_shape), "dtype": "float32"}
        self.chunk_rows.append(rows)

    def discard(self) -> None:
        """Remove what this output wrote (after a failure): no unfinished run is left behind."""
        for stale in (ARRAYS, "pca"):
            shutil.rmtree(self.path / stale, ignore_errors=True)
        for name in (MANIFEST, MANIFEST + ".tmp"):
            (self.path / name).unlink(missing_ok=True)
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty

    def complete(self, record: dict[str, Any]) -> Run:
        from layertap import __version__

        self.manifest.pop(_UNFINISHED, None)

        record = {**record, "source": str(self.src.path), "layertap": __version__}
        self.manifest["postprocessing"] = [*self.src.manifest.get("postprocessing", []), record]
        # A different spec: the extract command of the source run must not mistake this for its own.
        self.manifest["spec"] = {**self.manifest.get("spec", {}), "postprocessing": self.manifest["postprocessing"]}
        self.manifest["storage"] = {"format": "zarr", "chunk_rows": min(self.chunk_rows or [0]), "compression": None}
        self.manifest["status"] = "complete"
        self.manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            write_json_atomic(self.path / MANIFEST, self.manifest)
        except OSError as err:
            raise disk_error(err, self.path) from None
        return open_run(self.path)


#: manifest key of a postprocess output being written (the source run's path)
_UNFINISHED = "postprocessing_unfinished"


def _unfinished_postprocess(path: Path) -> bool:
    """Whether ``path`` holds an unfinished postprocess output (safe to replace), not a run of its own."""
    try:
        manifest = read_json(path / MANIFEST)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("status") != "complete" and _UNFINISHED in manifest


def _source(run: Run | str | os.PathLike[str]) -> Run:
    run = run if isinstance(run, Run) else open_run(run)
    if not run.complete:
        raise LayertapError(f"{run.path} is not complete; run the same extract command again to finish it first")
    return run


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
    """Write a new run at ``out`` with ``layers`` (default all) of ``run`` processed, in this order:

    1. ``center``: subtract each unit's mean over all images (two passes over the rows);
    2. ``normalize``: divide each image's (flattened) vector by its l2 norm;
    3. ``pca`` (k, a variance fraction, an unfitted :class:`PCA` as a template, or fitted PCAs
       per layer): scores (images, k), fitted per layer on the data after steps 1-2; fits are
       saved to ``out/pca/<layer>.npz`` (``PCA.load`` applies them to new images); or
       ``projection`` (k or a :class:`SparseRandomProjection`, drawn with ``seed``): (images, k).

    Without pca/projection a layer keeps its shape. Outputs are float32. The manifest keeps
    the source's images and model, and records every step with its parameters under
    ``postprocessing``. Returns the new :class:`Run`.
    """
    src = _source(run)
    names = list(layers or src.layers)
    for name in names:
        src[name]  # unknown layer: one error before anything is written
    if pca is not None and projection is not None:
        raise LayertapError("choose pca or projection, not both")
    if not (center or normalize or pca is not None or projection is not None):
        raise LayertapError("nothing to do: pass center, normalize, pca and/or projection")
    if isinstance(projection, (int, np.integer)):
        projection = SparseRandomProjection(int(projection), seed=seed)
    dest = _NewRun(src, out, overwrite)
    try:
        return _postprocess_into(dest, src, names, center, normalize, pca, projection)
    except BaseException:
        dest.discard()
        raise


def _postprocess_into(
    dest: _NewRun,
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
        blocks = _Blocks([src[name]])
        if center:
            blocks = blocks.with_steps(_subtract(column_mean(blocks)))
        if normalize:
            blocks = blocks.with_steps(_l2_normalize)
        info = {"module": src.manifest["layers"][name].get("module", name), "derived_from": name}
        if pca is not None:
            model = _pca_for(pca, name)
            if not model.fitted:
                try:
                    model.fit(blocks)
                except LayertapError as err:
                    raise LayertapError(f"layer {name}: {err}", err.exit_code) from None
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
    """The seed's ``--center_acts``: a new run with each unit's mean over images subtracted."""
    return postprocess(run, out, layers, center=True, **kw)


def normalize(
    run: Run | str | os.PathLike[str], out: str | os.PathLike[str], layers: list[str] | None = None, **kw: Any
) -> Run:
    """The seed's ``--normalize_reps``: a new run with every image's vector scaled to unit l2 norm."""
    return postprocess(run, out, layers, normalize=True, **kw)


# -- feature-map ensembles ------------------------------------------------------------------------------
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
    ``penultimate``, e.g. ``"classifier.4"``) are concatenated side by side, and PCA keeps
    ``n_components`` (k, a variance fraction, or None for all). With ``normalize_layers`` each
    layer's vector is l2-normalised first so that wide maps do not dominate. Pass a fitted
    ``pca`` (from ``return_pca=True``) to apply the same reduction to new images.

    Returns scores (images, k) float32, components ordered by decreasing variance (and the PCA
    with ``return_pca``). With ``out``, also writes them as layer ``ensemble`` of a new run.
    """
    src = _source(run)
    names = [*layers, *([penultimate] if penultimate else [])]
    if not names:
        raise LayertapError("feature_map_ensemble needs at least one layer")
    arrays = [src[name] for name in names]
    blocks = _Blocks(arrays)
    if normalize_layers:
        bounds = np.cumsum([0, *blocks.dims])

        def per_layer_l2(x: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [_l2_normalize(x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], axis=1
            )

        blocks = blocks.with_steps(per_layer_l2)
    model = pca if pca is not None else PCA(n_components, method=method)
    if not model.fitted:
        model.fit(blocks)
    scores = model.transform(blocks)
    if out is not None:
        dest = _NewRun(src, out, overwrite)
        try:
            path = model.save(dest.path / "pca" / "ensemble.npz")
            dest.write("ensemble", _Blocks([scores]), (scores.shape[1],), {"module": None, "derived_from": names})
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
