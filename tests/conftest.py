"""Shared fixtures: test images made from scikit-image's bundled photographs, reference helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle"]


def photo(name: str, seed: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
    """A real photograph from scikit-image, cropped/resized/noised reproducibly (uint8 RGB)."""
    import skimage.data as d

    arr = getattr(d, name)()
    if isinstance(arr, tuple):
        arr = arr[0]
    rng = np.random.default_rng(seed)
    h, w = arr.shape[:2]
    top, left = rng.integers(0, h // 5 + 1), rng.integers(0, w // 5 + 1)
    arr = arr[top : top + int(h * 0.8), left : left + int(w * 0.8)]
    img = Image.fromarray(arr)
    if size is not None:
        img = img.resize(size, Image.BILINEAR)
    out = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, size=np.asarray(img).shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_class_folder(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog", "rocket")) -> Path:
    """root/<class>/<i>.jpg made from different photos; returns root."""
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            name = PHOTOS[k % len(PHOTOS)]
            Image.fromarray(photo(name, seed=k, size=(200 + 17 * k % 90, 160 + 11 * k % 70))).save(
                root / c / f"img{i:02d}.jpg", quality=90
            )
            k += 1
    return root


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine RGB JPEGs in three class folders."""
    return make_class_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def flat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flat folder of images in many formats and modes (all decodable)."""
    root = tmp_path_factory.mktemp("flat")
    rgb = photo("astronaut", 1, (180, 150))
    Image.fromarray(rgb).save(root / "a_rgb.JPG", quality=92)
    Image.fromarray(photo("coffee", 2, (210, 140))).save(root / "b_rgb.png")
    Image.fromarray(photo("chelsea", 3, (190, 170))).save(root / "c.webp", quality=95)
    Image.fromarray(photo("rocket", 4, (160, 200))).save(root / "d.bmp")
    Image.fromarray(photo("hubble_deep_field", 5, (170, 170))).save(root / "e.tiff")
    Image.fromarray(photo("coffee", 6, (150, 150))).convert("L").save(root / "f_gray.png")
    rgba = Image.fromarray(photo("chelsea", 7, (150, 130))).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "g_rgba.png")
    Image.fromarray(photo("rocket", 8, (140, 160))).convert("CMYK").save(root / "h_cmyk.jpg", quality=95)
    pal = Image.fromarray(photo("astronaut", 9, (120, 120))).convert("P", palette=Image.ADAPTIVE, colors=32)
    pal.info["transparency"] = 0
    pal.save(root / "i_palette.png", transparency=0)
    gray16 = photo("coffee", 10, (130, 110))[..., 0].astype(np.uint16) * 257
    Image.fromarray(gray16).save(root / "j_gray16.png")
    Image.fromarray(photo("astronaut", 11, (1, 1))).save(root / "k_tiny.png")
    return root


@pytest.fixture()
def layertap_cli():
    """Run the installed CLI in a subprocess; returns CompletedProcess."""
    exe = shutil.which("layertap", path=str(Path(sys.executable).parent)) or "layertap"

    def run(*args: str, input: str | None = None, check: bool = False, timeout: int = 300, **kw):
        proc = subprocess.run([exe, *args], capture_output=True, text=True, input=input, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"layertap {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run


def reference_outputs(model: torch.nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, list[torch.Tensor]]:
    """An independent reference: a plain forward pass with hand-written hooks (clone on capture)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: got[n].append(o.detach().clone())) for n in layers]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return got


def reference_batch(paths: list[str], model_name: str) -> torch.Tensor:
    """Images preprocessed independently of layertap: PIL RGB + the torchvision weights transform."""
    import torchvision.models as tvm

    tf = tvm.get_model_weights(model_name).DEFAULT.transforms()
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def independent_rgb(path: Path) -> Image.Image:
    """The image as a viewer shows it on white, decoded here without layertap's decoder."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16"):  # 16-bit gray: scaled to 8 bits, 65535 -> 255
            return Image.fromarray(np.rint(np.asarray(img, np.float64) / 257).astype(np.uint8)).convert("RGB")
        if img.mode in ("RGBA", "LA", "P") and (img.mode != "P" or "transparency" in img.info):
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return img.convert("RGB")
