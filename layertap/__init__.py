"""layertap: tap the hidden layers of vision models, stream activations to disk.

import layertap as lt
model = lt.load_model("resnet50", weights="pretrained")
run = lt.extract(model, "./images", layers=["layer3", "avgpool"], out="./acts")
run["avgpool"][:10]
"""

import sys
import types
from typing import Any

# Names are imported on first use (PEP 562): 'import layertap' and the command line's argument parsing
# stay fast (torch is imported only when a function needs it).
_SUBMODULES = ("analysis", "clip", "encode")  # encode: a callable module, lt.encode(run, responses, ...)
_NAMES = {
    "ModelEntry": "catalog",
    "model_catalog": "catalog",
    "ImageSet": "data",
    "LayertapError": "errors",
    "Extractor": "extraction",
    "extract": "extraction",
    "export": "formats",
    "merge_activations": "formats",
    "slices2tensor": "formats",
    "split_activations": "formats",
    "tensor2slices": "formats",
    "LayerInfo": "layers",
    "list_layers": "layers",
    "resolve_layers": "layers",
    "LoadedModel": "models",
    "from_module": "models",
    "list_models": "models",
    "list_sources": "models",
    "load_model": "models",
    "register_source": "models",
    "Plan": "planning",
    "plan": "planning",
    "PCA": "postprocess",
    "SparseRandomProjection": "postprocess",
    "feature_map_ensemble": "postprocess",
    "postprocess": "postprocess",
    "open_stimuli": "stimuli",
    "LayerArray": "storage",
    "Run": "storage",
    "VerifyResult": "storage",
    "open_run": "storage",
    "verify_run": "storage",
}


def __getattr__(name: str) -> Any:
    """Import ``name`` from its module on first use (then it is a plain module attribute)."""
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layertap' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_NAMES})


class _Package(types.ModuleType):
    """Importing the submodule ``layertap.postprocess`` sets the package attribute of that name; the
    function of the same name keeps it (as the eager ``from .postprocess import postprocess`` did)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if _NAMES.get(name) == name and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "analysis",
    "clip",
    "model_catalog",
    "encode",
    "ModelEntry",
    "PCA",
    "SparseRandomProjection",
    "feature_map_ensemble",
    "merge_activations",
    "postprocess",
    "slices2tensor",
    "split_activations",
    "tensor2slices",
    "verify_run",
    "VerifyResult",
    "Extractor",
    "ImageSet",
    "LayerArray",
    "LayerInfo",
    "LayertapError",
    "LoadedModel",
    "Run",
    "export",
    "extract",
    "from_module",
    "list_layers",
    "list_models",
    "list_sources",
    "load_model",
    "open_run",
    "open_stimuli",
    "plan",
    "Plan",
    "register_source",
    "resolve_layers",
]
