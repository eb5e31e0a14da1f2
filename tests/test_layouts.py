"""Spatial reducers on channels-last layers (torchvision Swin, Swin3D, Permute): they must pool H, W
(and T), not the channels, and say which layout they found; an undecidable layout is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, swin_t
from torchvision.models.video import swin3d_t
from torchvision.ops import Permute

import layertap as lt
from layertap.errors import LayertapError
from layertap.models.transforms import imagenet_transform


def _hooked(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The raw output of module ``name``, from a plain forward hook written here."""
    got: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda _m, _i, o: got.append(o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return got[0]


def _reduced(model: nn.Module, layers: list[str], reduce: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with lt.Extractor(model, layers, reduce=reduce) as tap:
        return tap(x)


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    torch.manual_seed(0)
    return swin_t().eval()


def test_swin_reducers_pool_spatial_axes_of_channels_last_maps(swin: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    ref = _hooked(swin, "features.1", x)  # (B, H, W, C) = (2, 16, 16, 96)
    conv = _hooked(swin, "features.0.0", x)  # the patch-embedding Conv2d: (B, C, H, W)
    assert ref.shape == (2, 16, 16, 96) and conv.shape == (2, 96, 16, 16)
    layers = ["features.1", "features.0.0"]
    avg = _reduced(swin, layers, "avg", x)
    torch.testing.assert_close(avg["features.1"], ref.mean(dim=(1, 2)))
    torch.testing.assert_close(avg["features.0.0"], conv.mean(dim=(2, 3)))
    torch.testing.assert_close(_reduced(swin, layers, "max", x)["features.1"], ref.amax(dim=(1, 2)))
    pooled = _reduced(swin, layers, "avg:2", x)["features.1"]
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(ref.permute(0, 3, 1, 2), 2))  # channels-first (B, C, 2, 2)
    with lt.Extractor(swin, ["features.1", "features.0.0", "permute", "features.1.0.mlp.1"]) as tap:
        assert tap.layouts == {
            "features.1": "channels_last",
            "features.0.0": "channels_first",
            "permute": "channels_first",
            "features.1.0.mlp.1": "channels_last",  # a GELU after an nn.Linear in an nn.Sequential
        }


def test_swin3d_reducers_pool_time_and_space_of_channels_last_clips() -> None:
    torch.manual_seed(0)
    model = swin3d_t().eval()
    x = torch.randn(1, 3, 4, 32, 32)
    ref = _hooked(model, "features.0", x)  # (B, T, H, W, C)
    assert ref.shape == (1, 2, 8, 8, 96)
    layers = ["features.0"]
    torch.testing.assert_close(_reduced(model, layers, "avg", x)["features.0"], ref.mean(dim=(1, 2, 3)))
    first = ref.permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
    torch.testing.assert_close(_reduced(model, layers, "time", x)["features.0"], first.mean(dim=2))
    got = _reduced(model, layers, "max:2", x)["features.0"]
    torch.testing.assert_close(got, F.adaptive_max_pool3d(first, (2, 2, 2)))


class _Mlp(nn.Module):
    """A two-layer MLP applied per position: whether its input is permuted cannot be told."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_permute_module_and_undecidable_layout() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), Permute([0, 2, 3, 1]), nn.GELU(), _Mlp(), Permute([0, 3, 1, 2]))
    x = torch.randn(2, 3, 10, 12)
    ref = _hooked(net, "2", x)  # (B, H, W, C) = (2, 8, 10, 8): H and C both 8
    torch.testing.assert_close(_reduced(net, ["2"], "avg", x)["2"], ref.mean(dim=(1, 2)))
    torch.testing.assert_close(_reduced(net, ["4"], "avg", x)["4"], _hooked(net, "4", x).mean(dim=(2, 3)))
    with pytest.raises(LayertapError, match=r"channels-last.*reduce=\{'3': 'none'\}"):
        _reduced(net, ["3"], "avg", x)
    assert _reduced(net, ["3"], "none", x)["3"].shape == (2, 8, 10, 8)  # unreduced: stored as it is


def test_resnet_layers_stay_channels_first() -> None:
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    ref = _hooked(model, "layer1", x)
    out = _reduced(model, ["layer1", "relu"], "avg", x)
    torch.testing.assert_close(out["layer1"], ref.mean(dim=(2, 3)))
    torch.testing.assert_close(out["relu"], _hooked(model, "relu", x).mean(dim=(2, 3)))


def test_extract_records_layout_in_manifest(swin: nn.Module, image_dir: Path, tmp_path: Path) -> None:
    model = lt.from_module(swin, transform=imagenet_transform(resize=72, crop=64), input_size=(3, 64, 64))
    layers = ["features.1", "features.0.0", "avgpool"]
    kw = {"batch_size": 8, "workers": 0}
    raw = lt.extract(model, image_dir, layers, tmp_path / "raw", **kw)
    avg = lt.extract(model, image_dir, layers, tmp_path / "avg", reduce="avg", **kw)
    info = avg.manifest["layers"]
    assert info["features.1"]["layout"] == "channels_last" and info["features.1"]["shape"] == [96]
    assert info["features.0.0"]["layout"] == "channels_first" and info["avgpool"]["layout"] == "channels_first"
    assert raw.manifest["layers"]["features.1"]["layout"] == "channels_last"
    np.testing.assert_allclose(avg["features.1"][:], raw["features.1"][:].mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_plan_suggests_avg_sizes_from_the_channel_axis() -> None:
    from layertap.extraction.planning import _suggest

    shape = (16, 16, 96)  # a Swin (H, W, C) map: avg keeps C = 96 numbers, avg:2 keeps 4 * 96
    got = dict(_suggest({"f": shape}, {"f": shape}, 10, 4, {"f": "channels_last"}))
    assert got["avg"] == 96 * 10 * 4 and got["avg:2"] == 4 * 96 * 10 * 4
    assert "avg" not in dict(_suggest({"f": shape}, {"f": shape}, 10, 4, {"f": "unknown"}))
