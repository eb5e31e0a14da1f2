"""Post-processing (center, normalize, PCA, sparse random projection, ensembles) and export formats.

Every number is checked against an independent reference computed here with plain numpy,
scikit-learn, scipy or the format's own reader.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import layertap as lt
from layertap.errors import LayertapError, MissingDependencyError
from layertap.process.ensemble import feature_map_ensemble
from layertap.process.pca import PCA
from layertap.process.postprocess import center, normalize, postprocess
from layertap.process.projection import SparseRandomProjection, johnson_lindenstrauss_min_dim
from layertap.store import blocks as store_blocks
from layertap.store import export as formats

LAYERS = ["features.2", "features.5", "classifier.4", "classifier.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> lt.Run:
    """Six JPEG crops of scikit-image photos in three class folders, AlexNet (random weights), 2 chunks."""
    import skimage.data as d

    root = tmp_path_factory.mktemp("pp_images")
    for name in ("astronaut", "coffee", "chelsea"):
        photo = getattr(d, name)()
        (root / name).mkdir()
        for i, (top, left) in enumerate([(0, 0), (60, 90)]):
            crop = photo[top : top + 240, left : left + 260]
            Image.fromarray(crop).resize((96, 88)).save(root / name / f"{i}.jpg", quality=90)
    out = tmp_path_factory.mktemp("pp_run") / "run"
    return lt.extract(
        "alexnet", root, LAYERS, out, weights="random", workers=0, batch_size=4, chunk_rows=4, progress=False
    )


def flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def align_signs(got: np.ndarray, ref: np.ndarray, axis: int = 0) -> np.ndarray:
    """Flip each component (row if axis=0, column if axis=1) of ``got`` to agree in sign with ``ref``."""
    dots = np.sum(got * ref, axis=1 - axis)
    signs = np.where(dots < 0, -1.0, 1.0)
    return got * (signs[:, None] if axis == 0 else signs[None, :])


@pytest.fixture()
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Read one row per block and record how many rows every read of a stored layer asks for."""
    monkeypatch.setattr(store_blocks, "CHUNK_BYTES", 1)
    sizes: list[int] = []
    original = lt.LayerArray.__getitem__

    def spy(self: lt.LayerArray, key: object) -> np.ndarray:
        out = original(self, key)
        sizes.append(len(out) if out.ndim else 1)
        return out

    monkeypatch.setattr(lt.LayerArray, "__getitem__", spy)
    return sizes


# -- center / normalize -----------------------------------------------------------------------------
def test_center_then_normalize_streams_and_matches_numpy(run: lt.Run, tmp_path: Path, tiny_blocks: list[int]) -> None:
    out = postprocess(run, tmp_path / "cn", center=True, normalize=True)
    assert max(tiny_blocks) == 1, "a layer was read more than one row at a time"
    tiny_blocks.clear()
    for layer in LAYERS:
        x = flat(run[layer][:])
        ref = x - x.mean(axis=0)
        norms = np.linalg.norm(ref, axis=1, keepdims=True)
        ref = ref / np.where(norms > 0, norms, 1)
        got = out[layer][:]
        assert got.shape == run[layer].shape and got.dtype == np.float32
        np.testing.assert_allclose(flat(got), ref, rtol=1e-5, atol=1e-6)
    m = out.manifest
    assert m["status"] == "complete" and out.images == run.images and out.classes == run.classes
    np.testing.assert_array_equal(out.targets, run.targets)
    steps = m["postprocessing"][-1]["steps"]
    assert [s["op"] for s in steps] == ["center", "normalize"]
    assert m["postprocessing"][-1]["source"] == str(run.path)
    assert m["spec"] != run.manifest["spec"]  # the extract command of the source cannot mistake it for its own


