"""Write N photo-like JPEGs for the benchmarks, deterministically, into a folder (cached).

The images are random crops / rescales / flips / colour jitter / noise of the photographs that
scikit-image ships (astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry,
stereo_motorcycle), so they decode like real stimuli (natural image statistics, JPEG quality 90).
Sizes are assigned round-robin (``img_00000.jpg`` gets the first size, ``img_00001.jpg`` the next,
...), so every batch of the sorted folder mixes them. A finished folder holds ``.done`` with its
parameters; calling again with the same parameters does nothing.

    .venv/bin/python bench/make_images.py --n 512 --sizes 500x375,1200x900 --out bench/.work/images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "stereo_motorcycle",
)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        w, h = part.lower().split("x")
        sizes.append((int(w), int(h)))
    return sizes


def _photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in SOURCES:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        out.append(np.ascontiguousarray(img[..., :3]))
    return out


def make_image(photos: list[np.ndarray], index: int, size: tuple[int, int], seed: int):  # noqa: ANN201
    """One deterministic photo-like PIL image of ``size`` (width, height)."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([seed, index])
    src = photos[int(rng.integers(len(photos)))]
    h, w = src.shape[:2]
    target_aspect = size[0] / size[1]
    # random crop of 45-100% of the largest crop with the target aspect ratio
    cw, ch = (w, round(w / target_aspect)) if w / h < target_aspect else (round(h * target_aspect), h)
    scale = rng.uniform(0.45, 1.0)
    cw, ch = max(16, round(cw * scale)), max(16, round(ch * scale))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize(size, Image.Resampling.BICUBIC)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(1.0, 6.0), size=arr.shape).astype(np.float32)  # sensor noise
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def make_images(out: str | os.PathLike[str], n: int, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """Write ``n`` JPEGs into ``out`` (skipped when ``out/.done`` records the same parameters)."""
    out = Path(out)
    params = {"n": n, "sizes": [list(s) for s in sizes], "seed": seed, "version": 1}
    done = out / ".done"
    if done.is_file():
        try:
            if json.loads(done.read_text()) == params:
                return out
        except ValueError:
            pass
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    photos = _photos()
    for i in range(n):
        img = make_image(photos, i, sizes[i % len(sizes)], seed)
        img.save(tmp / f"img_{i:05d}.jpg", quality=90)
    (tmp / ".done").write_text(json.dumps(params))
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="number of images (default 512)")
    p.add_argument("--sizes", default="500x375,1200x900", help="WxH[,WxH...], assigned round-robin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write (replaced if its parameters differ)")
    a = p.parse_args(argv)
    path = make_images(a.out, a.n, parse_sizes(a.sizes), a.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
