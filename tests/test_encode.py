"""Encoding models (layertap.encode): synthetic responses with known truth, references from sklearn/rsatoolbox."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import layertap as lt
from layertap.encode import ceiling as ceil_mod
from layertap.errors import LayertapError

N_IMAGES = 72


class TinyNet(nn.Module):
    """conv -> 2x2 average pool (32) -> fc1 = tanh(linear) (12) -> fc2 = relu(linear) (12)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Sequential(nn.Linear(32, 12), nn.Tanh())
        self.fc2 = nn.Sequential(nn.Linear(12, 12), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.flat(self.pool(self.act(self.conv(x))))))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> lt.Run:
    """A run of TinyNet (random weights, seed 0) on 72 tiny random-pattern images in two folders."""
    import torchvision.transforms as T

    root = tmp_path_factory.mktemp("enc_images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        img = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((24, 24), Image.BILINEAR)
        img.save(folder / f"s{i:03d}.png")
    torch.manual_seed(0)
    model = lt.from_module(TinyNet(), transform=T.Compose([T.Resize(16), T.ToTensor()]), name="tiny",
                           input_size=(3, 16, 16))
    out = tmp_path_factory.mktemp("enc_run") / "run"
    return lt.extract(model, root, layers=["pool", "fc1", "fc2"], out=out, progress=False, workers=0, device="cpu")


def simulate(run: lt.Run, layer: str, n_targets: int, noise_sd: float | np.ndarray, reps: int, seed: int = 0):
    """Repeated responses = the layer's features x known weights (signal variance 1) + Gaussian noise.

    Returns (repeats (reps, images, targets) in run order, true reliability of the mean over reps).
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(run[layer], dtype=np.float64).reshape(len(run.images), -1)
    signal = (x - x.mean(0)) @ rng.standard_normal((x.shape[1], n_targets))
    signal /= signal.std(0)
    sd = np.broadcast_to(np.asarray(noise_sd, dtype=np.float64), (n_targets,))
    repeats = signal[None] + rng.standard_normal((reps, *signal.shape)) * sd
    return repeats, 1.0 / (1.0 + sd**2 / reps)


# -- known truth -----------------------------------------------------------------------------------


def test_true_layer_scores_best_and_normalised_score_is_one(run: lt.Run) -> None:
    repeats, rho = simulate(run, "fc1", 150, noise_sd=1.0, reps=4)
    perm = np.random.default_rng(1).permutation(N_IMAGES)  # rows in another order, ids as file stems
    ids = [Path(run.images[i]).stem for i in perm]
    scores = lt.encode(run, repeats[:, perm], stimuli=ids, folds=4, progress=False)
    assert scores.best_layer() == "fc1"
    prof = scores.profile("all", "r").set_index("layer")["median"]
    assert prof["fc1"] > prof["pool"] + 0.02 and prof["fc1"] > prof["fc2"] + 0.02
    # the ceiling recovers the simulated reliability (0.8), and the true layer reaches it
    assert np.median(scores.ceiling) == pytest.approx(rho[0], abs=0.04)
    t = scores.to_pandas(wide=True)
    r_norm = t[t["layer"] == "fc1"]["r_norm"].to_numpy()
    assert abs(np.median(r_norm) - 1.0) < np.std(r_norm)  # within one target's sampling error
    assert 0.9 < np.median(r_norm) < 1.1


def test_shuffled_responses_score_zero_where_a_leak_would_not(run: lt.Run) -> None:
    """Pure noise w.r.t. the images; choosing alpha on the test fold (a leak) would score > 0, encode must not."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    repeats, _ = simulate(run, "pool", 120, noise_sd=0.3, reps=1, seed=3)
    y = repeats[0][np.random.default_rng(4).permutation(N_IMAGES)]  # responses shuffled against images
    alphas = np.logspace(-2, 5, 15)
    scores = lt.encode(run, y, stimuli=run.images, layers=["pool"], folds=4, alphas=alphas, progress=False)
    honest = scores.profile("all", "r")["median"].iloc[0]
    assert abs(honest) < 0.1
    # the leaky analysis: per target, the alpha with the best *test* correlation
    x = np.asarray(run["pool"], dtype=np.float64).reshape(N_IMAGES, -1)
    leaky = np.zeros(y.shape[1])
    for train, test in KFold(4, shuffle=True, random_state=0).split(x):
        sc = StandardScaler().fit(x[train])
        best = np.full(y.shape[1], -np.inf)
        for a in alphas:
            pred = Ridge(alpha=a).fit(sc.transform(x[train]), y[train]).predict(sc.transform(x[test]))
            best = np.maximum(best, [np.corrcoef(pred[:, j], y[test, j])[0, 1] for j in range(y.shape[1])])
        leaky += best / 4
    assert np.median(leaky) > honest + 0.1


def test_test_responses_never_enter_the_fit(run: lt.Run) -> None:
    repeats, _ = simulate(run, "fc2", 40, noise_sd=0.5, reps=1, seed=5)
    y = repeats[0]
    test_ids = run.images[::4]
    a = lt.encode(run, y, stimuli=run.images, test_split=test_ids, keep_predictions=True, progress=False,
                  dtype="float64")
    y2 = y.copy()
    y2[::4] = np.random.default_rng(9).standard_normal(y2[::4].shape) * 100 + 50  # test responses: garbage
    b = lt.encode(run, y2, stimuli=run.images, test_split=test_ids, keep_predictions=True, progress=False,
                  dtype="float64")
    for layer in run.layers:
        np.testing.assert_allclose(b.predictions[layer][::4], a.predictions[layer][::4], rtol=0, atol=1e-9)
        assert np.all(np.isnan(a.predictions[layer][1::4]))  # only test stimuli are predicted
    ta, tb = a.to_pandas(wide=True), b.to_pandas(wide=True)
    np.testing.assert_array_equal(ta["alpha"].to_numpy(), tb["alpha"].to_numpy())


# -- equal to a plain scikit-learn computation on the same folds -----------------------------------


def _sklearn_reference(x, y, splits, alphas, inner, seed, pca=None, project=None):
    """Standardise on train, (PCA on train), per-target alpha by sklearn Ridge over inner KFold (mean MSE,
    ties to the larger alpha), refit, predict the test fold; r and R^2 averaged over folds."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    r_sum, r2_sum, log_a = 0.0, 0.0, 0.0
    for train, test in splits:
        sc = StandardScaler().fit(x[train])
        xtr, xte = sc.transform(x[train]), sc.transform(x[test])
        if pca:
            p = PCA(n_components=pca, random_state=seed).fit(xtr)
            xtr, xte = p.transform(xtr), p.transform(xte)
        if project is not None:
            xtr, xte = project(xtr), project(xte)
        ytr, yte = y[train], y[test]
        mse = np.zeros((len(alphas), y.shape[1]))
        for itr, iva in KFold(inner, shuffle=True, random_state=seed).split(xtr):
            for k, a in enumerate(alphas):
                pred = Ridge(alpha=a).fit(xtr[itr], ytr[itr]).predict(xtr[iva])
                mse[k] += ((pred - ytr[iva]) ** 2).mean(0) / inner
        best = np.array([alphas[len(alphas) - 1 - np.argmin(mse[::-1, j])] for j in range(y.shape[1])])
        pred = np.empty_like(yte)
        for a in np.unique(best):
            cols = best == a
            pred[:, cols] = Ridge(alpha=a).fit(xtr, ytr[:, cols]).predict(xte).reshape(len(xte), -1)
        r_sum = r_sum + np.array([np.corrcoef(pred[:, j], yte[:, j])[0, 1] for j in range(y.shape[1])])
        r2_sum = r2_sum + r2_score(yte, pred, multioutput="raw_values")
        log_a = log_a + np.log(best)
    k = len(splits)
    return r_sum / k, r2_sum / k, np.exp(log_a / k)


@pytest.mark.parametrize(("solver", "backend"), [("primal", "numpy"), ("dual", "numpy"), ("dual", "torch")])
def test_scores_equal_sklearn_on_the_same_folds(run: lt.Run, solver: str, backend: str) -> None:
    """Also himalaya's torch backend (the code path of --backend torch_cuda on a GPU)."""
    from sklearn.model_selection import KFold

    repeats, _ = simulate(run, "fc1", 30, noise_sd=1.0, reps=1, seed=6)
    y = repeats[0]
    alphas = np.logspace(-2, 4, 7)
    scores = lt.encode(run, y, stimuli=run.images, layers=["pool"], folds=3, inner_folds=4, alphas=alphas,
                       solver=solver, backend=backend, dtype="float64", seed=2, progress=False)
    assert scores.manifest["solver"]["backend"] == backend
    x = np.asarray(run["pool"], dtype=np.float64).reshape(N_IMAGES, -1)
    splits = list(KFold(3, shuffle=True, random_state=2).split(x))
    r, r2, alpha = _sklearn_reference(x, y, splits, alphas, 4, 2)
    t = scores.to_pandas(wide=True)
    np.testing.assert_allclose(t["r"].to_numpy(), r, rtol=0, atol=1e-6)
    np.testing.assert_allclose(t["r2"].to_numpy(), r2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(t["alpha"].to_numpy(), alpha, rtol=1e-9)
    # features computed elsewhere, as {layer: array} with row ids: the same numbers
    mapped = lt.encode({"pool": x}, y, stimuli=run.images, images=run.images, folds=3, inner_folds=4, alphas=alphas,
                       solver=solver, dtype="float64", seed=2, progress=False)
    np.testing.assert_allclose(mapped.to_pandas(wide=True)["r"].to_numpy(), r, rtol=0, atol=1e-6)


def test_pca_is_fitted_on_training_stimuli_only(run: lt.Run) -> None:
    """A given split whose test images are unusual: PCA (and z-scoring) on all stimuli would differ."""
    repeats, _ = simulate(run, "fc1", 20, noise_sd=0.5, reps=1, seed=7)
    y = repeats[0]
    x = np.asarray(run["pool"], dtype=np.float64).reshape(N_IMAGES, -1)
    far = np.argsort(-np.linalg.norm(x - x.mean(0), axis=1))[:18]  # the 18 most atypical images as test set
    test = np.sort(far)
    train = np.setdiff1d(np.arange(N_IMAGES), test)
    alphas = np.logspace(-2, 4, 7)
    scores = lt.encode(run, y, stimuli=run.images, layers=["pool"], test_split=[run.images[i] for i in test],
                       reduce="pca:6", alphas=alphas, dtype="float64", progress=False)
    r, r2, _ = _sklearn_reference(x, y, [(train, test)], alphas, 5, 0, pca=6)
    t = scores.to_pandas(wide=True)
    np.testing.assert_allclose(t["r"].to_numpy(), r, rtol=0, atol=1e-6)
    np.testing.assert_allclose(t["r2"].to_numpy(), r2, rtol=0, atol=1e-6)
    leaky, _, _ = _sklearn_reference(x, y, [(np.arange(N_IMAGES), test)], alphas, 5, 0, pca=6)
    assert np.max(np.abs(leaky - r)) > 1e-3  # the check above can tell the two apart
    # a sparse random projection (data-independent) of the z-scored features: layertap's own SRP matrix
    srp = lt.SparseRandomProjection(8, seed=1)
    scores = lt.encode(run, y, stimuli=run.images, layers=["pool"], test_split=[run.images[i] for i in test],
                       reduce="srp:8:1", alphas=alphas, dtype="float64", progress=False)
    r, _, _ = _sklearn_reference(x, y, [(train, test)], alphas, 5, 0, project=lambda a: a @ srp.dense_matrix(32))
    np.testing.assert_allclose(scores.to_pandas(wide=True)["r"].to_numpy(), r, rtol=0, atol=1e-6)


# -- noise ceilings --------------------------------------------------------------------------------


def test_ceilings_recover_simulated_reliability() -> None:
    rng = np.random.default_rng(0)
    n_stim, n_targets = 300, 400
    noise_sd = np.linspace(0.3, 3.0, n_targets)
    signal = rng.standard_normal((n_stim, n_targets))
    reps = signal[None] + rng.standard_normal((4, n_stim, n_targets)) * noise_sd
    true = 1.0 / (1.0 + noise_sd**2 / 4)
    sh = lt.encode.split_half_reliability(reps, n_splits=20)
    nc = lt.encode.nsd_noise_ceiling(reps) / 100
    assert np.median(np.abs(sh - true)) < 0.03 and np.corrcoef(sh, true)[0, 1] > 0.97
    assert np.median(np.abs(nc - true)) < 0.03 and np.corrcoef(nc, true)[0, 1] > 0.97
    # unequal repetitions (NaN where missing): NSD's 1/n becomes the mean over stimuli of 1/n_i
    n_i = rng.integers(1, 5, size=n_stim)
    holes = reps.copy()
    holes[np.arange(4)[:, None] >= n_i[None, :]] = np.nan
    true_unequal = 1.0 / (1.0 + noise_sd**2 * np.mean(1.0 / n_i))
    nc2 = lt.encode.nsd_noise_ceiling(holes) / 100
    assert abs(np.median(nc2 - true_unequal)) < 0.01 and np.median(np.abs(nc2 - true_unequal)) < 0.05


def test_nsd_formula_by_hand() -> None:
    """NC = 100 ncsnr^2 / (ncsnr^2 + 1/n), with ncsnr from the trial variance (Allen et al. 2022)."""
    rng = np.random.default_rng(1)
    reps = rng.standard_normal((3, 50, 4)) + rng.standard_normal((1, 50, 4)) * 2
    noise_var = reps.var(axis=0, ddof=1).mean(0)
    total_var = reps.reshape(-1, 4).var(axis=0, ddof=1)
    snr = np.sqrt(np.maximum(total_var - noise_var, 0)) / np.sqrt(noise_var)
    np.testing.assert_allclose(lt.encode.ncsnr(reps), snr, rtol=1e-12)
    np.testing.assert_allclose(lt.encode.nsd_noise_ceiling(reps), 100 * snr**2 / (snr**2 + 1 / 3), rtol=1e-12)


def test_fold_scores_equal_sklearn_with_a_target_constant_in_the_fold() -> None:
    """r2 per fold is sklearn's r2_score (test-fold mean), also where a target is constant in the fold."""
    from sklearn.metrics import r2_score

    from layertap.encode.encoding import pearson_columns, r2_columns

    rng = np.random.default_rng(3)
    y = rng.standard_normal((9, 4))
    pred = y + rng.standard_normal((9, 4)) * 0.5
    y[:, 1] = 2.0  # constant in this fold: SS_tot = 0
    pred[:, 2] = y[:, 2]
    y[:, 3], pred[:, 3] = 1.5, 1.5  # constant and predicted exactly
    np.testing.assert_allclose(r2_columns(pred, y), r2_score(y, pred, multioutput="raw_values"), rtol=1e-12)
    np.testing.assert_allclose(pearson_columns(pred, y)[[0, 2]], [np.corrcoef(pred[:, j], y[:, j])[0, 1] for j in (0, 2)])


def test_ceiling_r_summary_counts_unreliable_targets_as_zero() -> None:
    """The ceiling in r units is sqrt(max(rho, 0)) over all targets: its median is sqrt of the R^2 ceiling's."""
    from layertap.encode.scores import EncodingScores

    rho = np.array([0.8, 0.6, -0.1, -0.2, 0.05, 0.5, -0.05])
    r = np.linspace(0.1, 0.4, 7)
    norm = np.where(rho > 0, 1 / np.sqrt(np.abs(rho)), np.nan)
    res = {"L": {"r": r, "r2": r**2, "r_norm": r * norm, "r2_norm": r**2 * norm**2, "alpha": np.ones(7)}}
    with np.errstate(invalid="ignore"):
        sc = EncodingScores.from_arrays(res, ["L"], rho=rho, rois=None, roi_labels=None, manifest={}, n_bootstrap=0)
    med_r, med_r2 = sc.ceiling_summary("all", "r")[0], sc.ceiling_summary("all", "r2")[0]
    assert med_r == pytest.approx(np.sqrt(max(np.median(rho), 0)), abs=1e-12)
    assert med_r == pytest.approx(np.median(np.sqrt(np.clip(rho, 0, None))), abs=1e-12)
    assert med_r2 == pytest.approx(np.median(rho), abs=1e-12)
    s = sc.summary
    assert set(s.loc[s["metric"].isin(["ceiling_r", "ceiling_r2"]), "n_targets"]) == {7}


def test_split_half_steps_up_to_the_trials_averaged() -> None:
    """Spearman-Brown for equal halves; by hand and against simulated truth with 3 repetitions (halves of 1
    and 2 trials: plain 2r/(1+r) was 0.019 low) and 1-4 unequal ones (it was 0.063 high: stimuli seen once)."""
    r = np.linspace(-0.5, 1.0, 16)
    np.testing.assert_allclose(ceil_mod._step_up(r, 2 / 4, 2 / 4, 1 / 4), 2 * r / (1 + r), rtol=1e-12)  # 4 trials
    # signal and noise variance 1, 3 trials: halves of 1 and 2 correlate at 1/sqrt(2 * 1.5); rho = 1/(1 + 1/3)
    assert ceil_mod._step_up(np.array([1 / np.sqrt(3)]), 1.0, 0.5, 1 / 3)[0] == pytest.approx(0.75, abs=1e-12)
    rng = np.random.default_rng(5)
    n_stim, n_targets = 2000, 40
    noise_sd = np.linspace(0.5, 2.5, n_targets)
    signal = rng.standard_normal((n_stim, n_targets))
    reps = signal[None] + rng.standard_normal((4, n_stim, n_targets)) * noise_sd
    true3 = 1.0 / (1.0 + noise_sd**2 / 3)
    sh3 = lt.encode.split_half_reliability(reps[:3], n_splits=10)
    assert abs(np.median(sh3 - true3)) < 0.007
    n_i = rng.integers(1, 5, size=n_stim)
    holes = np.where(np.arange(4)[:, None, None] < n_i[None, :, None], reps, np.nan)
    true_unequal = 1.0 / (1.0 + noise_sd**2 * np.mean(1.0 / n_i))
    sh = lt.encode.split_half_reliability(holes, n_splits=10)
    assert abs(np.median(sh - true_unequal)) < 0.01


@pytest.mark.filterwarnings("ignore:Noise ceiling for tau")
@pytest.mark.parametrize(("ours", "theirs"), [("pearson", "corr"), ("spearman", "spearman"), ("kendall_tau_a", "tau-a")])
def test_rdm_noise_ceiling_equals_rsatoolbox(ours: str, theirs: str) -> None:
    import rsatoolbox

    rng = np.random.default_rng(2)
    shared = rng.random(45)
    subjects = np.stack([shared + 0.5 * rng.random(45) for _ in range(5)])
    subjects[0, 3] = subjects[0, 4]  # a tie, for the rank-based methods
    lower, upper = ceil_mod.rdm_noise_ceiling(subjects, ours)
    rdms = rsatoolbox.rdm.RDMs(subjects, dissimilarity_measure="euclidean")
    ref_lower, ref_upper = rsatoolbox.inference.boot_noise_ceiling(rdms, method=theirs)
    assert lower == pytest.approx(ref_lower, abs=1e-10)
    assert upper == pytest.approx(ref_upper, abs=1e-10)
    assert lower < upper


# -- reading and matching responses ----------------------------------------------------------------


def test_formats_and_ids_from_table(run: lt.Run, tmp_path: Path) -> None:
    import h5py
    import scipy.io

    y = np.random.default_rng(3).standard_normal((10, 5))
    ids = [Path(p).name for p in run.images[:10]][::-1]  # file names, reversed order
    np.save(tmp_path / "y.npy", y)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["betas"] = y
        f["other"] = y[:2]
    scipy.io.savemat(tmp_path / "y.mat", {"betas": y})
    with open(tmp_path / "y.tsv", "w") as f:
        f.write("stimulus\t" + "\t".join(f"v{j}" for j in range(5)) + "\n")
        for i, s in enumerate(ids):
            f.write(s + "\t" + "\t".join(repr(float(v)) for v in y[i]) + "\n")
    (tmp_path / "ids.txt").write_text("\n".join(ids))
    from layertap.encode.responses import prepare_responses

    want_rows = [run.images.index(next(p for p in run.images if Path(p).name == s)) for s in ids]
    for src, kw in [("y.npy", {}), ("y.h5", {"key": "betas"}), ("y.mat", {})]:
        resp = prepare_responses(run.images, tmp_path / src, tmp_path / "ids.txt", **kw)
        np.testing.assert_allclose(resp.data, y)
        assert resp.rows.tolist() == want_rows
    resp = prepare_responses(run.images, tmp_path / "y.tsv")  # ids in the first column
    np.testing.assert_allclose(resp.data, y)
    assert resp.rows.tolist() == want_rows and resp.unused_images == N_IMAGES - 10
    with pytest.raises(LayertapError, match="name one with --key"):
        prepare_responses(run.images, tmp_path / "y.h5", tmp_path / "ids.txt")


def test_bad_input_is_one_clear_error(run: lt.Run) -> None:
    y = np.random.default_rng(4).standard_normal((N_IMAGES, 6))
    with pytest.raises(LayertapError, match="never by position alone"):
        lt.encode(run, y, progress=False)
    with pytest.raises(LayertapError, match="look transposed.*--transpose"):
        lt.encode(run, y.T, stimuli=run.images, progress=False)
    ids = list(run.images)
    ids[5] = "no_such_image.png"
    with pytest.raises(LayertapError, match="1 of 72 stimulus ids are not images of the run.*no_such_image"):
        lt.encode(run, y, stimuli=ids, progress=False)
    with pytest.raises(LayertapError, match="appears 2 times"):
        lt.encode(run, y, stimuli=[*run.images[:-1], run.images[0]], progress=False)
    with pytest.raises(LayertapError, match="too few for 5 folds"):
        lt.encode(run, y[:8], stimuli=run.images[:8], progress=False)
    with pytest.raises(LayertapError, match="no usable target"):
        lt.encode(run, np.ones((N_IMAGES, 3)), stimuli=run.images, progress=False)
    # file stems shared by two folders would be ambiguous; these images have unique stems, paths work too
    assert lt.encode.match_ids(["a/s001.png", "s001", "s001.png", "a/s001"], run.images)[0].tolist() == [
        run.images.index("a/s001.png")
    ] * 4
    with pytest.raises(LayertapError, match="matches 2 images"):
        lt.encode.match_ids(["x"], ["a/x.png", "b/x.png"])


def test_asked_for_ceiling_without_repeats_is_an_error(run: lt.Run, tmp_path: Path, layertap_cli) -> None:
    """`--ceiling ncsnr` with 2-D responses and no --repeats used to be dropped silently (no ceiling at all)."""
    y = np.random.default_rng(5).standard_normal((N_IMAGES, 4))
    with pytest.raises(LayertapError, match="'ncsnr' noise ceiling needs repeated measurements.*--repeats"):
        lt.encode(run, y, stimuli=run.images, ceiling="ncsnr", layers=["fc1"], progress=False)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "ids.txt").write_text("\n".join(run.images) + "\n")
    res = layertap_cli("encode", str(run.path), "--layers", "fc1", "--responses", str(tmp_path / "y.npy"),
                       "--stimuli", str(tmp_path / "ids.txt"), "--ceiling", "split-half", "--out", str(tmp_path / "s"))
    assert res.returncode != 0 and "needs repeated measurements" in res.stderr
    assert not (tmp_path / "s").exists()
    # the default (no --ceiling) still runs without repeats, with no ceiling
    scores = lt.encode(run, y, stimuli=run.images, layers=["fc1"], progress=False)
    assert scores.ceiling is None


def test_reported_handling_of_drops_and_bad_targets(run: lt.Run) -> None:
    repeats, _ = simulate(run, "fc1", 8, noise_sd=0.5, reps=1, seed=8)
    y = repeats[0].copy()
    y[3, 1] = np.nan  # a NaN target
    y[:, 2] = 7.0  # a constant target
    ids = list(run.images)
    ids[0] = "missing.png"
    scores = lt.encode(run, y, stimuli=ids, on_missing="drop", layers=["fc1"], folds=3, progress=False)
    t = scores.to_pandas(wide=True)
    assert np.isnan(t["r"].to_numpy()[[1, 2]]).all() and np.isfinite(t["r"].to_numpy()[[0, 3, 4]]).all()
    m = scores.manifest
    assert m["stimuli"]["dropped_not_in_run"] == ["missing.png"] and m["stimuli"]["n"] == N_IMAGES - 1
    assert m["targets"]["left_out"] == {"nan_or_inf": 1, "constant": 1, "indices": [1, 2]}


# -- command line ----------------------------------------------------------------------------------


def test_cli_encode_end_to_end(run: lt.Run, tmp_path: Path, layertap_cli) -> None:
    import pandas as pd

    repeats, _ = simulate(run, "fc1", 30, noise_sd=0.7, reps=2, seed=10)
    perm = np.random.default_rng(11).permutation(N_IMAGES)
    np.save(tmp_path / "x.npy", repeats[:, perm])
    (tmp_path / "ids.tsv").write_text("stimulus\tnote\n" + "".join(f"{run.images[i]}\tz\n" for i in perm))
    (tmp_path / "rois.txt").write_text("\n".join(["V1"] * 15 + ["IT"] * 15))
    out = tmp_path / "scores"
    proc = layertap_cli("encode", str(run.path), "--responses", str(tmp_path / "x.npy"), "--stimuli",
                        str(tmp_path / "ids.tsv"), "--rois", str(tmp_path / "rois.txt"), "--folds", "3",
                        "--out", str(out), check=True)
    assert "ROI V1" in proc.stdout and "best: fc1" in proc.stdout
    table = pd.read_parquet(out / "scores.parquet")
    assert set(table.columns) == {"layer", "target", "roi", "metric", "value"}
    assert len(table) == 3 * 30 * 5  # layers x targets x (r, r2, r_norm, r2_norm, alpha)
    assert pd.read_csv(out / "scores.csv").shape == table.shape
    manifest = json.loads((out / "manifest.json").read_text())
    files = {Path(f["path"]).name: f["sha256"] for f in manifest["data_files"]}
    assert files["x.npy"] == hashlib.sha256((tmp_path / "x.npy").read_bytes()).hexdigest()
    assert manifest["folds"]["k"] == 3 and len(manifest["alphas"]["grid"]) == 15
    assert (out / "scores.png").stat().st_size > 10_000
    loaded = lt.encode.EncodingScores.load(out)
    assert loaded.best_layer("IT") == "fc1"
    bad = layertap_cli("encode", str(run.path), "--responses", str(tmp_path / "x.npy"), "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--stimuli" in bad.stderr


# -- RSA route in `layertap compare` ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Noise ceiling for tau")
def test_compare_subject_rdms_equals_rsatoolbox(run: lt.Run, tmp_path: Path, layertap_cli) -> None:
    import pandas as pd
    import rsatoolbox
    from scipy.spatial.distance import pdist, squareform

    from layertap.encode.rsa import compare_to_subjects

    order = np.random.default_rng(12).permutation(N_IMAGES)[:30]  # 30 stimuli, in another order
    x = np.asarray(run["fc1"], dtype=np.float64)[order]
    rng = np.random.default_rng(13)
    subjects = np.stack([squareform(pdist(x + rng.standard_normal(x.shape) * 0.3, "correlation")) for _ in range(4)])
    np.save(tmp_path / "subjects.npy", subjects)
    (tmp_path / "ids.txt").write_text("\n".join(run.images[i] for i in order))
    scores, (lower, upper) = compare_to_subjects(run, tmp_path / "subjects.npy", ["fc1", "pool"], "rdm-spearman",
                                                 stimuli=tmp_path / "ids.txt")
    data_rdms = rsatoolbox.rdm.RDMs(np.stack([squareform(m, checks=False) for m in subjects]))
    model = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(x), method="correlation")
    np.testing.assert_allclose(scores["fc1"], rsatoolbox.rdm.compare(model, data_rdms, "spearman")[0], atol=1e-10)
    ref = rsatoolbox.inference.boot_noise_ceiling(data_rdms, method="spearman")
    assert (lower, upper) == pytest.approx(ref, abs=1e-10)
    assert scores["fc1"].mean() > lower  # the generating layer reaches the ceiling
    proc = layertap_cli("compare", str(run.path), "--subject-rdms", str(tmp_path / "subjects.npy"), "--stimuli",
                        str(tmp_path / "ids.txt"), "--layers", "fc1", "pool", "--out", str(tmp_path / "rsa.csv"),
                        check=True)
    assert f"lower {lower:.4f}, upper {upper:.4f}" in proc.stdout
    table = pd.read_csv(tmp_path / "rsa.csv")
    np.testing.assert_allclose(table.loc[table["layer"] == "fc1", "mean"], scores["fc1"].mean(), atol=1e-12)
