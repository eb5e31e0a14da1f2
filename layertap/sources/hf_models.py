"""Hugging Face transformers vision backbones: ``hf:google/vit-base-patch16-224``, ``hf:facebook/dinov2-small``.

Any hub id (or local directory) that ``AutoModel`` loads, preprocessed by its own
``AutoImageProcessor``. Hidden states are tappable by index as well as by module name:
``hidden_states.0`` is the embeddings' output and ``hidden_states.i`` the output of block ``i-1``,
exactly ``model(x, output_hidden_states=True).hidden_states[i]``.

``weights="random"`` with a hub id needs its config (from the hub cache); with a bare model type
(``hf:vit``, ``hf:dinov2``, ``hf:convnext``; sizes via ``config={...}``) it needs nothing, and then
uses the ImageNet evaluation transform at the config's image size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayertapError
from ..models import (
    LoadedModel,
    Source,
    finish_loading,
    imagenet_transform,
    register_source,
    seeded_build,
    weights_unavailable,
)

KNOWN = [
    "google/vit-base-patch16-224",
    "google/vit-base-patch16-224-in21k",
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "facebook/dinov2-large",
    "facebook/dinov2-with-registers-small",
    "facebook/convnext-tiny-224",
    "facebook/convnext-base-224",
    "microsoft/resnet-50",
    "microsoft/swin-tiny-patch4-window7-224",
    "facebook/deit-small-patch16-224",
]
_BLOCK_LISTS = ("layer", "layers", "stages", "block", "blocks")


class ImageProcessorTransform:
    """A Hugging Face image processor as a PIL -> (C, H, W) tensor transform (picklable)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, img: Any) -> torch.Tensor:
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        keys = (
            "do_resize",
            "size",
            "resample",
            "do_center_crop",
            "crop_size",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
        )
        return (
            f"{type(self.processor).__name__}("
            + ", ".join(f"{k}={getattr(self.processor, k)}" for k in keys if hasattr(self.processor, k))
            + ")"
        )


def hidden_state_aliases(module: nn.Module) -> dict[str, str]:
    """``hidden_states.i`` -> module name: the embeddings, then each block of the first block list."""
    named = dict(module.named_modules())
    if "embeddings" not in named:
        return {}
    for name, m in named.items():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in _BLOCK_LISTS:
            return {"hidden_states.0": "embeddings", **{f"hidden_states.{i + 1}": f"{name}.{i}" for i in range(len(m))}}
    return {}


class HFSource(Source):
    name = "hf"
    description = "Hugging Face transformers vision backbones by hub id (ViT, DINOv2, ConvNeXt, Swin, ...)"
    package = "transformers"
    extra = "hf"

    def list_models(self) -> list[str]:
        return list(KNOWN)

    def has_model(self, name: str) -> bool:
        if name.count("/") == 1 or os.path.isdir(name):
            return True
        return name in self.lib().CONFIG_MAPPING

    def load(self, name: str, weights: str | Path, seed: int, **options: Any) -> LoadedModel:
        transformers = self.lib()
        overrides = options.pop("config", None) or {}
        if options:
            raise LayertapError(f"Hugging Face models take only config={{...}} (got {', '.join(options)})")
        is_type = name in transformers.CONFIG_MAPPING and "/" not in name
        processor = None
        weights_id = None
        try:
            if isinstance(weights, Path) or weights == "random":
                if is_type:
                    cfg = transformers.AutoConfig.for_model(name, **overrides)
                else:
                    cfg = transformers.AutoConfig.from_pretrained(name, **overrides)
                    processor = transformers.AutoImageProcessor.from_pretrained(name)
                module = seeded_build(lambda: transformers.AutoModel.from_config(cfg), seed)
            else:
                if is_type:
                    raise LayertapError(
                        f"'{name}' is a model type, not a checkpoint: give a hub id or use weights='random'"
                    )
                revision = None if weights == "pretrained" else weights  # any other string is a hub revision
                module = transformers.AutoModel.from_pretrained(name, revision=revision, **overrides)
                processor = transformers.AutoImageProcessor.from_pretrained(name, revision=revision)
                weights_id = f"{name}@{revision or getattr(module.config, '_commit_hash', None) or 'main'}"
        except LayertapError:
            raise
        except Exception as err:  # noqa: BLE001 - hub, network and cache errors all mean "not available"
            raise weights_unavailable(
                f"Hugging Face model {name}",
                err,
                "connect to the internet once (it is cached), or use a bare model type such as hf:vit",
            ) from None
        size = getattr(module.config, "image_size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        if processor is not None:
            transform: Any = ImageProcessorTransform(processor)
            crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
            if isinstance(crop, dict) and "height" in crop:
                size = int(crop["height"])
            elif isinstance(crop, dict) and "shortest_edge" in crop and not getattr(processor, "do_center_crop", False):
                size = int(crop["shortest_edge"])
        else:
            transform = imagenet_transform(resize=round(size / 0.875), crop=size)
        has_cls = getattr(getattr(module, "embeddings", None), "cls_token", None) is not None
        prefix = (1 if has_cls else 0) + int(getattr(module.config, "num_register_tokens", 0) or 0)
        return finish_loading(
            module,
            transform,
            f"hf:{name}",
            (3, size, size),
            weights,
            seed,
            weights_id,
            {"config": {k: v for k, v in overrides.items()}} if overrides else None,
            num_prefix_tokens=prefix,
            layer_aliases=hidden_state_aliases(module),
        )


register_source(HFSource())
