"""Models' preprocessing: the transform type, the ImageNet evaluation transform, and how manifests describe one."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

#: a model's preprocessing: one image (a PIL image; a (T, C, H, W) uint8 clip for video models) -> a float tensor
Transform = Callable[[Any], torch.Tensor]


#: ImageNet's per-channel mean and standard deviation (RGB, 0-1 scale): what most published weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transform(resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> Transform:
    """The standard ImageNet evaluation transform: resize the shorter side, center-crop, normalise.

    Args:
        resize: the shorter side's length after resizing.
        crop: the side of the square center crop.
        interpolation: a ``torchvision.transforms.InterpolationMode`` value (``"bilinear"``, ``"bicubic"``, ...).

    Returns:
        A transform from one RGB ``PIL.Image`` to a normalised float tensor of shape (3, crop, crop).

    Example:
        >>> from PIL import Image
        >>> imagenet_transform(crop=112)(Image.new("RGB", (300, 200))).shape
        torch.Size([3, 112, 112])
    """
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    return T.Compose(
        [
            T.Resize(resize, interpolation=mode, antialias=True),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def describe_transform(transform: Any) -> str:
    """A one-line, stable description of a transform, as manifests record it.

    Args:
        transform: any transform (its ``str`` is used).

    Returns:
        Its ``str`` on one line, without memory addresses.

    Example:
        >>> describe_transform(lambda img: img).startswith("<function <lambda>")
        True
    """
    # without memory addresses (a function's repr has one), so that a resume in a new process agrees
    return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(transform).split()))
