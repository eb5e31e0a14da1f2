"""torchvision classification models: every name in ``torchvision.models.list_models``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

from layertap.errors import LayertapError, close_matches
from layertap.models.registry import Built, Source, register_source
from layertap.models.weights import Pretrained, Weights, seeded_build, weights_unavailable


@cache
def _names() -> tuple[str, ...]:
    import torchvision.models as tvm

    return tuple(sorted(tvm.list_models(module=tvm) + _video_names()))


@cache
def _video_names() -> list[str]:
    """torchvision's video classification models (r3d_18, s3d, mvit_v2_s, swin3d_t, ...): clips in."""
    import torchvision.models as tvm
    import torchvision.models.video as tvv

    return tvm.list_models(module=tvv)


#: frames per clip a video model is given by default (what its Kinetics weights were evaluated with)
VIDEO_CLIP_LEN = 16


class TorchvisionSource(Source):
    name = "torchvision"
    description = "torchvision classification models (ImageNet weights from torchvision's model hub)"

    def list_models(self) -> list[str]:
        return list(_names())

    def has_model(self, name: str) -> bool:
        return name in _names()

    def pretrained_names(self) -> set[str]:
        import torchvision.models as tvm

        out = set()
        for model in self.list_models():
            try:
                if list(tvm.get_model_weights(model)):
                    out.add(model)
            except (ValueError, KeyError):
                continue
        return out

    def _weights_enum(self, name: str, weights: str):  # noqa: ANN202 - a torchvision WeightsEnum member
        import torchvision.models as tvm

        enum = tvm.get_model_weights(name)
        if weights == "pretrained":
            return enum.DEFAULT
        key = weights.split(".")[-1]
        try:
            return enum[key]
        except KeyError:
            ids = [w.name for w in enum]
            raise LayertapError(
                f"unknown weights '{weights}' for {name}{close_matches(key, ids)}; choose one of "
                f"{', '.join(ids)}, 'pretrained', 'random' or a weights file"
            ) from None

    def build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        import torchvision.models as tvm

        if options:
            raise LayertapError(f"torchvision models take no options (got {', '.join(options)})")
        default = tvm.get_model_weights(name).DEFAULT
        if not isinstance(weights, Pretrained):
            # Untrained or user weights: the architecture's own preprocessing (its default
            # weights' transform parameters: resize/crop sizes, interpolation, ImageNet stats).
            module = seeded_build(lambda: tvm.get_model(name, weights=None), seed)
            chosen = default
            weights_id = None
        else:
            chosen = self._weights_enum(name, weights.id)
            weights_id = f"{type(chosen).__name__}.{chosen.name}"
            try:
                # get_model with a weights enum applies the builder's weight-specific settings
                # (e.g. transform_input for googlenet/inception_v3) and uses torch.hub's cache.
                module = tvm.get_model(name, weights=chosen)
            except Exception as err:  # noqa: BLE001 - network, hash and disk errors all mean "not available"
                cache_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
                raise weights_unavailable(
                    f"pretrained weights {weights_id} for {name}",
                    err,
                    f"connect to the internet once, or put {chosen.url} at {cache_file}, or pass a weights file",
                ) from None
        transform = chosen.transforms()
        crop = int(transform.crop_size[0])
        extra = {"url": chosen.url} if weights_id else {}
        # Video models take (B, C, T, H, W) clips; their transform takes (T, C, H, W) uint8 frames.
        size = (3, VIDEO_CLIP_LEN, crop, crop) if name in _video_names() else (3, crop, crop)
        # MViT's blocks return (B, 1 + tokens, D) with a class token first (for --reduce cls/mean).
        fields: dict[str, Any] = {"num_prefix_tokens": 1} if name.startswith("mvit") else {}
        return Built(module, transform, size, weights_id, extra, fields=fields)


register_source(TorchvisionSource())
