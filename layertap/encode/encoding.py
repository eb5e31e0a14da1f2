"""``encode``: score every stored layer of a run as an encoding model of a response matrix.

For each layer and each outer fold (K-fold over stimuli, or one given train/test split):
features are z-scored with the training stimuli's mean and standard deviation, optionally reduced
(PCA fitted on the training stimuli, or a sparse random projection), ridge is fitted on the
training stimuli with an alpha per target chosen by an inner K-fold inside them
(:mod:`layertap.encode.ridge`), and the held-out stimuli are predicted. Pearson r and R^2 are
computed per target on each held-out fold and averaged over folds. Nothing about the held-out
stimuli (features or responses) enters the fit.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from layertap._optional import require
from layertap.analysis.similarity import select_layers
from layertap.encode.ceiling import CEILINGS, reliability
from layertap.encode.responses import Responses, match_ids, prepare_responses, read_labels
from layertap.encode.ridge import BACKENDS, choose_solver, fit_predict, himalaya_backend, parse_alphas
from layertap.encode.scores import EncodingScores
from layertap.errors import LayertapError
from layertap.hashing import file_sha256
from layertap.process.projection import SparseRandomProjection
from layertap.store.blocks import rows_for_bytes
from layertap.store.run import Run, open_complete_run

log = logging.getLogger("layertap")

#: the per-target metrics written to the table
METRICS = ("r", "r2", "r_norm", "r2_norm", "alpha")
#: target blocks are sized so that one block's weights/predictions stay near this many bytes
BLOCK_BYTES = 512 << 20




def read_rows(arr: Any, rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of a LayerArray or array, flattened, read chunk by chunk.

    Args:
        arr: a LayerArray (read one chunk at a time, never whole) or a numpy array (N, ...).
        rows: the row indices wanted.
        dtype: the output dtype.

    Returns:
        (len(rows), features) in ``dtype``, in the order of ``rows``.

    Example:
        >>> read_rows(np.arange(12.0).reshape(4, 3), np.array([2, 0]), np.dtype(np.float32)).tolist()
        [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]
    """
    if isinstance(arr, np.ndarray):
        return arr[rows].reshape(len(rows), -1).astype(dtype, copy=False)
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    n_feat = int(np.prod(arr.shape[1:]))
    out = np.empty((len(rows), n_feat), dtype=dtype)
    for start, block in arr.iter_chunks():
        lo, hi = np.searchsorted(srt, [start, start + len(block)])
        if hi > lo:
            out[order[lo:hi]] = block[srt[lo:hi] - start].reshape(hi - lo, -1)
    return out


