"""Every model source, offline with random weights or tiny configs, against independent references."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, reference_outputs
from PIL import Image

import layertap as lt
from layertap import clip as ltclip

TOL = {"rtol": 1e-4, "atol": 1e-4}


def _batch(model: lt.LoadedModel, folder: Path) -> tuple[list[Path], torch.Tensor]:
    paths = sorted(folder.rglob("*.jpg"))
    return paths, torch.stack([model.transform(Image.open(p).convert("RGB")) for p in paths])


def _check_run_against_hooks(model: lt.LoadedModel, folder: Path, layers: list[str], out: Path, **kw) -> lt.Run:
    run = lt.extract(model, folder, layers, out, workers=0, batch_size=4, channels_last=False, **kw)
    _, x = _batch(model, folder)
    ref = reference_outputs(model.module, x, [n for n in layers if n != "output"])
    for layer in layers:
        want = model.module(x) if layer == "output" else ref[layer][0]
        want = want if isinstance(want, torch.Tensor) else want[0]
        np.testing.assert_allclose(run[layer][:], want.numpy(), **TOL, err_msg=layer)
    return run


# -- timm -------------------------------------------------------------------------------------------
def test_timm_vit_tokens_and_transform(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("timm:vit_tiny_patch16_224", weights="random", seed=1)
    assert model.num_prefix_tokens == 1 and model.input_size == (3, 224, 224)
    assert model.provenance["data_config"]["crop_pct"] == 0.9
    _check_run_against_hooks(model, image_dir, ["blocks.2", "blocks.11.mlp.fc1", "output"], tmp_path / "a")
    pooled = lt.extract(
        model,
        image_dir,
        ["blocks.5", "patch_embed.proj"],
        tmp_path / "b",
        workers=0,
        batch_size=4,
        reduce="cls+mean",
        channels_last=False,
    )
    _, x = _batch(model, image_dir)
    tokens = reference_outputs(model.module, x, ["blocks.5"])["blocks.5"][0]
    want = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)
    np.testing.assert_allclose(pooled["blocks.5"][:], want.numpy(), **TOL)
    # the conv patch embedding is not a token sequence: left as it is, and the manifest says so
    assert pooled["patch_embed.proj"].shape == (9, 192, 14, 14)
    assert pooled.manifest["layers"]["blocks.5"]["reduce"] == "cls+mean"
    assert "reduce" not in pooled.manifest["layers"]["patch_embed.proj"]


def test_timm_cnn_pooling(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("timm:resnet18", weights="random", seed=0)
    run = lt.extract(
        model, image_dir, ["layer2", "layer3"], tmp_path / "r", workers=0, reduce={"layer2": "avg", "layer3": "max:2"}
    )
    _, x = _batch(model, image_dir)
    ref = reference_outputs(model.module, x, ["layer2", "layer3"])
    np.testing.assert_allclose(run["layer2"][:], ref["layer2"][0].mean((2, 3)).numpy(), **TOL)
    np.testing.assert_allclose(
        run["layer3"][:], torch.nn.functional.adaptive_max_pool2d(ref["layer3"][0], 2).numpy(), **TOL
    )


# -- CLIP -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_vit() -> lt.LoadedModel:
    return lt.load_model("clip:ViT-B-32", weights="random", seed=0)


def test_clip_image_layers_batch_first(clip_vit: lt.LoadedModel, image_dir: Path, tmp_path: Path) -> None:
    run = _check_run_against_hooks(clip_vit, image_dir, ["transformer.resblocks.3", "output"], tmp_path / "r")
    assert run["transformer.resblocks.3"].shape == (9, 50, 768)  # batch first
    _, x = _batch(clip_vit, image_dir)
    np.testing.assert_allclose(run["output"][:], clip_vit.components["clip"].encode_image(x).detach().numpy(), **TOL)
    np.testing.assert_allclose(ltclip.encode_image(clip_vit, x), run["output"][:], **TOL)


def test_sequence_first_outputs_are_stored_batch_first() -> None:
    class SeqFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, D) -> blocks run on (L, B, D)
            return self.block(x.transpose(0, 1)).transpose(0, 1)

    torch.manual_seed(0)
    net = SeqFirst().eval()
    model = lt.LoadedModel(net, transform=lambda i: i, name="toy", sequence_first=("block",), num_prefix_tokens=1)
    x = torch.randn(2, 5, 4)
    with lt.Extractor(model, ["block"]) as tap:
        out = tap(x)["block"]
    torch.testing.assert_close(out, net(x).detach())
    with lt.Extractor(model, ["block"], reduce="mean") as tap:
        torch.testing.assert_close(tap(x)["block"], net(x)[:, 1:].mean(1).detach())


def test_clip_text_features(clip_vit: lt.LoadedModel) -> None:
    texts = ["aardvark", "abacus", "a much longer description of an acorn on the ground"]
    a = ltclip.encode_text(clip_vit, texts, templates=["a photo of a {}"])
    b = ltclip.encode_text(clip_vit, texts, templates=["a photo of a {}"])
    assert a.shape == (3, 512) and np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    tokens = ltclip.tokenize(clip_vit, [f"a photo of a {t}" for t in texts])
    raw = clip_vit.components["clip"].encode_text(tokens).detach()
    np.testing.assert_allclose(a, torch.nn.functional.normalize(raw, dim=-1).numpy(), **TOL)
    # prompt ensembling: mean of normalised prompt embeddings, renormalised
    two = ltclip.encode_text(clip_vit, ["cat"], templates=["a photo of a {}", "a drawing of a {}"])
    parts = ltclip.encode_text(clip_vit, ["a photo of a cat", "a drawing of a cat"])
    want = parts.mean(0) / np.linalg.norm(parts.mean(0))
    np.testing.assert_allclose(two[0], want, rtol=1e-5, atol=1e-6)
    img = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    logits = ltclip.similarity_logits(img, a)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ a.T
    np.testing.assert_allclose(logits, 100 * cos, rtol=1e-5, atol=1e-4)
    with pytest.raises(lt.LayertapError, match="no '\\{\\}'"):
        ltclip.encode_text(clip_vit, ["x"], templates=["a photo"])


def test_clip_tokenizer_truncates_and_pads(clip_vit: lt.LoadedModel) -> None:
    tok = ltclip.tokenize(clip_vit, ["cat", "word " * 200])
    assert tok.shape == (2, 77) and tok.dtype == torch.int64
    sot, eot = 49406, 49407
    assert tok[0, 0] == sot and tok[0, 2] == eot and (tok[0, 3:] == 0).all()  # 'cat' is one token, then padding
    assert tok[1, 0] == sot and tok[1, -1] == eot and (tok[1] != 0).all()  # truncated, end token kept


def test_clip_resnet_and_text_cli(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("clip:RN50", weights="random", seed=0)
    run = _check_run_against_hooks(model, image_dir, ["layer4", "output"], tmp_path / "r")
    assert run["output"].shape == (9, 1024)
    tsv = tmp_path / "things_concepts.tsv"
    tsv.write_text("Word\tuniqueID\naardvark\taardvark\nabacus\tabacus\n")
    proc = layertap_cli(
        "text",
        "--model",
        "clip:ViT-B-32",
        "--weights",
        "random",
        "--texts",
        str(tsv),
        "--template",
        "a photo of a {}",
        "--out",
        str(tmp_path / "txt"),
        check=True,
    )
    assert "2 text embeddings" in proc.stderr
    # the same loud warning as extract, and none of open_clip's root-logger lines
    assert "using RANDOM (untrained) weights, seed 0" in proc.stderr and "root:" not in proc.stderr
    feats = np.load(tmp_path / "txt" / "text_features.npy")
    want = ltclip.encode_text(
        lt.load_model("clip:ViT-B-32", weights="random", seed=0), ["aardvark", "abacus"], templates=["a photo of a {}"]
    )
    np.testing.assert_allclose(feats, want, **TOL)


def test_text_offline_is_one_whole_line(layertap_cli, tmp_path: Path) -> None:
    """No cached OpenAI weights and no internet: one error line, whole words, the CLI's spelling."""
    (tmp_path / "t.txt").write_text("cat\ndog\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    env.update({"HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    env.pop("HF_HUB_CACHE", None)
    proc = layertap_cli(
        "text", "--model", "clip:ViT-B-32", "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), env=env
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("layertap: error: cannot load CLIP weights ViT-B-32/openai (not in the local cache")
    assert str(tmp_path / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai") in lines[0]
    assert lines[0].endswith("use --weights random only if you want an untrained model")
    assert "weights='random'" not in lines[0]


def test_option_json_errors_say_where(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from layertap.cli.app import main

    args = ["extract", "--model", "hf:vit", "--weights", "random", "--layers", "x", "--images", str(tmp_path)]
    code = main([*args, "--out", str(tmp_path / "o"), "--option", "config={hidden_size: 384}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--option config: invalid JSON at column 2 (Expecting property name enclosed in double quotes)" in err
    assert "mapping" not in err and "internet" not in err
    # plain words stay strings; valid JSON is parsed
    from layertap.cli.options import model_options as _options

    assert _options(["transform=validation", 'config={"hidden_size": 8}', "n=3"]) == {
        "transform": "validation",
        "config": {"hidden_size": 8},
        "n": 3,
    }
    # the library says what a Python user writes; the command line says --weights random
    with pytest.raises(lt.LayertapError, match=r"config must be a mapping"):
        lt.load_model("hf:vit", weights="random", config="{hidden_size: 384}")
    with pytest.raises(lt.LayertapError, match=r"use weights='random'"):
        lt.load_model("hf:vit")
    assert main(["extract", "--model", "hf:vit", "--layers", "x", "--images", str(tmp_path), "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "or use --weights random" in err and "weights='random'" not in err


# -- Hugging Face ----------------------------------------------------------------------------------
TINY_VIT = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 64,
    "patch_size": 16,
}


def test_hf_hidden_states_by_index(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("hf:vit", weights="random", seed=0, config=TINY_VIT)
    assert model.input_size == (3, 64, 64) and model.num_prefix_tokens == 1
    layers = ["hidden_states.0", "hidden_states.2", "output"]
    run = lt.extract(model, image_dir, layers, tmp_path / "r", workers=0, batch_size=4)
    _, x = _batch(model, image_dir)
    with torch.no_grad():
        out = model.module(x, output_hidden_states=True)
    np.testing.assert_allclose(run["hidden_states.0"][:], out.hidden_states[0].numpy(), **TOL)
    np.testing.assert_allclose(run["hidden_states.2"][:], out.hidden_states[2].numpy(), **TOL)
    np.testing.assert_allclose(run["output"][:], out.last_hidden_state.numpy(), **TOL)


def test_hf_model_type_uses_its_default_image_processor() -> None:
    """A bare model type preprocesses as its hub checkpoints' processor class does by default."""
    import transformers

    imgs = [Image.fromarray(photo("astronaut", 1, (300, 240))), Image.fromarray(photo("coffee", 2, (200, 260)))]

    def same(model: lt.LoadedModel, processor) -> None:
        for img in imgs:
            want = processor(images=img, return_tensors="pt")["pixel_values"][0]
            torch.testing.assert_close(model.transform(img), want, rtol=0, atol=1e-6)
        assert model.input_size == tuple(want.shape)

    small = {k: v for k, v in TINY_VIT.items() if k != "image_size"}
    vit = lt.load_model("hf:vit", weights="random", config=small)  # squash to 224 x 224, mean = std = 0.5
    same(vit, transformers.ViTImageProcessor())
    assert vit.provenance["transform"].startswith("ViTImageProcessor(") and "0.5, 0.5, 0.5" in vit.provenance["transform"]
    # a config of another image size: the same processor at that size
    at64 = transformers.ViTImageProcessor(size={"height": 64, "width": 64})
    same(lt.load_model("hf:vit", weights="random", config=TINY_VIT), at64)
    # the user's processor settings win
    stats = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    custom = lt.load_model("hf:vit", weights="random", config=small, processor=stats)
    same(custom, transformers.ViTImageProcessor(**stats))
    assert custom.provenance["processor"] == stats
    # shortest-edge + crop processors (DINOv2's BitImageProcessor), ConvNeXt's crop_pct processor
    same(lt.load_model("hf:dinov2", weights="random", config=small), transformers.BitImageProcessor())
    tiny_cnx = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
    cnx = lt.load_model("hf:convnext", weights="random", config=tiny_cnx)  # config image_size 224: crop 224
    same(cnx, transformers.ConvNextImageProcessor(size={"shortest_edge": 224}))


def test_hf_register_tokens_are_excluded_from_mean(image_dir: Path, tmp_path: Path) -> None:
    cfg = {**TINY_VIT, "num_register_tokens": 4}
    model = lt.load_model("hf:dinov2", weights="random", seed=0, config=cfg)
    assert model.num_prefix_tokens == 5
    run = lt.extract(model, image_dir, ["hidden_states.3"], tmp_path / "r", workers=0, reduce="mean")
    _, x = _batch(model, image_dir)
    with torch.no_grad():
        hs = model.module(x, output_hidden_states=True).hidden_states[3]
    np.testing.assert_allclose(run["hidden_states.3"][:], hs[:, 5:].mean(1).numpy(), **TOL)


def test_hf_convnext_module_names(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model(
        "hf:convnext", weights="random", config={"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
    )
    _check_run_against_hooks(model, image_dir, ["encoder.stages.1", "encoder.stages.3.layers.0"], tmp_path / "r")


# -- IPCL -------------------------------------------------------------------------------------------
def test_ipcl_released_checkpoint_format_and_layers(tmp_path: Path) -> None:
    from layertap.models.sources.ipcl import AlexNetGN

    torch.manual_seed(3)
    net = AlexNetGN(128, True)
    ckpt = tmp_path / "ipcl1.pth.tar"
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    model = lt.load_model("ipcl:ipcl1", weights=ckpt)
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with lt.Extractor(model, ["fc7", "fc8", "l2norm"]) as tap:  # the seed's FeatureExtractor example
        feats = tap(x)
    assert feats["fc7"].shape == (2, 4096) and feats["fc8"].shape == (2, 128)
    torch.testing.assert_close(feats["l2norm"], torch.nn.functional.normalize(feats["fc8"], dim=1))
    torch.testing.assert_close(feats["l2norm"], net.eval()(x))
    conv = lt.Extractor(model, ["conv_block_1.0", "conv_block_1.1", "conv_block_1.2"])(x)
    assert conv["conv_block_1.0"].shape == (2, 96, 55, 55) and (conv["conv_block_1.0"] < 0).any()
    assert model.provenance["ipcl"]["training_data"] == "ImageNet"


def test_ipcl_pretrained_from_cache_and_transforms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from layertap.models.sources.ipcl import CONFIGS, AlexNetGN

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(lt.LayertapError, match="cannot load pretrained weights for ipcl8"):
        lt.load_model("ipcl:ipcl8")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(CONFIGS["ipcl8"]["url"]).name
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(8)
    net = AlexNetGN()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, cache)
    import hashlib

    from layertap.models.sources import ipcl  # our file stands in for the released one: its hash prefix too

    monkeypatch.setitem(ipcl.SHA256_PREFIX, "ipcl8", hashlib.sha256(cache.read_bytes()).hexdigest()[:10])
    stim = lt.load_model("ipcl:ipcl8")
    assert torch.equal(stim.module.conv_block_1[0].weight, net.conv_block_1[0].weight)
    assert stim.provenance["weights"]["kind"] == "pretrained" and stim.provenance["ipcl_transform"] == "stimulus"
    val = lt.load_model("ipcl:ipcl8", transform="validation")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 450, 3), dtype=np.uint8))
    a, b = stim.transform(img), val.transform(img)
    assert a.shape == b.shape == (3, 224, 224) and not torch.equal(a, b)
    assert "Resize(size=224" in stim.provenance["transform"] and "Resize(size=256" in val.provenance["transform"]
    assert "mean=[0.5, 0.5, 0.5]" in stim.provenance["transform"]  # ipcl6-11 were trained with Set 2 stats
    untrained = lt.load_model("ipcl:ipcl16")  # the released untrained control *is* random weights
    assert untrained.provenance["weights"]["kind"] == "random"


# -- your own model --------------------------------------------------------------------------------
def test_custom_model_file_cli(layertap_cli, image_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "mynet.py"
    src.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),\n"
        "                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 5))\n"
    )
    torch.manual_seed(5)
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynet_ref", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref_net = mod.build().eval()
    weights = tmp_path / "mynet.pt"
    torch.save(ref_net.state_dict(), weights)
    out = tmp_path / "acts"
    layertap_cli(
        "extract",
        "--model",
        f"{src}:build",
        "--weights",
        str(weights),
        "--layers",
        "0",
        "4",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        check=True,
    )
    run = lt.open_run(out)
    model = lt.load_model(f"{src}:build", weights=weights)
    _, x = _batch(model, image_dir)
    ref = reference_outputs(ref_net, x, ["0", "4"])
    for layer in ("0", "4"):
        np.testing.assert_allclose(run[layer][:], ref[layer][0].numpy(), **TOL)
    assert run.manifest["model"]["weights"]["kind"] == "file" and run.manifest["model"]["file_sha256"]


# -- optional packages -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "package", "extra"),
    [("timm:resnet18", "timm", "timm"), ("clip:RN50", "open_clip", "clip"), ("hf:vit", "transformers", "hf")],
)
def test_missing_package_gives_install_hint(
    name: str, package: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import now fails as if not installed
    with pytest.raises(lt.LayertapError, match=rf"pip install 'layertap\[{extra}\]'"):
        lt.load_model(name, weights="random")
    assert not any(m.startswith(f"{name.split(':')[0]}:") for m in lt.list_models())


def test_missing_package_cli_is_one_line(layertap_cli, tmp_path: Path) -> None:
    (tmp_path / "timm.py").write_text("raise ImportError('pretend timm is not installed')\n")
    proc = layertap_cli(
        "layers", "timm:resnet18", env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 1 and "pip install 'layertap[timm]'" in proc.stderr and "Traceback" not in proc.stderr
