"""Your own model: ``--model path/to/file.py:factory`` (CLI) or ``lt.load_model("file.py:factory")``.

``factory()`` returns an ``nn.Module``, a ``(module, transform)`` pair or a
:class:`~layertap.models.LoadedModel`. ``weights="pretrained"`` keeps whatever weights the factory
built (recorded as such, with the file's sha256); ``weights="random"`` calls it under a fixed
seed; a weights file is loaded into the module. In Python, :func:`layertap.from_module` wraps a
module you already have.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from torch import nn

from layertap.errors import LayertapError
from layertap.hashing import file_sha256
from layertap.models.registry import Built, LoadedModel, Source, register_source
from layertap.models.transforms import imagenet_transform
from layertap.models.weights import Pretrained, Weights, module_fingerprint, seeded_build

_SPEC = re.compile(r"^(?P<file>.+\.py):(?P<factory>[A-Za-z_]\w*)$")


class CustomSource(Source):
    name = "custom"
    description = "your own model: path/to/file.py:factory (returns an nn.Module or (module, transform))"

    def list_models(self) -> list[str]:
        return []

    def has_model(self, name: str) -> bool:
        return _SPEC.match(name) is not None

    def build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        m = _SPEC.match(name)
        assert m is not None
        path = Path(m["file"])
        if not path.is_file():
            raise LayertapError(f"model file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"layertap_user_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        try:
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
        except Exception as err:  # noqa: BLE001 - the user's file; say where it failed
            raise LayertapError(f"importing {path} failed: {type(err).__name__}: {err}") from None
        factory = getattr(mod, m["factory"], None)
        if not callable(factory):
            raise LayertapError(f"{path} has no function '{m['factory']}'")
        built = seeded_build(lambda: factory(**options), seed)
        transform = None
        if isinstance(built, LoadedModel):
            module, transform, size = built.module, built.transform, built.input_size
        elif isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
            module, transform = built
            size = (3, 224, 224)
        elif isinstance(built, nn.Module):
            module, size = built, (3, 224, 224)
        else:
            raise LayertapError(f"{name} returned {type(built).__name__}; return an nn.Module or (module, transform)")
        extra = {"file": str(path.resolve()), "file_sha256": file_sha256(path), "factory": m["factory"]}
        recorded = None
        if isinstance(weights, Pretrained) and weights.default:
            # the factory may read weights from anywhere: fingerprint what it built
            recorded = {"kind": "as built by the factory", "seed": seed, "sha256": module_fingerprint(module)}
        return Built(module, transform or imagenet_transform(crop=size[-1]), size, extra=extra, recorded=recorded)


register_source(CustomSource())