def pearson_columns(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns (NaN where either column is constant).

    Args:
        pred: (stimuli, targets) predictions.
        y: (stimuli, targets) responses.

    Returns:
        (targets,) r.

    Example:
        >>> pearson_columns(np.array([[1.0], [2.0], [3.0]]), np.array([[2.0], [4.0], [7.0]])).round(4).tolist()
        [0.9934]
    """
    pc = pred - pred.mean(0)
    yc = y - y.mean(0)
    with np.errstate(all="ignore"):
        return (pc * yc).sum(0) / np.sqrt((pc * pc).sum(0) * (yc * yc).sum(0))


def r2_columns(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column, 1 - SS_res / SS_tot with SS_tot around the held-out mean.

    As scikit-learn's ``r2_score(multioutput="raw_values")``, including a column constant in this fold
    (SS_tot = 0): 1 for a perfect prediction, else 0 (not -inf, which would sink the mean over folds).

    Args:
        pred: (stimuli, targets) predictions.
        y: (stimuli, targets) responses.

    Returns:
        (targets,) R^2.

    Example:
        >>> r2_columns(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [2.0], [4.0]])).round(4).tolist()
        [0.7857]
    """
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(all="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    return np.where(ss_tot > 0, r2, np.where(ss_res == 0, 1.0, 0.0))


def outer_splits(
    resp: Responses, images: Sequence[str], folds: int, test_split: Any, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The outer (train, test) splits: K-fold (shuffled with ``seed``) or a given test set.

    Args:
        resp: the matched responses.
        images: the run's image ids (to match a test split given by id).
        folds: K (>= 2) when ``test_split`` is None.
        test_split: the test stimuli' ids (a sequence, or a .txt/.tsv/.csv file of ids), or None.
        seed: the shuffling seed.

    Returns:
        ``[(train, test)]`` positions into the response stimuli.

    Raises:
        LayertapError: too few stimuli for the folds, or a split with fewer than 2 stimuli on a side.

    Example:
        >>> splits = outer_splits(resp, run.images, 5, None, seed=0)  # doctest: +SKIP
    """
    n = len(resp.ids)
    if test_split is not None:
        test_ids = read_labels(test_split, ("stimulus", "stimulus_id", "id", "image", "test"), None, "test ids")
        test_rows, missing = match_ids(test_ids, images)
        if missing:
            raise LayertapError(
                f"{len(missing)} test ids are not images of the run (e.g. {test_ids[missing[0]]!r}); "
                "name test stimuli as in --stimuli"
            )
        pos = {int(r): i for i, r in enumerate(resp.rows)}
        absent = [test_ids[i] for i, r in enumerate(test_rows) if int(r) not in pos]
        if absent:
            raise LayertapError(f"{len(absent)} test stimuli have no responses (e.g. {absent[0]!r})")
        test = np.array(sorted({pos[int(r)] for r in test_rows}), dtype=np.int64)
        train = np.setdiff1d(np.arange(n), test)
        if len(train) < 2 or len(test) < 2:
            raise LayertapError(f"the test split leaves {len(train)} training and {len(test)} test stimuli; need 2+ each")
        return [(train, test)]
    if folds < 2:
        raise LayertapError(f"folds must be at least 2, got {folds}")
    if n < 2 * folds:
        raise LayertapError(f"{n} stimuli are too few for {folds} folds (need at least 2 per fold): use fewer --folds")
    model_selection = require("sklearn.model_selection", "encode", "encoding models")
    return list(model_selection.KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.arange(n)))


def _standardise(x: np.ndarray, train: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """z-score every feature with the training rows' mean and (population) sd; constant features -> 0."""
    xt = x[train]
    mu = xt.mean(0, dtype=np.float64)
    sd = xt.std(0, dtype=np.float64)
    del xt
    scale = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    out = x.astype(dtype, copy=True)  # one copy in the working dtype (float32: half the memory of float64 temps)
    out -= mu.astype(dtype)
    out *= scale.astype(dtype)
    return out


def parse_reduce(spec: str | None) -> tuple[str, int, int] | None:
    """A feature reduction spec, fitted per fold on the training stimuli.

    Args:
        spec: ``"pca:K"`` or ``"srp:K[:SEED]"``, or None.

    Returns:
        ``(kind, K, seed)``, or None.

    Raises:
        LayertapError: a malformed spec.

    Example:
        >>> parse_reduce("srp:256:3"), parse_reduce(None)
        (('srp', 256, 3), None)
    """
    if spec is None:
        return None
    parts = str(spec).split(":")
    try:
        if parts[0] in ("pca", "srp") and len(parts) in (2, 3) and not (parts[0] == "pca" and len(parts) == 3):
            k = int(parts[1])
            if k >= 1:
                return parts[0], k, int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        pass
    raise LayertapError(f"reduce '{spec}': use pca:K or srp:K[:SEED] (K >= 1)")


def _reduce(xs: np.ndarray, train: np.ndarray, how: tuple[str, int, int], seed: int) -> np.ndarray:
    kind, k, rseed = how
    if kind == "pca":
        decomposition = require("sklearn.decomposition", "encode", f"reduce 'pca:{k}'")
        if k > min(len(train), xs.shape[1]):
            raise LayertapError(f"pca:{k} asks for more components than min(training stimuli, features) allows")
        pca = decomposition.PCA(n_components=k, random_state=seed).fit(xs[train])  # training stimuli only
        return pca.transform(xs).astype(xs.dtype, copy=False)
    sparse = require("scipy.sparse", "encode", f"reduce 'srp:{k}'")
    # layertap's SRP matrix (the one --reduce srp:K applies at extraction), applied in the working dtype
    unit, comp, value = SparseRandomProjection(k, seed=rseed).triplets(xs.shape[1])
    r = sparse.csr_matrix((value.astype(xs.dtype), (unit, comp)), shape=(xs.shape[1], k))
    return np.asarray((r.T @ xs.T).T, dtype=xs.dtype)


def _bad_targets(y: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    finite = np.all(np.isfinite(y), axis=0)
    with np.errstate(all="ignore"):
        const = np.zeros(y.shape[1], dtype=bool)
        const[finite] = np.ptp(y[:, finite], axis=0) == 0
    return finite & ~const, {"nan_or_inf": int((~finite).sum()), "constant": int(const.sum())}


@contextlib.contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """Limit BLAS (threadpoolctl) and torch intra-op threads inside the block; None leaves them alone."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise LayertapError(f"threads must be at least 1, got {threads}")
    import torch  # torch only here: reading a run and fitting with numpy never imports it

    threadpool_limits = require("threadpoolctl", "encode", "limiting threads").threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("layertap", "numpy", "himalaya", "scikit-learn", "scipy", "pandas", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def encode(
    run: Any,
    responses: Any,
    stimuli: Any = None,
    *,
    layers: Sequence[str] | str | None = None,
    folds: int = 5,
    test_split: Any = None,
    alphas: Any = None,
    inner_folds: int = 5,
    reduce: str | None = None,
    solver: str = "auto",
    backend: str = "auto",
    dtype: str = "float32",
    repeats: Any = None,
    ceiling: str | None = None,
    rois: Any = None,
    key: str | None = None,
    repeats_key: str | None = None,
    stimulus_column: str | None = None,
    roi_column: str | None = None,
    on_missing: str = "error",
    transpose: bool = False,
    seed: int = 0,
    n_bootstrap: int = 1000,
    target_block: int | None = None,
    progress: bool | None = None,
    keep_predictions: bool = False,
    images: Sequence[str] | None = None,
    threads: int | None = None,
) -> Any:
    """Score every (or each named) layer of a run as a ridge encoding model of ``responses``.

    Args:
        run: a :class:`~layertap.Run` or run directory, or ``{layer: (rows, ...) array}`` of features
            computed elsewhere (then ``images`` names the rows).
        responses: (stimuli x targets) or (repetitions x stimuli x targets, NaN where missing) array
            or file (.npy, .h5, .mat, .csv, .tsv); see :func:`~layertap.encode.responses.prepare_responses`.
        stimuli: one id per response stimulus, matched to the run's images by path, path stem, file
            name or stem (a list or a .txt/.tsv/.csv file); ``run.images`` if the rows follow the run.
        layers: names or glob patterns (default: all stored layers).
        folds: outer K (shuffled K-fold, ``seed``), unless ``test_split`` gives the test stimuli.
        test_split: ids of the test stimuli (list or file); the rest are the training stimuli.
        alphas: ridge grid, ``"LO:HI:N"`` (log-spaced), ``"a,b,c"`` or a sequence (default 1e-2:1e5:15).
        inner_folds: K of the inner CV choosing each target's alpha inside the training stimuli.
        reduce: ``"pca:K"`` (fitted on training stimuli) or ``"srp:K[:SEED]"``; None keeps all features.
        solver: ``"auto"`` (dual/kernel ridge when features outnumber training stimuli), ``"primal"``, ``"dual"``.
        backend: himalaya backend: ``"auto"`` (torch on CUDA when available, else numpy), ``"numpy"``, ``"torch"``,
            ``"torch_cuda"``.
        dtype: ``"float32"`` (fast) or ``"float64"``.
        repeats: (repetitions x stimuli x targets) for the noise ceiling when ``responses`` is averaged.
        ceiling: ``"split-half"`` (Spearman-Brown, the default) or ``"ncsnr"`` (NSD); see
            :mod:`layertap.encode.ceiling`. Naming one without repeated measurements is an error.
        rois: one ROI label per target (list or file) or ``{roi: target indices or mask}``.
        key, repeats_key: dataset/variable in .h5/.mat files.
        stimulus_column, roi_column: column names in .tsv/.csv tables.
        on_missing: ``"error"`` or ``"drop"`` for stimulus ids that are not images of the run.
        transpose: responses are (targets x stimuli).
        seed: outer and inner fold shuffling, splits of the ceiling, bootstrap.
        n_bootstrap: resamples of targets for the per-ROI confidence intervals.
        target_block: targets per solver call (default: sized to ~512 MB of weights).
        progress: progress bar per layer (default: on a terminal).
        keep_predictions: keep the held-out predictions, ``scores.predictions[layer]`` (stimuli x
            targets, in the order of ``scores.manifest['stimuli']['ids']``; NaN for left-out targets).
        images: with a ``{layer: array}`` mapping, one id per feature row (matched like a run's images).
        threads: BLAS (and torch) threads while fitting (default: the libraries' own). On a busy shared
            machine 1 can be much faster: idle BLAS threads spin while waiting for a core.

    Returns:
        :class:`~layertap.encode.scores.EncodingScores`.

    Example:
        >>> scores = encode("./acts", "betas.h5", stimuli="stimulus_ids.tsv", folds=5)  # doctest: +SKIP
        >>> scores.best_layer(roi="V4")  # doctest: +SKIP
    """
    # None = the default; an explicitly asked-for ceiling without repeats must not be dropped silently
    ceiling_asked = ceiling is not None
    ceiling = ceiling or "split-half"
    if ceiling not in CEILINGS:
        raise LayertapError(f"unknown ceiling '{ceiling}'; choose one of {', '.join(CEILINGS)}")
    if backend not in BACKENDS:
        raise LayertapError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if dtype not in ("float32", "float64"):
        raise LayertapError(f"dtype must be float32 or float64, not {dtype!r}")
    if inner_folds < 2:
        raise LayertapError(f"inner folds must be at least 2, got {inner_folds}")
    np_dtype = np.dtype(dtype)
    grid = parse_alphas(alphas)
    how = parse_reduce(reduce)
    if isinstance(run, Mapping):  # features computed elsewhere: {layer: (rows, ...) array}
        if images is None:
            raise LayertapError("with a {layer: array} mapping, give images=[one id per feature row]")
        given = {str(k): v if hasattr(v, "iter_chunks") else np.asarray(v) for k, v in run.items()}
        image_ids = [str(i) for i in images]
        wrong = [k for k, v in given.items() if len(v) != len(image_ids)]
        if wrong:
            raise LayertapError(
                f"layer '{wrong[0]}' has {len(given[wrong[0]])} rows but {len(image_ids)} images were given"
            )
        names = [n for n in given if layers is None or n in ([layers] if isinstance(layers, str) else layers)]
        if not names:
            raise LayertapError(f"no layer named {layers} among {', '.join(given)}")
        features: Mapping[str, Any] | Run = given
        run_record: dict[str, Any] = {"path": None, "model": "in-memory features"}
    else:
        r = open_complete_run(run)
        names = select_layers(r, layers)
        features, image_ids = r, r.images
        run_record = {"path": str(r.path.resolve()), "model": r.manifest.model}
    resp = prepare_responses(
        image_ids,
        responses,
        stimuli,
        key=key,
        repeats=repeats,
        repeats_key=repeats_key,
        rois=rois,
        stimulus_column=stimulus_column,
        roi_column=roi_column,
        on_missing=on_missing,
        transpose=transpose,
    )
    y_all = resp.data
    n_stim, n_targets = y_all.shape
    splits = outer_splits(resp, image_ids, folds, test_split, seed)
    min_train = min(len(tr) for tr, _ in splits)
    if min_train < 2 * inner_folds:
        raise LayertapError(
            f"{min_train} training stimuli are too few for {inner_folds} inner folds: use fewer --inner-folds or more stimuli"
        )
    valid, bad = _bad_targets(y_all)
    if not valid.any():
        raise LayertapError(f"no usable target: {bad['nan_or_inf']} have NaN/inf responses, {bad['constant']} are constant")
    if not valid.all():
        log.warning(
            "left out %d of %d targets (%d with NaN/inf responses, %d constant over stimuli); their scores are NaN",
            int((~valid).sum()),
            n_targets,
            bad["nan_or_inf"],
            bad["constant"],
        )
    vidx = np.flatnonzero(valid)
    y = y_all[:, vidx].astype(np_dtype)

    rho = None
    if resp.repeats is None and ceiling_asked:
        raise LayertapError(
            f"a '{ceiling}' noise ceiling needs repeated measurements: pass --repeats FILE / repeats=... "
            "(repetitions x stimuli x targets) or 3-D responses, or leave out --ceiling"
        )
    if resp.repeats is not None:
        rho = np.full(n_targets, np.nan)
        rho[vidx] = reliability(resp.repeats[:, :, vidx], ceiling, seed=seed)

    results: dict[str, dict[str, np.ndarray]] = {}
    predictions: dict[str, np.ndarray] = {}
    layer_info: dict[str, Any] = {}
    t_all = time.perf_counter()
    with himalaya_backend(backend) as hb, _thread_limit(threads):
        backend_used = str(hb.name)
        for name in names:
            t0 = time.perf_counter()
            x = read_rows(features[name], resp.rows, np_dtype)
            n_feat_in = x.shape[1]
            n_feat = how[1] if how else n_feat_in
            kind = choose_solver(solver, min_train, n_feat)
            width = max(n_feat, n_stim) if kind == "primal" else n_stim
            block = target_block or rows_for_bytes(width * np_dtype.itemsize * 4, BLOCK_BYTES, n_rows=len(vidx), limit=None)
            blocks = [slice(s, s + block) for s in range(0, len(vidx), block)]
            r_sum = np.zeros(len(vidx))
            r2_sum = np.zeros(len(vidx))
            log_alpha = np.zeros(len(vidx))
            chosen_counts = np.zeros(len(grid), dtype=np.int64)
            if keep_predictions:
                predictions[name] = np.full((n_stim, n_targets), np.nan)
            # disable=None: a bar only on a terminal, unless progress says otherwise
            off = None if progress is None else not progress
            bar = tqdm(total=len(splits) * len(blocks), desc=f"encode {name}", unit="fit", disable=off, leave=False)
            for train, test in splits:
                xs = _standardise(x, train, np_dtype)
                if how:
                    xs = _reduce(xs, train, how, seed)
                for b in blocks:
                    pred, best, used = fit_predict(
                        xs[train], y[train, b], xs[test], grid, inner_folds=inner_folds, seed=seed, solver=kind
                    )
                    pred = pred.astype(np.float64)
                    if keep_predictions:
                        predictions[name][np.ix_(test, vidx[b])] = pred
                    yt = y[test, b].astype(np.float64)
                    r_sum[b] += np.nan_to_num(pearson_columns(pred, yt))
                    r2_sum[b] += r2_columns(pred, yt)
                    log_alpha[b] += np.log(best.astype(np.float64))
                    chosen_counts += np.bincount(
                        np.abs(np.log(grid)[None, :] - np.log(best.astype(np.float64))[:, None]).argmin(1),
                        minlength=len(grid),
                    )
                    bar.update(1)
                del xs
            bar.close()
            k = len(splits)
            full = {m: np.full(n_targets, np.nan) for m in ("r", "r2", "alpha")}
            full["r"][vidx] = r_sum / k
            full["r2"][vidx] = r2_sum / k
            full["alpha"][vidx] = np.exp(log_alpha / k)  # geometric mean over folds
            with np.errstate(all="ignore"):
                full["r_norm"] = full["r"] / np.sqrt(rho) if rho is not None else np.full(n_targets, np.nan)
                full["r2_norm"] = full["r2"] / rho if rho is not None else np.full(n_targets, np.nan)
                if rho is not None:
                    full["r_norm"][~(rho > 0)] = np.nan
                    full["r2_norm"][~(rho > 0)] = np.nan
            results[name] = full
            seconds = time.perf_counter() - t0
            layer_info[name] = {
                "features": n_feat_in,
                "features_fitted": n_feat,
                "solver": kind,
                "target_block": block,
                "seconds": round(seconds, 3),
                "alphas_chosen": {f"{a:.6g}": int(c) for a, c in zip(grid, chosen_counts, strict=True) if c},
            }
            log.info("%s: %d features, %s ridge, %.1f s, median r %.3f", name, n_feat, kind, seconds,
                     float(np.nanmedian(full["r"])))
        del x

    files = []
    for p in resp.files + ([Path(test_split)] if isinstance(test_split, (str, os.PathLike)) else []):
        try:
            files.append({"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": file_sha256(p)})
        except OSError:
            files.append({"path": str(p)})
    manifest = {
        "kind": "layertap-encode",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t_all, 3),
        "run": run_record,
        "layers": layer_info,
        "data_files": files,
        "stimuli": {
            "n": n_stim,
            "ids": resp.ids,
            "matched_by": "stimulus id (relative path, path stem, file name or stem)",
            "dropped_not_in_run": resp.dropped_stimuli,
            "run_images_without_responses": resp.unused_images,
        },
        "targets": {
            "n": n_targets,
            "scored": int(valid.sum()),
            "left_out": {**bad, "indices": np.flatnonzero(~valid)[:1000].tolist()},
        },
        "folds": {
            "kind": "given test split" if test_split is not None else "k-fold",
            "k": len(splits),
            "seed": seed,
            "shuffle": test_split is None,
            "test_stimuli": [[resp.ids[i] for i in te] for _, te in splits],
        },
        "inner_cv": {"kind": "k-fold (sklearn KFold, shuffled)", "k": inner_folds, "seed": seed,
                     "score": "negative squared error per target, mean over inner folds (himalaya)"},
        "alphas": {"grid": grid.tolist(), "per_target": "geometric mean over outer folds, in the table (metric alpha)"},
        "solver": {"library": "himalaya", "primal": "RidgeCV(solver='svd')",
                   "dual": "KernelRidgeCV(kernel='linear', solver='eigenvalues')", "requested": solver,
                   "backend": backend_used, "dtype": dtype, "fit_intercept": True, "threads": threads},
        "preprocessing": {"standardise": "features z-scored with the training stimuli's mean and sd (ddof=0)",
                          "reduce": reduce, "reduce_fitted_on": "training stimuli of each fold" if how else None},
        "ceiling": None if rho is None else {
            "method": ceiling,
            "repetitions": 0 if resp.repeats is None else int(resp.repeats.shape[0]),
            "reference": "Spearman-Brown split-half (100 random splits; odd/unequal repetitions stepped up exactly)" if ceiling == "split-half"
            else "NCSNR, Allen et al. 2022 Nat Neurosci 25:116 (NC = 100 ncsnr^2 / (ncsnr^2 + 1/n))",
            "normalised": "r_norm = r / sqrt(rho), r2_norm = r2 / rho",
        },
        "scores": {"r": "Pearson r per target on each held-out fold, mean over folds (NaN in a fold counts 0)",
                   "r2": "1 - SS_res/SS_tot around the held-out fold's mean (sklearn r2_score), mean over folds"},
        "bootstrap": {"n": n_bootstrap, "seed": seed, "ci": 0.95, "statistic": "median over targets",
                      "resampled": "targets (percentile interval)"},
        "versions": _versions(),
        "cpu": platform.processor() or platform.machine(),
        "threads": os.cpu_count(),
    }
    scores = EncodingScores.from_arrays(
        results, names, rho=rho, rois=resp.rois, roi_labels=resp.roi_labels, manifest=manifest,
        n_bootstrap=n_bootstrap, seed=seed,
    )
    scores.predictions = predictions or None
    return scores
