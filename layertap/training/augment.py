"""IPCL augmentations, two ways: CPU torchvision transforms and batched tensor ops on the device.

Both apply, per sample: random resized crop (area fraction ``scale``, aspect ``ratio``), horizontal
flip (``flip_p``), grayscale (``grayscale_p``), colour jitter (brightness, contrast, saturation,
hue, in a random order per sample, as torchvision's ``ColorJitter``), then ImageNet normalisation.
These are the augmentations of Wu et al. (2018) used by IPCL (``scale=(0.2, 1)``, jitter 0.4 each).

CPU path (:func:`cpu_augment`): torchvision transforms on PIL images, one sample at a time.

Tensor path (:class:`TensorAugment`, the "fastaug" path): the loader decodes each image once and
resizes it (aspect ignored) to a fixed ``load_size`` square of uint8, keeping the original (h, w).
Crop boxes are drawn exactly as torchvision's ``RandomResizedCrop.get_params`` draws them *in the
original image's pixel grid* and mapped to the squashed square, so the crops have the same
distribution of position, area and aspect (the squash is undone by the crop), and are resampled
with :func:`torchvision.ops.roi_align` (bilinear, adaptive sampling per output bin, i.e.
box-filtered when shrinking). Flip, grayscale and jitter are torch ops on (B, 3, H, W) floats in
[0, 1]; hue is rotated in a float HSV conversion (torchvision's tensor formulas).

Differences, and what the tests measure (``tests/test_training.py``):

* torchvision's PIL path works in uint8 (each op rounds) and rotates hue in PIL's 8-bit HSV; the
  tensor path stays in float32 and clamps to [0, 1] after each op. Over many samples the mean
  brightness and mean saturation of the outputs differ by less than 0.02 (on a 0-1 scale);
  crop area fraction and flip rate match to within sampling error.
* The original open_ipcl GPU jitter (``dataloaders/functional_tensor.py``) applied brightness,
  contrast, saturation, hue in a *fixed* order, one order per batch, and rotated hue with
  ``fmod`` (a negative shift leaves negative hues, so the rotation for shifts < 0 is not a proper
  wrap-around); it also ran the crop and flip on the CPU (albumentations) after resizing the
  shorter side to 256. Here the order is random per sample and hue wraps modulo 1.
* The tensor path stores a ``load_size`` square (default ``size * 256 / 224``), so the longer side
  of a non-square image keeps less resolution than the CPU path, which crops the full-size image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: crop attempts before the centre-crop fallback (torchvision's RandomResizedCrop uses 10)
CROP_TRIES = 10
#: uniform draws per sample: crop tries x (scale, log-ratio, top, left), flip, gray, 4 factors, 4 order keys
N_UNIFORMS = CROP_TRIES * 4 + 2 + 4 + 4


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters shared by both augmentation paths (:func:`cpu_augment`, :class:`TensorAugment`).

    ``size`` is the output side (pixels); ``scale``/``ratio`` are RandomResizedCrop's; the others are the
    probabilities and strengths of flip, grayscale and colour jitter, then normalisation with ``mean``/``std``.

    Example:
        >>> AugmentConfig(size=64).scale
        (0.2, 1.0)
    """

    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    grayscale_p: float = 0.2
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.4
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: bool = True

    @property
    def load_size(self) -> int:
        """Side of the uint8 square the tensor path stores per image (256 for size 224)."""
        return int(round(self.size * 256 / 224))


def cpu_augment(cfg: AugmentConfig = AugmentConfig()):  # noqa: ANN201 - a torchvision Compose
    """The torchvision (PIL, per image) augmentation: PIL RGB image -> float tensor (3, size, size).

    Args:
        cfg: the augmentation's parameters.

    Returns:
        A ``torchvision.transforms.Compose``: random resized crop, flip, grayscale, colour jitter, to tensor,
        normalisation (when ``cfg.normalize``).

    Example:
        >>> from PIL import Image
        >>> cpu_augment(AugmentConfig(size=32))(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    from torchvision import transforms as T

    parts = [
        T.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomGrayscale(cfg.grayscale_p),
        T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
        T.ToTensor(),
    ]
    if cfg.normalize:
        parts.append(T.Normalize(cfg.mean, cfg.std))
    return T.Compose(parts)


def eval_transform(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):  # noqa: ANN201
    """The evaluation transform (kNN, linear probe): resize to ``size*256/224``, centre crop ``size``, normalise.

    Args:
        size: the output side.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Returns:
        A transform from a PIL RGB image to a float tensor (3, size, size).

    Example:
        >>> from PIL import Image
        >>> eval_transform(64)(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(int(round(size * 256 / 224)), antialias=True),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(list(mean), list(std)),
        ]
    )


