#!/usr/bin/env bash
# Create bench/.venv-thingsvision: thingsvision 2.7.3 on the same torch/torchvision as layertap's venv.
#
# thingsvision 2.7.3 pins torchvision==0.15.2, numpy<2, tensorflow<2.16, transformers==4.40.1, ... which
# clash with layertap's torch 2.14.1 / torchvision 0.29.1. The benchmark must run every contender on the
# same torch, so: install torch + torchvision first, then thingsvision with --no-deps, then only the
# packages thingsvision imports at runtime for torchvision models (found by trying the imports).
#
# TensorFlow: thingsvision imports tensorflow (and tensorflow.keras) at module level even for PyTorch
# models, and calls tf.config.list_physical_devices("GPU") on import. It is not used for torchvision
# models, so a tiny stub package `tensorflow` is written into the venv: list_physical_devices returns [],
# anything else raises when called. (A real TensorFlow would only add import time and RSS to thingsvision.)
#
# Usage: bash bench/setup_thingsvision.sh        (idempotent; ~2 min, mostly pip)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv-thingsvision
TORCH=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION=${TORCHVISION_SPEC:-torchvision==0.29.1}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install "$TORCH" "$TORCHVISION"
"$PIP" install --no-deps thingsvision==2.7.3
# What `from thingsvision import get_extractor`, thingsvision.utils.data and thingsvision.utils.storing
# import at runtime (numpy<2 is thingsvision's own pin; 2.x removed np.AxisError, which it uses).
"$PIP" install "numpy<2" h5py scipy tqdm torchtyping timm requests

SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$SP/tensorflow/keras/layers" "$SP/tensorflow/keras/applications"
cat > "$SP/tensorflow/_stub.py" <<'PY'
"""Stub TensorFlow written by layertap's bench/setup_thingsvision.sh (thingsvision imports TF on import)."""


class Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: TensorFlow is a stub in this venv (bench/setup_thingsvision.sh)")


def module_getattr(prefix):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{prefix}.{name}")

    return __getattr__


class config:  # noqa: N801 - tf.config
    @staticmethod
    def list_physical_devices(device_type=None):
        return []
PY
for mod in "" keras keras/layers keras/applications; do
    dotted="tensorflow${mod:+.}${mod//\//.}"
    {
        echo "\"\"\"Stub of $dotted (see tensorflow/_stub.py).\"\"\""
        echo "from tensorflow._stub import module_getattr"
        case "$mod" in
            "") echo "from tensorflow._stub import config"; echo "from . import keras";;
            keras) echo "from . import applications, layers";;
        esac
        echo "__version__ = '0.0+stub'"
        echo "__getattr__ = module_getattr(\"$dotted\")"
    } > "$SP/tensorflow/$mod/__init__.py"
done

"$VENV/bin/python" - <<'PY'
import thingsvision
from thingsvision import get_extractor  # noqa: F401
from thingsvision.utils.data import DataLoader, ImageDataset  # noqa: F401
from thingsvision.utils.storing import save_features  # noqa: F401
import torch, torchvision
print(f"thingsvision {thingsvision.__version__} ready (torch {torch.__version__}, torchvision {torchvision.__version__})")
PY
