"""Representational analysis: every number checked against an independent, straightforward reference.

References: scipy's pdist/squareform/pearsonr/spearmanr/kendalltau, explicit double loops (tau-a),
the HSIC formula with the centering matrix H = I - 11'/n written out (biased CKA), the U-statistic
definition of HSIC summed over distinct index tuples (unbiased CKA), an explicit loop over run pairs
and over leave-one-run-out folds (crossnobis).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import pdist, squareform

import layertap as lt
from layertap import analysis as an
from layertap.analysis import alignment, similarity
from layertap.analysis import rows as row_blocks
from layertap.errors import LayertapError

LAYERS = ["features.2", "classifier.4"]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> lt.Run:
    """6 JPEG crops of 3 scikit-image photos in class folders, 2 layers of a random-weights AlexNet."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("analysis")
    images = root / "images"
    for name in ("astronaut", "coffee", "chelsea"):
        photo = getattr(skimage.data, name)()
        (images / name).mkdir(parents=True)
        for i, (top, left) in enumerate([(0, 0), (100, 120)]):
            Image.fromarray(photo[top : top + 160, left : left + 200]).save(images / name / f"{i}.jpg", quality=90)
    return lt.extract(
        "alexnet", images, LAYERS, root / "run", weights="random", workers=0, batch_size=4, progress=False
    )


def flat(run: lt.Run, layer: str) -> np.ndarray:
    arr = np.asarray(run[layer], dtype=np.float64)
    return arr.reshape(arr.shape[0], -1)


# -- references -----------------------------------------------------------------------------------


def ref_tau_a(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    s = 0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
    return s / (n * (n - 1) / 2)


def ref_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H) / (n - 1) ** 2)


