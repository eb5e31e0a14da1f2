"""Activations equal an independent reference (plain torchvision model + hand-written hooks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from conftest import reference_batch, reference_outputs

import layertap as lt

TOL = {"rtol": 1e-4, "atol": 1e-4}

CASES = {
    # features.0 is followed by ReLU(inplace=True): the stored conv output must not be rectified
    "alexnet": ["features.0", "features.10", "classifier.4", "classifier.5"],
    "resnet18": ["layer1", "layer3.1.conv2", "avgpool", "fc"],
    "vgg11": ["features.3", "features.20", "classifier.3"],
}


def _reference_model(name: str, weights_file: Path) -> torch.nn.Module:
    model = tvm.get_model(name, weights=None)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_extract_matches_reference(name: str, image_dir: Path, tmp_path: Path) -> None:
    layers = CASES[name]
    model = lt.load_model(name, weights="random", seed=3)
    weights_file = tmp_path / "w.pt"
    torch.save(model.module.state_dict(), weights_file)

    run = lt.extract(lt.load_model(name, weights_file), image_dir, layers, tmp_path / "run", batch_size=4, workers=0)
    assert run.complete and run.layers == layers

    paths = [str(image_dir / p) for p in run.images]
    assert paths == sorted(paths) and len(paths) == 9
    ref = reference_outputs(_reference_model(name, weights_file), reference_batch(paths, name), layers)
    for layer in layers:
        want = ref[layer][0].numpy()
        got = run[layer][:]
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, **TOL, err_msg=layer)
    # the classes are the folder names, targets index them
    assert run.classes == ["cat", "dog", "rocket"]
    assert run.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_inplace_relu_does_not_leak_into_stored_conv(image_dir: Path, tmp_path: Path) -> None:
    run = lt.extract("alexnet", image_dir, ["features.0", "features.1"], tmp_path / "r", weights="random", workers=0)
    conv, relu = run["features.0"][:], run["features.1"][:]
    assert (conv < 0).any(), "conv output was rectified by the in-place ReLU"
    np.testing.assert_allclose(np.maximum(conv, 0), relu, **TOL)


def test_extractor_in_memory_and_early_stop() -> None:
    model = lt.load_model("resnet18", weights="random", seed=0)
    ref_model = tvm.get_model("resnet18", weights=None)
    ref_model.load_state_dict(model.module.state_dict())
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ran = []
    handle = model.module.layer4.register_forward_hook(lambda *a: ran.append(1))
    with lt.Extractor(model, ["layer1", "layer2.0.conv1"]) as tap:
        first = tap(x)  # the first call runs everything once, to count calls
        assert len(ran) == 1
        second = tap(x)
        assert len(ran) == 1, "layer4 ran although layer2 was the deepest requested layer"
    handle.remove()
    assert not model.module.layer1._forward_hooks, "hooks must be removed on exit"
    ref = reference_outputs(ref_model, x, ["layer1", "layer2.0.conv1"])
    for out in (first, second):
        assert set(out) == {"layer1", "layer2.0.conv1"}
        for k, v in out.items():
            torch.testing.assert_close(v, ref[k][0], **TOL)


def test_extractor_flatten_and_hooks_removed_on_error() -> None:
    model = lt.load_model("alexnet", weights="random")
    with pytest.raises(RuntimeError):
        with lt.Extractor(model, ["features.3"]) as tap:
            tap(torch.randn(1, 3, 8, 8))  # too small for alexnet: the forward fails
    assert all(not m._forward_hooks for m in model.module.modules())
    with lt.Extractor(model, "features.3", flatten=True) as tap:
        out = tap(torch.randn(2, 3, 224, 224))
    assert out["features.3"].shape == (2, 192 * 27 * 27)


class Recurrent(torch.nn.Module):
    """One cell applied three times: every call must be kept."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.cell = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for _ in range(3):
            h = torch.relu(self.cell(h))
        return self.head(h.mean((2, 3)))


def test_reused_module_keeps_every_call() -> None:
    torch.manual_seed(0)
    net = Recurrent().eval()
    x = torch.randn(2, 3, 16, 16)
    with lt.Extractor(net, ["cell", "head"]) as tap:
        out = tap(x)
        again = tap(x)  # early-stop path, counts learned
    assert sorted(out) == ["cell#0", "cell#1", "cell#2", "head"]
    h = net.stem(x)
    for k in range(3):
        c = net.cell(h)
        torch.testing.assert_close(out[f"cell#{k}"], c.detach())
        torch.testing.assert_close(again[f"cell#{k}"], c.detach())
        h = torch.relu(c)


