"""Model sources. Each module registers itself with :func:`layertap.models.register_source`.

Adding a source = adding one module here and one import line below. Sources whose package is an
optional extra import that package only when a model is listed or loaded.
"""

from . import torchvision_models  # noqa: F401