def ref_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012, eq. 5, written out with the diagonal-free Grams."""
    n = K.shape[0]
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return float(
        (
            np.trace(Kt @ Lt)
            + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ Kt @ Lt @ one
        )
        / (n * (n - 3))
    )


def ref_hsic_ustat(K: np.ndarray, L: np.ndarray) -> float:
    """The U-statistic definition: E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq] over distinct indices."""
    n = K.shape[0]
    t1 = np.mean([K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)])
    t2 = np.mean([K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)])
    t3 = np.mean([K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)])
    return float(t1 + t2 - 2 * t3)


def ref_cka(K: np.ndarray, L: np.ndarray, hsic=ref_hsic_biased) -> float:
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def ref_rbf(X: np.ndarray, frac: float = 0.8) -> np.ndarray:
    d = pdist(X)
    bw = frac * np.median(d)
    return np.exp(-(squareform(d) ** 2) / (2 * bw**2))


def random_orthogonal(p: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, p)))
    return q * np.sign(np.diag(r))


# -- RDMs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["correlation", "cosine", "euclidean"])
def test_rdm_matches_pdist_and_blocking(metric: str) -> None:
    X = np.random.default_rng(1).normal(size=(13, 3, 4)) + 2.0  # trailing axes are flattened
    ref = squareform(pdist(X.reshape(13, -1), metric))
    D = an.rdm(X, metric)
    assert D.shape == (13, 13) and D.dtype == np.float64
    np.testing.assert_allclose(D, ref, rtol=1e-12, atol=1e-12)
    assert np.array_equal(D, D.T) and np.all(np.diag(D) == 0)
    for block in (1, 4, 5, 13, 100):
        np.testing.assert_allclose(an.rdm(X, metric, block_rows=block), D, rtol=1e-12, atol=1e-13)


def test_correlation_rdm_is_one_minus_pearson() -> None:
    X = np.random.default_rng(2).normal(size=(8, 30))
    D = an.rdm(X.astype(np.float32), "correlation", block_rows=3)
    for i in range(8):
        for j in range(8):
            r = 1.0 if i == j else stats.pearsonr(X[i].astype(np.float32), X[j].astype(np.float32))[0]
            assert D[i, j] == pytest.approx(1 - r, abs=1e-6)


def test_rdm_to_disk_equals_rdm(tmp_path: Path) -> None:
    X = np.random.default_rng(3).normal(size=(11, 7))
    for metric in ("correlation", "euclidean"):
        path = an.rdm_to_disk(X, tmp_path / "sub" / f"{metric}.npy", metric, block_rows=4)
        back = np.load(path)
        assert back.shape == (11, 11) and back.dtype == np.float64
        np.testing.assert_array_equal(back, an.rdm(X, metric, block_rows=4))
        np.testing.assert_allclose(back, squareform(pdist(X, metric)), atol=1e-12)


def test_rdm_of_layer_array(run: lt.Run, tmp_path: Path) -> None:
    for layer in LAYERS:
        ref = squareform(pdist(flat(run, layer), "correlation"))
        np.testing.assert_allclose(an.rdm(run[layer], block_rows=4), ref, atol=1e-10)
        np.testing.assert_allclose(
            np.load(an.rdm_to_disk(run[layer], tmp_path / "r.npy", block_rows=5)), ref, atol=1e-10
        )


def test_rdm_bad_input() -> None:
    with pytest.raises(LayertapError, match="unknown RDM metric"):
        an.rdm(np.zeros((3, 2)), "manhattan")
    with pytest.raises(LayertapError, match="images x features"):
        an.rdm(np.zeros(5))
    with pytest.raises(LayertapError, match="block_rows"):
        an.rdm(np.ones((3, 2)), block_rows=0)


# -- comparing RDMs -------------------------------------------------------------------------------


def test_compare_rdms_against_scipy_and_loops() -> None:
    rng = np.random.default_rng(4)
    a = squareform(pdist(rng.normal(size=(10, 5))))
    b = squareform(pdist(rng.normal(size=(10, 5))))
    b_tied = np.round(b, 0)  # many ties
    ua, ub, ut = (x[np.triu_indices(10, k=1)] for x in (a, b, b_tied))
    assert an.compare_rdms(a, b, "pearson") == pytest.approx(stats.pearsonr(ua, ub)[0], abs=1e-12)
    assert an.compare_rdms(a, b, "spearman") == pytest.approx(stats.spearmanr(ua, ub)[0], abs=1e-12)
    assert an.compare_rdms(a, b_tied, "spearman") == pytest.approx(stats.spearmanr(ua, ut)[0], abs=1e-12)
    assert an.compare_rdms(a, b, "kendall_tau_a") == pytest.approx(ref_tau_a(ua, ub), abs=1e-12)
    assert an.compare_rdms(a, b_tied, "kendall_tau_a") == pytest.approx(ref_tau_a(ua, ut), abs=1e-12)
    # condensed vectors are accepted too; identical RDMs give 1
    assert an.compare_rdms(ua, ub, "pearson") == pytest.approx(an.compare_rdms(a, b, "pearson"))
    for method in ("pearson", "spearman", "kendall_tau_a"):
        assert an.compare_rdms(a, a, method) == pytest.approx(1.0)
    with pytest.raises(LayertapError, match="unknown RDM comparison"):
        an.compare_rdms(a, b, "cosine")
    with pytest.raises(LayertapError, match="differ in size"):
        an.compare_rdms(a, b[:5, :5])


def test_kendall_tau_a_with_ties() -> None:
    rng = np.random.default_rng(5)
    for n in (2, 3, 7, 33, 64, 65):
        x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 5, n).astype(float)
        assert an.kendall_tau_a(x, y) == pytest.approx(ref_tau_a(x, y), abs=1e-12), n
    x = rng.integers(0, 4, 40).astype(float)
    assert an.kendall_tau_a(x, x) == pytest.approx(ref_tau_a(x, x))  # < 1: tied pairs count in the denominator
    assert an.kendall_tau_a(x, x) < 1


def test_kendall_tau_a_large_against_tau_b() -> None:
    """n = 3000 with ties: against a vectorised sign sum, and tau-a = tau-b * sqrt((n0-n1)(n0-n2)) / n0."""
    rng = np.random.default_rng(6)
    n = 3000
    x, y = rng.integers(0, 50, n).astype(float), rng.normal(size=n).round(1)
    s = sum(int((np.sign(x[i] - x[i + 1 :]) * np.sign(y[i] - y[i + 1 :])).sum()) for i in range(n))
    n0 = n * (n - 1) / 2
    assert an.kendall_tau_a(x, y) == pytest.approx(s / n0, abs=1e-12)

    def ties(v: np.ndarray) -> float:
        c = np.unique(v, return_counts=True)[1]
        return float((c * (c - 1) / 2).sum())

    tau_b = stats.kendalltau(x, y).statistic
    assert an.kendall_tau_a(x, y) == pytest.approx(tau_b * np.sqrt((n0 - ties(x)) * (n0 - ties(y))) / n0, abs=1e-10)


# -- CKA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50, 5, 7), (6, 40, 30)])  # feature-space path (N large), Gram path (N small)
def test_linear_cka_biased_against_hsic(shape: tuple[int, int, int]) -> None:
    n, px, py = shape
    rng = np.random.default_rng(7)
    X = rng.normal(size=(n, px)) + 3.0
    Y = X[:, :1] * rng.normal(size=(1, py)) + rng.normal(size=(n, py))
    ref = ref_cka(X @ X.T, Y @ Y.T)  # uncentered Grams: H does the centering
    assert an.cka(X, Y) == pytest.approx(ref, rel=1e-10)
    # the feature-space formula on centered data, written out
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    feat = np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    assert an.cka(X, Y) == pytest.approx(feat, rel=1e-10)


def test_linear_cka_in_many_blocks_with_a_large_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real-world sizes run the feature-space formula over many row blocks: force 9 blocks of 7 rows
    # on data far from 0 (the shifted-data sums then need their final centring correction).
    n, px, py = 60, 5, 3
    rng = np.random.default_rng(11)
    X = rng.normal(size=(n, px)) + 1e3
    Y = X[:, :2] @ rng.normal(size=(2, py)) + rng.normal(size=(n, py)) - 1e3
    steps: list[int] = []
    real = alignment._centered_cross_products

    def spy(rx, ry, step):  # noqa: ANN001, ANN202
        steps.append(step)
        return real(rx, ry, step)

    monkeypatch.setattr(alignment, "_centered_cross_products", spy)
    monkeypatch.setattr(row_blocks, "BLOCK_BYTES", 8 * (px + py) * 7)
    got = an.cka(X, Y)
    assert steps == [7]  # the blocked path, in ceil(60 / 7) = 9 blocks
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)  # the plain formula on full matrices
    assert got == pytest.approx(ref_cka(Xc @ Xc.T, Yc @ Yc.T), rel=1e-10)
    assert 0.2 < got < 0.99  # related, not identical: a wrong correction cannot hide at 0 or 1


def test_rbf_cka_biased_against_hsic() -> None:
    rng = np.random.default_rng(8)
    X, Y = rng.normal(size=(12, 6)), rng.normal(size=(12, 4))
    Y[:, 0] += 2 * X[:, 0]
    assert an.cka(X, Y, "rbf") == pytest.approx(ref_cka(ref_rbf(X), ref_rbf(Y)), rel=1e-10)
    assert an.cka(X, Y, "rbf", sigma=0.5) == pytest.approx(ref_cka(ref_rbf(X, 0.5), ref_rbf(Y, 0.5)), rel=1e-10)


def test_unbiased_cka_against_explicit_formula_and_u_statistic() -> None:
    rng = np.random.default_rng(9)
    X, Y = rng.normal(size=(7, 5)), rng.normal(size=(7, 3))
    Y[:, 0] += X[:, 0]
    K, L = X @ X.T, Y @ Y.T
    assert ref_hsic_unbiased(K, L) == pytest.approx(ref_hsic_ustat(K, L), rel=1e-10)  # the two references agree
    assert an.hsic(K, L, unbiased=True) == pytest.approx(ref_hsic_ustat(K, L), rel=1e-10)
    assert an.hsic(K, L) == pytest.approx(ref_hsic_biased(K, L), rel=1e-10)
    assert an.cka(X, Y, unbiased=True) == pytest.approx(ref_cka(K, L, ref_hsic_ustat), rel=1e-10)
    Kr, Lr = ref_rbf(X), ref_rbf(Y)
    assert an.cka(X, Y, "rbf", unbiased=True) == pytest.approx(ref_cka(Kr, Lr, ref_hsic_unbiased), rel=1e-10)
    with pytest.raises(LayertapError, match="at least 4"):
        an.cka(X[:3], Y[:3], unbiased=True)


@pytest.mark.parametrize("kernel,unbiased", [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)])
def test_cka_identity_and_invariances(kernel: str, unbiased: bool) -> None:
    rng = np.random.default_rng(10)
    X, Y = rng.normal(size=(20, 8)), rng.normal(size=(20, 5))
    Y[:, :2] += X[:, :2]
    assert an.cka(X, X, kernel, unbiased) == pytest.approx(1.0, abs=1e-12)
    Xt = 3.7 * X @ random_orthogonal(8, 1) + 5.0  # rotation, isotropic scaling, translation
    assert an.cka(X, Xt, kernel, unbiased) == pytest.approx(1.0, abs=1e-10)
    base = an.cka(X, Y, kernel, unbiased)
    assert an.cka(Xt, Y, kernel, unbiased) == pytest.approx(base, rel=1e-10)
    assert an.cka(Y, X, kernel, unbiased) == pytest.approx(base, rel=1e-12)
    assert 0 < base < 1


def test_cka_bad_input() -> None:
    with pytest.raises(LayertapError, match="same images"):
        an.cka(np.ones((4, 2)), np.ones((5, 2)))
    with pytest.raises(LayertapError, match="kernel"):
        an.cka(np.ones((4, 2)), np.ones((4, 2)), "poly")


# -- crossnobis -----------------------------------------------------------------------------------


def ref_crossnobis(X, cond, runs, W=None):
    labels, run_ids = np.unique(cond), np.unique(runs)
    P = X.shape[1]
    W = np.eye(P) if W is None else W
    mu = {(r, c): X[(runs == r) & (cond == c)].mean(0) for r in run_ids for c in labels}
    D = np.zeros((len(labels), len(labels)))
    for i, ci in enumerate(labels):
        for j, cj in enumerate(labels):
            vals = [
                (mu[a, ci] - mu[a, cj]) @ W @ (mu[b, ci] - mu[b, cj]) / P for a in run_ids for b in run_ids if a != b
            ]
            D[i, j] = np.mean(vals)
    return D


def ref_crossnobis_loro(X, cond, runs):
    """Leave-one-run-out: training = mean over the other runs' condition means, test = the left-out run."""
    labels, run_ids = np.unique(cond), np.unique(runs)
    mu = {r: np.array([X[(runs == r) & (cond == c)].mean(0) for c in labels]) for r in run_ids}
    D = np.zeros((len(labels), len(labels)))
    for r in run_ids:
        train = np.mean([mu[o] for o in run_ids if o != r], axis=0)
        for i, j in itertools.product(range(len(labels)), repeat=2):
            D[i, j] += (train[i] - train[j]) @ (mu[r][i] - mu[r][j]) / X.shape[1]
    return D / len(run_ids)