def test_center_and_normalize_alone(run: lt.Run, tmp_path: Path) -> None:
    c = center(run, tmp_path / "c", ["classifier.4"])
    n = normalize(run, tmp_path / "n", ["features.5"])
    x = flat(run["classifier.4"][:])
    np.testing.assert_allclose(flat(c["classifier.4"][:]), x - x.mean(axis=0), rtol=1e-5, atol=1e-5)
    y = flat(run["features.5"][:])
    np.testing.assert_allclose(flat(n["features.5"][:]), y / np.linalg.norm(y, axis=1, keepdims=True), rtol=1e-5)
    assert c.layers == ["classifier.4"] and n.layers == ["features.5"]
    # a processed run is an ordinary run: export works on it
    back = np.load(lt.export(n, "npy", tmp_path / "exp")[0])
    np.testing.assert_array_equal(back, n["features.5"][:])


def test_postprocess_refuses_bad_input(run: lt.Run, tmp_path: Path) -> None:
    with pytest.raises(LayertapError, match="nothing to do"):
        postprocess(run, tmp_path / "x")
    with pytest.raises(LayertapError, match="new directory"):
        center(run, run.path)
    with pytest.raises(LayertapError, match="no layer"):
        center(run, tmp_path / "y", ["classifer.4"])
    center(run, tmp_path / "z", ["classifier.4"])
    with pytest.raises(LayertapError, match="overwrite"):
        center(run, tmp_path / "z", ["classifier.4"])
    center(run, tmp_path / "z", ["classifier.5"], overwrite=True)
    assert lt.open_run(tmp_path / "z").layers == ["classifier.5"]


# -- PCA ------------------------------------------------------------------------------------------
def lowrank(n: int = 300, d: int = 40, rank: int = 8, seed: int = 0) -> np.ndarray:
    """Data with a clearly decaying spectrum (distinct eigenvalues) plus a little noise."""
    rng = np.random.default_rng(seed)
    scales = 10.0 / np.arange(1, rank + 1) ** 1.5
    return (
        (rng.standard_normal((n, rank)) * scales) @ np.linalg.qr(rng.standard_normal((d, rank)))[0].T
        + (0.01 * rng.standard_normal((n, d)))
        + 3.0
    )


def test_pca_exact_matches_svd_and_sklearn() -> None:
    from sklearn.decomposition import PCA as SkPCA

    x = lowrank()
    p = PCA(5, method="exact").fit(x)
    # reference 1: numpy SVD of the centred matrix
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    vt = vt[:5] * np.sign(vt[np.arange(5), np.abs(vt[:5]).argmax(1)])[:, None]  # documented: largest |loading| > 0
    np.testing.assert_allclose(p.components_, vt, atol=1e-8)  # signs included
    np.testing.assert_allclose(p.explained_variance_, s[:5] ** 2 / (len(x) - 1), rtol=1e-10)
    np.testing.assert_allclose(p.explained_variance_ratio_, s[:5] ** 2 / np.sum(s**2), rtol=1e-10)
    # reference 2: scikit-learn
    sk = SkPCA(5).fit(x)
    np.testing.assert_allclose(p.explained_variance_ratio_, sk.explained_variance_ratio_, rtol=1e-8)
    scores = p.transform(x)
    assert scores.shape == (300, 5) and scores.dtype == np.float32
    ref = xc @ vt.T
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(p.explained_variance_) < 0)


def test_pca_incremental_matches_sklearn() -> None:
    from sklearn.decomposition import PCA as SkPCA

    x = lowrank(rank=5)  # what the incremental fit truncates between batches is then noise only
    p = PCA(5, method="incremental", batch_rows=50).fit(x)
    sk = SkPCA(5).fit(x)
    assert p.method_ == "incremental" and p.n_components_ == 5
    np.testing.assert_allclose(align_signs(p.components_, sk.components_), sk.components_, atol=2e-3)
    np.testing.assert_allclose(p.explained_variance_ratio_, sk.explained_variance_ratio_, rtol=1e-3)
    np.testing.assert_allclose(p.mean_, x.mean(axis=0), rtol=1e-10)


@pytest.mark.parametrize("method", ["exact", "incremental"])
def test_pca_fraction_of_variance(method: str) -> None:
    from sklearn.decomposition import PCA as SkPCA

    x = lowrank(rank=12)
    full = SkPCA().fit(x).explained_variance_ratio_
    for frac in (0.5, 0.9, 0.99):
        k_ref = int(np.searchsorted(np.cumsum(full), frac) + 1)
        p = PCA(frac, method=method, batch_rows=60).fit(x)
        assert p.n_components_ == k_ref, (frac, method)
        assert p.explained_variance_ratio_.sum() >= frac > p.explained_variance_ratio_[:-1].sum()