def test_reused_module_extract_to_disk(image_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = lt.from_module(Recurrent(), name="recurrent")
    run = lt.extract(net, image_dir, ["cell"], tmp_path / "r", batch_size=4, workers=0, channels_last=False)
    assert run.layers == ["cell#0", "cell#1", "cell#2"]
    assert run["cell#2"].shape == (9, 4, 224, 224)


def test_early_stop_extract_matches_full(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("resnet18", weights="random", seed=5)
    early = lt.extract(model, image_dir, ["layer1"], tmp_path / "a", batch_size=4, workers=0)
    ref = reference_outputs(
        model.module,
        reference_batch([str(image_dir / p) for p in early.images], "resnet18").contiguous(
            memory_format=torch.channels_last
        ),
        ["layer1"],
    )
    np.testing.assert_allclose(early["layer1"][:], ref["layer1"][0].numpy(), **TOL)


def test_storage_dtypes(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("alexnet", weights="random", seed=2)
    full = lt.extract(model, image_dir, ["classifier.1"], tmp_path / "f32", workers=0)["classifier.1"][:]
    half = lt.extract(model, image_dir, ["classifier.1"], tmp_path / "f16", workers=0, dtype="float16")
    assert half["classifier.1"].dtype == np.float16
    np.testing.assert_array_equal(half["classifier.1"][:], full.astype(np.float16))
    bf = lt.extract(model, image_dir, ["classifier.1"], tmp_path / "bf16", workers=0, dtype="bfloat16")
    want = torch.from_numpy(full).to(torch.bfloat16).float().numpy()
    assert bf["classifier.1"].dtype == np.float32 and bf.manifest["layers"]["classifier.1"]["dtype"] == "bfloat16"
    np.testing.assert_array_equal(bf["classifier.1"][:], want)


def test_flatten_and_chunked_reads(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("alexnet", weights="random", seed=2)
    native = lt.extract(model, image_dir, ["features.12"], tmp_path / "n", workers=0, chunk_rows=2)
    flat = lt.extract(model, image_dir, ["features.12"], tmp_path / "f", workers=0, flatten=True, chunk_rows=4)
    assert native["features.12"].shape == (9, 256, 6, 6) and flat["features.12"].shape == (9, 9216)
    np.testing.assert_array_equal(native["features.12"][:].reshape(9, -1), flat["features.12"][:])
    blocks = list(flat["features.12"].iter_chunks())
    assert [s for s, _ in blocks] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), np.asarray(flat["features.12"]))


def test_same_command_is_deterministic(image_dir: Path, tmp_path: Path) -> None:
    a = lt.extract("resnet18", image_dir, ["layer2"], tmp_path / "a", weights="random", seed=7, workers=0)
    b = lt.extract("resnet18", image_dir, ["layer2"], tmp_path / "b", weights="random", seed=7, workers=2)
    assert a["layer2"][:].tobytes() == b["layer2"][:].tobytes()


def test_batchnorm_folding_is_exact_safe_and_leaves_the_model_alone(image_dir: Path, tmp_path: Path) -> None:
    from layertap.extraction.graph import fold_batchnorm, foldable_pairs

    model = lt.load_model("resnet18", weights="random", seed=8)
    # give the BatchNorms non-trivial statistics, as trained ones have
    g = torch.Generator().manual_seed(0)
    for m in model.module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    layers = ["layer1.0.conv1", "layer1.0.bn2", "layer3", "fc"]
    run = lt.extract(model, image_dir, layers, tmp_path / "r", workers=0, batch_size=4)
    assert run.manifest["options"]["folded_batchnorms"] == 19  # all 20 pairs but the tapped conv's
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items()), "caller's model changed"
    ref = reference_outputs(model.module, reference_batch([str(image_dir / p) for p in run.images], "resnet18"), layers)
    for layer in layers:
        np.testing.assert_allclose(run[layer][:], ref[layer][0].numpy(), **TOL, err_msg=layer)
    pairs = dict(foldable_pairs(model.module, {"layer1.0.conv1"}))
    assert "layer1.0.conv1" not in pairs and pairs["layer1.0.conv2"] == "layer1.0.bn2"
    assert fold_batchnorm(lt.load_model("alexnet", weights="random").module, set())[1] == 0
    nostats = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))
    assert foldable_pairs(nostats, set()) == []
    unfolded = lt.extract(model, image_dir, layers, tmp_path / "u", workers=0, batch_size=4, fold_bn=False)
    assert unfolded.manifest["options"]["folded_batchnorms"] == 0


class _Untraceable(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so compile must fall back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_compiled_tap_matches_hooks_and_pads_last_batch() -> None:
    # features.10 and classifier.4 are each followed by an in-place ReLU; layer1's output feeds an in-place add
    cases = {"alexnet": ["features.10", "classifier.4", "classifier.5"], "resnet18": ["layer1.0.bn2", "layer2", "fc"]}
    for name, layers in cases.items():
        model = lt.load_model(name, weights="random", seed=1)
        ref_model = tvm.get_model(name, weights=None)
        ref_model.load_state_dict(model.module.state_dict())
        x = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(2))
        ref = reference_outputs(ref_model, x, layers)
        tap = lt.Extractor(model, layers, compile=True)
        assert tap.compiled and tap.calls == dict.fromkeys(layers, 1)
        with tap:
            full = tap(x[:4])  # compiles for batch 4
            part = tap(x[4:])  # batch 1: padded to 4, sliced back
            again = tap(x[:4])
        for layer in layers:
            got = torch.cat([full[layer], part[layer]])
            assert got.shape == ref[layer][0].shape
            torch.testing.assert_close(got, ref[layer][0], **TOL, msg=f"{name} {layer}")
            assert torch.equal(again[layer], full[layer]), "same input, same output"


