"""layertap: tap the hidden layers of vision models, stream activations to disk.

import layertap as lt
model = lt.load_model("resnet50", weights="pretrained")
run = lt.extract(model, "./images", layers=["layer3", "avgpool"], out="./acts")
run["avgpool"][:10]
"""

from typing import Any

# Names are imported on first use (PEP 562): 'import layertap' and the command line's argument parsing
# stay fast (torch is imported only when a function needs it).
_SUBMODULES = ("analysis", "clip", "encode")  # encode: a callable module, lt.encode(run, responses, ...)
_NAMES = {
    "ModelEntry": "models.catalog",
    "model_catalog": "models.catalog",
    "ImageSet": "data.images",
    "LayertapError": "errors",
    "Extractor": "extraction.pipeline",
    "extract": "extraction.pipeline",
    "export": "store.export",
    "merge_activations": "store.export",
    "slices2tensor": "store.export",
    "split_activations": "store.export",
    "tensor2slices": "store.export",
    "LayerInfo": "extraction.layers",
    "list_layers": "extraction.layers",
    "resolve_layers": "extraction.layers",
    "LoadedModel": "models.registry",
    "from_module": "models.registry",
    "list_models": "models.registry",
    "list_sources": "models.registry",
    "load_model": "models.registry",
    "register_source": "models.registry",
    "Plan": "extraction.planning",
    "plan": "extraction.planning",
    "PCA": "process.postprocess",
    "SparseRandomProjection": "process.postprocess",
    "feature_map_ensemble": "process.postprocess",
    "postprocess": "process.postprocess",
    "open_stimuli": "data.stimuli",
    "LayerArray": "store.run",
    "Run": "store.run",
    "VerifyResult": "store.run",
    "open_run": "store.run",
    "verify_run": "store.run",
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
