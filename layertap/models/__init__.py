"""Stage 1, models: one registry of sources and one entry point, :func:`load_model`.

Modules: :mod:`.registry` (``Source``, ``LoadedModel``, ``load_model``, weights reading and provenance),
:mod:`.catalog` (the cached ``layertap models`` listing) and :mod:`.sources` (one small adapter per model
library; importing this package registers them, in lookup order).
"""

from layertap.models import sources  # noqa: E402,F401,I001  (registers the built-in sources)
from layertap.models.registry import (
    LoadedModel,
    Source,
    from_module,
    list_models,
    list_sources,
    load_model,
    register_source,
)

__all__ = ["LoadedModel", "Source", "from_module", "list_models", "list_sources", "load_model", "register_source"]
