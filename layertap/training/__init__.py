"""Training: IPCL self-supervised training (loss, memory queue, trainer), augmentations, kNN, linear probe.

``layertap.training.train_ipcl(images, out, epochs=..., ...)`` trains and checkpoints a model;
``layertap.training.linear_probe(run, layer, images, val)`` evaluates a frozen layer. The command
line is ``layertap train ipcl ...`` and ``layertap train linear-probe ...``.
"""

from layertap._lazy import lazy_exports

# Imported on first use: the command line builds its parser without importing torch.
_NAMES = {
    "AugmentConfig": "augment",
    "TensorAugment": "augment",
    "cpu_augment": "augment",
    "eval_transform": "augment",
    "load_square": "augment",
    "IPCLConfig": "ipcl",
    "IPCLCriterion": "ipcl",
    "TrainResult": "ipcl",
    "build_model": "ipcl",
    "ipcl_loss": "ipcl",
    "ipcl_similarities": "ipcl",
    "load_trained": "ipcl",
    "nce_loss": "ipcl",
    "softmax_loss": "ipcl",
    "train_ipcl": "ipcl",
    "knn_accuracy": "knn",
    "knn_eval": "knn",
    "knn_predict": "knn",
    "ProbeResult": "probe",
    "linear_probe": "probe",
}

__getattr__, __dir__ = lazy_exports(__name__, _NAMES)

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
