"""Paper-ready figures: titles with model/layer/measure, labelled colour bars, data-range colour limits,
bar chart with bootstrap CIs, MDS from the command line, integer epoch ticks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import layertap as lt
from layertap.analysis import plots
from layertap.cli import app as cli


@pytest.fixture(scope="module")
def run(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> lt.Run:
    model = lt.load_model("resnet18", weights="random", seed=0)
    out = tmp_path_factory.mktemp("figs") / "acts"
    return lt.extract(model, image_dir, ["layer2", "layer3", "penultimate"], out, progress=False, reduce="avg")


@pytest.fixture()
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every figure the plotting functions save (and the files still get written)."""
    saved: list = []
    real = plots._save

    def keep(fig, path, dpi):  # noqa: ANN001, ANN202
        saved.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def test_rdm_and_mds_figures_from_the_cli(run: lt.Run, tmp_path: Path, figures: list) -> None:
    args = ["rdm", str(run.path), "--layer", "layer3", "--out", str(tmp_path / "r.npy")]
    assert cli.main([*args, "--plot", str(tmp_path / "rdm.png"), "--mds", str(tmp_path / "mds.png")]) == 0
    assert (tmp_path / "rdm.png").stat().st_size > 0 and (tmp_path / "mds.png").stat().st_size > 0
    heat, mds = figures
    ax, bar = heat.axes
    assert ax.get_title() == "resnet18, layer3: RDM"
    assert bar.get_ylabel() == "1 - Pearson r"
    d = np.load(tmp_path / "r.npy")
    off = d[~np.eye(9, dtype=bool)]
    assert ax.images[0].get_clim() == pytest.approx((off.min(), off.max()))  # not pinned to 0 by the diagonal
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 9
    assert mds.axes[0].get_title() == "resnet18, layer3: MDS (correlation)"
    assert [t.get_text() for t in mds.axes[0].get_legend().get_texts()] == ["cat", "dog", "rocket"]


def test_layer_similarity_figure_uses_the_data_range(run: lt.Run, tmp_path: Path, figures: list) -> None:
    assert cli.main(["compare", str(run.path), "--method", "cka-linear", "--plot", str(tmp_path / "l.png")]) == 0
    ax, bar = figures[0].axes
    m, _, _ = lt.analysis.layer_similarity(run, method="cka-linear")
    off = m[~np.eye(3, dtype=bool)]
    assert ax.images[0].get_clim() == pytest.approx((off.min(), off.max()))
    assert bar.get_ylabel() == "linear CKA" and ax.get_title() == "resnet18: linear CKA"


def test_reference_comparison_is_a_bar_chart_with_bootstrap_cis(run: lt.Run, tmp_path: Path, figures: list) -> None:
    from scipy.spatial.distance import pdist, squareform
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    ref = squareform(pdist(np.asarray(run["layer3"]) + rng.normal(0, 0.05, (9, 256)), "correlation"))
    np.save(tmp_path / "ref.npy", ref)
    args = ["compare", str(run.path), "--reference", str(tmp_path / "ref.npy"), "--plot", str(tmp_path / "b.png")]
    assert cli.main(args) == 0
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer2", "layer3", "fc:input"]
    heights = [p.get_height() for p in ax.patches]
    expected = spearmanr(pdist(np.asarray(run["layer3"]), "correlation"), squareform(ref, checks=False))[0]
    assert heights[1] == pytest.approx(expected)
    assert ax.get_ylabel() == "Spearman \u03c1 between RDMs (95% bootstrap CI)"
    bars = next(c for c in ax.containers if getattr(c, "errorbar", None) is not None)
    segments = bars.errorbar.lines[2][0].get_segments()  # one error bar per layer, around its bar
    assert len(segments) == 3 and all(s[0][1] <= h <= s[1][1] for s, h in zip(segments, heights, strict=True))


def test_bootstrap_ci() -> None:
    from scipy.spatial.distance import pdist, squareform

    from layertap.analysis.results import bootstrap_ci

    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 5))
    a = squareform(pdist(x))
    assert bootstrap_ci(a, a, "rdm-pearson", n_boot=50) == pytest.approx((1.0, 1.0))
    b = squareform(pdist(x + rng.normal(0, 1.0, x.shape)))
    lo, hi = bootstrap_ci(a, b, "rdm-spearman", n_boot=100)
    from scipy.stats import spearmanr

    full = spearmanr(squareform(a), squareform(b))[0]
    assert lo < full < hi and hi - lo < 0.6


def test_bootstrap_ci_of_tau_a_is_tau_a() -> None:
    """The CI of rdm-kendall_tau_a resamples tau-a (what compare_rdms reports), not scipy's tau-b, which
    resampled images (duplicate pairs: ties) push above it. Reference: the same resamples, tau-a by pairs."""
    from scipy.spatial.distance import pdist, squareform
    from scipy.stats import kendalltau

    from layertap.analysis.results import bootstrap_ci
    from layertap.errors import LayertapError

    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 4))
    a, b = squareform(pdist(x)), squareform(pdist(x + rng.normal(0, 0.7, x.shape)))
    b = np.round(b, 1)  # a coarse reference RDM with tied values, as behavioural RDMs often are

    def tau_a(u: np.ndarray, v: np.ndarray) -> float:
        s = np.sign(u[:, None] - u[None, :]) * np.sign(v[:, None] - v[None, :])
        return float(s[np.triu_indices(len(u), 1)].sum() / (len(u) * (len(u) - 1) / 2))

    iu = np.triu_indices(12, k=1)
    draws = np.random.default_rng(0)
    taus_a, taus_b = [], []
    for _ in range(40):
        idx = draws.integers(0, 12, 12)
        i, j = idx[iu[0]], idx[iu[1]]
        keep = i != j
        u, v = a[i[keep], j[keep]], b[i[keep], j[keep]]
        taus_a.append(tau_a(u, v))
        taus_b.append(kendalltau(u, v)[0])
    expected = np.percentile(taus_a, [2.5, 97.5])
    assert bootstrap_ci(a, b, "rdm-kendall_tau_a", n_boot=40, seed=0) == pytest.approx(tuple(expected), abs=1e-12)
    assert np.max(np.abs(np.percentile(taus_b, [2.5, 97.5]) - expected)) > 0.02  # tau-b would be told apart
    with pytest.raises(LayertapError, match="rdm-spearman"):
        bootstrap_ci(a, b, "cka-linear")


def test_training_plot_has_integer_epoch_ticks(tmp_path: Path) -> None:
    from layertap.training.ipcl import plot_history

    captured = []
    import matplotlib.figure

    orig = matplotlib.figure.Figure.savefig

    def grab(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        captured.append(self)
        return orig(self, *a, **kw)

    matplotlib.figure.Figure.savefig = grab
    try:
        plot_history([{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5}], tmp_path / "t.png")
    finally:
        matplotlib.figure.Figure.savefig = orig
    ticks = captured[0].axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


def test_two_layer_similarity_keeps_a_correlation_inside_its_range(tmp_path: Path, figures: list) -> None:
    # two layers: one off-diagonal value; the colour band must sit around it, not reach past 1
    plots.plot_layer_similarity(np.array([[1.0, 0.98], [0.98, 1.0]]), ["a", "b"], ["a", "b"], tmp_path / "two.png")
    lo, hi = figures[0].axes[0].images[0].get_clim()
    assert lo < 0.98 < hi <= 1.0 and hi - lo < 0.1
