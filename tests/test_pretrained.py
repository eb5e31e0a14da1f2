"""Every source's ``weights="pretrained"`` path, end to end and offline.

Each test puts a generated checkpoint (random values, the released keys, shapes and file name)
where the source's own download would put it (torch hub cache, Hugging Face hub cache), with every
cache variable pointed into ``tmp_path``. layertap then loads it through its normal pretrained
code (``lt.load_model(name)``), and the result is compared with the reference library's *own*
pretrained construction from the same cache: layer by layer (hooks written here) to float32
rounding, and the transform against the library's own preprocessing for those weights on real
photographs. A model built with the wrong architecture for its weights (CLIP's QuickGELU) or
preprocessed the wrong way fails here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import photo, reference_outputs
from PIL import Image

import layertap as lt
from layertap import clip as ltclip

REV = "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"  # the commit a fabricated hub snapshot claims to be
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture()
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """torch hub and Hugging Face hub caches in tmp_path (never the real ~/.cache), offline."""
    torch_home, hf_home, xdg = tmp_path / "torch", tmp_path / "hf", tmp_path / "xdg"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() reads TORCH_HOME again
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    # huggingface_hub read these at import; every download function looks them up at call time
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return SimpleNamespace(torch_checkpoints=torch_home / "hub" / "checkpoints", hf_hub=hf_home / "hub")


def hf_snapshot(hub: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a Hugging Face hub cache (refs/main points at it)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return path


def stir_norm_stats(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give BatchNorm running statistics non-default values (as trained weights have)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Two real photographs of different aspect ratios (scikit-image's bundled data)."""
    return [
        Image.fromarray(photo("astronaut", seed=1, size=(300, 240))),
        Image.fromarray(photo("chelsea", seed=2, size=(210, 280))),
    ]


def assert_same_transform(model: lt.LoadedModel, reference, photos: list[Image.Image]) -> torch.Tensor:
    """layertap's transform equals the library's own preprocessing; returns the reference batch."""
    want = torch.stack([reference(img) for img in photos])
    got = torch.stack([model.transform(img) for img in photos])
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    return want


def assert_same_layers(
    model: lt.LoadedModel, reference: torch.nn.Module, x: torch.Tensor, layers: dict[str, str]
) -> None:
    """layertap's tap of its pretrained model equals hooks on the reference model ({ours: theirs})."""
    ref = reference_outputs(reference, x, list(layers.values()))
    with lt.Extractor(model, list(layers)) as tap:
        got = tap(x)
    for ours, theirs in layers.items():
        want = ref[theirs][0]
        want = want if isinstance(want, torch.Tensor) else want[0]
        np.testing.assert_allclose(got[ours].numpy(), want.numpy(), **TOL, err_msg=ours)


# -- torchvision: $TORCH_HOME/hub/checkpoints/<file of the weights URL> ------------------------------
def test_torchvision_pretrained_from_torch_hub_cache(caches: SimpleNamespace, photos: list[Image.Image]) -> None:
    import torchvision.models as tvm

    weights = tvm.ResNet18_Weights.DEFAULT
    torch.manual_seed(0)
    caches.torch_checkpoints.mkdir(parents=True)
    torch.save(stir_norm_stats(tvm.resnet18(), 0).state_dict(), caches.torch_checkpoints / Path(weights.url).name)

    model = lt.load_model("resnet18")  # weights="pretrained"
    reference = tvm.resnet18(weights=weights).eval()
    assert model.provenance["weights"] == {"kind": "pretrained", "id": "ResNet18_Weights.IMAGENET1K_V1"}
    x = assert_same_transform(model, weights.transforms(), photos)
    layers = ["conv1", "bn1", "layer1", "layer2.1.bn2", "layer3", "layer4", "avgpool", "fc"]
    assert_same_layers(model, reference, x, {n: n for n in layers})


# -- timm: the Hugging Face hub cache (timm/<arch>.<tag>/model.safetensors) -------------------------
@pytest.mark.parametrize(
    ("name", "layers"),
    [
        ("resnet18", ["conv1", "bn1", "layer1", "layer3.0.downsample", "layer4", "global_pool", "fc"]),
        ("vit_tiny_patch16_224", ["patch_embed", "blocks.0", "blocks.6.attn", "blocks.11", "norm", "head"]),
    ],
)
def test_timm_pretrained_from_hf_hub_cache(
    name: str, layers: list[str], caches: SimpleNamespace, photos: list[Image.Image]
) -> None:
    import timm

    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    torch.manual_seed(1)
    built = stir_norm_stats(timm.create_model(name, pretrained=False), 1)
    save_safetensors(built.state_dict(), hf_snapshot(caches.hf_hub, cfg["hf_hub_id"]) / "model.safetensors")

    model = lt.load_model(f"timm:{name}")
    reference = timm.create_model(name, pretrained=True).eval()
    assert model.provenance["weights"]["id"] == f"{name}.{cfg['tag']}"
    data = timm.data.resolve_data_config({}, model=reference)
    x = assert_same_transform(model, timm.data.create_transform(**data), photos)
    assert_same_layers(model, reference, x, {n: n for n in layers})
    assert tuple(model.input_size) == tuple(data["input_size"])