def test_crossnobis_against_explicit_loops() -> None:
    rng = np.random.default_rng(11)
    runs = np.repeat(np.arange(4), 9)
    cond = np.tile(np.array(["a", "b", "c"]).repeat(3), 4)  # 3 repetitions per condition and run
    X = rng.normal(size=(36, 6)) + (cond == "b")[:, None] * 1.5
    D, labels = an.crossnobis_rdm(X, cond, runs)
    assert list(labels) == ["a", "b", "c"]
    np.testing.assert_allclose(D, ref_crossnobis(X, cond, runs), atol=1e-12)
    np.testing.assert_allclose(D, ref_crossnobis_loro(X, cond, runs), atol=1e-12)
    assert np.array_equal(D, D.T) and np.all(np.diag(D) == 0)
    A = rng.normal(size=(6, 6))
    W = A @ A.T + np.eye(6)
    np.testing.assert_allclose(an.crossnobis_rdm(X, cond, runs, W)[0], ref_crossnobis(X, cond, runs, W), atol=1e-12)
    w = rng.uniform(0.5, 2, 6)
    np.testing.assert_allclose(
        an.crossnobis_rdm(X, cond, runs, w)[0], ref_crossnobis(X, cond, runs, np.diag(w)), atol=1e-12
    )


def test_crossnobis_unbiased_on_noise_and_positive_for_different_means() -> None:
    rng = np.random.default_rng(12)
    runs = np.repeat(np.arange(3), 4)
    cond = np.tile([0, 0, 1, 1], 3)
    P, reps = 10, 600
    cv, naive, diff = [], [], []
    delta = np.zeros(P)
    delta[:4] = np.sqrt(P / 4)  # true distance |delta|^2 / P = 1
    for _ in range(reps):
        noise = rng.normal(size=(12, P))
        cv.append(an.crossnobis_rdm(noise, cond, runs)[0][0, 1])
        m0, m1 = noise[cond == 0].mean(0), noise[cond == 1].mean(0)
        naive.append((m0 - m1) @ (m0 - m1) / P)
        diff.append(an.crossnobis_rdm(noise + np.outer(cond, delta), cond, runs)[0][0, 1])
    cv, naive, diff = np.array(cv), np.array(naive), np.array(diff)
    sem = cv.std() / np.sqrt(reps)
    assert abs(cv.mean()) < 4 * sem  # unbiased: 0 in expectation (single estimates can be negative)
    assert (cv < 0).any()
    assert naive.mean() > 20 * sem  # the non-cross-validated distance is biased upwards
    assert diff.mean() == pytest.approx(1.0, abs=4 * diff.std() / np.sqrt(reps))
    assert diff.mean() > 0.5


