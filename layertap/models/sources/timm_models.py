"""timm models: any ``timm.create_model`` name (``timm:convnext_tiny``, ``timm:vit_small_patch16_224.augreg_in21k``).

Preprocessing is timm's own data config for the model (``resolve_model_data_config`` +
``create_transform``). Pretrained weights come from timm's hub download/cache.
"""

from __future__ import annotations

from typing import Any

from layertap.models.registry import Built, Source, register_source
from layertap.models.weights import Pretrained, Weights, seeded_build, weights_unavailable


class TimmSource(Source):
    name = "timm"
    description = "timm (PyTorch Image Models): every timm.create_model name, timm's preprocessing"
    package = "timm"
    extra = "timm"

    def list_models(self) -> list[str]:
        return list(self.lib().list_models())

    def pretrained_names(self) -> set[str]:
        return {n.split(".", 1)[0] for n in self.lib().list_pretrained()}

    def has_model(self, name: str) -> bool:
        timm = self.lib()
        return bool(timm.is_model(name.split(".", 1)[0]))

    def build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        timm = self.lib()
        arch = name.split(".", 1)[0]
        if not isinstance(weights, Pretrained):
            module = seeded_build(lambda: timm.create_model(name, pretrained=False, **options), seed)
            weights_id = None
        else:
            # weights="pretrained" -> the name's default tag; any other string is a timm pretrained tag
            full = name if weights.default else f"{arch}.{weights.id}"
            try:
                module = timm.create_model(full, pretrained=True, **options)
            except Exception as err:  # noqa: BLE001 - hub, network and cache errors all mean "not available"
                raise weights_unavailable(
                    f"pretrained timm weights for {full}",
                    err,
                    "connect to the internet once (they are cached by huggingface_hub) or pass a weights file",
                ) from None
            cfg = getattr(module, "pretrained_cfg", {}) or {}
            weights_id = f"{arch}.{cfg.get('tag')}" if cfg.get("tag") else full
        data = timm.data.resolve_model_data_config(module)
        transform = timm.data.create_transform(**data, is_training=False)
        return Built(
            module,
            transform,
            tuple(int(v) for v in data["input_size"]),
            weights_id,
            {"data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}},
            fields={"num_prefix_tokens": int(getattr(module, "num_prefix_tokens", 0))},
        )


register_source(TimmSource())
