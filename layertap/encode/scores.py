"""The result of :func:`layertap.encode`: a tidy table, per-ROI summaries, the manifest, a figure."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layertap._optional import require
from layertap.analysis.plots import _figure, _save
from layertap.errors import LayertapError
from layertap.store.files import disk_error, write_json_atomic

METRIC_LABELS = {
    "r": "Pearson r (held-out)",
    "r2": "R² (held-out)",
    "r_norm": "r / noise ceiling",
    "r2_norm": "R² / noise ceiling",
    "alpha": "ridge alpha",
}
ALL = "all"


def _pandas() -> Any:
    return require("pandas", "encode", "encoding scores")


def bootstrap_median(values: np.ndarray, n_bootstrap: int, seed: int, ci: float = 0.95) -> tuple[float, float, float]:
    """Median of the finite ``values`` and its percentile bootstrap CI (resampling values).

    Args:
        values: per-target scores (NaN ignored).
        n_bootstrap: resamples (0: no interval).
        seed: seed of the resampling.
        ci: coverage of the interval.

    Returns:
        ``(median, low, high)``; NaN where there is no finite value.

    Example:
        >>> median, low, high = bootstrap_median(np.array([0.1, 0.2, 0.3, np.nan]), 200, seed=0)
        >>> round(median, 6), bool(low <= median <= high)
        (0.2, True)
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    med = float(np.median(v))
    if n_bootstrap <= 0 or v.size < 2:
        return med, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    step = max(1, (16 << 20) // (8 * v.size))  # resamples per batch: ~16 MB of indices
    meds = []
    for start in range(0, n_bootstrap, step):
        idx = rng.integers(0, v.size, size=(min(step, n_bootstrap - start), v.size))
        meds.append(np.median(v[idx], axis=1))
    lo, hi = np.quantile(np.concatenate(meds), [(1 - ci) / 2, (1 + ci) / 2])
    return med, float(lo), float(hi)


class EncodingScores:
    """Scores of every layer for every target, tidy.

    Attributes:
        table: pandas DataFrame, one row per (layer, target, metric): columns ``layer``, ``target``
            (column index in the response matrix), ``roi``, ``metric`` (r, r2, r_norm, r2_norm,
            alpha), ``value``.
        summary: per (layer, roi, metric): ``median`` over targets, bootstrap ``ci_low``/``ci_high``
            (95%), ``n_targets``; ROI ``all`` pools every target. Rows with an empty layer hold the
            noise ceiling (metrics ``ceiling_r`` = sqrt(max(rho, 0)), ``ceiling_r2`` = rho). Scores are
            per held-out fold (r: Pearson; r2: 1 - SS_res/SS_tot around the fold's mean, as sklearn's
            ``r2_score``) and averaged over folds; ``r_norm`` = r / sqrt(rho), ``r2_norm`` = r2 / rho.
        ceiling: (targets,) reliability rho of the trial-averaged responses, or None without repeats.
        layers: layer names in run order.
        manifest: what was done (data files with sha256, folds, seeds, alphas, solver, versions).

    Example:
        >>> scores = EncodingScores.load("./scores")  # doctest: +SKIP
        >>> scores.profile(roi="V4", metric="r")  # doctest: +SKIP
    """

    def __init__(self, table: Any, summary: Any, layers: list[str], manifest: dict[str, Any], ceiling: Any = None):
        self.table = table
        self.summary = summary
        self.layers = layers
        self.manifest = manifest
        self.ceiling = ceiling
        #: held-out predictions per layer (stimuli x targets) when ``encode(keep_predictions=True)``
        self.predictions: dict[str, np.ndarray] | None = None

    @classmethod
    def from_arrays(
        cls,
        results: dict[str, dict[str, np.ndarray]],
        layers: Sequence[str],
        *,
        rho: np.ndarray | None,
        rois: dict[str, np.ndarray] | None,
        roi_labels: np.ndarray | None,
        manifest: dict[str, Any],
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> EncodingScores:
        """Build the tables from per-layer score arrays (medians over targets and their bootstrap CIs per ROI).

        Args:
            results: ``{layer: {metric: (targets,) array}}``.
            layers: layer names in run order.
            rho: (targets,) reliability of the trial-averaged responses, or None.
            rois: ``{roi: target indices}``, or None (then only ROI ``all``).
            roi_labels: one ROI label per target, or None.
            manifest: what was done.
            n_bootstrap: bootstrap resamples of each median.
            seed: seed of the resampling.

        Returns:
            The scores.
        """
        pd = _pandas()
        layers = list(layers)
        n_targets = len(next(iter(results.values()))["r"])
        target = np.arange(n_targets)
        roi_col = np.asarray(roi_labels, dtype=object) if roi_labels is not None else np.full(n_targets, "", object)
        metrics = [m for m in ("r", "r2", "r_norm", "r2_norm", "alpha") if rho is not None or "norm" not in m]
        parts = []
        for layer in layers:
            for m in metrics:
                parts.append(pd.DataFrame({"layer": layer, "target": target, "roi": roi_col, "metric": m,
                                           "value": results[layer][m]}))
        table = pd.concat(parts, ignore_index=True)
        table["layer"] = pd.Categorical(table["layer"], categories=layers)
        table["metric"] = pd.Categorical(table["metric"], categories=metrics)
        groups = {ALL: target, **(rois or {})}
        rows: list[tuple[str | None, str, str, float, float, float, int]] = []
        for roi, idx in groups.items():
            for layer in layers:
                for m in metrics:
                    if m == "alpha":
                        continue
                    med, lo, hi = bootstrap_median(results[layer][m][idx], n_bootstrap, seed)
                    n = int(np.isfinite(results[layer][m][idx]).sum())
                    rows.append((layer, roi, m, med, lo, hi, n))
            if rho is not None:
                # rho <= 0 (no reliable signal): a ceiling r of 0, not a target dropped from the median,
                # which would lift the ceiling of an ROI with unreliable targets above that of its R^2
                with np.errstate(invalid="ignore"):
                    ceil_r = np.sqrt(np.clip(rho, 0.0, None))
                for m, vals in (("ceiling_r", ceil_r), ("ceiling_r2", rho)):
                    med, lo, hi = bootstrap_median(vals[idx], n_bootstrap, seed)
                    rows.append((None, roi, m, med, lo, hi, int(np.isfinite(vals[idx]).sum())))
        summary = pd.DataFrame(rows, columns=["layer", "roi", "metric", "median", "ci_low", "ci_high", "n_targets"])
        return cls(table, summary, layers, manifest, rho)

    # -- access ------------------------------------------------------------------------------
    def to_pandas(self, wide: bool = False) -> Any:
        """The tidy table.

        Args:
            wide: one row per (layer, target) and one column per metric instead.

        Returns:
            A ``pandas.DataFrame``.
        """
        if not wide:
            return self.table
        out = self.table.pivot_table(index=["layer", "target", "roi"], columns="metric", values="value",
                                     observed=True, dropna=False)
        return out.reset_index()

    @property
    def rois(self) -> list[str]:
        """ROI names in the summary (``all`` first)."""
        return list(dict.fromkeys(self.summary["roi"].tolist()))

    def profile(self, roi: str = ALL, metric: str = "r") -> Any:
        """Summary rows of one ROI and metric, in layer order.

        Args:
            roi: the ROI (``all``: every target).
            metric: ``r``, ``r2``, ``r_norm``, ``r2_norm`` or ``alpha``.

        Returns:
            A ``pandas.DataFrame`` (columns ``layer``, ``median``, ``ci_low``, ``ci_high``, ``n_targets``, ...).

        Raises:
            LayertapError: an unknown ROI or metric.
        """
        if roi not in self.rois:
            raise LayertapError(f"no ROI '{roi}' (ROIs: {', '.join(self.rois)})")
        s = self.summary
        rows = s[(s["roi"] == roi) & (s["metric"] == metric) & s["layer"].notna()]
        if rows.empty:
            raise LayertapError(f"no metric '{metric}' in the summary (metrics: {', '.join(self._metrics())})")
        return rows.set_index("layer").loc[self.layers].reset_index()

    def _metrics(self) -> list[str]:
        s = self.summary
        return list(dict.fromkeys(s[s["layer"].notna()]["metric"].tolist()))

    def best_layer(self, roi: str = ALL, metric: str = "r") -> str:
        """The layer with the highest median ``metric`` over the targets of ``roi``.

        Args:
            roi: the ROI (``all``: every target).
            metric: as in :meth:`profile`.

        Returns:
            The layer name.
        """
        prof = self.profile(roi, metric)
        if prof["median"].isna().all():
            raise LayertapError(f"no finite '{metric}' score for ROI '{roi}'")
        return str(prof.loc[prof["median"].idxmax(), "layer"])

    def ceiling_summary(self, roi: str = ALL, metric: str = "r") -> tuple[float, float, float] | None:
        """The noise ceiling of ``roi`` in units of ``metric``.

        Args:
            roi: the ROI (``all``: every target).
            metric: ``r`` or ``r2`` (normalised metrics have no ceiling of their own).

        Returns:
            ``(median, ci_low, ci_high)``, or None without repeats.
        """
        s = self.summary
        rows = s[(s["roi"] == roi) & (s["metric"] == f"ceiling_{metric}")]
        if rows.empty:
            return None
        row = rows.iloc[0]
        return float(row["median"]), float(row["ci_low"]), float(row["ci_high"])

    # -- figure ------------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike[str] | None = None, metric: str = "r", rois: Sequence[str] | None = None,
             dpi: int = 200, title: str | None = None) -> Any:
        """Layer profile per ROI: median ``metric`` with its 95% CI, the noise-ceiling band, best layer marked.

        Args:
            path: .png/.svg/.pdf to write (None: return the matplotlib Figure).
            metric: ``r``, ``r2``, ``r_norm`` or ``r2_norm``.
            rois: ROIs to draw (default: every ROI, or ``all`` when none were given).
            dpi: resolution of a PNG.
            title: figure title.

        Returns:
            The path written, or the Figure.
        """
        names = list(rois) if rois is not None else ([r for r in self.rois if r != ALL] or [ALL])
        n_layers = len(self.layers)
        fig = _figure((max(4.5, 0.55 * n_layers + 2.5), 3.6))
        ax = fig.add_subplot(1, 1, 1)
        colors = [f"C{i % 10}" for i in range(len(names))]
        x = np.arange(n_layers)
        norm = metric.endswith("_norm")
        for roi, color in zip(names, colors, strict=True):
            prof = self.profile(roi, metric)
            y, lo, hi = (prof[c].to_numpy(dtype=float) for c in ("median", "ci_low", "ci_high"))
            n_t = int(prof["n_targets"].max())
            label = f"{roi} (n={n_t})" if len(names) > 1 or roi != ALL else f"median of {n_t} targets, 95% CI"
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
            ax.plot(x, y, "-o", color=color, markersize=4, linewidth=1.6, label=label)
            if np.isfinite(y).any():
                b = int(np.nanargmax(y))
                ax.plot(x[b], y[b], marker="*", markersize=13, color=color, markeredgecolor="black",
                        markeredgewidth=0.6, zorder=5, linestyle="none")
            ceil = None if norm else self.ceiling_summary(roi, metric)
            if ceil is not None and np.isfinite(ceil[0]):
                c_lo, c_hi = (ceil[1], ceil[2]) if np.isfinite(ceil[1]) else (ceil[0], ceil[0])
                ax.axhspan(c_lo, c_hi, color=color, alpha=0.10, linewidth=0)
                ax.axhline(ceil[0], color=color, linestyle="--", linewidth=1.0)
        if norm and self.ceiling is not None:
            ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1.0)
        ax.axhline(0.0, color="0.6", linewidth=0.6)
        ax.set_xticks(x)
        rotate = max(len(n) for n in self.layers) > 6 or n_layers > 8
        ax.set_xticklabels(self.layers, rotation=40 if rotate else 0, ha="right" if rotate else "center")
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.spines[["top", "right"]].set_visible(False)
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], marker="*", color="0.4", markeredgecolor="black", markersize=11, linestyle="none"))
        labels.append("best layer")
        if self.ceiling is not None:
            dashed = Line2D([], [], color="0.3", linestyle="--", linewidth=1.0)
            handles.append((Patch(facecolor="0.5", alpha=0.25), dashed) if not norm else dashed)
            labels.append("noise ceiling (median, 95% CI)" if not norm else "noise ceiling")
        ax.legend(handles, labels, frameon=False, fontsize=8, loc="best")
        ax.set_title(title or "Encoding score by layer", fontsize=10)
        return fig if path is None else _save(fig, path, dpi)

    # -- files -------------------------------------------------------------------------------
    def save(self, out: str | os.PathLike[str], plot: bool = True, metric: str = "r") -> dict[str, Path]:
        """Write ``scores.parquet``, ``scores.csv``, ``summary.csv``, ``manifest.json`` (and ``scores.png``).

        Args:
            out: folder (created).
            plot: also draw the layer profile (needs matplotlib).
            metric: metric of the figure.

        Returns:
            ``{kind: path}`` of the files written.
        """
        out = Path(out)
        paths = {"table": out / "scores.parquet", "csv": out / "scores.csv", "summary": out / "summary.csv",
                 "manifest": out / "manifest.json"}
        try:
            out.mkdir(parents=True, exist_ok=True)
            try:
                self.table.to_parquet(paths["table"], index=False)
            except ImportError:
                require("pyarrow", "encode", "writing parquet")  # the one-line install hint when pyarrow is missing
                raise
            self.table.to_csv(paths["csv"], index=False)
            self.summary.to_csv(paths["summary"], index=False)
            if self.ceiling is not None:
                paths["ceiling"] = out / "ceiling.csv"
                _pandas().DataFrame({"target": np.arange(len(self.ceiling)), "rho": self.ceiling}).to_csv(
                    paths["ceiling"], index=False)
            write_json_atomic(paths["manifest"], {**self.manifest, "files": {k: p.name for k, p in paths.items()}})
        except OSError as err:
            raise disk_error(err, out) from None
        if plot:
            paths["plot"] = self.plot(out / "scores.png", metric=metric)
        return paths

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> EncodingScores:
        """Read a folder written by :meth:`save`.

        Args:
            out: the folder.

        Returns:
            The scores (table, summary, ceiling and manifest as saved).

        Raises:
            LayertapError: the folder holds no saved scores.
        """
        pd = _pandas()
        out = Path(out)
        if not (out / "manifest.json").is_file():
            raise LayertapError(f"{out} holds no encoding scores (no manifest.json)")
        manifest = json.loads((out / "manifest.json").read_text())
        table = pd.read_parquet(out / "scores.parquet")
        summary = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values={"layer": [""], "median": [""],
                                                                                       "ci_low": [""], "ci_high": [""]})
        summary["layer"] = summary["layer"].replace("", None)
        ceiling = pd.read_csv(out / "ceiling.csv")["rho"].to_numpy() if (out / "ceiling.csv").is_file() else None
        layers = list(manifest["layers"])
        return cls(table, summary, layers, manifest, ceiling)

    def __repr__(self) -> str:
        n_t = int(self.table["target"].max()) + 1 if len(self.table) else 0
        return f"EncodingScores({len(self.layers)} layers x {n_t} targets, ROIs={self.rois})"