def test_crossnobis_bad_input() -> None:
    X = np.zeros((4, 3))
    with pytest.raises(LayertapError, match="at least 2 runs"):
        an.crossnobis_rdm(X, [0, 1, 0, 1], [0, 0, 0, 0])
    with pytest.raises(LayertapError, match="no observation"):
        an.crossnobis_rdm(X, [0, 1, 0, 0], [0, 0, 1, 1])
    with pytest.raises(LayertapError, match="one label per observation"):
        an.crossnobis_rdm(X, [0, 1], [0, 1])
    with pytest.raises(LayertapError, match="precision"):
        an.crossnobis_rdm(X, [0, 1, 0, 1], [0, 0, 1, 1], np.eye(2))


# -- runs: layer similarity, references -----------------------------------------------------------


def test_layer_similarity_one_run(run: lt.Run) -> None:
    a, b = (flat(run, name) for name in LAYERS)
    m, rows, cols = an.layer_similarity(run)
    assert rows == cols == LAYERS and m.shape == (2, 2)
    assert np.all(np.diag(m) == 1) and m[0, 1] == m[1, 0]
    assert m[0, 1] == pytest.approx(stats.spearmanr(pdist(a, "correlation"), pdist(b, "correlation"))[0], abs=1e-10)
    m, _, _ = an.layer_similarity(run.path, method="rdm-pearson", metric="euclidean")
    assert m[0, 1] == pytest.approx(stats.pearsonr(pdist(a), pdist(b))[0], abs=1e-10)
    m, _, _ = an.layer_similarity(run, method="rdm-kendall_tau_a")
    assert m[0, 1] == pytest.approx(ref_tau_a(pdist(a, "correlation"), pdist(b, "correlation")), abs=1e-10)
    m, _, _ = an.layer_similarity(run, method="cka-linear")
    assert m[0, 1] == pytest.approx(ref_cka(a @ a.T, b @ b.T), rel=1e-8)
    m, _, _ = an.layer_similarity(run, method="cka-rbf-unbiased")
    assert m[0, 1] == pytest.approx(ref_cka(ref_rbf(a), ref_rbf(b), ref_hsic_unbiased), rel=1e-8)
    m, rows, cols = an.layer_similarity(run, layers_a=["classifier.*"], layers_b=LAYERS)
    assert rows == ["classifier.4"] and cols == LAYERS and m[0, 1] == 1
    with pytest.raises(LayertapError, match="did you mean"):
        an.layer_similarity(run, layers_a=["classifer.4"])
    with pytest.raises(LayertapError, match="unknown method"):
        an.layer_similarity(run, method="cca")


def test_select_layers_uses_the_extraction_glob_dialect(run: lt.Run) -> None:
    # One dialect for layer names everywhere (layertap.globs, as lt.extract's layers=): '*' stays within one
    # dotted component, '**' crosses dots. The analysis used fnmatch before, where '*' matched 'features.2' too.
    assert an.select_layers(run, "classifier.*") == ["classifier.4"]
    assert an.select_layers(run, "**") == LAYERS
    assert an.select_layers(run, ["classifier.**", "f*.?"]) == ["classifier.4", "features.2"]
    with pytest.raises(LayertapError, match=r"has no layer.*'\*\*' crosses dots"):
        an.select_layers(run, "*")  # no stored layer name is a single component
    with pytest.raises(LayertapError, match="has no layer"):
        an.select_layers(run, "c*4")


