"""Model sources. Each module registers itself with :func:`layertap.models.register_source`.

Adding a source = adding one module here and one import line below. Sources whose package is an
optional extra (timm, open_clip, transformers) import it only when a model is listed or loaded.
"""

from . import clip_models, custom, hf_models, ipcl, timm_models, torchvision_models  # noqa: F401