def test_pca_save_load_applies_to_new_images(tmp_path: Path) -> None:
    x, new = lowrank(seed=1), lowrank(n=20, seed=2)
    p = PCA(0.95).fit(x)
    q = PCA.load(p.save(tmp_path / "fit.npz"))
    np.testing.assert_array_equal(q.transform(new), p.transform(new))
    assert q.n_components_ == p.n_components_ and q.method_ == p.method_ and q.input_shape_ == (40,)
    with pytest.raises(LayertapError, match="not fitted"):
        PCA(3).transform(new)
    with pytest.raises(LayertapError, match="units"):
        p.transform(new[:, :10])


def test_pca_on_run_layers(run: lt.Run, tmp_path: Path, tiny_blocks: list[int]) -> None:
    from sklearn.decomposition import PCA as SkPCA

    out = postprocess(run, tmp_path / "pca", ["features.5", "classifier.4"], pca=3)
    for layer in ("features.5", "classifier.4"):
        ref = SkPCA(3).fit_transform(flat(run[layer][:]))
        got = out[layer][:]
        assert got.shape == (6, 3)
        np.testing.assert_allclose(align_signs(got.astype(np.float64), ref, axis=1), ref, rtol=1e-4, atol=1e-3)
        fit = PCA.load(out.path / "pca" / f"{layer}.npz")
        np.testing.assert_allclose(fit.transform(run, layer), got, rtol=1e-5, atol=1e-5)
    step = out.manifest["postprocessing"][-1]["steps"][0]
    assert step["op"] == "pca" and step["fits"]["classifier.4"]["k"] == 3
    # incremental over one-row blocks reads the run block by block and agrees with the exact fit
    tiny_blocks.clear()
    inc = PCA(3, method="incremental").fit(run, "classifier.4")
    assert max(tiny_blocks) <= 1
    exact = PCA(3, method="exact").fit(run, "classifier.4")
    np.testing.assert_allclose(inc.explained_variance_ratio_, exact.explained_variance_ratio_, rtol=1e-6)


# -- sparse random projection ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("modules", "call"),
    [
        (["sklearn", "sklearn.decomposition"], lambda x: PCA(2, method="incremental").fit(x)),
        (["scipy", "scipy.sparse"], lambda x: SparseRandomProjection(2).apply_numpy(x)),
    ],
)
def test_missing_optional_package_is_one_install_hint(monkeypatch: pytest.MonkeyPatch, modules, call) -> None:  # noqa: ANN001
    # layertap._optional.require: the one message and class (MissingDependencyError: the environment, CLI exit 1)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # makes 'import m' raise ImportError
    with pytest.raises(MissingDependencyError) as err:
        call(np.ones((6, 4)))
    msg = str(err.value)
    assert "pip install 'layertap[postprocess]'" in msg and "\n" not in msg and err.value.__suppress_context__


def test_jl_min_dim_formula() -> None:
    for n, eps in [(100, 0.3), (1000, 0.1), (10, 0.5)]:
        assert johnson_lindenstrauss_min_dim(n, eps) == math.ceil(4 * math.log(n) / (eps**2 / 2 - eps**3 / 3))
    with pytest.raises(LayertapError):
        johnson_lindenstrauss_min_dim(100, 1.5)


def test_srp_shape_determinism_density() -> None:
    d, k = 2500, 64
    x = np.random.default_rng(0).standard_normal((7, d)).astype(np.float32)
    a, b, c = (
        SparseRandomProjection(k, seed=3),
        SparseRandomProjection(k, seed=3),
        SparseRandomProjection(k, 4),
    )
    ya = a.apply_numpy(x)
    assert ya.shape == (7, k) and ya.dtype == np.float32
    np.testing.assert_array_equal(ya, b.apply_numpy(x))
    assert not np.allclose(ya, c.apply_numpy(x))
    r = a.dense_matrix(d)
    nonzero = r[r != 0]
    assert abs((r != 0).mean() - 1 / math.sqrt(d)) < 0.2 / math.sqrt(d)  # density 1/sqrt(D)
    np.testing.assert_allclose(np.abs(nonzero), math.sqrt(math.sqrt(d) / k))  # +-sqrt(1/(density k))
    positive = float((nonzero > 0).mean())  # and the signs: +/- with probability 1/2 each (~3200 draws)
    assert abs(positive - 0.5) < 4 * 0.5 / math.sqrt(len(nonzero)), positive
    np.testing.assert_allclose(ya, x.astype(np.float64) @ r, rtol=1e-5, atol=1e-4)  # plain matrix product


