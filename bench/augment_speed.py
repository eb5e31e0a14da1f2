"""Images/s of the IPCL augmentations: CPU torchvision transforms vs the batched tensor path.

Each image yields ``--n-samples`` augmented samples (crop, flip, grayscale, jitter, normalise).
CPU path: PIL image -> ``cpu_augment`` N times. Tensor path: PIL image -> ``load_square`` once
(the loader's work) + ``TensorAugment`` on the batch (on ``--device``). Decoding is excluded
from both (the images are decoded once up front).

    .venv/bin/python bench/augment_speed.py --images 64 --size 224 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from layertap.training.augment import AugmentConfig, TensorAugment, cpu_augment, draw_uniforms, load_square


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fair to the single-threaded CPU path)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    # ImageNet-like sizes (375 x 500), smooth content so that PIL's work is realistic.
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    imgs = [Image.fromarray(np.roll(base, i, axis=1)).resize((500, 375), Image.BILINEAR) for i in range(args.images)]
    cfg = AugmentConfig(size=args.size)

    cpu_t = cpu_augment(cfg)
    t0 = time.perf_counter()
    for im in imgs:
        torch.stack([cpu_t(im) for _ in range(args.n_samples)])
    cpu_rate = len(imgs) / (time.perf_counter() - t0)

    dev = torch.device(args.device)
    aug = TensorAugment(cfg)
    g = torch.Generator().manual_seed(0)
    warm = [load_square(im, cfg.load_size) for im in imgs[:2]]
    aug(torch.stack([w[0] for w in warm]).to(dev), torch.tensor([w[1] for w in warm]), draw_uniforms(2, 2, g))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loaded = [load_square(im, cfg.load_size) for im in imgs]
    x = torch.stack([sq for sq, _ in loaded]).to(dev)
    out = aug(x, torch.tensor([hw for _, hw in loaded]), draw_uniforms(len(imgs), args.n_samples, g))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ten_rate = len(imgs) / (time.perf_counter() - t0)
    assert out.shape == (len(imgs), args.n_samples, 3, args.size, args.size)
    print(f"{args.images} images x {args.n_samples} samples at {args.size}px, {args.threads} thread(s), {dev}")
    print(f"cpu (torchvision, PIL): {cpu_rate:8.1f} images/s")
    print(f"tensor ({dev.type}):        {ten_rate:8.1f} images/s")
    print(f"ratio tensor/cpu:        {ten_rate / cpu_rate:8.2f}x")


if __name__ == "__main__":
    main()