def load_square(img: Image.Image, load_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tensor path's loading step: an RGB image squashed to an L x L square, and its original size.

    Args:
        img: the RGB image.
        load_size: L, the square's side (PIL's antialiased bilinear shrink).

    Returns:
        (uint8 (3, L, L) tensor, the original (height, width)).

    Example:
        >>> from PIL import Image
        >>> t, hw = load_square(Image.new("RGB", (60, 30)), 16)
        >>> t.shape, t.dtype, hw
        (torch.Size([3, 16, 16]), torch.uint8, (30, 60))
    """
    w, h = img.size
    small = img.resize((load_size, load_size), Image.Resampling.BILINEAR)  # PIL's bilinear shrink is antialiased
    t = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(load_size, load_size, 3)
    return t.permute(2, 0, 1).contiguous(), (h, w)


def draw_uniforms(n_images: int, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """All randomness of the tensor path for a batch: (n_images, n_samples, N_UNIFORMS) in [0, 1).

    Drawn on the CPU from ``generator`` so that every device and every DDP rank (which slices its images' rows)
    gets the same numbers.

    Args:
        n_images: images in the batch.
        n_samples: augmented samples per image.
        generator: the seeded generator.

    Returns:
        The uniforms, float32 on the CPU.

    Example:
        >>> draw_uniforms(2, 5, torch.Generator().manual_seed(0)).shape == (2, 5, N_UNIFORMS)
        True
    """
    return torch.rand(n_images, n_samples, N_UNIFORMS, generator=generator, dtype=torch.float64)


def crop_boxes(u: torch.Tensor, hw: torch.Tensor, scale: Sequence[float], ratio: Sequence[float]) -> torch.Tensor:
    """RandomResizedCrop boxes, torchvision's algorithm vectorised over samples.

    Args:
        u: (M, CROP_TRIES, 4) uniforms.
        hw: (M, 2) original heights/widths (pixels).
        scale: the crop's area range, as a fraction of the image's.
        ratio: the crop's aspect-ratio range.

    Returns:
        (M, 4) float64 boxes (x0, y0, x1, y1) in original pixels: the first of ``CROP_TRIES`` draws that fits,
        else the centre crop clamped to ``ratio``.

    Example:
        >>> crop_boxes(torch.rand(3, CROP_TRIES, 4), torch.tensor([[100, 80]] * 3), (0.2, 1.0), (3 / 4, 4 / 3)).shape
        torch.Size([3, 4])
    """
    h = hw[:, 0:1].double()
    w = hw[:, 1:2].double()
    area = h * w
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u[..., 1] * (hi - lo))
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    top = torch.floor(u[..., 2] * (h - ch + 1))
    left = torch.floor(u[..., 3] * (w - cw + 1))
    first = ok.double().argmax(dim=1, keepdim=True)  # index of the first fitting try
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    cw, ch, top, left = pick(cw), pick(ch), pick(top), pick(left)
    # Fallback (no try fits): the whole image, cut to the nearest allowed aspect, centred.
    h1, w1 = h.squeeze(1), w.squeeze(1)
    in_ratio = w1 / h1
    fw = torch.where(in_ratio < ratio[0], w1, torch.where(in_ratio > ratio[1], torch.round(h1 * ratio[1]), w1))
    fh = torch.where(in_ratio < ratio[0], torch.round(w1 / ratio[0]), h1)
    any_ok = ok.any(dim=1)
    cw = torch.where(any_ok, cw, fw)
    ch = torch.where(any_ok, ch, fh)
    top = torch.where(any_ok, top, torch.floor((h1 - fh) / 2))
    left = torch.where(any_ok, left, torch.floor((w1 - fw) / 2))
    return torch.stack([left, top, left + cw, top + ch], dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's ITU-R 601 weights."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, hue in [0, 1).

    Args:
        x: the RGB images.

    Returns:
        The HSV images, same shape.

    Example:
        >>> rgb_to_hsv(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).flatten()
        tensor([0., 1., 1.])
    """
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV (hue in [0, 1)) -> RGB in [0, 1] (the closed form: no per-sector table).

    Args:
        x: the HSV images.

    Returns:
        The RGB images, same shape.

    Example:
        >>> hsv_to_rgb(torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)).flatten()
        tensor([1., 0., 0.])
    """
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h * 6.0, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def _apply_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factors (B,)."""
    f4 = f.view(-1, 1, 1, 1).to(x.dtype)
    if op == 0:
        return (x * f4).clamp_(0, 1)
    if op == 1:
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f4)
    if op == 2:
        return _blend(x, _gray(x), f4)
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + f4[:, 0], 1.0)
    return hsv_to_rgb(hsv)