def test_srp_preserves_distances_within_eps() -> None:
    from scipy.spatial.distance import pdist

    n, d, eps = 100, 20000, 0.3
    k = johnson_lindenstrauss_min_dim(n, eps)
    x = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)
    srp = SparseRandomProjection(k, seed=0)
    y = srp.apply_numpy(x)
    ratio = pdist(y.astype(np.float64), "sqeuclidean") / pdist(x.astype(np.float64), "sqeuclidean")
    assert np.max(np.abs(ratio - 1)) < eps
    # torch path (sparse CSR here: D*k*4 bytes > dense_max_bytes) equals the numpy path
    proj = srp.torch_matrix(d)
    assert proj.layout == torch.sparse_csr
    yt = srp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(yt, y, rtol=1e-4, atol=1e-4 * np.abs(y).max())


def test_srp_torch_dense_path_and_nd_batches() -> None:
    srp = SparseRandomProjection(16, seed=5)
    x = torch.randn(4, 8, 5, 5)  # a conv batch: flattened to D = 200
    y = srp(x)
    assert y.shape == (4, 16) and y.dtype == torch.float32
    assert srp.torch_matrix(200).layout == torch.strided
    np.testing.assert_allclose(y.numpy(), srp.apply_numpy(x.numpy()), rtol=1e-5, atol=1e-5)
    if torch.cuda.is_available():  # on the device the same matrix gives the same numbers
        np.testing.assert_allclose(srp(x.cuda()).cpu().numpy(), y.numpy(), rtol=1e-4, atol=1e-5)


def test_srp_on_run(run: lt.Run, tmp_path: Path) -> None:
    out = postprocess(run, tmp_path / "srp", ["features.2"], projection=50, seed=7)
    ref = flat(run["features.2"][:]) @ SparseRandomProjection(50, seed=7).dense_matrix(64 * 27 * 27)
    np.testing.assert_allclose(out["features.2"][:], ref, rtol=1e-4, atol=1e-3)
    assert out.manifest["postprocessing"][-1]["steps"][-1] == {
        "op": "sparse_random_projection",
        "n_components": 50,
        "seed": 7,
        "density": "auto",
    }


# -- feature-map ensembles ------------------------------------------------------------------------------
def test_feature_map_ensemble(run: lt.Run, tmp_path: Path) -> None:
    from sklearn.decomposition import PCA as SkPCA

    scores, fit = feature_map_ensemble(
        run,
        ["features.2", "features.5"],
        penultimate="classifier.4",
        n_components=4,
        out=tmp_path / "ens",
        return_pca=True,
    )
    concat = np.concatenate([flat(run[name][:]) for name in ("features.2", "features.5", "classifier.4")], axis=1)
    sk = SkPCA(4).fit(concat)
    comps = sk.components_ * np.sign(sk.components_[np.arange(4), np.abs(sk.components_).argmax(1)])[:, None]
    ref = (concat - sk.mean_) @ comps.T  # the documented sign: each component's largest |loading| > 0
    assert scores.shape == (6, 4) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())  # float32 rounding
    assert np.all(np.diff(fit.explained_variance_) <= 0)
    np.testing.assert_allclose(fit.explained_variance_ratio_, sk.explained_variance_ratio_, rtol=1e-6)
    ens = lt.open_run(tmp_path / "ens")
    assert ens.layers == ["ensemble"]
    np.testing.assert_array_equal(ens["ensemble"][:], scores)
    again = feature_map_ensemble(run, ["features.2", "features.5"], penultimate="classifier.4", pca=fit)
    np.testing.assert_array_equal(again, scores)
    normed = feature_map_ensemble(run, ["features.5"], "classifier.4", n_components=0.9, normalize_layers=True)
    assert normed.shape[0] == 6 and 1 <= normed.shape[1] <= 5


