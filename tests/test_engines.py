"""Exact CPU inference engines (ONNX Runtime, OpenVINO) for the tapped graph: issue 14.

Every tapped output of the engine must equal eager forward hooks on the unmodified model to
float32 rounding (max |engine - eager| / max |eager| <= 1e-5, per layer). Random weights and small
inputs keep the exports short; a model whose graph is cut after its first blocks exports only those.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import layertap as lt
from layertap.errors import LayertapError
from layertap.extraction import engines
from layertap.extraction.engines import AUTO_MIN_IMAGES, EngineGraph, engine_available, resolve_backend
from layertap.extraction.graph import tap_graph

ENGINES = [e for e in ("onnxruntime", "openvino") if engine_available(e)]
pytestmark = pytest.mark.skipif(not ENGINES, reason="no CPU inference engine installed (pip install 'layertap[cpu]')")
REL = 1e-5


@pytest.fixture(autouse=True)
def _engine_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One cache for the session's tests (the two engines share each export); never the user's."""
    path = tmp_path_factory.getbasetemp() / "engine-cache"
    monkeypatch.setenv("LAYERTAP_ENGINE_CACHE", str(path))
    return path


def eager_hooks(module: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """The independent reference: hooks on the unmodified model's eager forward (first tensor of a tuple)."""
    got: dict[str, torch.Tensor] = {}
    mods = dict(module.named_modules())

    def keep(name: str, out: Any) -> None:
        t = out if isinstance(out, torch.Tensor) else next(o for o in out if isinstance(o, torch.Tensor))
        got[name] = t.detach().clone()

    handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: keep(n, o)) for n in layers]
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return got


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape and got.ndim == 3:  # a sequence-first block: layertap stores batch first
        ref = ref.transpose(0, 1)
    assert got.shape == ref.shape
    return float((got - ref).abs().max() / ref.abs().max())


def _tv(name: str) -> lt.LoadedModel:
    return lt.load_model(name, weights="random", seed=0)


TINY_VIT = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 64,
    "patch_size": 16,
}

