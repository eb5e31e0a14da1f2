"""Noise ceilings: how well a perfect model could do, given how reliable the data are.

Two estimators for encoding models, both from repeated measurements ``(repetitions, stimuli,
targets)`` with NaN where a stimulus was not repeated, and both returning the *reliability* rho of
the response that is fitted (the mean over all repetitions of each stimulus): the fraction of its
variance across stimuli that is signal. A model that predicts the true signal exactly reaches, in
expectation, R^2 = rho and Pearson r = sqrt(rho); normalised scores are R^2 / rho and r / sqrt(rho).

- ``"split-half"``: the repetitions of each stimulus are split at random into two halves, the two
  half-means are correlated across stimuli (per target), the correlation is averaged over
  ``n_splits`` splits and stepped up to the full number of repetitions with the Spearman-Brown
  formula rho = 2 r / (1 + r) (Spearman 1910; Brown 1910). Stimuli seen once cannot be split and
  are left out of r; with an odd count one half holds one more repetition. Odd and unequal counts
  are stepped up exactly (see ``_step_up``): to the reliability of the mean over each stimulus's
  own n_i trials, with 1/n the mean of 1/n_i as for ``"ncsnr"`` (plain 2r/(1+r) would be 0.02
  low with 3 repetitions and 0.06 high with 1-4).
- ``"ncsnr"``: the noise-ceiling signal-to-noise ratio of the Natural Scenes Dataset (Allen et al.
  2022, Nature Neuroscience 25:116-126, "A massive 7T fMRI dataset to bridge cognitive neuroscience
  and artificial intelligence", Methods: noise ceiling). The noise variance is the mean over
  stimuli (with >= 2 repetitions) of the variance across repetitions (ddof=1); the signal variance
  is the variance of all single trials minus the noise variance (floored at 0); ncsnr =
  sd_signal / sd_noise and NC = 100 * ncsnr^2 / (ncsnr^2 + 1/n), with n the number of trials
  averaged. With unequal numbers of trials, 1/n is the mean over stimuli of 1/n_i (NSD's
  (A/3 + B/2 + C/1) / (A + B + C)). NSD z-scores betas per session first (total variance 1); here
  the total variance is measured, which is the same for z-scored data. rho = NC / 100.

For RSA, :func:`rdm_noise_ceiling` gives the lower and upper bounds of rsatoolbox's
``boot_noise_ceiling`` (Nili et al. 2014, PLoS Comput Biol 10:e1003553): upper = the mean over
subjects of the similarity of each subject's RDM with the pooled RDM of all subjects, lower = the
same with the pooled RDM of the other subjects (leave one subject out).
"""

from __future__ import annotations

import warnings

import numpy as np

from layertap.analysis.compare import compare_rdms, rank_average
from layertap.analysis.rdms import upper_triangle
from layertap.errors import LayertapError

CEILINGS = ("split-half", "ncsnr")


