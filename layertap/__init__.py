"""layertap: tap the hidden layers of vision models, stream activations to disk.

import layertap as lt
model = lt.load_model("resnet50", weights="pretrained")
run = lt.extract(model, "./images", layers=["layer3", "avgpool"], out="./acts")
run["avgpool"][:10]
"""

from layertap._lazy import lazy_exports
from layertap._version import __version__ as __version__  # re-exported: lt.__version__

# Names are imported on first use (PEP 562): 'import layertap' and the command line's argument parsing
# stay fast (torch is imported only when a function needs it).
_SUBMODULES = ("analysis", "clip", "encode")  # encode: a callable module, lt.encode(run, responses, ...)
_NAMES = {
    "ModelEntry": "models.catalog",
    "model_catalog": "models.catalog",
    "ImageSet": "data.images",
    "LayertapError": "errors",
    "LayertapFailure": "errors",
    "MissingDependencyError": "errors",
    "StorageError": "errors",
    "UnavailableError": "errors",
    "JobFailedError": "errors",
    "Extractor": "extraction.tap",
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
    "PCA": "process.pca",
    "SparseRandomProjection": "process.projection",
    "feature_map_ensemble": "process.ensemble",
    "postprocess": "process.postprocess",
    "open_stimuli": "data.stimuli",
    "LayerArray": "store.run",
    "Run": "store.run",
    "VerifyResult": "store.verify",
    "open_run": "store.run",
    "verify_run": "store.run",
}


__getattr__, __dir__ = lazy_exports(__name__, _NAMES, _SUBMODULES)

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
    "LayertapFailure",
    "MissingDependencyError",
    "StorageError",
    "UnavailableError",
    "JobFailedError",
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