# -- export formats -------------------------------------------------------------------------------------
def check_index_csv(run: lt.Run, path: Path) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == run.images
    assert [int(r["row"]) for r in rows] == list(range(len(run.images)))


def test_export_npy_txt_h5(run: lt.Run, tmp_path: Path) -> None:
    import h5py

    lt.export(run, "npy", tmp_path / "npy")
    lt.export(run, "txt", tmp_path / "txt")
    [h5, index] = lt.export(run, "hdf5", tmp_path / "h5")
    check_index_csv(run, index)
    with h5py.File(h5, "r") as f:
        assert [p.decode() for p in f["images/path"][:]] == run.images
        np.testing.assert_array_equal(f["images/target"][:], run.targets)
        assert [c.decode() for c in f["images/class"][:]] == [r["class"] for r in run.manifest["images"]["rows"]]
        assert json.loads(f["manifest"][()])["layers"] == run.manifest["layers"]
        for layer in LAYERS:
            a = run[layer][:]
            assert f[layer].chunks is not None
            np.testing.assert_array_equal(f[layer][:], a)
            np.testing.assert_array_equal(np.load(tmp_path / "npy" / f"{layer}.npy"), a)
            back = np.loadtxt(tmp_path / "txt" / f"{layer}.txt", dtype=np.float32).reshape(a.shape)
            np.testing.assert_array_equal(back, a)


def test_export_mat_v5(run: lt.Run, tmp_path: Path) -> None:
    from scipy.io import loadmat

    paths = lt.export(run, "mat", tmp_path / "mat", ["features.5", "classifier.4"])
    for layer, path in zip(["features.5", "classifier.4"], paths, strict=False):
        m = loadmat(path)
        assert m["__header__"].startswith(b"MATLAB 5.0")
        np.testing.assert_array_equal(m["activations"], run[layer][:])
        assert [c[0] for c in m["path"][:, 0]] == run.images
        np.testing.assert_array_equal(m["target"][:, 0], run.targets)
        np.testing.assert_array_equal(m["row"][:, 0], np.arange(6))
        assert [c[0] for c in m["classes"][:, 0]] == run.classes
        assert str(m["layer"][0]) == layer


def read_mat73(path: Path) -> dict[str, object]:
    """An independent v7.3 reader with h5py: transpose back, follow cell references."""
    import h5py

    def text(ds: h5py.Dataset) -> str:
        if ds.attrs.get("MATLAB_empty"):
            return ""
        return ds[:].astype("<u2").tobytes().decode("utf-16-le")

    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 512
        for name, ds in f.items():
            if name == "#refs#":
                continue
            cls = ds.attrs["MATLAB_class"].decode()
            if cls == "cell":
                out[name] = [text(f[ref]) for ref in ds[0]]
            elif cls == "char":
                out[name] = text(ds)
            else:
                out[name] = (cls, ds[:].T)
    return out


