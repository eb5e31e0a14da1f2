"""Labelled results: to_xarray / to_pandas / _repr_html_, zarr dimension names, analysis result objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import layertap as lt
from layertap.errors import LayertapError


@pytest.fixture(scope="module")
def run(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> lt.Run:
    model = lt.load_model("resnet18", weights="random", seed=0)
    out = tmp_path_factory.mktemp("labels") / "acts"
    return lt.extract(model, image_dir, ["layer4", "penultimate", "layer3"], out, progress=False, reduce={"layer3": "avg"})


def test_to_xarray_has_named_dims_and_image_coords(run: lt.Run, image_dir: Path) -> None:
    da = run.to_xarray("layer4")
    assert da.dims == ("image", "channel", "y", "x") and da.shape == (9, 512, 7, 7)
    np.testing.assert_array_equal(da.values, np.asarray(run["layer4"]))
    assert list(da["path"].values) == run.images
    # classes are the first folder level of the image paths (an independent reading of the folder)
    assert list(da["class"].values) == [p.split("/")[0] for p in run.images] and sorted(set(da["class"].values)) == [
        "cat", "dog", "rocket"
    ]
    np.testing.assert_array_equal(da["target"].values, run.targets)
    assert da.attrs["model"] == "torchvision:resnet18" and da.name == "layer4"
    assert da.sel(image=da["class"] == "dog").shape[0] == 3
    vec = run.to_xarray("fc:input")
    assert vec.dims == ("image", "unit")


def test_to_pandas_for_vectors_only(run: lt.Run) -> None:
    df = run.to_pandas("layer3")  # avg-pooled: 256 units
    assert df.shape == (9, 256) and list(df.index) == run.images and df.index.name == "path"
    np.testing.assert_array_equal(df.to_numpy(), np.asarray(run["layer3"]))
    with pytest.raises(LayertapError, match="512x7x7 per image, not a vector; use run.to_xarray"):
        run.to_pandas("layer4")


def test_zarr_arrays_carry_dimension_names(run: lt.Run) -> None:
    import zarr

    z = zarr.open_array(str(run.path / "arrays" / "layer4"), mode="r")
    assert tuple(z.metadata.dimension_names) == ("image", "channel", "y", "x")
    z = zarr.open_array(str(run.path / "arrays" / "layer3"), mode="r")
    assert tuple(z.metadata.dimension_names) == ("image", "unit")


def test_run_html(run: lt.Run) -> None:
    text = run._repr_html_()
    assert "<table>" in text and "torchvision:resnet18" in text
    assert "<code>layer4</code></td><td>512x7x7</td><td>channel, y, x</td><td>float32</td>" in text
    assert f"{9 * 512 * 49 * 4 / 1e6:.2f} MB" in text


def test_analysis_results_are_objects_that_still_unpack(run: lt.Run) -> None:
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    from layertap import analysis as an

    res = an.layer_similarity(run, layers_a=["layer3", "fc:input"], method="rdm-spearman")
    m, rows, cols = res  # the old tuple form
    assert rows == cols == ["layer3", "fc:input"] and res.method == "rdm-spearman"
    ref = spearmanr(
        pdist(np.asarray(run["layer3"]).reshape(9, -1), "correlation"), pdist(np.asarray(run["fc:input"]), "correlation")
    )[0]
    df = res.to_pandas()
    assert df.loc["layer3", "fc:input"] == pytest.approx(ref) and df.loc["fc:input", "fc:input"] == 1.0
    assert "<caption>layer similarity (rdm-spearman, correlation)</caption>" in res._repr_html_()

    reference = np.asarray(run["fc:input"])[:, :50]
    scores = an.compare_to_reference(run, reference, layers=["layer3"], method="rdm-pearson")
    assert list(scores) == ["layer3"] and isinstance(scores, dict)
    table = scores.to_pandas()
    assert list(table.columns) == ["layer", "similarity", "method"]
    assert table["similarity"][0] == pytest.approx(
        np.corrcoef(pdist(np.asarray(run["layer3"]), "correlation"), pdist(reference, "correlation"))[0, 1]
    )