class TensorAugment:
    """Batched IPCL augmentation with torch ops on any device (the "fastaug" path).

    ``aug(images, hw, u)``: ``images`` uint8 or float (B, 3, L, L) squares from :func:`load_square` (float in
    [0, 1]), ``hw`` (B, 2) original sizes, ``u`` uniforms (B, N, N_UNIFORMS) from :func:`draw_uniforms`.
    Returns float (B, N, 3, size, size): N augmented samples per image, normalised if ``cfg.normalize``.

    Example:
        >>> aug = TensorAugment(AugmentConfig(size=16))
        >>> images, hw = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([[32, 32], [32, 32]])
        >>> aug(images, hw, draw_uniforms(2, 3, torch.Generator().manual_seed(0))).shape
        torch.Size([2, 3, 3, 16, 16])
    """

    def __init__(self, cfg: AugmentConfig = AugmentConfig()) -> None:
        self.cfg = cfg

    def factors(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Jitter factors (M, 4) (brightness, contrast, saturation, hue shift) and op order (M, 4)."""
        c = self.cfg
        base = CROP_TRIES * 4 + 2
        spans = [(1 - c.brightness, 1 + c.brightness), (1 - c.contrast, 1 + c.contrast)]
        spans += [(1 - c.saturation, 1 + c.saturation), (-c.hue, c.hue)]
        cols = []
        for k, (a, b) in enumerate(spans):
            a = max(a, 0.0) if k < 3 else a
            cols.append(a + u[:, base + k] * (b - a))
        order = u[:, base + 4 : base + 8].argsort(dim=1)  # a uniform random permutation per sample
        return torch.stack(cols, 1), order

    def __call__(self, images: torch.Tensor, hw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        c = self.cfg
        B, N = u.shape[:2]
        L = images.shape[-1]
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        uf = u.reshape(B * N, -1)
        hw_rep = hw.repeat_interleave(N, dim=0)
        boxes = crop_boxes(uf[:, : CROP_TRIES * 4].view(-1, CROP_TRIES, 4), hw_rep, c.scale, c.ratio)
        # Map boxes from the original pixel grid to the squashed L x L square.
        sx = L / hw_rep[:, 1].double()
        sy = L / hw_rep[:, 0].double()
        boxes = boxes * torch.stack([sx, sy, sx, sy], 1)
        idx = torch.arange(B, dtype=torch.float64).repeat_interleave(N)
        rois = torch.cat([idx[:, None], boxes], 1).to(device=x.device, dtype=x.dtype)
        out = roi_align(x, rois, output_size=(c.size, c.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        uf = uf.to(x.device)
        flip = uf[:, CROP_TRIES * 4] < c.flip_p
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        gray = uf[:, CROP_TRIES * 4 + 1] < c.grayscale_p
        out = torch.where(gray.view(-1, 1, 1, 1), _gray(out).expand(-1, 3, -1, -1), out)
        fac, order = self.factors(uf)
        active = [c.brightness > 0, c.contrast > 0, c.saturation > 0, c.hue > 0]
        for slot in range(4):  # each sample runs its own op order: op order[m, slot] at this slot
            for op in range(4):
                if not active[op]:
                    continue
                sel = (order[:, slot] == op).nonzero().squeeze(1)
                if sel.numel():
                    out[sel] = _apply_op(op, out[sel], fac[sel, op])
        if c.normalize:
            mean = torch.tensor(c.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(c.std, device=x.device).view(1, 3, 1, 1)
            out = (out - mean) / std
        return out.view(B, N, 3, c.size, c.size)