def test_export_mat_v73_layout(run: lt.Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [path, _] = lt.export(run, "mat73", tmp_path / "m73", ["features.5"])
    head = path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and b"HDF5 schema 1.00" in head
    assert head[124:128] == b"\x00\x02IM"  # version 0x0200, little-endian indicator
    m = read_mat73(path)
    cls, acts = m["activations"]  # type: ignore[misc]
    assert cls == "single"
    np.testing.assert_array_equal(acts, run["features.5"][:])
    assert m["path"] == run.images and m["classes"] == run.classes and m["layer"] == "features.5"
    np.testing.assert_array_equal(m["target"][1][:, 0], run.targets)  # type: ignore[index]
    try:  # a third-party reader, when installed
        import mat73
    except ImportError:
        pass
    else:
        d = mat73.loadmat(str(path))
        np.testing.assert_array_equal(d["activations"], run["features.5"][:])
        assert [p[0] for p in d["path"]] == run.images
    # 'mat' switches to v7.3 by itself above the v5 size limit
    monkeypatch.setattr(formats, "MAT5_MAX_BYTES", 1000)
    [big, _] = lt.export(run, "mat", tmp_path / "auto", ["classifier.4"])
    assert big.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    np.testing.assert_array_equal(read_mat73(big)["activations"][1], run["classifier.4"][:])  # type: ignore[index]


def test_export_pt(run: lt.Run, tmp_path: Path) -> None:
    [path, _] = lt.export(run, "pt", tmp_path / "pt")
    d = torch.load(path, weights_only=True)
    assert d["images"] == run.images and d["class_names"] == run.classes
    np.testing.assert_array_equal(d["targets"].numpy(), run.targets)
    for layer in LAYERS:
        np.testing.assert_array_equal(d[layer].numpy(), run[layer][:])
    assert not list(path.parent.glob("*.tmp.npy"))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_tables(run: lt.Run, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    [path, _] = lt.export(run, fmt, tmp_path / fmt, ["classifier.4"])
    a = run["classifier.4"][:]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        cols = t.column_names
        assert cols[:4] == ["row", "path", "target", "class"] and len(cols) == 4 + a.shape[1]
        paths, targets = t.column("path").to_pylist(), t.column("target").to_pylist()
        values = np.stack([t.column(c).to_numpy() for c in cols[4:]], axis=1)
    else:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0][:5] == ["row", "path", "target", "class", "u0"]
        paths, targets = [r[1] for r in rows[1:]], [int(r[2]) for r in rows[1:]]
        values = np.array([[float(v) for v in r[4:]] for r in rows[1:]], dtype=np.float32)
    assert paths == run.images and targets == run.targets.tolist()
    np.testing.assert_array_equal(values, a)
    monkeypatch.setattr(formats, "MAX_TABLE_VALUES", 1000)
    with pytest.raises(LayertapError, match="npy or h5"):
        lt.export(run, fmt, tmp_path / "big", ["classifier.4"])


def test_export_unknown_format(run: lt.Run, tmp_path: Path) -> None:
    with pytest.raises(LayertapError, match="unknown export format"):
        lt.export(run, "xlsx", tmp_path)


# -- helpers for old pipelines ----------------------------------------------------------------------------
def test_tensor2slices_round_trip(run: lt.Run, tmp_path: Path) -> None:
    a = run["features.5"][:]
    m = formats.tensor2slices(a)
    assert m.shape == (6 * 192 * 13, 13)
    np.testing.assert_array_equal(formats.slices2tensor(m, a.shape), a)
    # to text and back, from the file alone (float32 and float64 exactly)
    path = formats.tensor2slices(run["features.5"], tmp_path, "f5.txt")  # a LayerArray, chunk by chunk
    back = formats.slices2tensor(tmp_path, "f5.txt")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, a)
    assert path.read_text().splitlines()[0] == "# layertap slices: shape=(6, 192, 13, 13) dtype=float32"
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 5))
    formats.tensor2slices(tmp_path, "x.txt", x)  # the seed's argument order
    np.testing.assert_array_equal(formats.slices2tensor(tmp_path / "x.txt"), x)
    # the seed's header
    (tmp_path / "old.txt").write_text("# Array shape: (2, 2, 3)\n" + "\n".join(" ".join(["1.5"] * 3) for _ in range(4)))
    assert formats.slices2tensor(tmp_path, "old.txt").shape == (2, 2, 3)


def test_split_merge_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((23, 7)).astype(np.float32)
    parts = formats.split_activations(x, tmp_path / "a", n_splits=4)
    assert len(parts) == 4 and sorted(len(np.load(p)) for p in parts) == [5, 6, 6, 6]
    np.testing.assert_array_equal(formats.merge_activations(tmp_path / "a"), x)
    # from a text file, 3 parts, stays text
    src = formats.tensor2slices(x, tmp_path / "acts.txt")
    parts = formats.split_activations(src, tmp_path / "b", n_splits=3)
    assert [p.suffix for p in parts] == [".txt"] * 3
    np.testing.assert_array_equal(formats.merge_activations(tmp_path / "b", out=tmp_path / "m.npy"), x)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), x)
    parts[1].unlink()
    with pytest.raises(LayertapError, match="lacks part"):
        formats.merge_activations(tmp_path / "b")
    with pytest.raises(LayertapError, match="cannot split"):
        formats.split_activations(x, tmp_path / "c", n_splits=24)