# -- CLIP: open_clip's hub download (HF cache), OpenAI and LAION tags ---------------------------------
def test_clip_pretrained_openai_and_laion_tags(caches: SimpleNamespace, photos: list[Image.Image]) -> None:
    import open_clip

    torch.manual_seed(2)
    # float16 like OpenAI's released files (half the bytes to write and read); loaded into float32
    state = {k: v.half() for k, v in open_clip.create_model("ViT-B-32").state_dict().items()}
    files = []
    for tag in ("openai", "laion2b_s34b_b79k"):
        repo = open_clip.get_pretrained_cfg("ViT-B-32", tag)["hf_hub"].strip("/")
        files.append(hf_snapshot(caches.hf_hub, repo) / "open_clip_pytorch_model.bin")
    torch.save(state, files[0])
    os.link(files[0], files[1])  # the same weights under both tags: only the architecture differs
    del state
    texts = ["a photo of a cat", "an astronaut", "a much longer description of a rocket on the launch pad"]
    layers = {n: n for n in ("conv1", "transformer.resblocks.0", "transformer.resblocks.6", "ln_post")}
    layers.update({f"transformer.resblocks.{i}.mlp.gelu": f"transformer.resblocks.{i}.mlp.gelu" for i in (0, 11)})

    # OpenAI's weights: open_clip's own QuickGELU config for them, from the same cache
    openai = lt.load_model("clip:ViT-B-32")
    assert openai.provenance["weights"]["id"] == "ViT-B-32/openai" and openai.provenance["quick_gelu"] is True
    ref, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained="openai")
    ref.eval()
    x = assert_same_transform(openai, preprocess, photos)
    assert_same_layers(openai, ref.visual, x, layers)
    with torch.no_grad():
        want_image = ref.encode_image(x)
        want_text = ref.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts))
    np.testing.assert_allclose(ltclip.encode_image(openai, x), want_image.numpy(), **TOL)
    np.testing.assert_allclose(ltclip.encode_text(openai, texts, normalize=False), want_text.numpy(), **TOL)
    del ref, openai

    # A LAION tag trained with plain GELU: open_clip's plain config
    laion = lt.load_model("clip:ViT-B-32", weights="laion2b_s34b_b79k")
    assert laion.provenance["quick_gelu"] is False
    ref, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")
    ref.eval()
    x = assert_same_transform(laion, preprocess, photos)
    assert_same_layers(laion, ref.visual, x, layers)
    with torch.no_grad():
        gelu_image = ref.encode_image(x)
    np.testing.assert_allclose(ltclip.encode_image(laion, x), gelu_image.numpy(), **TOL)
    np.testing.assert_allclose(
        ltclip.encode_text(laion, texts, normalize=False),
        ref.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts)).detach().numpy(),
        **TOL,
    )
    # the plain GELU build of the same weights gives other numbers: the activation matters
    assert (gelu_image - want_image).abs().max() > 1e-3


# -- Hugging Face: a hub repo in the HF cache (config.json, model.safetensors, preprocessor_config.json)
def test_hf_pretrained_from_hub_cache(caches: SimpleNamespace, photos: list[Image.Image]) -> None:
    import transformers

    repo = "layertap-test/tiny-vit"
    snap = hf_snapshot(caches.hf_hub, repo)
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, image_size=64
    )
    torch.manual_seed(3)
    transformers.ViTModel(cfg).save_pretrained(snap)
    # settings of the checkpoint's own that differ from ViTImageProcessor's defaults
    transformers.ViTImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(snap)
    assert {p.name for p in snap.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}

    model = lt.load_model(f"hf:{repo}")
    reference = transformers.AutoModel.from_pretrained(repo).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(repo)
    assert model.provenance["weights"]["id"] == f"{repo}@{REV}" and model.input_size == (3, 64, 64)
    x = assert_same_transform(model, lambda img: processor(images=img, return_tensors="pt")["pixel_values"][0], photos)
    with torch.no_grad():
        out = reference(x, output_hidden_states=True)
    names = [f"hidden_states.{i}" for i in range(4)] + ["output"]
    with lt.Extractor(model, names) as tap:
        got = tap(x)
    for i in range(4):
        np.testing.assert_allclose(got[f"hidden_states.{i}"].numpy(), out.hidden_states[i].numpy(), **TOL)
    np.testing.assert_allclose(got["output"].numpy(), out.last_hidden_state.numpy(), **TOL)


