"""Layer aliases (input, output/logits, penultimate, embedding, block:K, depth:P%) across families."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

import layertap as lt
from layertap.data.images import load_rgb
from layertap.errors import LayertapError
from layertap.extraction.aliases import alias_table, blocks, head, resolve_alias


def _meta_model(name: str) -> torch.nn.Module:
    """A torchvision classifier built on the meta device (no memory, no init cost); RegNet computes
    its block widths with tensors, so that part runs on the CPU."""
    import torchvision.models.regnet as regnet

    orig = regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        with torch.device("cpu"):
            return orig(cls, *a, **kw)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return tvm.get_model(name)
    finally:
        regnet.BlockParams.from_init_params = classmethod(orig)


EXPECTED_BLOCKS = {
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "alexnet": ["features.2", "features.5", "features.12"],
    "vgg11": ["features.2", "features.5", "features.10", "features.15", "features.20"],
    "convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
    "swin_t": ["features.1", "features.3", "features.5", "features.7"],
    "efficientnet_b0": [f"features.{i}" for i in range(1, 8)],
    "mobilenet_v2": [f"features.{i}" for i in range(1, 18)],
    "densenet121": [f"features.denseblock{i}" for i in range(1, 5)],
    "regnet_y_400mf": [f"trunk_output.block{i}" for i in range(1, 5)],
    "shufflenet_v2_x0_5": ["stage2", "stage3", "stage4"],
    "squeezenet1_0": [f"features.{i}" for i in (3, 4, 5, 7, 8, 9, 10, 12)],
    "vit_b_16": [f"encoder.layers.encoder_layer_{i}" for i in range(12)],
    "mnasnet0_5": [f"layers.{i}" for i in range(8, 14)],
    "maxvit_t": [f"blocks.{i}" for i in range(4)],
}
EXPECTED_HEAD = {
    "resnet50": "fc",
    "alexnet": "classifier.6",
    "vit_b_16": "heads.head",
    "swin_t": "head",
    "squeezenet1_0": "classifier.1",
    "googlenet": "fc",
    "inception_v3": "fc",
    "maxvit_t": "classifier.5",
    "densenet121": "classifier",
}


def test_aliases_resolve_on_every_torchvision_classifier() -> None:
    names = tvm.list_models(module=tvm)
    assert len(names) > 70
    for name in names:
        model = _meta_model(name)
        modules = dict(model.named_modules())
        found = blocks(model)
        assert len(found) >= 3, name
        assert all(b in modules for b in found), name
        assert name not in EXPECTED_BLOCKS or found == EXPECTED_BLOCKS[name], (name, found)
        # no block contains another: a list of stages or of blocks, not a mix
        assert not any(a != b and b.startswith(a + ".") for a in found for b in found), (name, found)
        h = head(model)
        assert isinstance(modules[h], (torch.nn.Linear, torch.nn.Conv2d)), name
        assert modules[h].out_features if isinstance(modules[h], torch.nn.Linear) else modules[h].out_channels == 1000
        assert name not in EXPECTED_HEAD or h == EXPECTED_HEAD[name], (name, h)
        assert resolve_alias(model, "block:-1") == found[-1] and resolve_alias(model, "depth:0%") == found[0]
        assert resolve_alias(model, "depth:100%") == found[-1]
        assert resolve_alias(model, "penultimate") == h + ":input"


@pytest.mark.parametrize(
    "name, size",
    [("resnet18", 64), ("squeezenet1_0", 64), ("shufflenet_v2_x0_5", 64), ("densenet121", 64),
     ("mobilenet_v3_small", 64), ("alexnet", 64)],
)
def test_penultimate_fed_to_the_head_gives_the_logits(name: str, size: int) -> None:
    model = lt.load_model(name, weights="random", seed=0)
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with lt.Extractor(model, ["penultimate", "output", "input"]) as tap:
        out = tap(x)
    h = head(model)
    pen = out[h + ":input"]
    headmod = dict(model.module.named_modules())[h]
    reference = model.module(x)  # a plain forward of the unmodified model
    if name == "squeezenet1_0":  # the conv head: classifier = Dropout, Conv2d, ReLU, AdaptiveAvgPool2d, flatten
        logits = torch.flatten(model.module.classifier[2:](headmod(pen)), 1)
    else:
        logits = headmod(pen)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["output"], reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(out["input"], x)


def test_tiny_torchvision_vit_penultimate_is_the_class_token() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32)
    model = lt.from_module(vit, name="tiny-vit")
    x = torch.randn(2, 3, 32, 32)
    with lt.Extractor(model, ["penultimate", "block:-1"]) as tap:
        out = tap(x)
    with torch.inference_mode():
        torch.testing.assert_close(vit.heads.head(out["heads.head:input"]), vit(x), rtol=1e-4, atol=1e-4)
    assert "encoder.layers.encoder_layer_2" in out


def test_timm_clip_hf_ipcl_aliases() -> None:
    cases = {
        "timm:resnet18": ("layer4", "fc"),
        "timm:vit_tiny_patch16_224": ("blocks.11", "head"),
        "timm:convnext_atto": ("stages.3", "head.fc"),
    }
    for name, (last, h) in cases.items():
        model = lt.load_model(name, weights="random")
        assert resolve_alias(model, "block:-1") == last and head(model) == h, name
        x = torch.randn(1, *model.input_size)
        with lt.Extractor(model, ["penultimate", "output"]) as tap:
            out = tap(x)
        with torch.inference_mode():
            logits = dict(model.module.named_modules())[h](out[h + ":input"])
        torch.testing.assert_close(logits, out["output"])
    rn = lt.load_model("clip:RN50", weights="random")
    assert blocks(rn) == ["layer1", "layer2", "layer3", "layer4"] and resolve_alias(rn, "embedding") == "output"
    vit = lt.load_model("clip:ViT-B-32", weights="random")
    assert resolve_alias(vit, "block:-1") == "transformer.resblocks.11"
    with pytest.raises(LayertapError, match="no classifier head"):
        resolve_alias(vit, "penultimate")
    hf = lt.load_model(
        "hf:dinov2", weights="random",
        config={"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37},
    )
    assert resolve_alias(hf, "block:0") == hf.layer_aliases["hidden_states.1"]
    assert resolve_alias(hf, "block:-1") == hf.layer_aliases["hidden_states.3"]
    hf_vit = lt.load_model(
        "hf:vit", weights="random",
        config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37},
    )
    assert blocks(hf_vit) == [hf_vit.layer_aliases["hidden_states.1"], hf_vit.layer_aliases["hidden_states.2"]]
    with pytest.raises(LayertapError, match="no classifier head"):
        resolve_alias(hf_vit, "penultimate")
    ipcl = lt.load_model("ipcl:alexnet_gn", weights="random")
    assert resolve_alias(ipcl, "embedding") == "l2norm" and blocks(ipcl)[-1] == "conv_block_5"
    assert ("block:4 / block:-1", "conv_block_5") in alias_table(ipcl)


def test_bad_aliases_are_one_line_errors() -> None:
    model = lt.load_model("resnet18", weights="random")
    for alias, msg in [("block:9", "out of range: this model has 4 blocks"), ("block:x", "integer K"),
                       ("depth:150%", "P from 0 to 100"), ("embedding", "CLIP and IPCL")]:
        with pytest.raises(LayertapError, match=msg):
            lt.resolve_layers(model, [alias])


def test_manifest_records_real_names_and_the_alias(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("resnet18", weights="random")
    run = lt.extract(model, image_dir, ["penultimate", "block:-1"], tmp_path / "a", progress=False, batch_size=9)
    assert run.layers == ["fc:input", "layer4"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["layer_aliases"] == {"penultimate": "fc:input", "block:-1": "layer4"}
    assert manifest["layers_requested"] == ["penultimate", "block:-1"]
    x = torch.stack([model.transform(load_rgb(str(image_dir / p))) for p in run.images])
    with torch.no_grad():
        ref = model.module.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        seen: list[torch.Tensor] = []
        model.module(x)
        ref.remove()
    torch.testing.assert_close(torch.from_numpy(run["fc:input"][:]), seen[0], rtol=1e-4, atol=1e-4)


def test_layers_command_lists_the_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from layertap.cli import app as cli

    assert cli.main(["layers", "resnet18", "--aliases", "--input-size", "64", "64"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^block:3 / block:-1 +layer4 +512x2x2$", text, re.M)
    assert re.search(r"^penultimate +fc:input +512$", text, re.M)
    assert re.search(r"^depth:50% +layer3 +256x4x4$", text, re.M)
