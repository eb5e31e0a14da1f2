"""Model sources. Each module registers itself with :func:`layertap.models.register_source`.

Adding a source = adding one module here and one import line below: a :class:`~layertap.models.registry.Source`
subclass with ``list_models`` and ``build`` (the architecture for a ``Pretrained | Random | File`` weights spec;
the shared ``Source.load`` does the rest), optionally ``pretrained_names``. Sources whose package is an
optional extra (timm, open_clip, transformers) import it only when a model is listed or loaded.
The import order is the lookup order for bare names: ``resnet18`` is torchvision's, while
``timm:resnet18`` asks timm.
"""

# isort: off
from layertap.models.sources import torchvision_models  # noqa: F401
from layertap.models.sources import ipcl  # noqa: F401
from layertap.models.sources import custom  # noqa: F401
from layertap.models.sources import timm_models  # noqa: F401
from layertap.models.sources import clip_models  # noqa: F401
from layertap.models.sources import hf_models  # noqa: F401
# isort: on