# -- IPCL: the released checkpoint format in torch hub's cache ------------------------------------------
IPCL_CONVS = [(3, 96, 11, 4, 2, True), (96, 256, 5, 1, 2, True), (256, 384, 3, 1, 1, False)]
IPCL_CONVS += [(384, 384, 3, 1, 1, False), (384, 256, 3, 1, 1, True)]


def ipcl_checkpoint(seed: int, out_dim: int = 128) -> dict[str, torch.Tensor]:
    """A state_dict in the released open_ipcl format (DataParallel 'module.' names), from shapes alone."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    sd: dict[str, torch.Tensor] = {}
    for i, (cin, cout, k, _s, _p, _pool) in enumerate(IPCL_CONVS, 1):
        sd[f"conv_block_{i}.0.weight"] = rnd(cout, cin, k, k, scale=(2 / (cin * k * k)) ** 0.5)
        sd[f"conv_block_{i}.1.weight"] = 1 + rnd(cout, scale=0.1)
        sd[f"conv_block_{i}.1.bias"] = rnd(cout, scale=0.1)
    for name, cin, cout in (("fc6", 256 * 36, 4096), ("fc7", 4096, 4096)):
        sd[f"{name}.0.weight"] = rnd(cout, cin, scale=(2 / cin) ** 0.5)
        sd[f"{name}.0.bias"] = rnd(cout, scale=0.1)
        sd[f"{name}.1.weight"] = 1 + rnd(cout, scale=0.1)
        sd[f"{name}.1.bias"] = rnd(cout, scale=0.1)
        sd[f"{name}.1.running_mean"] = rnd(cout, scale=0.1)
        sd[f"{name}.1.running_var"] = 0.5 + torch.rand(cout, generator=g)
        sd[f"{name}.1.num_batches_tracked"] = torch.tensor(1000)
    sd["fc8.0.weight"] = rnd(out_dim, 4096, scale=(1 / 4096) ** 0.5)
    sd["fc8.0.bias"] = rnd(out_dim, scale=0.1)
    return {f"module.{k}": v for k, v in sd.items()}


def ipcl_reference(sd: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """AlexNet-GN of Konkle & Alvarez computed straight from the checkpoint tensors (no nn.Module)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    out = {}
    for i, (_cin, _cout, _k, stride, pad, pool) in enumerate(IPCL_CONVS, 1):
        p = f"conv_block_{i}"
        x = F.conv2d(x, sd[f"{p}.0.weight"], stride=stride, padding=pad)
        x = F.relu(F.group_norm(x, 32, sd[f"{p}.1.weight"], sd[f"{p}.1.bias"]))
        out[p] = x = F.max_pool2d(x, 3, 2) if pool else x
    out["ave_pool"] = x = F.adaptive_avg_pool2d(x, (6, 6))
    x = x.flatten(1)
    for n in ("fc6", "fc7"):
        x = F.linear(x, sd[f"{n}.0.weight"], sd[f"{n}.0.bias"])
        bn = [sd[f"{n}.1.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        out[n] = x = F.relu(F.batch_norm(x, *bn, training=False, eps=1e-5))
    out["fc8"] = x = F.linear(x, sd["fc8.0.weight"], sd["fc8.0.bias"])
    out["l2norm"] = x / x.norm(dim=1, keepdim=True)
    return out


def test_ipcl_pretrained_from_torch_hub_cache(
    caches: SimpleNamespace, photos: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import transforms as T

    from layertap.models.sources import ipcl

    sd = ipcl_checkpoint(4)
    file = caches.torch_checkpoints / Path(ipcl.CONFIGS["ipcl1"]["url"]).name
    file.parent.mkdir(parents=True)
    torch.save({"epoch": 100, "state_dict": sd}, file)
    # the cached file is hash-checked against the released file's sha256 prefix before loading
    with pytest.raises(lt.LayertapError, match="not the published 51bcc71556"):
        lt.load_model("ipcl:ipcl1")
    monkeypatch.setitem(ipcl.SHA256_PREFIX, "ipcl1", hashlib.sha256(file.read_bytes()).hexdigest()[:10])

    model = lt.load_model("ipcl:ipcl1")
    assert model.provenance["weights"]["kind"] == "pretrained"
    # open_ipcl's transforms: Resize(224) + CenterCrop(224) for stimuli, Resize(256) for validation
    stats = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = assert_same_transform(model, T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), stats]), photos)
    val = lt.load_model("ipcl:ipcl1", transform="validation")
    assert_same_transform(val, T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), stats]), photos)
    want = ipcl_reference(sd, x)
    with lt.Extractor(model, list(want)) as tap:
        got = tap(x)
    for layer, ref in want.items():
        np.testing.assert_allclose(got[layer].numpy(), ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=layer)