def test_layer_similarity_reuses_given_rdms(run: lt.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = (flat(run, name) for name in LAYERS)
    given = {LAYERS[0]: squareform(pdist(a, "correlation"))}
    computed: list[str] = []
    real = an.rdm
    monkeypatch.setattr(similarity, "rdm", lambda x, *args, what=None, **kw: computed.append(what) or real(x, *args, **kw))
    m, _, _ = an.layer_similarity(run, rdms=given)
    assert computed == [LAYERS[1]]  # only the layer whose RDM was not given
    assert m[0, 1] == pytest.approx(stats.spearmanr(pdist(a, "correlation"), pdist(b, "correlation"))[0], abs=1e-10)


def test_layer_similarity_two_runs(run: lt.Run, tmp_path: Path) -> None:
    # another network (other random weights) on the same images: every entry against the plain formula
    images = Path(run.manifest["images"]["root"])
    other = lt.extract("alexnet", images, LAYERS, tmp_path / "other", weights="random", seed=1, workers=0, batch_size=4)
    m, rows, cols = an.layer_similarity(run, other, method="cka-linear")
    assert rows == ["A:" + n for n in LAYERS] and cols == ["B:" + n for n in LAYERS]
    for i, a in enumerate(LAYERS):
        for j, b in enumerate(LAYERS):
            x, y = flat(run, a), flat(other, b)
            assert m[i, j] == pytest.approx(ref_cka(x @ x.T, y @ y.T), rel=1e-8), (a, b)
    assert not np.allclose(m, 1.0)  # different networks: not the trivial answer
    copy = Path(shutil.copytree(run.path, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["images"]["rows"] = manifest["images"]["rows"][::-1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LayertapError, match="different images"):
        an.layer_similarity(run, copy)
    manifest["status"] = "running"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LayertapError, match="not complete"):
        an.layer_similarity(copy)


def test_compare_to_reference_hands_back_its_rdms(run: lt.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    # keep_rdms: the RDMs the scores came from come back with them (the CLI's bootstrap CIs reuse them
    # instead of computing every layer's RDM a second time); each RDM is computed once.
    responses = np.random.default_rng(5).normal(size=(6, 4))
    computed: list[str] = []
    real = an.rdm
    monkeypatch.setattr(similarity, "rdm", lambda x, *args, what=None, **kw: computed.append(what) or real(x, *args, **kw))
    got = an.compare_to_reference(run, responses, keep_rdms=True)
    assert computed == ["reference", *LAYERS]
    assert got.reference_rdm is not None and got.rdms is not None and list(got.rdms) == LAYERS
    np.testing.assert_allclose(got.reference_rdm, squareform(pdist(responses, "correlation")), atol=1e-12)
    for name in LAYERS:
        np.testing.assert_allclose(got.rdms[name], squareform(pdist(flat(run, name), "correlation")), atol=1e-10)
        assert got[name] == pytest.approx(an.compare_rdms(got.rdms[name], got.reference_rdm), abs=1e-12)
    plain = an.compare_to_reference(run, responses)
    assert plain.rdms is None and plain.reference_rdm is None and dict(plain) == dict(got)


def test_one_matrix_reader_for_references_and_responses(tmp_path: Path) -> None:
    # analysis.load_matrix (references) and encode's responses read files through one reader
    # (analysis.matrices.load_array): the same table gives the same numbers to both.
    import h5py

    from layertap.analysis.matrices import load_array
    from layertap.encode.responses import prepare_responses

    m = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    np.savetxt(tmp_path / "ws.txt", m)  # whitespace-separated, as np.loadtxt reads it
    np.savetxt(tmp_path / "comma.txt", m, delimiter=",")
    np.savetxt(tmp_path / "m.tsv", m, delimiter="\t", header="a\tb\tc", comments="")
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["m"] = m
        f["ids"] = np.arange(4.0)  # 1-D: not a candidate for a 2-D reference
    for name in ("ws.txt", "comma.txt", "m.tsv", "m.h5"):
        np.testing.assert_allclose(an.load_matrix(tmp_path / name), m, rtol=1e-15, err_msg=name)
    with (tmp_path / "r.tsv").open("w") as f:
        f.write("stimulus\tv1\tv2\tv3\n" + "".join(f"img{i}.jpg\t" + "\t".join(repr(float(v)) for v in row) + "\n" for i, row in enumerate(m)))
    arr, ids = load_array(tmp_path / "r.tsv")
    assert ids == [f"img{i}.jpg" for i in range(4)]
    np.testing.assert_array_equal(arr, m)
    resp = prepare_responses([f"img{i}.jpg" for i in range(4)][::-1], tmp_path / "r.tsv")
    np.testing.assert_array_equal(resp.data, m)
    np.testing.assert_array_equal(resp.rows, [3, 2, 1, 0])
    np.testing.assert_array_equal(an.load_matrix(tmp_path / "r.tsv"), m)  # ids column skipped by both
    (tmp_path / "gap.csv").write_text("0,1\n1,\n")  # an empty cell is a missing value (NaN), not an error
    assert np.isnan(an.load_matrix(tmp_path / "gap.csv")[1, 1])
    with pytest.raises(LayertapError, match="reference file .* does not exist"):
        an.load_matrix(tmp_path / "nope.csv")


def test_compare_to_reference_files(run: lt.Run, tmp_path: Path) -> None:
    import scipy.io

    rng = np.random.default_rng(13)
    responses = rng.normal(size=(6, 9))
    ref_rdm = squareform(pdist(responses, "correlation"))
    layer_rdms = {name: pdist(flat(run, name), "correlation") for name in LAYERS}
    expect = {name: stats.spearmanr(v, squareform(ref_rdm))[0] for name, v in layer_rdms.items()}

    np.save(tmp_path / "rdm.npy", ref_rdm)
    np.savetxt(tmp_path / "rdm.csv", ref_rdm, delimiter=",", header=",".join(f"c{i}" for i in range(6)), comments="")
    np.save(tmp_path / "resp.npy", responses)
    scipy.io.savemat(tmp_path / "one.mat", {"rdm": ref_rdm})
    scipy.io.savemat(tmp_path / "two.mat", {"rdm": ref_rdm, "resp": responses})
    for ref, key in [
        (ref_rdm, None),
        (squareform(ref_rdm), None),  # condensed
        (tmp_path / "rdm.npy", None),
        (str(tmp_path / "rdm.csv"), None),
        (tmp_path / "resp.npy", None),  # a response matrix: its correlation RDM is computed
        (tmp_path / "one.mat", None),
        (tmp_path / "two.mat", "resp"),
    ]:
        got = an.compare_to_reference(run, ref, key=key)
        assert list(got) == LAYERS
        for name in LAYERS:
            assert got[name] == pytest.approx(expect[name], abs=1e-10), (ref, name)
    with pytest.raises(LayertapError, match="2 2-D numeric variables"):
        an.compare_to_reference(run, tmp_path / "two.mat")
    got = an.compare_to_reference(run, responses, layers="classifier.4", method="cka-linear")
    a = flat(run, "classifier.4")
    assert got["classifier.4"] == pytest.approx(ref_cka(a @ a.T, responses @ responses.T), rel=1e-8)
    with pytest.raises(LayertapError, match="CKA needs a response matrix"):
        an.compare_to_reference(run, ref_rdm, method="cka-linear")
    with pytest.raises(LayertapError, match="rows but the run has 6"):
        an.compare_to_reference(run, responses[:5])
    with pytest.raises(LayertapError, match="does not exist"):
        an.compare_to_reference(run, tmp_path / "nope.npy")


# -- rsatoolbox hand-off --------------------------------------------------------------------------


def test_rsatoolbox_hand_off(run: lt.Run) -> None:
    pytest.importorskip("rsatoolbox")
    import rsatoolbox

    ds = an.to_rsatoolbox(run, "classifier.4")
    assert ds.measurements.shape == (6, 4096)
    np.testing.assert_array_equal(ds.measurements, flat(run, "classifier.4"))
    assert list(ds.obs_descriptors["image"]) == run.images
    assert list(ds.obs_descriptors["class"]) == [run.classes[t] for t in run.targets]
    assert ds.descriptors["layer"] == "classifier.4"
    theirs = rsatoolbox.rdm.calc_rdm(ds, method="correlation").get_matrices()[0]
    np.testing.assert_allclose(theirs, an.rdm(run["classifier.4"]), atol=1e-10)

    rdms = an.rdms_to_rsatoolbox(run, metric="correlation")
    assert rdms.n_rdm == 2 and rdms.n_cond == 6 and rdms.dissimilarity_measure == "correlation"
    assert list(rdms.rdm_descriptors["layer"]) == LAYERS
    assert list(rdms.pattern_descriptors["image"]) == run.images
    for k, name in enumerate(LAYERS):
        ours = an.rdm(run[name])
        np.testing.assert_array_equal(rdms.dissimilarities[k], ours[np.triu_indices(6, k=1)])
        np.testing.assert_allclose(rdms.get_matrices()[k], ours, atol=1e-15)
    one = an.rdms_to_rsatoolbox({"x": an.rdm(np.eye(5) + 1)})
    assert one.n_rdm == 1 and list(one.rdm_descriptors["layer"]) == ["x"]
    ds = an.to_rsatoolbox(np.ones((4, 2, 3)))
    assert ds.measurements.shape == (4, 6)


@pytest.mark.parametrize(
    "modules,call,extra",
    [
        (["rsatoolbox", "rsatoolbox.data"], lambda r: an.to_rsatoolbox(r, "classifier.4"), "rsa"),
        (["rsatoolbox", "rsatoolbox.rdm"], lambda r: an.rdms_to_rsatoolbox(r), "rsa"),
        (["matplotlib"], lambda r: __import__("layertap.analysis.plots").analysis.plots.plot_rdm(np.zeros((3, 3)), "x.png"), "plots"),
        (["sklearn", "sklearn.manifold"], lambda r: an_plots().mds_embedding(np.ones((3, 3)) - np.eye(3)), "plots"),
    ],
)
def test_missing_optional_package(run: lt.Run, monkeypatch: pytest.MonkeyPatch, modules, call, extra) -> None:
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # makes 'import m' raise ImportError
    with pytest.raises(LayertapError) as err:
        call(run)
    msg = str(err.value)
    assert f"pip install 'layertap[{extra}]'" in msg and "\n" not in msg
    assert err.value.__suppress_context__  # raised 'from None': the CLI shows one line, no chained traceback


def an_plots():
    from layertap.analysis import plots

    return plots


# -- plots ----------------------------------------------------------------------------------------


def check_image(path: Path, size: tuple[int, int] | None) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 2000
    if path.suffix == ".png":
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and im.size == size
    else:
        assert "<svg" in path.read_text()[:2000]


def test_plots(run: lt.Run, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from layertap.analysis import plots

    D = an.rdm(run["classifier.4"])
    shuffled = np.array([2, 0, 1, 5, 4, 3])  # class grouping must reorder
    for suffix in ("png", "svg"):
        p = plots.plot_rdm(
            D[np.ix_(shuffled, shuffled)], tmp_path / f"rdm.{suffix}", run.targets[shuffled], run.classes
        )
        check_image(p, (900, 750))
        m, rows, cols = an.layer_similarity(run)
        p = plots.plot_layer_similarity(m, rows, cols, tmp_path / f"sim.{suffix}", figsize=(4, 3), dpi=100)
        check_image(p, (400, 300))
        p = plots.plot_mds(run["classifier.4"], tmp_path / f"mds.{suffix}", run.targets, run.classes, dpi=100)
        check_image(p, (600, 500))
    assert "chelsea" in (tmp_path / "rdm.svg").read_text() and "coffee" in (tmp_path / "mds.svg").read_text()
    check_image(plots.plot_rdm(D, tmp_path / "plain.png", dpi=50), (300, 250))
    check_image(plots.plot_mds(D, tmp_path / "mds_rdm.png", dpi=50), (300, 250))
    xy = plots.mds_embedding(D)
    assert xy.shape == (6, 2) and np.allclose(xy, plots.mds_embedding(D))  # fixed random_state
    with pytest.raises(LayertapError, match=r"\.png, \.svg"):
        plots.plot_rdm(D, tmp_path / "rdm.bmp2")
    with pytest.raises(LayertapError, match="does not match"):
        plots.plot_layer_similarity(m, rows, cols[:1], tmp_path / "x.png")


# -- command line ---------------------------------------------------------------------------------


def cli(*argv: str) -> None:
    from layertap.cli.analysis import add_analysis_commands

    parser = argparse.ArgumentParser(prog="layertap")
    add_analysis_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    args.func(args)


def test_cli_rdm_and_compare(run: lt.Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "rdm.npy"
    cli("rdm", run.path, "--layer", "features.2", "--metric", "euclidean", "--out", out, "--plot", tmp_path / "r.png")
    np.testing.assert_allclose(np.load(out), squareform(pdist(flat(run, "features.2"))), rtol=1e-10)
    assert (tmp_path / "r.png").stat().st_size > 2000
    assert "6x6 euclidean RDM" in capsys.readouterr().out

    cli("compare", run.path, "--method", "cka-linear", "--out", tmp_path / "sim.csv", "--plot", tmp_path / "s.svg")
    table = np.loadtxt(tmp_path / "sim.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    np.testing.assert_allclose(table, an.layer_similarity(run, method="cka-linear")[0], rtol=1e-12)
    assert "classifier.4" in capsys.readouterr().out and (tmp_path / "s.svg").is_file()

    ref = tmp_path / "ref.npy"
    np.save(ref, an.rdm(run["classifier.4"]))
    cli("compare", run.path, "--reference", ref, "--layers", "classifier.4", "--out", tmp_path / "ref.csv")
    lines = (tmp_path / "ref.csv").read_text().splitlines()
    assert (
        lines[0] == "layer,rdm-spearman" and lines[1].startswith("classifier.4,") and float(lines[1].split(",")[1]) == 1
    )

    for argv, msg in [
        (("rdm", run.path, "--layer", "features.2", "--out", tmp_path / "x.csv"), r"\.npy"),
        (("rdm", run.path, "--layer", "feature.2", "--out", out), "did you mean"),
        (("compare", run.path, run.path, "--reference", ref), "not both"),
        (("compare", run.path, "--out", tmp_path / "x.txt"), r"\.csv"),
        (("compare", run.path, "--layers2", "features.2"), "second run"),
    ]:
        with pytest.raises(LayertapError, match=msg):
            cli(*argv)


# -- missing pairs (NaN) in RDMs ------------------------------------------------------------------


def rdm_pair_with_missing(n: int = 12, seed: int = 21) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two RDMs (the second with ties) and a symmetric mask of 4 missing pairs."""
    rng = np.random.default_rng(seed)
    a = squareform(pdist(rng.normal(size=(n, 5))))
    b = squareform(np.round(pdist(rng.normal(size=(n, 5))), 1))
    mask = np.zeros((n, n), dtype=bool)
    for i, j in [(0, 3), (2, 7), (5, 11), (4, 9)]:
        mask[i, j] = mask[j, i] = True
    return a, b, mask


def test_is_rdm_with_missing_pairs() -> None:
    a, _, mask = rdm_pair_with_missing()
    nan = np.where(mask, np.nan, a)
    assert an.is_rdm(nan)
    with_nan_diagonal = nan.copy()
    np.fill_diagonal(with_nan_diagonal, np.nan)
    assert an.is_rdm(with_nan_diagonal)
    one_sided = a.copy()
    one_sided[0, 3] = np.nan  # NaN at (0, 3) but not at (3, 0): not an RDM
    assert not an.is_rdm(one_sided)
    assert not an.is_rdm(np.full((4, 4), np.nan))
    responses = np.random.default_rng(0).normal(size=(12, 12))
    responses[0, 3] = responses[3, 0] = np.nan
    assert not an.is_rdm(responses)


@pytest.mark.parametrize(
    ("ours", "theirs"), [("pearson", "corr"), ("spearman", "spearman"), ("kendall_tau_a", "tau-a")]
)
def test_compare_rdms_leaves_out_missing_pairs_like_rsatoolbox(
    ours: str, theirs: str, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN pairs are left out of both RDMs (counted in a warning): equal to rsatoolbox's own compare on
    the same RDMs and to scipy / the tau-a loop on the pairs that are not NaN."""
    rsatoolbox = pytest.importorskip("rsatoolbox")
    a, b, mask = rdm_pair_with_missing()
    a_nan, b_nan = np.where(mask, np.nan, a), np.where(mask, np.nan, b)
    keep = ~mask[np.triu_indices(len(a), k=1)]
    ua, ub = an.upper_triangle(a)[keep], an.upper_triangle(b)[keep]
    scipy_value = {
        "pearson": lambda: stats.pearsonr(ua, ub)[0],
        "spearman": lambda: stats.spearmanr(ua, ub)[0],
        "kendall_tau_a": lambda: ref_tau_a(ua, ub),
    }[ours]()
    theirs_value = rsatoolbox.rdm.compare(
        rsatoolbox.rdm.RDMs(an.upper_triangle(a_nan)[None]), rsatoolbox.rdm.RDMs(an.upper_triangle(b_nan)[None]), theirs
    )[0, 0]
    with caplog.at_level("WARNING", logger="layertap"):
        both = an.compare_rdms(a_nan, b_nan, ours)  # the same pairs missing in both
        one = an.compare_rdms(a, b_nan, ours)  # missing in one only (a complete model RDM vs brain data)
    assert both == pytest.approx(theirs_value, abs=1e-12)
    assert both == pytest.approx(scipy_value, abs=1e-12)
    assert one == pytest.approx(both, abs=1e-15)
    assert caplog.text.count("4 of 66 pairs are missing (NaN) and were left out") == 2

    conflicting = b.copy()
    conflicting[1, 2] = conflicting[2, 1] = np.nan
    with pytest.raises(ValueError, match="different nan positions"):  # rsatoolbox refuses it too
        rsatoolbox.rdm.compare(
            rsatoolbox.rdm.RDMs(an.upper_triangle(a_nan)[None]),
            rsatoolbox.rdm.RDMs(an.upper_triangle(conflicting)[None]),
        )
    with pytest.raises(LayertapError, match=r"different positions \(4 pairs missing only in the first, 1 only"):
        an.compare_rdms(a_nan, conflicting, ours)


def test_constant_images_warned_by_name(caplog: pytest.LogCaptureFixture) -> None:
    x = np.random.default_rng(3).normal(size=(5, 8))
    x[1] = 2.5  # a constant row: correlation distance undefined
    x[3] = 0.0  # constant and zero: undefined for cosine too
    names = [f"img{i}.jpg" for i in range(5)]
    with caplog.at_level("WARNING", logger="layertap"):
        d = an.rdm(x, labels=names, what="fc7")
    expected = squareform(pdist(x, "correlation"), checks=False)
    np.testing.assert_allclose(d, expected, rtol=1e-12, atol=1e-12)  # NaN where scipy has NaN
    assert np.isnan(d[1, 0]) and np.isnan(d[3, 4])
    assert "fc7: 2 of 5 images have constant activations" in caplog.text
    assert "img1.jpg, img3.jpg" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="layertap"):
        an.rdm(x, "cosine")
    assert "1 of 5 images have all-zero activations" in caplog.text and "row 3" in caplog.text


def test_compare_reference_with_missing_pairs(
    run: lt.Run, tmp_path: Path, layertap_cli, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer against its own RDM with missing pairs: still an RDM, Spearman 1 (the old code took the
    reference for a response matrix and gave 0.5); against another reference, scipy on the shared pairs."""
    own = an.rdm(run["classifier.4"])
    own[0, 4] = own[4, 0] = own[2, 3] = own[3, 2] = np.nan
    with caplog.at_level("WARNING", logger="layertap"):
        got = an.compare_to_reference(run, own, layers="classifier.4")
    assert got["classifier.4"] == pytest.approx(1.0, abs=1e-12)
    assert "2 of 15 pairs are missing (NaN)" in caplog.text

    keep = ~np.isnan(squareform(own, checks=False))
    other = an.upper_triangle(an.rdm(run["features.2"]))
    got = an.compare_to_reference(run, own, layers="features.2", method="rdm-pearson")
    assert got["features.2"] == pytest.approx(stats.pearsonr(other[keep], squareform(own, checks=False)[keep])[0])

    ref = tmp_path / "brain_rdm.npy"
    np.save(ref, own)
    proc = layertap_cli("compare", str(run.path), "--reference", str(ref), "--layers", "classifier.4", check=True)
    assert proc.stdout.split() == ["classifier.4", "1.0000"], proc.stdout
    assert "2 of 15 pairs are missing (NaN) and were left out" in proc.stderr