def test_output_chunks_gathered_from_smaller_blocks(
    run: lt.Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = postprocess(run, tmp_path / "ref", ["classifier.4"], pca=3)["classifier.4"][:]
    monkeypatch.setattr(store_blocks, "CHUNK_BYTES", 48)  # input blocks of 1 row (4096 units), output chunks of 4 rows (3 units)
    out = postprocess(run, tmp_path / "small", ["classifier.4"], pca=3)
    assert out["classifier.4"].chunk_rows == 4
    np.testing.assert_allclose(out["classifier.4"][:], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "batch"), [(300, 50), (307, 50), (303, 50)])
def test_pca_incremental_honours_batch_rows(n: int, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """partial_fit sees exactly the batches IncrementalPCA(batch_size=batch_rows).fit uses (a remainder
    shorter than k joins the last batch), so the fit equals scikit-learn's to float64 rounding, and no
    call holds more than batch_rows + k rows (memory bounded by batch_rows, not by the images)."""
    from sklearn.decomposition import IncrementalPCA
    from sklearn.utils import gen_batches

    x = lowrank(n=n, rank=12, seed=3)  # rank 12 > k = 5: every batch boundary changes the result
    sizes: list[int] = []
    original = IncrementalPCA.partial_fit

    def spy(self: IncrementalPCA, X: np.ndarray, *args: object, **kwargs: object) -> IncrementalPCA:
        sizes.append(len(X))
        return original(self, X, *args, **kwargs)

    monkeypatch.setattr(IncrementalPCA, "partial_fit", spy)
    p = PCA(5, method="incremental", batch_rows=batch).fit(x)
    ours = list(sizes)
    sk = IncrementalPCA(n_components=5, batch_size=batch).fit(x)
    assert ours == [s.stop - s.start for s in gen_batches(n, batch, min_batch_size=5)]
    assert max(ours) < batch + 5
    np.testing.assert_allclose(align_signs(p.components_, sk.components_), sk.components_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(p.explained_variance_, sk.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(p.singular_values_, sk.singular_values_, rtol=1e-9)
    np.testing.assert_allclose(p.mean_, sk.mean_, rtol=1e-12)
    ref = sk.transform(x)
    got = p.transform(x).astype(np.float64)  # float32 scores
    np.testing.assert_allclose(align_signs(got, ref, axis=1), ref, rtol=1e-5, atol=1e-5)


def test_srp_leaves_layers_with_k_units_or_fewer_alone(image_dir: Path, tmp_path: Path) -> None:
    """--reduce srp:1000 on AlexNet: classifier.4 (4096 units) is projected, classifier.6 (1000 units)
    has nothing to reduce: stored exactly as a plain hooked forward gives it, and the manifest says so."""
    from conftest import reference_batch, reference_outputs

    model = lt.load_model("alexnet", weights="random", seed=2)
    layers = ["classifier.4", "classifier.6"]
    run = lt.extract(model, image_dir, layers, tmp_path / "srp", workers=0, reduce="srp:1000:3", progress=False)
    ref = reference_outputs(model.module, reference_batch([str(image_dir / p) for p in run.images], "alexnet"), layers)
    np.testing.assert_allclose(run["classifier.6"][:], ref["classifier.6"][0].numpy(), rtol=1e-5, atol=1e-5)
    want = SparseRandomProjection(1000, seed=3).apply_numpy(ref["classifier.4"][0].numpy())
    np.testing.assert_allclose(run["classifier.4"][:], want, rtol=1e-4, atol=1e-4)
    info = run.manifest["layers"]
    assert info["classifier.4"]["reduce"] == "srp:1000:3" and "reduce_skipped" not in info["classifier.4"]
    assert "reduce" not in info["classifier.6"]
    assert info["classifier.6"]["reduce_skipped"] == "srp:1000:3: 1000 units <= 1000"
