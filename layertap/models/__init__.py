"""Stage 1, models: one registry of sources and one entry point, :func:`load_model`.

Modules: :mod:`.registry` (``Source``, ``LoadedModel``, ``load_model``), :mod:`.weights` (the weights spec
``Pretrained | Random | File``, reading and checking weights files, provenance), :mod:`.transforms` (preprocessing),
:mod:`.catalog` (the cached ``layertap models`` listing) and :mod:`.sources` (one small adapter per model
library; importing this package registers them, in lookup order).
"""

from layertap.models import sources  # noqa: E402,F401,I001  (registers the built-in sources)
from layertap.models.registry import (
    Built,
    LoadedModel,
    Source,
    from_module,
    list_models,
    list_sources,
    load_model,
    register_source,
)

from layertap.models.weights import File, Pretrained, Random, Weights

__all__ = [
    "Built",
    "File",
    "LoadedModel",
    "Pretrained",
    "Random",
    "Source",
    "Weights",
    "from_module",
    "list_models",
    "list_sources",
    "load_model",
    "register_source",
]
