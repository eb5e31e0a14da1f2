"""Training: IPCL self-supervised training (loss, memory queue, trainer), augmentations, kNN, linear probe.

``layertap.training.train_ipcl(images, out, epochs=..., ...)`` trains and checkpoints a model;
``layertap.training.linear_probe(run, layer, images, val)`` evaluates a frozen layer. The command
line is ``layertap train ipcl ...`` and ``layertap train linear-probe ...``.
"""

from .augment import AugmentConfig, TensorAugment, cpu_augment, eval_transform, load_square
from .ipcl import (
    IPCLConfig,
    IPCLCriterion,
    TrainResult,
    build_model,
    ipcl_loss,
    ipcl_similarities,
    load_trained,
    nce_loss,
    softmax_loss,
    train_ipcl,
)
from .knn import knn_accuracy, knn_eval, knn_predict
from .probe import ProbeResult, linear_probe

__all__ = [
    "AugmentConfig",
    "IPCLConfig",
    "IPCLCriterion",
    "ProbeResult",
    "TensorAugment",
    "TrainResult",
    "build_model",
    "cpu_augment",
    "eval_transform",
    "ipcl_loss",
    "ipcl_similarities",
    "knn_accuracy",
    "knn_eval",
    "knn_predict",
    "linear_probe",
    "load_square",
    "load_trained",
    "nce_loss",
    "softmax_loss",
    "train_ipcl",
]
