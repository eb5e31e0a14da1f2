"""layertap: tap the hidden layers of vision models, stream activations to disk.

import layertap as lt
model = lt.load_model("resnet50", weights="pretrained")
run = lt.extract(model, "./images", layers=["layer3", "avgpool"], out="./acts")
run["avgpool"][:10]
"""

from . import analysis, clip
from .data import ImageSet
from .errors import LayertapError
from .extraction import Extractor, extract
from .formats import export, merge_activations, slices2tensor, split_activations, tensor2slices
from .layers import LayerInfo, list_layers, resolve_layers
from .models import LoadedModel, from_module, list_models, list_sources, load_model, register_source
from .postprocess import PCA, SparseRandomProjection, feature_map_ensemble, postprocess
from .storage import LayerArray, Run, open_run

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "clip",
    "PCA",
    "SparseRandomProjection",
    "feature_map_ensemble",
    "merge_activations",
    "postprocess",
    "slices2tensor",
    "split_activations",
    "tensor2slices",
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
    "register_source",
    "resolve_layers",
]
