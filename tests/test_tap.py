"""The tap strategies behind one protocol, the explicit reuse of a held Extractor, and the job config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import layertap as lt
from layertap.devices import resolve_device
from layertap.extraction import tap as tapmod
from layertap.extraction.layers import unwrap_output
from layertap.extraction.pipeline import ExtractConfig
from layertap.extraction.tap import GraphTap, HookTap, LayerOutputs, Tap
from layertap.models.registry import as_loaded

TOL = {"rtol": 1e-5, "atol": 1e-5}


class _Net(nn.Module):
    """An in-place ReLU after a tapped conv, and a block that runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        y = self.block(self.block(y))
        return self.head(y.mean((2, 3)))


class _EagerGraphTap(GraphTap):
    """A third strategy in a few lines: the same fx graph, run eagerly (no compiler)."""

    name = "fx-eager"

    def compile_graph(self, graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return graph


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net().eval()


def _by_hand(net: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, list[torch.Tensor]]:
    """Hand-written forward hooks that clone every output."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(net.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: got[n].append(o.detach().clone())) for n in names]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return got


def test_hook_and_graph_taps_equal_hand_written_hooks() -> None:
    net, names = _net(), ["conv", "block", "head"]
    x = torch.randn(3, 3, 12, 12)
    want = _by_hand(net, x, names)
    loaded = as_loaded(net)
    for cls in (HookTap, _EagerGraphTap):
        strategy = cls(loaded, names, LayerOutputs(loaded, names, None, False))
        assert isinstance(strategy, Tap)
        got = strategy(x)
        strategy.close()
        assert strategy.calls == {"conv": 1, "block": 2, "head": 1}, cls.__name__
        for n in names:
            assert len(got[n]) == len(want[n])
            for g, w in zip(got[n], want[n], strict=True):
                torch.testing.assert_close(g, w, **TOL, msg=f"{cls.__name__} {n}")
        assert (got["conv"][0] < 0).any(), "the in-place ReLU leaked into the stored conv output"
    # through the public tap: layer#k keys, hooks removed after a call outside `with`
    out = lt.Extractor(net, names)(x)
    assert set(out) == {"conv", "block#0", "block#1", "head"}
    torch.testing.assert_close(out["block#1"], want["block"][1], **TOL)
    assert not any(m._forward_hooks for m in net.modules())


def test_graph_tap_pads_a_smaller_batch_and_cuts_the_padding() -> None:
    net, names = _net(), ["conv", "head"]
    loaded = as_loaded(net)
    strategy = _EagerGraphTap(loaded, names, LayerOutputs(loaded, names, "avg", False))
    x = torch.randn(5, 3, 12, 12)
    full, part = strategy(x[:4]), strategy(x[4:])
    assert strategy.batch == 4 and part["conv"][0].shape == (1, 4)
    want = _by_hand(net, x, names)
    torch.testing.assert_close(torch.cat([full["conv"][0], part["conv"][0]]), want["conv"][0].mean((2, 3)), **TOL)


def test_fallback_reasons_are_recorded_and_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y if y.sum() > 0 else -y

    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING", logger="layertap"):
        tap = lt.Extractor(Untraceable().eval(), ["conv"], compile=True)
        tap(x)
        tap(x)
    assert not tap.compiled and tap.fallback is not None and tap.fallback.startswith("compile: cannot trace")
    assert tap.describe()["tap"] == "hooks" and tap.describe()["fallback"] == tap.fallback
    assert caplog.text.count("cannot trace") == 1
    caplog.clear()

    # a graph that builds but whose first run fails: hooks, the same numbers, one warning
    def broken(self: GraphTap, graph: torch.fx.GraphModule):  # noqa: ANN202
        def run(_x: torch.Tensor) -> None:
            raise RuntimeError("backend exploded\nmore lines")

        return run

    monkeypatch.setattr(GraphTap, "compile_graph", broken)
    net = _net()
    with caplog.at_level("WARNING", logger="layertap"):
        tap = lt.Extractor(net, ["conv", "head"], compile=True)
        assert tap.compiled and tap.fallback is None
        with tap:
            first, second = tap(x), tap(x)
    assert not tap.compiled and tap.fallback == "compile: torch.compile failed (backend exploded)"
    assert caplog.text.count("torch.compile failed") == 1
    want = _by_hand(net, x, ["conv", "head"])
    for n in ("conv", "head"):
        torch.testing.assert_close(first[n], want[n][0], **TOL)
        torch.testing.assert_close(second[n], want[n][0], **TOL)


def test_a_held_extractor_is_reused_across_extract_calls_without_retracing(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    traces: list[list[str]] = []
    real = tapmod.tap_graph
    monkeypatch.setattr(tapmod, "tap_graph", lambda m, t: traces.append(t) or real(m, t))
    monkeypatch.setattr(GraphTap, "compile_graph", _EagerGraphTap.compile_graph)  # the tracing is what is counted
    model = lt.load_model("resnet18", weights="random", seed=2)
    layers = ["layer2", "avgpool"]
    opts = {"batch_size": 4, "workers": 0, "compile": True}
    tap = lt.Extractor(model, layers, compile=True, fold_bn=True)
    a = lt.extract(tap, image_dir, layers, tmp_path / "a", **opts)
    b = lt.extract(tap, image_dir, layers, tmp_path / "b", **opts)
    assert len(traces) == 1, "a held Extractor traces once"
    assert a.manifest["compiled"] and b.manifest["compiled"]
    plain = lt.extract(model, image_dir, layers, tmp_path / "plain", batch_size=4, workers=0)
    assert len(traces) == 1  # compile=False: no graph
    for layer in layers:
        assert a[layer][:].tobytes() == b[layer][:].tobytes()
        np.testing.assert_allclose(a[layer][:], plain[layer][:], rtol=1e-4, atol=1e-4)
    lt.extract(model, image_dir, layers, tmp_path / "c", **opts)
    assert len(traces) == 2, "no hidden cache: a call without a held tap builds its own graph"
    with pytest.raises(lt.LayertapError, match="built with reduce=None"):
        lt.extract(tap, image_dir, layers, tmp_path / "d", reduce="avg", **opts)
    with pytest.raises(lt.LayertapError, match="not the layers asked for"):
        lt.extract(tap, image_dir, ["layer3"], tmp_path / "e", **opts)


def test_extract_config_is_checked_once_and_frozen() -> None:
    assert ExtractConfig().batch_size == 64 and ExtractConfig().fold_bn is True
    for bad, match in (
        ({"batch_size": 0}, "batch_size must"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"on_error": "retry"}, "on_error must"),
        ({"workers": -1}, "workers"),
        ({"chunk_rows": 0}, "chunk_rows must"),
        ({"autocast": "int8"}, "autocast must be one of"),
    ):
        with pytest.raises(lt.LayertapError, match=match):
            ExtractConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExtractConfig().batch_size = 2  # type: ignore[misc]


def test_resolve_device_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    from layertap import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(lt.LayertapError, match="unknown device"):
        resolve_device("gpu0")


def test_unwrap_output_is_the_one_rule() -> None:
    t = torch.zeros(2)
    assert unwrap_output(t) is t
    assert unwrap_output((None, t)) is t
    assert unwrap_output({"pooler_output": torch.ones(1), "last_hidden_state": t}) is t
    assert unwrap_output({"logits": t}) is t
    assert unwrap_output(None) is None and unwrap_output(("a",)) is None
