"""CLIP models through open_clip: ``clip:RN50``, ``clip:ViT-B-32`` (any ``open_clip.list_models()`` name).

``weights="pretrained"`` loads OpenAI's released weights (open_clip's ``openai`` tag) where they
exist, else the name's first published tag; any other string is an open_clip pretrained tag
(``laion2b_s34b_b79k``). The tapped module is the image tower (``model.visual``: layer names
such as ``transformer.resblocks.11`` or ``layer4``; ``output`` is the image embedding); the full
model and its tokenizer travel in ``components`` for text features (:mod:`layertap.clip`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LayertapError
from ..models import (
    LoadedModel,
    Source,
    finish_loading,
    register_source,
    seeded_build,
    weights_unavailable,
)


def pretrained_tag(open_clip: Any, name: str, weights: str) -> str:
    tags = [t for n, t in open_clip.list_pretrained() if n == name]
    if weights != "pretrained":
        if weights not in tags:
            raise LayertapError(
                f"unknown CLIP weights '{weights}' for {name}; published tags: {', '.join(tags) or 'none'}"
            )
        return weights
    if not tags:
        raise LayertapError(f"open_clip publishes no weights for {name}; use weights='random' or a weights file")
    return "openai" if "openai" in tags else tags[0]


class ClipSource(Source):
    name = "clip"
    description = "CLIP image and text encoders (open_clip; OpenAI's weights for RN50, ViT-B-32, ...)"
    package = "open_clip"
    extra = "clip"

    def list_models(self) -> list[str]:
        return list(self.lib().list_models())

    def load(self, name: str, weights: str | Path, seed: int, **options: Any) -> LoadedModel:
        open_clip = self.lib()
        if isinstance(weights, Path) or weights == "random":
            model, _, preprocess = seeded_build(
                lambda: open_clip.create_model_and_transforms(name, pretrained=None, **options), seed
            )
            weights_id = None
        else:
            tag = pretrained_tag(open_clip, name, weights)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, **options)
            except Exception as err:  # noqa: BLE001 - network and cache errors all mean "not available"
                raise weights_unavailable(
                    f"CLIP weights {name}/{tag}",
                    err,
                    "connect to the internet once (open_clip caches them) or pass a weights file",
                ) from None
            weights_id = f"{name}/{tag}"
        visual = model.visual
        transformer = getattr(visual, "transformer", None)
        # Older open_clip runs the vision transformer sequence-first (L, N, D): store batch-first.
        seq_first = (
            ("transformer",) if transformer is not None and not getattr(transformer, "batch_first", True) else ()
        )
        size = getattr(visual, "image_size", 224)
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return finish_loading(
            visual,
            preprocess,
            f"clip:{name}",
            (3, int(size[0]), int(size[1])),
            weights,
            seed,
            weights_id,
            weights_target=model,
            num_prefix_tokens=1 if transformer is not None else 0,
            sequence_first=seq_first,
            components={"clip": model, "tokenizer": open_clip.get_tokenizer(name)},
        )


register_source(ClipSource())
