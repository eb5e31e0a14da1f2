"""Ridge regression with one regularisation per target, through himalaya.

Why himalaya (Dupré la Tour, Eickenberg, Nunez-Elizalde & Gallant 2022, NeuroImage 264:119728):
it is the voxelwise-encoding library of the field; its ``RidgeCV`` / ``KernelRidgeCV`` choose an
alpha per target by inner cross-validation over all targets at once (one decomposition per inner
fold shared by every alpha and target), it batches targets to bound memory, and it runs the same
code on numpy or torch (CPU or CUDA) backends. scikit-learn's ``RidgeCV(alpha_per_target=True)``
is exact too but float64-only, CPU-only, and refits the full weight matrix in memory.

The primal solver (``RidgeCV``, SVD of the training features) is used when there are fewer
features than training stimuli; the dual one (``KernelRidgeCV`` with a linear kernel,
eigendecomposition of the stimuli x stimuli kernel) when features outnumber stimuli: its cost
does not grow with the number of features beyond forming the kernel.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.errors import LayertapError

SOLVERS = ("auto", "primal", "dual")
BACKENDS = ("auto", "numpy", "torch", "torch_cuda")
DEFAULT_ALPHAS = "1e-2:1e5:15"


def parse_alphas(spec: str | Sequence[float] | np.ndarray | None) -> np.ndarray:
    """The alpha grid: ``"LO:HI:N"`` (N log-spaced values from LO to HI), ``"a,b,c"`` or a sequence.

    Args:
        spec: the grid; None gives ``DEFAULT_ALPHAS``.

    Returns:
        Sorted, positive float64 alphas.

    Example:
        >>> parse_alphas("1:100:3").tolist()
        [1.0, 10.0, 100.0]
    """
    spec = DEFAULT_ALPHAS if spec is None else spec
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*([^:]+):([^:]+):(\d+)\s*", spec)
        try:
            if m:
                lo, hi, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
                if lo <= 0 or hi <= 0 or n < 1:
                    raise ValueError
                alphas = np.logspace(np.log10(lo), np.log10(hi), n)
            else:
                alphas = np.array([float(x) for x in spec.split(",") if x.strip()])
        except ValueError:
            raise LayertapError(f"alphas '{spec}': give LO:HI:N (e.g. 1e-2:1e5:20) or a,b,c with positive values") from None
    else:
        alphas = np.asarray(spec, dtype=np.float64).ravel()
    if alphas.size == 0 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise LayertapError(f"alphas must be positive numbers, got {alphas.tolist()}")
    return np.unique(alphas)


def _himalaya() -> Any:
    return require("himalaya", "encode", "encoding models")


@contextlib.contextmanager
def himalaya_backend(name: str) -> Iterator[Any]:
    """Use himalaya's ``name`` backend inside the block, then restore the previous one.

    ``"auto"`` is ``"torch_cuda"`` when CUDA is available, else ``"numpy"`` (on the 2-core development
    CPU, himalaya's torch CPU backend was slower than numpy with single-threaded BLAS; bench/encode.py).

    Args:
        name: one of :data:`BACKENDS`.

    Returns:
        A context manager giving the himalaya backend module.

    Raises:
        LayertapError: an unknown backend, or one that cannot be used here (no torch/CUDA).
        MissingDependencyError: himalaya is not installed.

    Example:
        >>> with himalaya_backend("numpy") as backend:  # doctest: +SKIP
        ...     backend.name
        'numpy'
    """
    if name not in BACKENDS:
        raise LayertapError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    _himalaya()
    if name == "auto":
        import torch

        name = "torch_cuda" if torch.cuda.is_available() else "numpy"
    from himalaya.backend import get_backend, set_backend

    old = get_backend().name
    try:
        backend = set_backend(name, on_error="raise")
    except Exception as err:  # noqa: BLE001 - himalaya raises plain errors for a missing torch/CUDA
        raise LayertapError(f"himalaya backend '{name}' is not available here ({err}); use --backend numpy") from None
    try:
        yield backend
    finally:
        set_backend(old, on_error="warn")


def choose_solver(solver: str, n_train: int, n_features: int) -> str:
    """The ridge solver: primal (features x features) or dual (stimuli x stimuli).

    Args:
        solver: ``"auto"``, ``"primal"`` or ``"dual"``.
        n_train: training stimuli.
        n_features: features.

    Returns:
        ``"primal"`` or ``"dual"``: ``"auto"`` takes the dual when features outnumber training stimuli.

    Raises:
        LayertapError: an unknown solver.

    Example:
        >>> choose_solver("auto", 100, 4096)
        'dual'
    """
    if solver not in SOLVERS:
        raise LayertapError(f"unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}")
    if solver == "auto":
        return "dual" if n_features > n_train else "primal"
    return solver


def inner_splitter(n_folds: int, seed: int) -> Any:
    """The inner K-fold over training stimuli (shuffled with ``seed``) that chooses each alpha.

    Args:
        n_folds: K.
        seed: the shuffling seed.

    Returns:
        A scikit-learn ``KFold``.

    Raises:
        MissingDependencyError: scikit-learn is not installed.

    Example:
        >>> inner_splitter(5, seed=0).get_n_splits()
        5
    """
    return require("sklearn.model_selection", "encode", "encoding models").KFold(n_splits=n_folds, shuffle=True, random_state=seed)


def fit_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    alphas: np.ndarray,
    *,
    inner_folds: int = 5,
    seed: int = 0,
    solver: str = "auto",
    n_targets_batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Fit ridge with a per-target alpha chosen by inner K-fold CV on the training data only.

    Inputs must already be standardised with training statistics; an intercept is fitted (and
    centred within every inner fold by himalaya). Runs on the current himalaya backend (see
    :func:`himalaya_backend`).

    Args:
        x_train: (n_train, features).
        y_train: (n_train, targets).
        x_test: (n_test, features).
        alphas: the grid.
        inner_folds: K of the inner CV.
        seed: shuffles the inner folds.
        solver: ``"auto" | "primal" | "dual"`` (see :func:`choose_solver`).
        n_targets_batch: targets solved at once inside himalaya (memory).

    Returns:
        ``(predictions (n_test, targets) numpy, alphas chosen (targets,), solver used)``.

    Example:
        >>> with himalaya_backend("numpy"):  # doctest: +SKIP
        ...     pred, alphas, solver = fit_predict(x_train, y_train, x_test, parse_alphas(None), inner_folds=5, seed=0)
    """
    _himalaya()
    from himalaya.backend import get_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    backend = get_backend()
    kind = choose_solver(solver, x_train.shape[0], x_train.shape[1])
    params = {"n_targets_batch": n_targets_batch, "n_targets_batch_refit": n_targets_batch, "local_alpha": True}
    cv = inner_splitter(inner_folds, seed)
    alphas_arr = np.asarray(alphas, dtype=x_train.dtype)
    if kind == "primal":
        model = RidgeCV(alphas=alphas_arr, fit_intercept=True, solver="svd", solver_params=params, cv=cv)
    else:
        model = KernelRidgeCV(
            alphas=alphas_arr, kernel="linear", fit_intercept=True, solver="eigenvalues", solver_params=params, cv=cv,
            warn=False,  # himalaya's "primal would be faster" hint: the solver was chosen (or forced) knowingly
        )
    model.fit(x_train, y_train)
    pred = backend.to_numpy(model.predict(x_test))
    return np.asarray(pred), np.asarray(backend.to_numpy(model.best_alphas_)), kind
