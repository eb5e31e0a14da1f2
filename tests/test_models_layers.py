"""Model registry, weights loading (pretrained cache, files, checkpoints) and layer resolution."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

import layertap as lt
from layertap.extraction.layers import format_layer_table

SEED_MODELS = ["alexnet", "resnet50", "resnet101", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


def test_registry_lists_every_torchvision_classifier() -> None:
    names = lt.list_models()
    assert "torchvision:alexnet" in names and "torchvision:vit_b_16" in names
    # the image classifiers plus torchvision.models.video (r3d_18, s3d, mvit_v2_s, swin3d_t, ...)
    assert len(lt.list_models("torchvision")) == len(tvm.list_models(module=tvm)) + len(
        tvm.list_models(module=tvm.video)
    )
    assert "torchvision:r3d_18" in names and "torchvision:swin3d_t" in names
    assert "torchvision" in lt.list_sources()


def test_unknown_model_suggests() -> None:
    with pytest.raises(lt.LayertapError, match="did you mean: resnet50"):
        lt.load_model("resnet5O", weights="random")
    with pytest.raises(lt.LayertapError, match="unknown model source"):
        lt.list_models("nosuchsource")


def test_random_weights_are_seeded() -> None:
    a = lt.load_model("resnet18", weights="random", seed=1).module.state_dict()
    b = lt.load_model("resnet18", weights="random", seed=1).module.state_dict()
    c = lt.load_model("resnet18", weights="random", seed=2).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    m = lt.load_model("resnet18", weights="random", seed=1)
    assert m.provenance["weights"] == {"kind": "random", "seed": 1}
    assert not m.module.training and not any(p.requires_grad for p in m.module.parameters())


def test_pretrained_never_falls_back_to_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(lt.LayertapError, match="cannot load pretrained weights AlexNet_Weights.IMAGENET1K_V1"):
        lt.load_model("alexnet", weights="pretrained")


def test_pretrained_loads_from_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Put a (random) state_dict where torch.hub caches AlexNet's published file: the real
    # pretrained code path must load exactly it and record the weights id.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    url = tvm.AlexNet_Weights.IMAGENET1K_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    cache.parent.mkdir(parents=True)
    torch.manual_seed(11)
    state = tvm.alexnet().state_dict()
    torch.save(state, cache)
    model = lt.load_model("alexnet")
    assert torch.equal(model.module.state_dict()["features.0.weight"], state["features.0.weight"])
    assert model.provenance["weights"] == {"kind": "pretrained", "id": "AlexNet_Weights.IMAGENET1K_V1"}
    assert model.provenance["url"] == url
    with pytest.raises(lt.LayertapError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        lt.load_model("alexnet", weights="IMAGENET9K")


def test_weights_spec_objects_load_as_their_strings(tmp_path: Path) -> None:
    """``weights=`` as a spec object (Pretrained | Random | File) loads what its string spelling loads, and a
    source written as a ``build`` adapter alone gets the shared finishing step (file loading, provenance, frozen)."""
    from torch import nn

    from layertap.models import Built, File, Pretrained, Random, Source, register_source
    from layertap.models.registry import _SOURCES
    from layertap.models.weights import seeded_build, weights_spec

    assert weights_spec("random") == Random() and weights_spec("IMAGENET1K_V1") == Pretrained("IMAGENET1K_V1")
    a = lt.load_model("resnet18", Random(), seed=3)
    b = lt.load_model("resnet18", "random", seed=3)
    assert a.provenance == b.provenance and all(
        torch.equal(v, b.module.state_dict()[k]) for k, v in a.module.state_dict().items()
    )

    class Tiny(Source):
        name = "tiny-test"

        def list_models(self) -> list[str]:
            return ["mlp"]

        def build(self, name: str, weights: object, seed: int, **options: object) -> Built:
            return Built(seeded_build(lambda: nn.Linear(3, 2), seed), lambda x: x, (3,), extra={"note": 1})

    register_source(Tiny())
    try:
        torch.manual_seed(0)
        state = nn.Linear(3, 2).state_dict()
        torch.save(state, tmp_path / "w.pt")
        for spelled in (tmp_path / "w.pt", File(tmp_path / "w.pt")):
            m = lt.load_model("tiny-test:mlp", spelled)
            assert torch.equal(m.module.weight, state["weight"]) and not m.module.weight.requires_grad
            assert m.provenance["weights"]["kind"] == "file" and m.provenance["note"] == 1
        assert lt.load_model("tiny-test:mlp", "random", seed=5).provenance["weights"] == {"kind": "random", "seed": 5}
        assert Tiny().pretrained_names() is None  # the default: cannot tell without loading
    finally:
        del _SOURCES["tiny-test"]


def test_weights_file_and_released_checkpoint_format(tmp_path: Path) -> None:
    torch.manual_seed(4)
    state = tvm.resnet18().state_dict()
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    for f in (plain, ckpt):
        m = lt.load_model("resnet18", weights=f)
        loaded = m.module.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
        assert m.provenance["weights"]["kind"] == "file" and len(m.provenance["weights"]["sha256"]) == 64


def test_weights_that_do_not_fit_name_the_keys(tmp_path: Path) -> None:
    f = tmp_path / "alex.pt"
    torch.save(tvm.alexnet().state_dict(), f)
    with pytest.raises(lt.LayertapError, match="weights do not fit torchvision:resnet18: missing keys: conv1.weight"):
        lt.load_model("resnet18", weights=f)
    g = tmp_path / "resnet10cls.pt"
    torch.save(tvm.resnet18(num_classes=10).state_dict(), g)
    with pytest.raises(lt.LayertapError, match=r"shape mismatch.*fc.weight \(10, 512\) vs \(1000, 512\)"):
        lt.load_model("resnet18", weights=g)


class _Evil:
    """A pickle that runs code when loaded: it creates the file ``marker`` (its visible side effect)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_weights_file_cannot_run_code(tmp_path: Path, writer: str) -> None:
    f, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    payload = {"state_dict": {"features.0.weight": torch.zeros(1), "hook": _Evil(marker)}}
    if writer == "pickle":
        with open(f, "wb") as fh:
            pickle.dump(payload, fh)
    else:
        torch.save(payload, f)
    try:
        with pytest.raises(lt.LayertapError, match="cannot read weights file"):
            lt.load_model("alexnet", weights=f)
    finally:
        assert not marker.exists(), "loading the weights file ran the code in its pickle"
    with pytest.raises(lt.LayertapError, match="weights file not found"):
        lt.load_model("alexnet", weights="missing/weights.pt")


