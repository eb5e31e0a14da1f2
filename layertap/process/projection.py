"""Very sparse random projection (Johnson–Lindenstrauss): D units -> k, applied with torch on any device
(during extraction, as the ``srp:K`` reducer) or with numpy/scipy (post-processing, encoding models).

It depends on nothing of layertap but its errors, so extraction can apply it without importing the
post-processing stage's readers and writers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.errors import LayertapError


def johnson_lindenstrauss_min_dim(n_samples: int, eps: float = 0.1) -> int:
    """Smallest k with k >= 4 ln(n) / (eps^2/2 - eps^3/3) (Johnson–Lindenstrauss, Dasgupta & Gupta).

    Projecting n points to k dimensions with a random projection then keeps every pairwise
    squared distance within a factor (1 ± eps) of the original with high probability,
    whatever the original dimension D.

    Args:
        n_samples: the number of points (images), >= 1.
        eps: the distortion allowed, in (0, 1).

    Returns:
        k.

    Raises:
        LayertapError: eps or n_samples out of range.

    Example:
        >>> johnson_lindenstrauss_min_dim(1000, eps=0.1)
        5921
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

    Args:
        n_components: k, >= 1.
        seed: the seed R is drawn with.
        density: the fraction of nonzeros, in (0, 1], or ``"auto"`` (1/sqrt(D)).
        dense_max_bytes: the largest dense float32 R torch uses; above it, sparse CSR.

    Raises:
        LayertapError: k < 1 or a density out of range.

    Example:
        >>> proj = SparseRandomProjection(16, seed=0)
        >>> proj.apply_numpy(np.ones((3, 1000))).shape
        (3, 16)
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
        """The density used for ``n_features`` units.

        Args:
            n_features: D.

        Returns:
            ``density``, or 1/sqrt(D) for ``"auto"``.
        """
        return 1 / math.sqrt(n_features) if self.density == "auto" else float(self.density)

    def triplets(self, n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nonzeros of R (D x k), drawn once per D and kept.

        Args:
            n_features: D.

        Returns:
            ``(unit index, component index, value)`` arrays, sorted by component.
        """
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
        """R as a dense array (for inspection and small D).

        Args:
            n_features: D.

        Returns:
            (D, k) float64.
        """
        unit, comp, value = self.triplets(n_features)
        r = np.zeros((n_features, self.n_components), dtype=np.float64)
        r[unit, comp] = value
        return r

    def torch_matrix(self, n_features: int, device: Any = "cpu") -> Any:
        """R for torch on ``device``, built once per (D, device) and kept.

        Args:
            n_features: D.
            device: the torch device.

        Returns:
            A dense (D, k) float32 tensor, or a sparse CSR tensor of R transposed (k, D).
        """
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
        """Project on the CPU with scipy.sparse (float64 sums). Needs ``pip install 'layertap[postprocess]'``.

        Args:
            x: (n, ...) values (trailing axes flattened to D).

        Returns:
            (n, k) float32.

        Raises:
            MissingDependencyError: scipy is not installed.
        """
        sparse = require("scipy.sparse", "postprocess", "apply_numpy")
        x = np.asarray(x)
        flat = x.reshape(len(x), -1)
        unit, comp, value = self.triplets(flat.shape[1])
        rt = sparse.csr_matrix((value, (comp, unit)), shape=(self.n_components, flat.shape[1]))
        return np.asarray(rt @ flat.T.astype(np.float64)).T.astype(np.float32)

    def record(self) -> dict[str, Any]:
        """What the manifest records about the projection.

        Returns:
            ``{"n_components", "seed", "density"}``.
        """
        return {"n_components": self.n_components, "seed": self.seed, "density": self.density}

    def __repr__(self) -> str:
        return f"SparseRandomProjection(n_components={self.n_components}, seed={self.seed}, density={self.density!r})"