def test_compile_falls_back_when_untraceable(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = _Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING", logger="layertap"):
        tap = lt.Extractor(net, ["conv", "output"], compile=True)
    assert not tap.compiled and "cannot trace" in caplog.text
    out = tap(x)
    torch.testing.assert_close(out["conv"], net.conv(x))
    torch.testing.assert_close(out["output"], net(x))
    # a tapped module inside another tapped module cannot be a graph node of its own: hooks again
    assert not lt.Extractor(lt.load_model("resnet18", weights="random"), ["layer1", "layer1.0"], compile=True).compiled


def test_autocast_is_opt_in_and_close_but_not_exact(image_dir: Path, tmp_path: Path) -> None:
    layers = ["layer2", "avgpool"]
    model = lt.load_model("resnet18", weights="random", seed=4)
    exact = lt.extract(model, image_dir, layers, tmp_path / "fp32", batch_size=4, workers=0)
    low = lt.extract(model, image_dir, layers, tmp_path / "bf16", batch_size=4, workers=0, autocast="bfloat16")
    assert exact.manifest["spec"]["autocast"] is None and low.manifest["spec"]["autocast"] == "bfloat16"
    for layer in layers:
        a, b = exact[layer][:], low[layer][:]
        assert b.dtype == np.float32  # stored in the requested dtype, whatever autocast computed in
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert 1e-5 < rel < 0.1, (layer, rel)  # bfloat16 has 8 mantissa bits: close, never equal
    with pytest.raises(lt.LayertapError, match="autocast must be one of"):
        lt.Extractor(model, layers, autocast="int8")


def test_folded_copy_is_held_by_the_extractor_and_plain_calls_follow_the_model(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layertap.extraction import graph

    folds = []
    real = graph.foldable_pairs
    monkeypatch.setattr(graph, "foldable_pairs", lambda m, p: folds.append(1) or real(m, p))
    model = lt.load_model("resnet18", weights="random", seed=6)
    tap = lt.Extractor(model, ["layer1"], fold_bn=True)
    first = tap.module
    assert tap.folded_batchnorms > 0 and first is not model.module and len(folds) == 1
    a = lt.extract(tap, image_dir, ["layer1"], tmp_path / "a", batch_size=4, workers=0)
    b = lt.extract(tap, image_dir, ["layer1"], tmp_path / "b", batch_size=4, workers=0)
    assert tap.module is first and len(folds) == 1, "a held Extractor folds once"
    assert a["layer1"][:].tobytes() == b["layer1"][:].tobytes()
    assert a.manifest["options"]["folded_batchnorms"] == tap.folded_batchnorms
    with torch.no_grad():
        model.module.bn1.running_var.mul_(4.0)  # in place, as a training step or load_state_dict would
    # no hidden cache: a plain call folds the model as it is now
    ref_model = tvm.get_model("resnet18", weights=None)
    ref_model.load_state_dict(model.module.state_dict())
    run = lt.extract(model, image_dir, ["layer1"], tmp_path / "after", batch_size=4, workers=0)
    assert len(folds) == 2
    paths = [str(image_dir / p) for p in run.images]
    ref = reference_outputs(ref_model, reference_batch(paths, "resnet18"), ["layer1"])
    np.testing.assert_allclose(run["layer1"][:], ref["layer1"][0].numpy(), **TOL)


def test_graph_tap_reads_weights_at_call_time_and_retraces_only_for_swapped_modules() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(2, 3, 10, 10)
    tap = lt.Extractor(net, ["0", "2"], compile=True)
    graph_tap = tap.strategy
    assert graph_tap.keys == [(0, 0), (1, 0)] and graph_tap.matches_model()
    tap.to_device(torch.device("cpu"))
    assert tap.strategy is graph_tap, "nothing moved: the same graph"
    with torch.no_grad():
        net[2].weight.mul_(-1.0)  # weights are read at call time: same graph, new numbers
        want2, want0 = net(x), net[0](x)
    out = tap(x)
    torch.testing.assert_close(out["2"], want2)
    torch.testing.assert_close(out["0"], want0)  # before the in-place ReLU
    net[2] = torch.nn.Conv2d(4, 5, 3)  # a swapped submodule: the graph is no longer the model's
    assert not graph_tap.matches_model()
    tap.to_device(torch.device("cpu"))
    assert tap.strategy is not graph_tap and tap.compiled
    assert tap(x)["2"].shape == (2, 5, 6, 6)