def test_transforms_follow_the_architecture() -> None:
    vit = lt.load_model("vit_b_16", weights="random")
    assert vit.input_size == (3, 224, 224) and "crop_size=[224]" in vit.provenance["transform"]
    inc = lt.load_model("inception_v3", weights="random")
    assert inc.input_size == (3, 299, 299)


def test_globs_and_unknown_layers() -> None:
    model = lt.load_model("resnet18", weights="random")
    assert lt.resolve_layers(model, ["layer?"]) == ["layer1", "layer2", "layer3", "layer4"]
    assert lt.resolve_layers(model, "layer4.*") == ["layer4.0", "layer4.1"]
    deep = lt.resolve_layers(model, "layer4.**")
    assert "layer4.0.downsample.0" in deep and "layer3.0" not in deep
    assert lt.resolve_layers(model, ["avgpool", "layer1", "avgpool"]) == ["avgpool", "layer1"]
    with pytest.raises(
        lt.LayertapError, match=r"unknown layer .layer5. \(did you mean: layer4, layer3, layer2, layer1"
    ):
        lt.resolve_layers(model, ["layer5"])
    with pytest.raises(lt.LayertapError, match="matches no module"):
        lt.resolve_layers(model, ["block*"])


def test_layer_table_shapes_and_params() -> None:
    model = lt.load_model("alexnet", weights="random")
    infos = {i.name: i for i in lt.list_layers(model)}
    assert infos["features.10"].shape == (256, 13, 13) and infos["features.10"].type == "Conv2d"
    assert infos["classifier.4"].shape == (4096,) and infos["classifier.4"].params == 4096 * 4096 + 4096
    assert infos["features"].params == sum(p.numel() for p in model.module.features.parameters())
    table = format_layer_table(list(infos.values()))
    assert "  features.10" in table and "256x13x13" in table and "16,781,312" in table


@pytest.mark.slow
@pytest.mark.parametrize("name", SEED_MODELS)
def test_seed_models_build_and_list_layers(name: str) -> None:
    model = lt.load_model(name, weights="random")
    infos = lt.list_layers(model)
    assert any(i.name.startswith("features") or i.name.startswith("layer") for i in infos)
    ran = [i for i in infos if i.calls]
    assert ran and all(i.shape is not None for i in ran)


def test_bare_names_prefer_torchvision() -> None:
    assert lt.load_model("resnet18", weights="random").name == "torchvision:resnet18"
    assert lt.load_model("timm:resnet18", weights="random").name == "timm:resnet18"
    assert lt.load_model("ipcl1", weights="random").name == "ipcl:ipcl1"
