"""Hugging Face transformers vision backbones: ``hf:google/vit-base-patch16-224``, ``hf:facebook/dinov2-small``.

Any hub id (or local directory) that ``AutoModel`` loads, preprocessed by its own
``AutoImageProcessor``. Hidden states are tappable by index as well as by module name:
``hidden_states.0`` is the embeddings' output and ``hidden_states.i`` the output of block ``i-1``,
exactly ``model(x, output_hidden_states=True).hidden_states[i]``.

``weights="random"`` with a hub id needs its config (from the hub cache); with a bare model type
(``hf:vit``, ``hf:dinov2``, ``hf:convnext``; sizes via ``config={...}``) it needs nothing, and then
preprocesses with the type's own default image processor (``ViTImageProcessor()``: squash to
224 x 224, mean = std = 0.5), at the config's image size. ``processor={...}`` overrides image
processor settings for any model (e.g. ``{"image_mean": [0.485, 0.456, 0.406]}``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from layertap.errors import LayertapError, option_spelling
from layertap.models.registry import Built, Source, register_source
from layertap.models.transforms import imagenet_transform
from layertap.models.weights import Pretrained, Weights, seeded_build, weights_unavailable

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
    """A Hugging Face image processor as a PIL -> (C, H, W) tensor transform (picklable).

    Example:
        >>> from transformers import ViTImageProcessor  # doctest: +SKIP
        >>> ImageProcessorTransform(ViTImageProcessor())(Image.new("RGB", (64, 48))).shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """

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
    """``hidden_states.i`` -> module name: the embeddings, then each block of the first block list.

    Args:
        module: a transformers model.

    Returns:
        The aliases (empty when the model has no block list).

    Example:
        >>> hidden_state_aliases(load_model("hf:vit", "random").module)["hidden_states.1"]  # doctest: +SKIP
        'encoder.layer.0'
    """
    named = dict(module.named_modules())
    if "embeddings" not in named:
        return {}
    for name, m in named.items():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in _BLOCK_LISTS:
            return {"hidden_states.0": "embeddings", **{f"hidden_states.{i + 1}": f"{name}.{i}" for i in range(len(m))}}
    return {}


def default_image_processor(transformers: Any, cfg: Any, overrides: Mapping[str, Any]) -> Any | None:
    """The image processor class the model type maps to, with its defaults, at the config's image size.

    This is what ``AutoImageProcessor`` builds for a hub checkpoint of that type with no settings
    of its own. A config whose ``image_size`` differs from the processor's output size (a small
    test config) gets the processor at that size: height/width set to it, or for shortest-edge
    + center-crop processors the crop set to it and the resize scaled alike.

    Args:
        transformers: the imported package.
        cfg: the model config.
        overrides: the user's processor settings (win over everything).

    Returns:
        The processor, or None when the type has no image processor.

    Example:
        >>> import transformers  # doctest: +SKIP
        >>> cfg = transformers.AutoConfig.for_model("vit", image_size=32)  # doctest: +SKIP
        >>> default_image_processor(transformers, cfg, {}).size  # doctest: +SKIP
        {'height': 32, 'width': 32}
    """
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    try:
        classes = IMAGE_PROCESSOR_MAPPING[type(cfg)]
    except KeyError:
        return None
    if isinstance(classes, Mapping):  # transformers 5: {backend: class}; AutoImageProcessor prefers torchvision
        cls = classes.get("torchvision") or classes.get("pil") or next(iter(classes.values()), None)
    else:  # transformers 4: (slow, fast); AutoImageProcessor's default is the slow one
        cls = next((c for c in classes if c is not None), None)
    if cls is None:
        return None
    proc = cls()
    kwargs: dict[str, Any] = {}
    want = getattr(cfg, "image_size", None)
    want = want[0] if isinstance(want, (list, tuple)) else want
    # transformers 5 keeps sizes as SizeDicts with every key (unused ones None)
    size = {k: v for k, v in dict(getattr(proc, "size", None) or {}).items() if v is not None}
    crop = dict(getattr(proc, "crop_size", None) or {}) if getattr(proc, "do_center_crop", False) else {}
    crop = {k: v for k, v in crop.items() if v is not None}
    have = crop.get("height") or size.get("height") or size.get("shortest_edge")
    if want and have and int(want) != int(have):
        want = int(want)
        if crop:
            kwargs["crop_size"] = {"height": want, "width": want}
            if "shortest_edge" in size:
                kwargs["size"] = {"shortest_edge": round(size["shortest_edge"] * want / have)}
            else:
                kwargs["size"] = {k: round(v * want / have) for k, v in size.items()}
        elif "height" in size:
            kwargs["size"] = {"height": want, "width": want}
        else:
            kwargs["size"] = {"shortest_edge": want}
    kwargs.update(overrides)
    return cls(**kwargs) if kwargs else proc


def _snapshot_commit(name: str, revision: str | None) -> str | None:
    """The commit of the cached hub snapshot that was loaded (what 'main' meant at download time)."""
    if os.path.isdir(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - provenance only: fall back to the revision asked for
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def _mapping_option(value: Any, what: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LayertapError(f"{what} must be a mapping of settings, e.g. {example} (got {value!r})")
    return dict(value)


class HFSource(Source):
    name = "hf"
    description = "Hugging Face transformers vision backbones by hub id (ViT, DINOv2, ConvNeXt, Swin, ...)"
    package = "transformers"
    extra = "hf"

    def list_models(self) -> list[str]:
        return list(KNOWN)

    def pretrained_names(self) -> set[str]:
        return {n for n in self.list_models() if "/" in n}  # hub checkpoints; bare types are untrained

    def has_model(self, name: str) -> bool:
        if name.count("/") == 1 or os.path.isdir(name):
            return True
        return name in self.lib().CONFIG_MAPPING

    def build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        transformers = self.lib()
        overrides = _mapping_option(options.pop("config", None), "config", """config={"hidden_size": 384}""")
        proc_settings = _mapping_option(
            options.pop("processor", None), "processor", """processor={"image_mean": [0.5, 0.5, 0.5]}"""
        )
        if options:
            raise LayertapError(
                f"Hugging Face models take only config={{...}} and processor={{...}} (got {', '.join(options)})"
            )
        is_type = name in transformers.CONFIG_MAPPING and "/" not in name
        processor = None
        weights_id = None
        try:
            if not isinstance(weights, Pretrained):
                if is_type:
                    cfg = transformers.AutoConfig.for_model(name, **overrides)
                    processor = default_image_processor(transformers, cfg, proc_settings)
                else:
                    cfg = transformers.AutoConfig.from_pretrained(name, **overrides)
                    processor = transformers.AutoImageProcessor.from_pretrained(name, **proc_settings)
                module = seeded_build(lambda: transformers.AutoModel.from_config(cfg), seed)
            else:
                if is_type:
                    raise LayertapError(
                        f"'{name}' is a model type, not a checkpoint: give a hub id or use {option_spelling('weights', 'random')}"
                    )
                revision = None if weights.default else weights.id  # any other id is a hub revision
                module = transformers.AutoModel.from_pretrained(name, revision=revision, **overrides)
                processor = transformers.AutoImageProcessor.from_pretrained(name, revision=revision, **proc_settings)
                weights_id = f"{name}@{_snapshot_commit(name, revision) or revision or 'main'}"
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
            # the processor's output size, measured (resize/crop rules differ between processors)

            probe = transform(Image.new("RGB", (3 * size, 2 * size)))
            input_size = (3, int(probe.shape[-2]), int(probe.shape[-1]))
        else:  # a model type without an image processor of its own
            transform = imagenet_transform(resize=round(size / 0.875), crop=size)
            input_size = (3, size, size)
        has_cls = getattr(getattr(module, "embeddings", None), "cls_token", None) is not None
        prefix = (1 if has_cls else 0) + int(getattr(module.config, "num_register_tokens", 0) or 0)
        return Built(
            module,
            transform,
            input_size,
            weights_id,
            {
                **({"config": dict(overrides)} if overrides else {}),
                **({"processor": dict(proc_settings)} if proc_settings else {}),
            },
            fields={"num_prefix_tokens": prefix, "layer_aliases": hidden_state_aliases(module)},
        )


register_source(HFSource())