def _check_repeats(repeats: np.ndarray) -> np.ndarray:
    rep = np.asarray(repeats, dtype=np.float64)
    if rep.ndim != 3:
        raise LayertapError(f"repeats must be (repetitions x stimuli x targets), got shape {rep.shape}")
    counts = np.sum(~np.isnan(rep), axis=0)
    if not np.any(counts >= 2):
        raise LayertapError("no stimulus has two or more repetitions: a noise ceiling needs repeated measurements")
    return rep


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns of (n, t) a and b, over rows where both are finite."""
    ok = np.isfinite(a) & np.isfinite(b)
    n = ok.sum(0)
    a0, b0 = np.where(ok, a, 0.0), np.where(ok, b, 0.0)
    with np.errstate(all="ignore"):
        ma, mb = a0.sum(0) / n, b0.sum(0) / n
        da, db = np.where(ok, a0 - ma, 0.0), np.where(ok, b0 - mb, 0.0)
        r = (da * db).sum(0) / np.sqrt((da * da).sum(0) * (db * db).sum(0))
    return np.where(n >= 3, r, np.nan)


def split_half_reliability(repeats: np.ndarray, n_splits: int = 100, seed: int = 0) -> np.ndarray:
    """Spearman-Brown corrected split-half reliability of the mean over repetitions, per target.

    Args:
        repeats: (repetitions, stimuli, targets), NaN where a stimulus was not repeated.
        n_splits: random splits averaged.
        seed: seed of the splits.

    Returns:
        (targets,) rho of the mean over each stimulus's repetitions. With an equal, even number of
        repetitions this is Spearman-Brown's 2 r / (1 + r), r the split-half correlation averaged over
        splits; otherwise the step-up of :func:`_step_up` (exact for odd and unequal counts).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> signal = rng.normal(size=(1, 40, 3))
        >>> rho = split_half_reliability(signal + 0.5 * rng.normal(size=(6, 40, 3)))
        >>> bool((rho > 0.8).all())
        True
    """
    rep = _check_repeats(repeats)
    avail = np.any(~np.isnan(rep), axis=2)  # (R, S): repetition r of stimulus s exists
    k = avail.sum(0)
    # the fitted response is the mean over all of each stimulus's trials, stimuli seen once included
    inv_n = float(np.mean(1.0 / k[k > 0]))
    use = k >= 2
    rep, avail, k = rep[:, use], avail[:, use], k[use]
    rng = np.random.default_rng(seed)
    halves = []  # the same random halves for every target
    for _ in range(n_splits):
        keys = np.where(avail, rng.random(avail.shape), np.inf)
        rank = np.argsort(np.argsort(keys, axis=0), axis=0)  # random order of the available repetitions
        in_a = avail & (rank < (k // 2)[None, :])
        halves.append((in_a, avail & ~in_a))
    n_t = rep.shape[2]
    out = np.empty(n_t)
    step = max(1, (32 << 20) // (8 * rep.shape[0] * max(1, rep.shape[1])))  # targets per block: ~32 MB temporaries
    for t0 in range(0, n_t, step):
        block = rep[:, :, t0 : t0 + step]
        total = np.zeros(block.shape[2])
        for in_a, in_b in halves:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a half with no value for a stimulus: NaN
                half_a = np.nanmean(np.where(in_a[..., None], block, np.nan), axis=0)
                half_b = np.nanmean(np.where(in_b[..., None], block, np.nan), axis=0)
            total += _pearson_columns(half_a, half_b)
        out[t0 : t0 + step] = total / n_splits
    half = k // 2  # repetitions in the first half of each split stimulus; the second holds k - half
    return _step_up(out, float(np.mean(1.0 / half)), float(np.mean(1.0 / (k - half))), inv_n)


def _step_up(r: np.ndarray, inv_a: float, inv_b: float, inv_n: float) -> np.ndarray:
    """Reliability of the full trial mean from the correlation ``r`` of two half means.

    With signal variance S and single-trial noise variance N, a mean over m trials has variance
    S + N/m, so two half means whose stimuli average 1/m_a = ``inv_a`` and 1/m_b = ``inv_b`` correlate
    at r = S / sqrt((S + N inv_a)(S + N inv_b)). Solving for q = N/S and returning S / (S + N inv_n)
    (``inv_n``: the mean over stimuli of 1/n_i, as NSD's noise ceiling) gives Spearman-Brown's
    2r / (1 + r) for equal halves and corrects it for odd counts (halves of 1 and 2 trials of 3: r is
    lower than for two halves of 1.5) and for stimuli with unequal repetitions. r <= 0 (no signal
    detected) keeps Spearman-Brown's value, <= 0.
    """
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(all="ignore"):
        a, b = inv_a, inv_b
        disc = (a + b) ** 2 + 4 * a * b * (1.0 / r**2 - 1.0)
        q = (np.sqrt(disc) - (a + b)) / (2 * a * b)  # the root q >= 0 of (1 + q a)(1 + q b) = 1 / r^2
        return np.where(r > 0, 1.0 / (1.0 + q * inv_n), 2 * r / (1 + r))


def ncsnr(repeats: np.ndarray) -> np.ndarray:
    """NSD's noise-ceiling SNR per target (Allen et al. 2022): sd_signal / sd_noise.

    Args:
        repeats: (repetitions, stimuli, targets), NaN where missing.

    Returns:
        (targets,) ncsnr (0 where the signal variance estimate is not positive).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> trials = rng.normal(size=(1, 50, 2)) + 0.5 * rng.normal(size=(3, 50, 2))
        >>> ncsnr(trials).shape
        (2,)
    """
    rep = _check_repeats(repeats)
    counts = np.sum(~np.isnan(rep), axis=0)  # (S, T)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # stimuli seen once: NaN variance, by design
        var_within = np.nanvar(rep, axis=0, ddof=1)  # (S, T), NaN where fewer than 2 trials
        var_within = np.where(counts >= 2, var_within, np.nan)
        noise_var = np.nanmean(var_within, axis=0)
        total_var = np.nanvar(rep.reshape(-1, rep.shape[2]), axis=0, ddof=1)
        signal_var = np.maximum(total_var - noise_var, 0.0)
        return np.sqrt(signal_var) / np.sqrt(noise_var)


def nsd_noise_ceiling(repeats: np.ndarray) -> np.ndarray:
    """NSD's noise ceiling in percent: 100 * ncsnr^2 / (ncsnr^2 + 1/n) (Allen et al. 2022).

    Args:
        repeats: (repetitions, stimuli, targets), NaN where missing.

    Returns:
        (targets,) NC in percent of the variance of the trial-averaged response.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> trials = rng.normal(size=(1, 50, 2)) + 0.5 * rng.normal(size=(3, 50, 2))
        >>> nc = nsd_noise_ceiling(trials)
        >>> bool(((nc > 0) & (nc < 100)).all())
        True
    """
    rep = _check_repeats(repeats)
    snr2 = ncsnr(rep) ** 2
    counts = np.sum(~np.isnan(rep), axis=0).astype(np.float64)  # (S, T)
    with np.errstate(all="ignore"):
        inv_n = np.nanmean(np.where(counts > 0, 1.0 / counts, np.nan), axis=0)
        return 100.0 * snr2 / (snr2 + inv_n)


def reliability(repeats: np.ndarray, method: str = "split-half", n_splits: int = 100, seed: int = 0) -> np.ndarray:
    """Reliability rho (0..1) of the trial-averaged response per target, by ``method``.

    Args:
        repeats: (repetitions, stimuli, targets), NaN where missing.
        method: ``"split-half"`` (Spearman-Brown) or ``"ncsnr"`` (NSD, rho = NC / 100).
        n_splits, seed: for ``"split-half"``.

    Returns:
        (targets,) rho; the ceiling of R^2 is rho, that of Pearson r is sqrt(rho).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> trials = rng.normal(size=(1, 40, 2)) + 0.3 * rng.normal(size=(4, 40, 2))
        >>> reliability(trials, "split-half").shape
        (2,)
    """
    if method == "split-half":
        return split_half_reliability(repeats, n_splits, seed)
    if method == "ncsnr":
        return nsd_noise_ceiling(repeats) / 100.0
    raise LayertapError(f"unknown noise ceiling '{method}'; choose one of {', '.join(CEILINGS)}")


# -- RSA: rsatoolbox's lower and upper bounds ------------------------------------------------------


def pool_rdms(vectors: np.ndarray, method: str) -> np.ndarray:
    """The RDM that best fits a group under ``method`` (rsatoolbox's ``pool_rdm`` definition).

    Args:
        vectors: (subjects, pairs) upper triangles.
        method: ``"pearson"`` (mean of z-scored RDMs), ``"spearman"`` / ``"kendall_tau_a"`` (mean of ranks),
            ``"cosine"`` (mean of RDMs scaled to unit root mean square).

    Returns:
        (pairs,) pooled upper triangle.

    Example:
        >>> pool_rdms(np.array([[1.0, 2.0, 3.0], [1.0, 3.0, 2.0]]), "spearman").tolist()
        [1.0, 2.5, 2.5]
    """
    v = np.asarray(vectors, dtype=np.float64)
    if method == "pearson":
        v = v - v.mean(1, keepdims=True)
        v = v / v.std(1, keepdims=True)
    elif method in ("spearman", "kendall_tau_a"):
        v = np.stack([rank_average(x) for x in v])
    elif method == "cosine":
        v = v / np.sqrt(np.mean(v**2, axis=1, keepdims=True))
    else:
        raise LayertapError(f"no noise ceiling for RDM comparison '{method}'")
    return v.mean(0)


def _compare(a: np.ndarray, b: np.ndarray, method: str) -> float:
    if method == "cosine":
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))
    return float(compare_rdms(a, b, method))


def rdm_noise_ceiling(subject_rdms: np.ndarray, method: str = "spearman") -> tuple[float, float]:
    """Lower and upper bound of the RSA noise ceiling, as rsatoolbox's ``boot_noise_ceiling``.

    Args:
        subject_rdms: (subjects, pairs) upper triangles, or (subjects, N, N) RDMs; at least 2 subjects.
        method: ``"pearson"``, ``"spearman"``, ``"kendall_tau_a"`` or ``"cosine"``.

    Returns:
        ``(lower, upper)``: mean over subjects of the similarity of each subject's RDM with the pooled
        RDM of the other subjects (lower) and of all subjects (upper).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> shared = rng.random(45)
        >>> lower, upper = rdm_noise_ceiling(shared + 0.1 * rng.random((5, 45)), "spearman")
        >>> bool(0 < lower < upper <= 1)
        True
    """
    v = np.asarray(subject_rdms, dtype=np.float64)
    if v.ndim == 3:
        v = np.stack([upper_triangle(m) for m in v])
    if v.ndim != 2 or v.shape[0] < 2:
        raise LayertapError(f"a noise ceiling needs the RDMs of at least 2 subjects, got shape {v.shape}")
    v = v[:, np.all(np.isfinite(v), axis=0)]  # pairs missing (NaN) in any subject are left out
    pooled_all = pool_rdms(v, method)
    lower, upper = [], []
    for i in range(v.shape[0]):
        others = np.delete(v, i, axis=0)
        lower.append(_compare(pool_rdms(others, method), v[i], method))
        upper.append(_compare(pooled_all, v[i], method))
    return float(np.mean(lower)), float(np.mean(upper))
