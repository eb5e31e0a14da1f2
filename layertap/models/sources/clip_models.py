"""CLIP models through open_clip: ``clip:RN50``, ``clip:ViT-B-32`` (any ``open_clip.list_models()`` name).

``weights="pretrained"`` loads OpenAI's released weights (open_clip's ``openai`` tag) where they
exist, else the name's first published tag; any other string is an open_clip pretrained tag
(``laion2b_s34b_b79k``). The tapped module is the image tower (``model.visual``: layer names
such as ``transformer.resblocks.11`` or ``layer4``; ``output`` is the image embedding); the full
model and its tokenizer travel in ``components`` for text features (:mod:`layertap.clip`).

The model is built with the activation its weights were trained with: QuickGELU for OpenAI's
weights and every tag open_clip marks ``quick_gelu`` (random weights and weights files follow the
name's default tag), recorded as ``quick_gelu`` in the provenance; ``quick_gelu=False`` overrides.
"""

from __future__ import annotations

from typing import Any

from layertap.errors import LayertapError, option_spelling
from layertap.models.registry import Built, Source, library_root_logging, register_source
from layertap.models.weights import Pretrained, Weights, seeded_build, weights_unavailable


def pretrained_tag(open_clip: Any, name: str, weights: str) -> str:
    """The open_clip tag that ``weights`` means: 'pretrained' -> 'openai' where published, else the first tag.

    Args:
        open_clip: the imported package.
        name: the model config name (``ViT-B-32``).
        weights: ``"pretrained"`` or a published tag (``laion2b_s34b_b79k``).

    Returns:
        The tag.

    Raises:
        LayertapError: an unknown tag, or no published weights for ``name``.

    Example:
        >>> import open_clip  # doctest: +SKIP
        >>> pretrained_tag(open_clip, "ViT-B-32", "pretrained")  # doctest: +SKIP
        'openai'
    """
    tags = [t for n, t in open_clip.list_pretrained() if n == name]
    if weights != "pretrained":
        if weights not in tags:
            raise LayertapError(
                f"unknown CLIP weights '{weights}' for {name}; published tags: {', '.join(tags) or 'none'}"
            )
        return weights
    if not tags:
        raise LayertapError(
            f"open_clip publishes no weights for {name}; use {option_spelling('weights', 'random')} or a weights file"
        )
    return "openai" if "openai" in tags else tags[0]


def activation_args(open_clip: Any, name: str, tag: str | None, options: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """open_clip arguments that build ``name`` with the activation ``tag``'s weights were trained with.

    OpenAI's CLIP (and every tag open_clip marks ``quick_gelu``) was trained with QuickGELU, while
    the plain model configs (``ViT-B-32``) use ``nn.GELU``; open_clip only warns about the mismatch.
    An explicit ``quick_gelu`` / ``force_quick_gelu`` option from the user wins.

    Args:
        open_clip: the imported package.
        name: the model config name (``ViT-B-32``).
        tag: the pretrained tag whose architecture to follow (None: the config as it is).
        options: the user's options for ``create_model_and_transforms``.

    Returns:
        (extra keyword arguments, whether the model uses QuickGELU).

    Example:
        >>> import open_clip  # doctest: +SKIP
        >>> activation_args(open_clip, "ViT-B-32", "openai", {})  # doctest: +SKIP
        ({'force_quick_gelu': True}, True)
    """
    base = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if "quick_gelu" in options:
        return {}, bool(options["quick_gelu"])
    if options.get("force_quick_gelu"):
        return {}, True
    want = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False)) if tag else base
    if want == base:
        return {}, want
    return ({"force_quick_gelu": True} if want else {"quick_gelu": False}), want


class ClipSource(Source):
    name = "clip"
    description = "CLIP image and text encoders (open_clip; OpenAI's weights for RN50, ViT-B-32, ...)"
    package = "open_clip"
    extra = "clip"

    def list_models(self) -> list[str]:
        return list(self.lib().list_models())

    def pretrained_names(self) -> set[str]:
        return {n for n, _tag in self.lib().list_pretrained()}

    def build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        # open_clip logs through the root logger (logging.info/error), which would configure it.
        with library_root_logging():
            return self._build(name, weights, seed, **options)

    def _build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        open_clip = self.lib()
        published = [t for n, t in open_clip.list_pretrained() if n == name]
        if not isinstance(weights, Pretrained):
            # Untrained or user weights: the architecture of the name's default published weights
            # (OpenAI's QuickGELU for ViT-B-32), as torchvision's random weights use the default's transform.
            tag = pretrained_tag(open_clip, name, "pretrained") if published else None
            extra, quick = activation_args(open_clip, name, tag, options)
            model, _, preprocess = seeded_build(
                lambda: open_clip.create_model_and_transforms(name, pretrained=None, **extra, **options), seed
            )
            weights_id = None
        else:
            tag = pretrained_tag(open_clip, name, weights.id)
            extra, quick = activation_args(open_clip, name, tag, options)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, **extra, **options)
            except Exception as err:  # noqa: BLE001 - network and cache errors all mean "not available"
                hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "").strip("/").split("/")
                cache = f" in {_hf_cache()}/models--{'--'.join(hub[:2])}" if len(hub) >= 2 else " in ~/.cache/clip"
                raise weights_unavailable(
                    f"CLIP weights {name}/{tag}",
                    err,
                    f"connect to the internet once (open_clip caches them{cache}) or pass a weights file",
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
        return Built(
            visual,
            preprocess,
            (3, int(size[0]), int(size[1])),
            weights_id,
            {"quick_gelu": quick, "architecture_of": f"{name}/{tag}" if tag else name},
            weights_target=model,
            fields={
                "num_prefix_tokens": 1 if transformer is not None else 0,
                "sequence_first": seq_first,
                "components": {"clip": model, "tokenizer": open_clip.get_tokenizer(name)},
            },
        )


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


register_source(ClipSource())