# (id, loader, layers tapped, input (C, H, W), fold_bn). The layers are real module names; each is checked.
CASES = [
    ("alexnet", lambda: _tv("alexnet"), ["features.2", "features.12", "classifier.4"], (3, 64, 64), True),
    ("vgg11_bn", lambda: _tv("vgg11_bn"), ["features.2", "features.14", "features.28"], (3, 64, 64), True),
    ("vgg11_bn-unfolded", lambda: _tv("vgg11_bn"), ["features.1", "features.28"], (3, 64, 64), False),
    ("resnet50", lambda: _tv("resnet50"), ["layer1", "layer3.2.conv2", "layer4", "avgpool"], (3, 64, 64), True),
    ("resnet50-unfolded", lambda: _tv("resnet50"), ["layer2", "avgpool"], (3, 64, 64), False),
    ("convnext_tiny", lambda: _tv("convnext_tiny"), ["features.1", "features.5", "avgpool"], (3, 64, 64), True),
    (
        "vit_b_16",
        lambda: _tv("vit_b_16"),
        ["conv_proj", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.mlp"],
        (3, 224, 224),
        True,
    ),
    ("timm-vit", lambda: _tv("timm:vit_tiny_patch16_224"), ["blocks.0", "blocks.11", "norm"], (3, 224, 224), True),
    ("timm-cnn", lambda: _tv("timm:resnet18"), ["layer1", "layer4", "global_pool"], (3, 64, 64), True),
    ("clip-vit", lambda: _tv("clip:ViT-B-32"), ["conv1", "transformer.resblocks.1"], (3, 224, 224), True),
    (
        "hf-vit",
        lambda: lt.load_model("hf:vit", weights="random", seed=0, config=TINY_VIT),
        ["embeddings", "layers.0", "layers.2"],  # torch.fx cannot trace it: exported via its hooked forward
        (3, 64, 64),
        True,
    ),
    ("ipcl-alexnet-gn", lambda: _tv("ipcl:alexnet_gn"), ["conv_block_1", "conv_block_5", "fc6"], (3, 224, 224), True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_engine_equals_eager_hooks_per_layer(case: tuple[Any, ...], caplog: pytest.LogCaptureFixture) -> None:
    _, load, layers, shape, fold_bn = case
    model = load()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    ref = eager_hooks(model.module, x, layers)
    for engine in ENGINES:
        with caplog.at_level(logging.WARNING, logger="layertap"):
            tap = lt.Extractor(model, layers, backend=engine, fold_bn=fold_bn)
            got = tap(x)
        assert tap.fallback is None, tap.fallback  # the engine ran, not torch
        assert tap.describe()["engine"] == engine
        for layer in layers:
            err = rel_error(got[layer], ref[layer])
            assert err <= REL, f"{engine} {layer}: max relative error {err:.2e}"


class DataDependent(nn.Module):
    """A forward whose path depends on the data: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:
            y = -y
        return self.pool(y)


def _small_model(module: nn.Module, name: str) -> lt.LoadedModel:
    import torchvision.transforms as T

    tf = T.Compose([T.Resize((32, 32)), T.ToTensor()])
    return lt.from_module(module, transform=tf, name=name)


def test_untraceable_model_falls_back_to_torch_with_one_warning_and_a_record(
    image_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _small_model(DataDependent().eval(), "datadep")
    with caplog.at_level(logging.WARNING, logger="layertap"):
        run = lt.extract(model, image_dir, ["pool"], tmp_path / "e", backend=ENGINES[0], workers=0, batch_size=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"backend {ENGINES[0]}: cannot export or run datadep" in warnings[0], warnings
    ref = lt.extract(model, image_dir, ["pool"], tmp_path / "t", backend="torch", workers=0, batch_size=4)
    assert run["pool"][:].tobytes() == ref["pool"][:].tobytes()  # torch ran: the same bytes
    record = run.manifest["backend"]
    assert record["name"] == ENGINES[0] and "cannot export" in record["fallback"]
    assert ref.manifest["backend"]["fallback"] is None and ref.manifest["backend"]["name"] == "torch"


def test_export_failure_falls_back_on_the_first_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unsupported(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("an op without an ONNX form")

    monkeypatch.setattr(engines, "export_onnx", unsupported)
    model = _tv("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="layertap"):
        tap = lt.Extractor(model, ["layer2"], backend=ENGINES[0])
        got = tap(x)["layer2"]
    assert "an op without an ONNX form" in tap.fallback and len(caplog.records) == 1
    assert torch.equal(got, lt.Extractor(model, ["layer2"])(x)["layer2"])  # torch's numbers exactly


def test_cache_skips_the_second_export_rebuilds_a_corrupt_entry_and_runs_any_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = engines.export_onnx
    monkeypatch.setattr(engines, "export_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    graph, _ = tap_graph(_tv("resnet18").module.eval(), ["layer2"])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = graph(x)[0]
    first = EngineGraph(ENGINES[0], graph, tmp_path)
    out = first(x)[0]
    assert len(calls) == 1 and rel_error(out, ref) <= REL
    for b in (1, 2, 5):  # the batch axis is dynamic: no new export for another batch size
        assert rel_error(first(x[:b])[0], ref[:b]) <= REL
    second = EngineGraph(ENGINES[-1], graph, tmp_path)  # a new process would do the same: read the cache
    assert rel_error(second(x)[0], ref) <= REL and len(calls) == 1
    files = sorted(tmp_path.glob("*.onnx"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    # the checksummed .onnx and its sidecar are all an engine reads: no unchecked compiled blobs beside them
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([files[0].name, files[0].stem + ".json"])
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])  # a truncated entry
    third = EngineGraph(ENGINES[0], graph, tmp_path)
    assert rel_error(third(x)[0], ref) <= REL and len(calls) == 2  # rebuilt, not used
    assert EngineGraph(ENGINES[0], graph, tmp_path)(x)[0].shape == ref.shape and len(calls) == 2
    with torch.no_grad():  # other weights: another key, another export
        graph.get_submodule("layer2").get_submodule("0").conv1.weight.mul_(2)
    EngineGraph(ENGINES[0], graph, tmp_path)(x)
    assert len(calls) == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_reducers_and_flatten_store_the_torch_backend_numbers(image_dir: Path, tmp_path: Path, engine: str) -> None:
    cnn = _tv("resnet18")
    reduce = {"layer2": "avg", "layer3": "srp:64:1", "avgpool": "none"}
    kw: dict[str, Any] = {"workers": 0, "batch_size": 3, "reduce": reduce}  # 3 does not divide the image count
    runs = {b: lt.extract(cnn, image_dir, list(reduce), tmp_path / f"c-{b}", backend=b, **kw) for b in (engine, "torch")}
    for layer in reduce:
        a, b = runs[engine][layer][:], runs["torch"][layer][:]
        assert a.shape == b.shape and np.abs(a - b).max() <= REL * np.abs(b).max(), layer
    assert runs[engine].manifest["backend"]["name"] == engine and runs[engine].manifest["backend"]["version"]
    vit = lt.load_model("hf:vit", weights="random", seed=0, config=TINY_VIT)
    layers = ["layers.1", "layers.2"]
    kw = {"workers": 0, "batch_size": 4, "reduce": {"*.1": "cls+mean", "*.2": "mean"}, "flatten": True}
    runs = {b: lt.extract(vit, image_dir, layers, tmp_path / f"v-{b}", backend=b, **kw) for b in (engine, "torch")}
    for layer in layers:
        a, b = runs[engine][layer][:], runs["torch"][layer][:]
        assert a.ndim == 2 and np.abs(a - b).max() <= REL * np.abs(b).max()


def test_resume_with_the_engine_is_byte_identical_and_another_backend_is_refused(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tv("resnet18")
    kw: dict[str, Any] = {"workers": 0, "batch_size": 2, "chunk_rows": 2, "backend": ENGINES[0]}
    whole = lt.extract(model, image_dir, ["layer3", "avgpool"], tmp_path / "whole", **kw)
    real, seen = EngineGraph.__call__, []

    def crash_third(self: EngineGraph, x: torch.Tensor) -> list[torch.Tensor]:
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt  # a kill after two batches were stored
        return real(self, x)

    monkeypatch.setattr(EngineGraph, "__call__", crash_third)
    with pytest.raises(KeyboardInterrupt):
        lt.extract(model, image_dir, ["layer3", "avgpool"], tmp_path / "r", **kw)
    monkeypatch.setattr(EngineGraph, "__call__", real)
    with pytest.raises(LayertapError, match="backend") as err:
        lt.extract(model, image_dir, ["layer3", "avgpool"], tmp_path / "r", **{**kw, "backend": "torch"})
    assert len(str(err.value).splitlines()) == 1
    resumed = lt.extract(model, image_dir, ["layer3", "avgpool"], tmp_path / "r", **kw)
    for layer in ("layer3", "avgpool"):
        assert resumed[layer][:].tobytes() == whole[layer][:].tobytes()


def test_cache_key_covers_every_tensor_and_setting_the_graph_computes_with() -> None:
    """A stale export must never be reused: non-persistent buffers (left out of state_dict), tensors fx keeps as
    plain attributes, and layer settings that are not weights all change the key."""

    class Shift(nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.register_buffer("offset", torch.full((3,), offset), persistent=False)
            self.scale = torch.ones(3)  # a plain tensor attribute: fx turns it into a constant of the graph

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + self.offset) * self.scale

    def key(module: nn.Module) -> str:
        return engines.cache_key(torch.fx.symbolic_trace(module), (3,))

    base = Shift(0.0)
    assert key(base) == key(Shift(0.0))
    assert key(base) != key(Shift(1.0))  # only the non-persistent buffer differs
    other = Shift(0.0)
    other.scale = torch.full((3,), 2.0)
    assert key(base) != key(other)  # only the plain tensor attribute differs
    assert key(nn.LayerNorm(3, eps=1e-5)) != key(nn.LayerNorm(3, eps=1e-6))  # a setting, same weights


def test_auto_continues_with_the_backend_a_run_was_started_with(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with torch (as every run written before backends existed) is continued with torch when
    "auto" would now pick an engine, and a run started with an engine keeps it when "auto" would pick torch:
    re-running the same command is "nothing to do" / a resume, never "holds a different run"."""
    model = _tv("resnet18")
    kw: dict[str, Any] = {"workers": 0, "batch_size": 2, "chunk_rows": 2}
    torch_run = lt.extract(model, image_dir, ["avgpool"], tmp_path / "t", backend="torch", **kw)
    assert "backend" not in torch_run.manifest.spec  # the spec of a run from before backends existed
    monkeypatch.setattr(engines, "AUTO_MIN_IMAGES", 1)  # "auto" now picks an engine for this job
    assert resolve_backend("auto", "cpu", len(torch_run.images)) in ENGINES
    exports: list[int] = []
    real_export = engines.export_onnx
    monkeypatch.setattr(engines, "export_onnx", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    again = lt.extract(model, image_dir, ["avgpool"], tmp_path / "t", **kw)
    assert again.manifest.backend["name"] == "torch" and not exports
    assert again["avgpool"][:].tobytes() == torch_run["avgpool"][:].tobytes()
    monkeypatch.setattr(engines, "AUTO_MIN_IMAGES", 10**9)  # "auto" now picks torch
    engine_run = lt.extract(model, image_dir, ["avgpool"], tmp_path / "e", backend=ENGINES[0], **kw)
    again = lt.extract(model, image_dir, ["avgpool"], tmp_path / "e", **kw)
    assert again.manifest.backend["name"] == ENGINES[0]
    assert again["avgpool"][:].tobytes() == engine_run["avgpool"][:].tobytes()


def test_auto_picks_an_engine_only_for_large_cpu_jobs_and_explicit_engines_are_checked() -> None:
    assert resolve_backend("auto", "cpu", AUTO_MIN_IMAGES - 1) == "torch"  # a small job: the export would not pay
    assert resolve_backend("auto", "cpu", AUTO_MIN_IMAGES) in ENGINES
    assert resolve_backend("auto", "cuda", 10**6) == "torch" and resolve_backend("auto", "mps", 10**6) == "torch"
    assert resolve_backend("auto", "cpu", 10**6, compile=True) == "torch"
    with pytest.raises(LayertapError, match="backend must be one of"):
        resolve_backend("tensorrt", "cpu", 1)
    with pytest.raises(LayertapError, match="leave out autocast"):
        resolve_backend(ENGINES[0], "cpu", 1, autocast="bfloat16")


def test_cli_backend_flag_runs_the_engine_and_records_it(image_dir: Path, tmp_path: Path) -> None:
    from layertap.cli import main

    engine = ENGINES[-1]
    args = ["extract", "--model", "resnet18", "--weights", "random", "--layers", "layer2", "avgpool"]
    code = main([*args, "--images", str(image_dir), "--out", str(tmp_path / "r"), "--backend", engine, "-q"])
    assert code in (0, None)
    run = lt.open_run(tmp_path / "r")
    assert run.manifest["backend"]["name"] == engine and run.manifest["backend"]["fallback"] is None
    assert run.manifest["options"]["backend"] == engine and run.manifest["spec"]["backend"] == engine


def test_shards_with_the_engine_merge_byte_identical_to_one_run(image_dir: Path, tmp_path: Path) -> None:
    model = _tv("resnet18")
    kw: dict[str, Any] = {"workers": 0, "batch_size": 2, "backend": ENGINES[0]}
    whole = lt.extract(model, image_dir, ["layer3"], tmp_path / "whole", **kw)
    lt.extract(model, image_dir, ["layer3"], tmp_path / "sharded", shard=(0, 2), **kw)
    merged = lt.extract(model, image_dir, ["layer3"], tmp_path / "sharded", shard=(1, 2), **kw)
    assert merged.path == (tmp_path / "sharded") and merged.manifest["backend"]["name"] == ENGINES[0]
    assert merged["layer3"][:].tobytes() == whole["layer3"][:].tobytes()
    assert "per_shard" not in merged.manifest.to_dict()  # both shards ran the same way


def test_a_merged_run_records_a_fallback_in_any_shard(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tv("resnet18")
    kw: dict[str, Any] = {"workers": 0, "batch_size": 2, "backend": ENGINES[0]}
    whole = lt.extract(model, image_dir, ["layer3"], tmp_path / "whole", **kw)
    lt.extract(model, image_dir, ["layer3"], tmp_path / "sharded", shard=(0, 2), **kw)

    def cannot_run(*_a: Any, **_k: Any) -> None:  # e.g. the second shard's node lacks an instruction set
        raise RuntimeError("the engine cannot run here")

    monkeypatch.setattr(engines, "open_session", cannot_run)
    merged = lt.extract(model, image_dir, ["layer3"], tmp_path / "sharded", shard=(1, 2), **kw)
    backends = merged.manifest["per_shard"]["backend"]
    assert [b["name"] for b in backends] == [ENGINES[0]] * 2
    assert backends[0]["fallback"] is None and "the engine cannot run here" in backends[1]["fallback"]
    assert set(merged.manifest["per_shard"]) == {"backend"}  # nothing else differed
    assert rel_error(torch.from_numpy(merged["layer3"][:]), torch.from_numpy(whole["layer3"][:])) <= REL
