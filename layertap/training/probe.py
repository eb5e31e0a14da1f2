"""Linear-probe evaluation of one frozen layer (open_ipcl's ``main_lincls_onecycle.py``).

A linear classifier (flatten -> ``nn.Linear``) on the layer's output is trained with SGD and a
one-cycle learning-rate schedule; the defaults are the original's (10 epochs, batch 256,
``lr=30``, ``div_factor=1e6``, ``pct_start=0.3``, momentum 0.9, no weight decay, training images
augmented with RandomResizedCrop + horizontal flip). ``augment="none"`` extracts the features
once (centre crop) and trains on the cached features: much faster, slightly optimistic.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layertap.data.images import ImageSet
from layertap.errors import LayertapError
from layertap.extraction.layers import resolve_layers
from layertap.extraction.tap import Extractor
from layertap.models.registry import LoadedModel
from layertap.training.ipcl import _device, _mix, _progress, load_trained
from layertap.training.knn import _EvalSet, labelled


@dataclass
class ProbeResult:
    """Top-1 accuracies (%) of the probe on the validation and training images, per-epoch log.

    Example:
        >>> result = linear_probe("runs/ipcl", "fc7", "train/", "val/", epochs=2)  # doctest: +SKIP
        >>> result.layer, result.n_features  # doctest: +SKIP
        ('fc7', 4096)
    """

    layer: str
    val_top1: float
    train_top1: float
    n_features: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _features(tap: Extractor, layer: str, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(tap(x.to(device))[layer].flatten(1).float())
        ys.append(y.to(device))
    return torch.cat(xs), torch.cat(ys)


class _Labelled(_EvalSet):
    def __init__(self, paths: list[str], targets: torch.Tensor, transform: Any) -> None:
        super().__init__(paths, transform)
        self.targets = targets

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().__getitem__(i), self.targets[i]


class _Augmented(_Labelled):
    """Training images with random crops drawn from (seed, epoch, image): the same crops whatever the worker count."""

    def __init__(self, paths: list[str], targets: torch.Tensor, transform: Any, seed: int) -> None:
        super().__init__(paths, targets, transform)
        self.seed, self.epoch = seed, 0  # the loop sets epoch before each pass (workers copy the dataset then)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.epoch, i, 4))
            return super().__getitem__(i)


def linear_probe(
    model: str | os.PathLike[str] | LoadedModel,
    layer: str,
    images: str | os.PathLike[str] | ImageSet,
    val: str | os.PathLike[str] | ImageSet,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 30.0,
    div_factor: float = 1e6,
    pct_start: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    augment: str = "crop-flip",
    device: str = "auto",
    workers: int = 0,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Train a linear readout of ``layer`` on labelled ``images``; report top-1 on ``val`` (%).

    Args:
        model: a training run folder / checkpoint (:func:`~layertap.training.load_trained`) or a LoadedModel.
        layer: the layer whose (flattened) output feeds the readout.
        images: labelled training images.
        val: labelled validation images.
        epochs: training epochs.
        batch_size: images per step.
        lr: the one-cycle schedule's peak learning rate.
        div_factor: the schedule starts at ``lr / div_factor``.
        pct_start: the fraction of steps spent warming up.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment: ``"crop-flip"`` (random resized crop + flip) or ``"none"``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        workers: decoding worker processes.
        seed: the seed of the readout's initialisation and the data order.
        out: a JSON file for the result (default: ``RUN/linear_probe_<layer>.json`` when ``model`` is a run
            folder; nothing otherwise).
        progress: show progress bars.

    Returns:
        The accuracies and the per-epoch log.

    Example:
        >>> linear_probe("runs/ipcl", "conv_block_5", "train/", "val/", epochs=5).val_top1  # doctest: +SKIP
    """
    from torchvision import transforms as T

    if augment not in ("crop-flip", "none"):
        raise LayertapError(f"unknown --augment '{augment}': choose crop-flip or none")
    loaded = model if isinstance(model, LoadedModel) else load_trained(model)
    names = resolve_layers(loaded, [layer])
    if len(names) != 1:
        raise LayertapError(f"--layer takes one layer; '{layer}' matches {len(names)}")
    name = names[0]
    train_set = images if isinstance(images, ImageSet) else ImageSet.from_path(images)
    val_set = val if isinstance(val, ImageSet) else ImageSet.from_path(val)
    train_y = labelled(train_set, "the linear-probe training images")
    val_y = labelled(val_set, "--val", train_set.classes)
    n_classes = len(train_set.classes or [])
    dev = _device(device, 0, 1)
    loaded.module.to(dev).eval()
    size = loaded.input_size[-1]
    train_tf = loaded.transform
    if augment == "crop-flip":
        norm = [t for t in getattr(loaded.transform, "transforms", []) if isinstance(t, T.Normalize)]
        train_tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(), *norm])
    gen = torch.Generator().manual_seed(seed)
    train_data = (
        _Augmented(train_set.paths, train_y, train_tf, seed)
        if augment == "crop-flip"
        else _Labelled(train_set.paths, train_y, train_tf)
    )
    train_loader = torch.utils.data.DataLoader(
        train_data,
        batch_size=batch_size,
        shuffle=True,
        generator=gen,
        num_workers=workers,
    )
    val_loader = torch.utils.data.DataLoader(
        _Labelled(val_set.paths, val_y, loaded.transform), batch_size=batch_size, num_workers=workers
    )
    history: list[dict[str, Any]] = []
    torch.manual_seed(seed)
    with Extractor(loaded, [name]) as tap:
        cached = None
        if augment == "none":
            feats, ys = _features(tap, name, torch.utils.data.DataLoader(train_loader.dataset, batch_size), dev)
            n_feat = feats.shape[1]
            cached = (feats, ys)
        else:
            x0 = train_loader.dataset[0][0][None].to(dev)
            n_feat = tap(x0)[name].flatten(1).shape[1]
        torch.manual_seed(seed)  # the head's initial weights depend on the seed alone, not on what loading drew
        head = nn.Linear(n_feat, n_classes).to(dev)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        steps = epochs * (len(train_loader) if cached is None else (len(train_set) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=pct_start, div_factor=div_factor
        )
        for epoch in range(epochs):
            total, correct, loss_sum = 0, 0, 0.0
            if cached is None:
                if isinstance(train_data, _Augmented):
                    train_data.epoch = epoch
                batches = ((tap(x.to(dev))[name].flatten(1).float().clone(), y.to(dev)) for x, y in train_loader)
            else:
                perm = torch.randperm(len(cached[1]), generator=gen).to(dev)
                batches = ((cached[0][i], cached[1][i]) for i in perm.split(batch_size))
            for xb, yb in _progress(batches, f"probe epoch {epoch + 1}/{epochs}", progress):
                logits = head(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(yb)
                total += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / total, "train_top1": 100 * correct / total})
        vx, vy = _features(tap, name, val_loader, dev)
        with torch.no_grad():
            val_top1 = float((head(vx).argmax(1) == vy).float().mean() * 100)
    result = ProbeResult(name, val_top1, history[-1]["train_top1"] if history else float("nan"), n_feat, history)
    target = Path(out) if out else None
    if target is None and not isinstance(model, LoadedModel) and Path(model).is_dir():
        target = Path(model) / f"linear_probe_{name}.json"
    if target is not None:
        target.write_text(json.dumps(asdict(result), indent=1))
    return result
