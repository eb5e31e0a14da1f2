"""IPCL training (Konkle & Alvarez, instance-prototype contrastive learning): loss, queue, trainer.

The objective, as in open_ipcl's ``ipcl/ipcl0.py`` with lemniscate's NCE:

* every image is augmented ``n_samples`` times (default 5) within the batch; the encoder's
  embeddings (``out_dim``, default 128) are l2-normalised;
* the prototype of an image is the mean of its N sample embeddings (``norm_prototype``:
  l2-normalised; ``detach_prototype`` (default, as the original computes it under ``no_grad``):
  no gradient flows through it);
* positive logit: sample . prototype; negatives: sample . queue, the ``queue_size`` (default 4096)
  most recent embeddings (of earlier batches, all ranks), no gradient;
* ``loss="nce"``: P = exp(sim / T) / Z with Z = mean(exp(sim / T)) * n_data fixed from the first
  batch (all ranks), and the NCE criterion with noise probability 1 / n_data;
  ``loss="softmax"``: cross-entropy of the (1 + K)-way softmax of sim / T, positive first.

Sample layouts of the (B*N, ...) batch: ``"contiguous"`` = [img0_aug0 .. img0_augN-1, img1_aug0,
...] and ``"interleaved"`` = [aug0 of all images, aug1 of all images, ...] (the original loader's
order, the default).

Small data: the defaults are the ImageNet settings (1.28M images, queue 4096, SGD momentum 0.9).
The negatives are stale embeddings (earlier steps' encoder), so a small network can lower the
loss by collapsing all embeddings together and letting the collapsed cloud drift away from the
queue every step, which momentum sustains; with a tiny backbone this ends with every embedding
identical (softmax loss log(1 + K)). For small tests use a queue below one pass over the data
(``queue_size < (images - batch_size) * n_samples``, or the queue holds the trained images' own
earlier embeddings; :func:`train_ipcl` warns) and ``momentum=0`` (or a higher ``temperature``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from layertap._optional import package_available, require
from layertap.data.images import ImageSet, load_rgb
from layertap.devices import resolve_device
from layertap.errors import JobFailedError, LayertapError
from layertap.extraction.layers import unwrap_output
from layertap.models.registry import LoadedModel, from_module, load_model
from layertap.models.sources.ipcl import AlexNetGN, L2Norm
from layertap.models.weights import seeded_build
from layertap.training.augment import (
    AugmentConfig,
    TensorAugment,
    cpu_augment,
    draw_uniforms,
    eval_transform,
    load_square,
)
from layertap.training.knn import knn_eval, labelled

log = logging.getLogger("layertap")

LAYOUTS = ("interleaved", "contiguous")
LOSSES = ("nce", "softmax")
CHECKPOINT = "checkpoint.pth.tar"
#: an epoch whose mean loss exceeds this multiple of the first epoch's is exploding
EXPLODING_RATIO = 10.0
ON_DIVERGENCE = ("warn", "stop")


def _what_to_try(cfg: IPCLConfig) -> str:
    return f"lower --lr (now {cfg.lr:g}; try {cfg.lr / 10:g}) or raise --temperature (now {cfg.temperature:g})"


def exploding(history: list[dict[str, Any]], ratio: float = EXPLODING_RATIO) -> str | None:
    """Why the last epoch's loss counts as exploding, or None: its mean loss is more than ``ratio``
    times the first epoch's (a healthy IPCL loss falls, or stays within a small factor).

    Args:
        history: the per-epoch log rows (``epoch``, ``train_loss``), first epoch first.
        ratio: the multiple of the first epoch's loss that counts as exploding.

    Returns:
        A phrase such as ``"epoch 2 loss 148.2 is 53x the first epoch's (2.79)"``, or None.

    Example:
        >>> exploding([{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 40.0}])
        "epoch 2 loss 40 is 20x the first epoch's (2)"
    """
    if len(history) < 2:
        return None
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    if first > 0 and last > ratio * first:
        return f"epoch {history[-1]['epoch']} loss {last:.4g} is {last / first:.0f}x the first epoch's ({first:.4g})"
    return None


NCE_EPS = 1e-7  # lemniscate's eps inside the NCE ratios


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, ...) samples grouped by image -> (B*N, ...) in ``layout`` order.

    Args:
        x: N samples of each of B images.
        layout: ``"interleaved"`` (aug0 of all images, then aug1, ...) or ``"contiguous"`` (image by image).

    Returns:
        The flattened batch.

    Example:
        >>> to_layout(torch.arange(6).reshape(2, 3), "interleaved")
        tensor([0, 3, 1, 4, 2, 5])
    """
    if layout == "contiguous":
        return x.reshape(-1, *x.shape[2:])
    if layout == "interleaved":
        return x.transpose(0, 1).reshape(-1, *x.shape[2:])
    raise LayertapError(f"unknown sample layout '{layout}': choose {' or '.join(LAYOUTS)}")


def from_layout(x: torch.Tensor, n_samples: int, layout: str) -> torch.Tensor:
    """(B*N, ...) in ``layout`` order -> (B, N, ...) grouped by image (the inverse of :func:`to_layout`).

    Args:
        x: the flattened batch.
        n_samples: N.
        layout: ``"interleaved"`` or ``"contiguous"``.

    Returns:
        The samples grouped by image.

    Example:
        >>> from_layout(torch.tensor([0, 3, 1, 4, 2, 5]), 3, "interleaved")
        tensor([[0, 1, 2],
                [3, 4, 5]])
    """
    if x.shape[0] % n_samples:
        raise LayertapError(f"batch of {x.shape[0]} samples is not a multiple of n_samples={n_samples}")
    if layout == "contiguous":
        return x.reshape(-1, n_samples, *x.shape[1:])
    if layout == "interleaved":
        return x.reshape(n_samples, -1, *x.shape[1:]).transpose(0, 1)
    raise LayertapError(f"unknown sample layout '{layout}': choose {' or '.join(LAYOUTS)}")


def ipcl_similarities(
    emb: torch.Tensor,
    queue: torch.Tensor,
    n_samples: int,
    layout: str = "interleaved",
    norm_prototype: bool = False,
    detach_prototype: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of each sample to its prototype (column 0) and to the queue (1..K).

    Args:
        emb: (B*N, D) embeddings in ``layout`` order (normalised here).
        queue: (K, D) unit vectors.
        n_samples: N, the samples per image.
        layout: ``"interleaved"`` (sample-major) or ``"contiguous"`` (image-major): the order of ``emb``'s rows.
        norm_prototype: l2-normalise the prototypes.
        detach_prototype: no gradient through the prototypes.

    Returns:
        ``sim`` (B*N, 1+K) in the same sample order, and the prototypes (B, D).

    Example:
        >>> sim, proto = ipcl_similarities(torch.randn(6, 4), torch.eye(4), n_samples=3)
        >>> sim.shape, proto.shape
        (torch.Size([6, 5]), torch.Size([2, 4]))
    """
    x = F.normalize(emb, dim=1)
    grouped = from_layout(x, n_samples, layout)  # (B, N, D)
    proto = grouped.detach().mean(dim=1) if detach_prototype else grouped.mean(dim=1)
    if norm_prototype:
        proto = F.normalize(proto, dim=1)
    pos = (grouped * proto[:, None]).sum(-1, keepdim=True)  # (B, N, 1)
    pos = to_layout(pos, layout)
    neg = x @ queue.detach().to(x.dtype).T
    return torch.cat([pos, neg], dim=1), proto


def nce_loss(sim: torch.Tensor, temperature: float, Z: float | torch.Tensor, n_data: int) -> torch.Tensor:
    """lemniscate's NCE criterion on (M, 1+K) similarities (positive first); mean over the M samples.

    P = exp(sim/T)/Z; with noise probability Pn = 1/n_data and K negatives,
    loss = -[sum_i log(P_i0 / (P_i0 + K Pn + eps)) + sum_ij log(K Pn / (P_ij + K Pn + eps))] / M.

    Args:
        sim: (M, 1+K) similarities, the positive in column 0.
        temperature: T.
        Z: the normalisation constant (see :func:`nce_normaliser`).
        n_data: the dataset size.

    Returns:
        The scalar loss.

    Example:
        >>> float(nce_loss(torch.zeros(2, 5), 0.07, Z=1.0, n_data=100)) > 0
        True
    """
    P = torch.exp(sim / temperature) / Z
    K = sim.shape[1] - 1
    kpn = K / float(n_data)
    pos = torch.log(P[:, 0] / (P[:, 0] + kpn + NCE_EPS))
    neg = torch.log(kpn / (P[:, 1:] + kpn + NCE_EPS))
    return -(pos.sum() + neg.sum()) / sim.shape[0]


def softmax_loss(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of softmax(sim / T) with the positive (column 0) as target; mean over samples.

    Args:
        sim: (M, 1+K) similarities, the positive in column 0.
        temperature: T.

    Returns:
        The scalar loss.

    Example:
        >>> round(float(softmax_loss(torch.zeros(2, 4), 1.0)), 4)  # log(4): four equal classes
        1.3863
    """
    target = torch.zeros(sim.shape[0], dtype=torch.long, device=sim.device)
    return F.cross_entropy(sim / temperature, target)


def nce_normaliser(sim: torch.Tensor, temperature: float, n_data: int) -> torch.Tensor:
    """Z = mean(exp(sim / T)) * n_data over all ranks' samples (lemniscate's constant), no gradient.

    Args:
        sim: (M, 1+K) similarities.
        temperature: T.
        n_data: the dataset size.

    Returns:
        Z, a scalar tensor.

    Example:
        >>> float(nce_normaliser(torch.zeros(2, 3), 1.0, n_data=10))
        10.0
    """
    with torch.no_grad():
        e = torch.exp(sim.detach().double() / temperature)
        total = torch.stack([e.sum(), torch.tensor(float(e.numel()), dtype=torch.float64, device=e.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return (total[0] / total[1] * n_data).float()


def ipcl_loss(
    emb: torch.Tensor,
    queue: torch.Tensor,
    n_samples: int,
    *,
    layout: str = "interleaved",
    temperature: float = 0.07,
    loss: str = "nce",
    Z: float | torch.Tensor | None = None,
    n_data: int | None = None,
    norm_prototype: bool = False,
    detach_prototype: bool = True,
) -> torch.Tensor:
    """The IPCL loss of one batch, without the state :class:`IPCLCriterion` keeps.

    Args:
        emb: (B*N, D) embeddings of N augmented samples of B images, in ``layout`` order.
        queue: (K, D) unit vectors, the negatives.
        n_samples: N, the samples per image.
        layout: ``"interleaved"`` (sample-major: aug0 of all images, then aug1, ...) or ``"contiguous"`` (image-major).
        temperature: the softmax / NCE temperature.
        loss: ``"nce"`` or ``"softmax"``.
        Z: the NCE normalisation constant; None with ``loss="nce"`` computes it from this batch.
        n_data: the dataset size (NCE's noise probability is 1 / n_data).
        norm_prototype: l2-normalise the prototypes (the mean of each image's samples).
        detach_prototype: no gradient through the prototypes.

    Returns:
        The scalar loss.

    Example:
        >>> emb, queue = torch.randn(8, 16), torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
        >>> ipcl_loss(emb, queue, n_samples=2, loss="softmax").shape
        torch.Size([])
    """
    sim, _ = ipcl_similarities(emb, queue, n_samples, layout, norm_prototype, detach_prototype)
    if loss == "softmax":
        return softmax_loss(sim, temperature)
    if loss != "nce":
        raise LayertapError(f"unknown IPCL loss '{loss}': choose {' or '.join(LOSSES)}")
    if n_data is None:
        raise LayertapError("the NCE loss needs n_data (the number of training images)")
    if Z is None:
        Z = nce_normaliser(sim, temperature, n_data)
    return nce_loss(sim, temperature, Z, n_data)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order); no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class IPCLCriterion(nn.Module):
    """The IPCL loss with its state: the memory queue (K, D) and the NCE constant Z.

    ``criterion(emb)`` takes (B*N, D) embeddings in ``layout`` order, returns the scalar loss and, in training mode,
    pushes the batch's embeddings (or prototypes with ``store_prototype``), gathered from all ranks in image order,
    to the front of the queue (oldest drop off the end). The queue starts as random unit vectors drawn from
    ``seed`` (the original's uniform init).

    Example:
        >>> crit = IPCLCriterion(n_data=100, out_dim=16, queue_size=32, n_samples=2, loss="softmax")
        >>> crit(torch.randn(8, 16)).shape, crit.queue.shape
        (torch.Size([]), torch.Size([32, 16]))
    """

    # registered buffers (declared for the type checker: nn.Module's __getattr__ types them loosely)
    queue: torch.Tensor
    Z: torch.Tensor

    def __init__(
        self,
        n_data: int,
        out_dim: int = 128,
        queue_size: int = 4096,
        temperature: float = 0.07,
        n_samples: int = 5,
        loss: str = "nce",
        layout: str = "interleaved",
        norm_prototype: bool = False,
        detach_prototype: bool = True,
        store_prototype: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise LayertapError(f"unknown IPCL loss '{loss}': choose {' or '.join(LOSSES)}")
        if layout not in LAYOUTS:
            raise LayertapError(f"unknown sample layout '{layout}': choose {' or '.join(LAYOUTS)}")
        self.n_data, self.temperature, self.n_samples = n_data, temperature, n_samples
        self.loss, self.layout = loss, layout
        self.norm_prototype, self.detach_prototype, self.store_prototype = (
            norm_prototype,
            detach_prototype,
            store_prototype,
        )
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(out_dim / 3)
        init = torch.rand(queue_size, out_dim, generator=g).mul_(2 * stdv).add_(-stdv)
        self.register_buffer("queue", F.normalize(init, dim=1))
        self.register_buffer("Z", torch.tensor(-1.0))  # < 0: not yet set

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        sim, proto = ipcl_similarities(
            emb, self.queue, self.n_samples, self.layout, self.norm_prototype, self.detach_prototype
        )
        if self.loss == "softmax":
            loss = softmax_loss(sim, self.temperature)
        else:
            if self.Z.item() < 0:
                self.Z.fill_(nce_normaliser(sim, self.temperature, self.n_data).item())
                log.info("NCE normalisation constant Z = %.1f", self.Z.item())
            loss = nce_loss(sim, self.temperature, self.Z, self.n_data)
        if self.training:
            with torch.no_grad():
                items = (
                    proto if self.store_prototype else from_layout(F.normalize(emb, dim=1), self.n_samples, self.layout)
                )
                self.push(_gather(items.detach()).reshape(-1, emb.shape[1]))
        return loss

    @torch.no_grad()
    def push(self, items: torch.Tensor) -> None:
        """Put (M, D) items at the front of the queue (newest first), dropping the oldest."""
        k = self.queue.shape[0]
        items = items[:k].to(self.queue.dtype)
        # A new tensor, not an in-place write: this batch's backward still needs the old queue.
        self.queue = torch.cat([items, self.queue[: k - items.shape[0]]])


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class EmbeddingNet(nn.Module):
    """A registry backbone with an IPCL head: flatten -> Linear(out_dim) -> l2 normalisation.

    Example:
        >>> net = EmbeddingNet(nn.Conv2d(3, 4, 8), in_features=4, out_dim=16)
        >>> net(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 16])
    """

    def __init__(self, backbone: nn.Module, in_features: int, out_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(in_features, out_dim)
        self.l2norm = L2Norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2norm(self.fc(torch.flatten(_first_tensor(self.backbone(x)), 1)))


def _first_tensor(out: Any) -> torch.Tensor:
    """The backbone's output tensor, by the one unwrapping rule (:func:`~layertap.extraction.layers.unwrap_output`)."""
    tensor = unwrap_output(out)
    if tensor is None:
        raise LayertapError(f"the backbone returns {type(out).__name__}; IPCL needs a tensor output")
    return tensor


def build_model(
    arch: str = "alexnet_gn", out_dim: int = 128, size: int = 224, seed: int = 0, weights: str = "random"
) -> nn.Module:
    """The network to train: ``alexnet_gn`` (the IPCL AlexNet-GN) or any registry model + head.

    Registry models (``lt.load_model`` names: ``resnet18``, ``timm:...``, ``file.py:factory``) are built with
    ``weights``; their flattened output feeds a new ``Linear(out_dim)`` and l2 normalisation (:class:`EmbeddingNet`).

    Args:
        arch: ``alexnet_gn`` or a model name :func:`~layertap.models.load_model` takes.
        out_dim: the embedding's size.
        size: the input images' side (to measure the backbone's output size).
        seed: the seed of the initialisation.
        weights: the backbone's weights (``"random"`` by default; anything :func:`~layertap.models.load_model` takes).

    Returns:
        The network, in training mode.

    Example:
        >>> net = build_model("alexnet_gn", out_dim=64, seed=1)
        >>> net(torch.zeros(2, 3, 224, 224)).shape
        torch.Size([2, 64])
    """
    if arch in ("alexnet_gn", "ipcl:alexnet_gn"):
        return seeded_build(lambda: AlexNetGN(out_dim, l2norm=True), seed)
    backbone = load_model(arch, weights=weights, seed=seed).module
    backbone.requires_grad_(True)
    with torch.no_grad():
        d = torch.flatten(_first_tensor(backbone.eval()(torch.zeros(2, 3, size, size))), 1).shape[1]
    net = seeded_build(lambda: EmbeddingNet(backbone, d, out_dim), seed)
    return net.train()


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as the released IPCL checkpoints store it: ``module.`` prefixes.

    Args:
        model: the trained network.

    Returns:
        Detached CPU copies of its tensors, keys prefixed with ``module.``.

    Example:
        >>> sorted(checkpoint_state(nn.Linear(2, 1)))
        ['module.bias', 'module.weight']
    """
    return {f"module.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_trained(path: str | os.PathLike[str], device: str = "cpu") -> LoadedModel:
    """A model trained here (a run folder or a checkpoint file) as a :class:`~layertap.models.LoadedModel`.

    Args:
        path: the run folder written by :func:`train_ipcl`, or one of its checkpoint files.
        device: where to put the model.

    Returns:
        The model in eval mode; its transform is the evaluation transform at the training size and normalisation.

    Example:
        >>> model = load_trained("runs/ipcl")  # doctest: +SKIP
        >>> lt.extract(model, "images/", layers=["fc7"], out="acts")  # doctest: +SKIP
    """
    ckpt = read_checkpoint(resolve_checkpoint(path))
    meta = ckpt.get("layertap") or {}
    if not meta:
        raise LayertapError(f"{path} is not a layertap training checkpoint (no 'layertap' entry)")
    model = build_model(meta["arch"], meta["out_dim"], meta["size"], seed=0)
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    model.requires_grad_(False)
    loaded = from_module(
        model.eval(),
        eval_transform(meta["size"], meta["mean"], meta["std"]),
        name=f"ipcl-trained:{meta['arch']}",
        input_size=(3, meta["size"], meta["size"]),
    )
    loaded.provenance["weights"] = {"kind": "file", "path": str(Path(path).resolve()), "epoch": ckpt.get("epoch")}
    return loaded


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A run folder's ``checkpoint.pth.tar``, or the file itself.

    Args:
        path: a run folder written by :func:`train_ipcl`, or a checkpoint file.

    Returns:
        The checkpoint file.

    Raises:
        LayertapError: there is no such folder, file or checkpoint.

    Example:
        >>> resolve_checkpoint("runs/ipcl").name  # doctest: +SKIP
        'checkpoint.pth.tar'
    """
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise LayertapError(f"no checkpoint at {p} (pass a training run folder or a .pth.tar file)")
    return p


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``: no code runs).

    Args:
        path: the checkpoint file.

    Returns:
        Its contents (state_dict, optimiser, RNG states, config, log, ...).

    Raises:
        LayertapError: it cannot be read (one line).

    Example:
        >>> read_checkpoint(Path("runs/ipcl/checkpoint.pth.tar"))["epoch"]  # doctest: +SKIP
        10
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable for whatever reason: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise LayertapError(f"cannot read checkpoint {path}: {first}") from None


# ----------------------------------------------------------------------------------------------
# Configuration, data order, RNG state
# ----------------------------------------------------------------------------------------------


@dataclass
class IPCLConfig:
    """Every setting of a training run (saved in the checkpoint; ``--resume`` reuses them).

    ``batch_size`` is the number of *images* per step over all ranks (each gives ``n_samples`` samples);
    ``batch_multiplier`` accumulates gradients over that many steps per optimiser step. ``lr`` is the peak
    (one-cycle ``max_lr``); the cycle starts at ``lr / div_factor`` and ends at ``lr / div_factor / final_div_factor``.

    Example:
        >>> IPCLConfig(epochs=2, batch_size=16).n_samples
        5
    """

    arch: str = "alexnet_gn"
    arch_weights: str = "random"
    out_dim: int = 128
    size: int = 224
    n_samples: int = 5
    queue_size: int = 4096
    temperature: float = 0.07
    loss: str = "nce"
    layout: str = "interleaved"
    norm_prototype: bool = False
    detach_prototype: bool = True
    store_prototype: bool = False
    epochs: int = 100
    batch_size: int = 128
    batch_multiplier: int = 1
    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "onecycle"
    div_factor: float = 1000.0
    pct_start: float = 0.4
    final_div_factor: float = 1e7
    augment: str = "cpu"
    scale_min: float = 0.2
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    knn_k: int = 200
    knn_every: int = 1
    seed: int = 0

    def check(self) -> None:
        if self.layout not in LAYOUTS:
            raise LayertapError(f"unknown --layout '{self.layout}': choose {' or '.join(LAYOUTS)}")
        if self.loss not in LOSSES:
            raise LayertapError(f"unknown --loss '{self.loss}': choose {' or '.join(LOSSES)}")
        if self.augment not in ("cpu", "tensor"):
            raise LayertapError(f"unknown --augment '{self.augment}': choose cpu or tensor")
        if self.scheduler not in ("onecycle", "cosine", "none"):
            raise LayertapError(f"unknown --scheduler '{self.scheduler}': choose onecycle, cosine or none")
        if self.optimizer != "sgd":
            raise LayertapError(f"unknown --optimizer '{self.optimizer}': only sgd is supported")
        for name in ("n_samples", "batch_size", "batch_multiplier", "epochs", "queue_size", "out_dim", "size"):
            if getattr(self, name) < 1:
                raise LayertapError(f"--{name.replace('_', '-')} must be at least 1")

    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(size=self.size, scale=(self.scale_min, 1.0), mean=self.mean, std=self.std)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (a splitmix-style hash, stable across Python runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches of image indices: a permutation drawn from (seed, epoch), full batches only.

    Args:
        n: the number of images.
        batch_size: images per global batch.
        seed: the run's seed.
        epoch: the epoch (0-based): each epoch has its own order.

    Returns:
        ``n // batch_size`` batches of indices.

    Example:
        >>> epoch_batches(5, 2, seed=0, epoch=0) == epoch_batches(5, 2, seed=0, epoch=0)
        True
    """
    g = torch.Generator().manual_seed(_mix(seed, epoch, 1))
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


class _TrainSet(torch.utils.data.Dataset):
    """Items are (image index, epoch): the N augmented samples (cpu) or the uint8 square (tensor)."""

    def __init__(self, paths: list[str], cfg: IPCLConfig) -> None:
        self.paths, self.cfg = paths, cfg
        self.aug = cpu_augment(cfg.augment_config()) if cfg.augment == "cpu" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, epoch = item
        img = load_rgb(self.paths[index])
        if self.aug is None:
            square, hw = load_square(img, self.cfg.augment_config().load_size)
            return square, torch.tensor(hw), index
        # Per-image seed: the same samples whatever the worker, rank or resume point.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.cfg.seed, epoch, index, 2))
            samples = torch.stack([self.aug(img) for _ in range(self.cfg.n_samples)])
        return samples, torch.tensor([0, 0]), index


class _BatchSampler(torch.utils.data.Sampler):
    """This rank's slice of each global batch, as (index, epoch) items."""

    def __init__(self, batches: list[list[int]], epoch: int, rank: int, world: int) -> None:
        self.batches, self.epoch, self.rank, self.world = batches, epoch, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in self.batches:
            per = len(b) // self.world
            yield [(i, self.epoch) for i in b[self.rank * per : (self.rank + 1) * per]]


def rng_state() -> dict[str, Any]:
    """torch / numpy / python / CUDA RNG states in types ``torch.load(weights_only=True)`` accepts.

    Returns:
        The states, for a checkpoint; :func:`set_rng_state` restores them.

    Example:
        >>> state = rng_state(); a = torch.rand(1); set_rng_state(state)
        >>> torch.equal(a, torch.rand(1))
        True
    """
    np_state = cast("tuple[Any, ...]", np.random.get_state())  # the legacy tuple form (the default)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` saved (CUDA's only where CUDA is available).

    Args:
        state: what :func:`rng_state` returned (possibly through a checkpoint).

    Example:
        >>> state = rng_state(); a = np.random.rand(); set_rng_state(state)
        >>> a == np.random.rand()
        True
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train_ipcl` returns: the per-epoch log, the per-step losses, the checkpoint.

    Example:
        >>> result = train_ipcl("images/", "runs/ipcl", epochs=1)  # doctest: +SKIP
        >>> [row["epoch"] for row in result.history], result.checkpoint.name  # doctest: +SKIP
        ([1], 'checkpoint.pth.tar')
    """

    history: list[dict[str, Any]]
    step_losses: list[float]
    checkpoint: Path
    model: nn.Module
    config: IPCLConfig
    extra: dict[str, Any] = field(default_factory=dict)


def _distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun when there is none yet."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(device: str, rank: int, world: int) -> torch.device:
    """This rank's device: ``device`` resolved and checked (``auto``: cuda, then mps, then cpu); under DDP a bare
    ``cuda`` is the rank's local GPU."""
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _make_optimiser(model: nn.Module, cfg: IPCLConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched: Any = None
    if cfg.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=steps,
            pct_start=cfg.pct_start,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            anneal_strategy="cos",
            cycle_momentum=cfg.momentum > 0,
            base_momentum=0.85,
            max_momentum=0.95,
        )
    elif cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return opt, sched


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def write_logs(out: Path, history: list[dict[str, Any]], step_losses: list[float], plot: bool) -> None:
    """Write ``log.csv`` (one row per epoch), ``log.json`` (plus per-step losses) and ``training.png``.

    Args:
        out: the run folder.
        history: the per-epoch log rows.
        step_losses: every step's loss.
        plot: also draw ``training.png`` (:func:`plot_history`).

    Example:
        >>> write_logs(Path("runs/ipcl"), result.history, result.step_losses, plot=False)  # doctest: +SKIP
    """
    if history:
        keys = list(history[0])
        with open(out / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)
    (out / "log.json").write_text(json.dumps({"history": history, "step_losses": step_losses}, indent=1))
    if plot and history:
        plot_history(history, out / "training.png")


def _require_matplotlib() -> Any:
    require("matplotlib", "plots", "plotting the training history").use("Agg")
    return require("matplotlib.pyplot", "plots", "plotting the training history")


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (left axis) and kNN top-1 % (right axis) per epoch, as a PNG.

    Args:
        history: the per-epoch log rows (``epoch``, ``train_loss``, ``knn_top1``).
        path: the PNG to write.

    Example:
        >>> plot_history(result.history, Path("runs/ipcl/training.png"))  # doctest: +SKIP
    """
    plt = _require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 0.5 ticks
    ax.set_ylabel("loss", color="tab:blue")
    acc = [(h["epoch"], h["knn_top1"]) for h in history if h.get("knn_top1") is not None]
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc, strict=True), "s-", color="tab:red")
        ax2.set_ylabel("kNN top-1 (%)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_ipcl(
    images: str | os.PathLike[str] | ImageSet,
    out: str | os.PathLike[str],
    *,
    val: str | os.PathLike[str] | ImageSet | None = None,
    knn_train: str | os.PathLike[str] | ImageSet | None = None,
    resume: bool | str | os.PathLike[str] = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    keep_checkpoints: bool = False,
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
    plot: bool | str = "auto",
    on_divergence: str = "warn",
    **config: Any,
) -> TrainResult:
    """Train an IPCL model on the images of ``images`` and write a run folder ``out``.

    Every epoch writes ``out/checkpoint.pth.tar`` (``state_dict`` with ``module.`` prefixes, loadable with
    ``lt.load_model("ipcl:alexnet_gn", weights=...)`` for alexnet_gn, plus optimiser, scheduler, queue, Z, epoch,
    RNG states, config, log), ``log.csv``, ``log.json`` and ``training.png``.

    Divergence: a non-finite loss stops training at once with a :class:`~layertap.errors.JobFailedError` that says
    what to try (``out``'s checkpoint stays the last good epoch's). An exploding loss (an epoch's mean loss above
    :data:`EXPLODING_RATIO` x the first epoch's, see :func:`exploding`) is a warning, or with
    ``on_divergence="stop"`` the same error, before that epoch's checkpoint is saved.

    Under ``torchrun`` (or an initialised process group) it trains with DistributedDataParallel: ``batch_size`` is
    global, the queue gathers all ranks, Z comes from all ranks, rank 0 writes.

    Args:
        images: the training images (a folder, a list file or an :class:`~layertap.data.images.ImageSet`).
        out: the run folder to write.
        val: labelled validation images: adds the kNN top-1 accuracy to the log.
        knn_train: the kNN memory bank's images (default: ``images``, which must then be labelled).
        resume: True continues ``out``'s checkpoint (a path: that checkpoint) with its saved settings, bit for bit
            as if never stopped.
        overwrite: replace an existing run in ``out``.
        stop_after: end after this epoch (to resume later).
        keep_checkpoints: also keep every epoch's checkpoint.
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        workers: image-decoding worker processes.
        progress: show progress bars.
        plot: write ``training.png`` (``"auto"``: when matplotlib is installed).
        on_divergence: ``"warn"`` or ``"stop"`` when the loss explodes.
        **config: :class:`IPCLConfig` fields (``arch``, ``epochs``, ``batch_size``, ``lr``, ``n_samples``,
            ``queue_size``, ``temperature``, ``loss``, ``layout``, ``augment="cpu"|"tensor"``, ``size``, ...).

    Returns:
        The per-epoch log, the per-step losses, the checkpoint's path, the trained model and its config.

    Raises:
        LayertapError: bad settings or images; JobFailedError when training diverges.

    Example:
        >>> result = train_ipcl("images/", "runs/ipcl", epochs=2, batch_size=16, queue_size=64)  # doctest: +SKIP
        >>> result.history[-1]["train_loss"], result.checkpoint  # doctest: +SKIP
    """
    out = Path(out)
    if on_divergence not in ON_DIVERGENCE:
        raise LayertapError(f"unknown --on-divergence '{on_divergence}': choose warn or stop")
    rank, world = _distributed()
    ckpt: dict[str, Any] | None = None
    if resume:
        ckpt = read_checkpoint(resolve_checkpoint(out if resume is True else resume))
        unknown = set(config) - {f.name for f in fields(IPCLConfig)}
        if unknown:
            raise LayertapError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        saved = dict(ckpt["config"])
        differ = [k for k, v in config.items() if _plain({k: v})[k] != saved.get(k)]
        if differ:
            raise LayertapError(f"--resume continues with the run's saved settings; these differ: {', '.join(differ)}")
        saved.update({k: tuple(v) for k, v in saved.items() if k in ("mean", "std")})
        cfg = IPCLConfig(**saved)
    else:
        try:
            cfg = IPCLConfig(**config)
        except TypeError as err:
            raise LayertapError(f"unknown training setting: {err}") from None
        if (out / CHECKPOINT).exists() and not overwrite:
            raise LayertapError(f"{out} already holds a training run: pass --resume to continue it or --overwrite")
    cfg.check()
    imageset = images if isinstance(images, ImageSet) else ImageSet.from_path(images)
    if ckpt is not None and ckpt.get("data_fingerprint") not in (None, imageset.fingerprint()):
        raise LayertapError("the training images differ from the run being resumed (paths or order changed)")
    if cfg.batch_size % world:
        raise LayertapError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    if cfg.batch_size > len(imageset):
        raise LayertapError(f"--batch-size {cfg.batch_size} exceeds the {len(imageset)} training images")
    if cfg.queue_size >= (len(imageset) - cfg.batch_size) * cfg.n_samples:
        log.warning(
            "--queue-size %d holds as many samples as the %d images give in a pass (x %d samples): "
            "the queue's negatives include earlier embeddings of the very images being trained on; "
            "use a queue well below (images - batch size) x n_samples",
            cfg.queue_size,
            len(imageset),
            cfg.n_samples,
        )
    val_set = val if isinstance(val, ImageSet) or val is None else ImageSet.from_path(val)
    bank_set = knn_train if isinstance(knn_train, ImageSet) or knn_train is None else ImageSet.from_path(knn_train)
    if val_set is not None:
        bank_set = bank_set or imageset
        labelled(bank_set, "the kNN training images (--images, or --knn-train)")
        labelled(val_set, "--val", bank_set.classes)
    do_plot = plot is True or (plot == "auto" and _has_matplotlib())
    if plot is True:
        _require_matplotlib()

    dev = _device(device, rank, world)
    model = build_model(cfg.arch, cfg.out_dim, cfg.size, cfg.seed, cfg.arch_weights).to(dev).train()
    criterion = IPCLCriterion(
        len(imageset),
        cfg.out_dim,
        cfg.queue_size,
        cfg.temperature,
        cfg.n_samples,
        cfg.loss,
        cfg.layout,
        cfg.norm_prototype,
        cfg.detach_prototype,
        cfg.store_prototype,
        cfg.seed,
    ).to(dev)
    n_batches = len(imageset) // cfg.batch_size
    steps_per_epoch = math.ceil(n_batches / cfg.batch_multiplier)
    opt, sched = _make_optimiser(model, cfg, steps_per_epoch * cfg.epochs)
    start, history, step_losses = 0, [], []
    if ckpt is not None:
        model.load_state_dict({k[len("module.") :]: v for k, v in ckpt["state_dict"].items()})
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        criterion.load_state_dict(ckpt["criterion"])
        start, history, step_losses = ckpt["epoch"], list(ckpt["history"]), list(ckpt["step_losses"])
        set_rng_state(ckpt["rng"])
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    net: nn.Module = model
    if world > 1:
        if dev.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
        elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            log.warning("BatchNorm on CPU under DDP uses each rank's batch statistics (SyncBatchNorm needs CUDA)")
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    dataset = _TrainSet(imageset.paths, cfg)
    tensor_aug = TensorAugment(cfg.augment_config()) if cfg.augment == "tensor" else None
    knn_tf = eval_transform(cfg.size, cfg.mean, cfg.std)
    per_rank = cfg.batch_size // world
    meta = {"arch": cfg.arch, "out_dim": cfg.out_dim, "size": cfg.size, "mean": list(cfg.mean), "std": list(cfg.std)}

    last = min(cfg.epochs, stop_after) if stop_after is not None else cfg.epochs
    warned = False  # about an exploding loss
    for epoch in range(start, last):
        t0 = time.perf_counter()
        batches = epoch_batches(len(imageset), cfg.batch_size, cfg.seed, epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_BatchSampler(batches, epoch, rank, world),
            num_workers=workers,
            pin_memory=dev.type == "cuda",
        )
        bar = _progress(loader, f"epoch {epoch + 1}/{cfg.epochs}", progress and rank == 0)
        losses: list[float] = []
        net.train()
        criterion.train()
        for b, (x, hw, _) in enumerate(bar):
            x = x.to(dev, non_blocking=True)
            if tensor_aug is not None:
                g = torch.Generator().manual_seed(_mix(cfg.seed, epoch, b, 3))
                u = draw_uniforms(cfg.batch_size, cfg.n_samples, g)[rank * per_rank : (rank + 1) * per_rank]
                x = tensor_aug(x, hw, u)
            x = to_layout(x, cfg.layout)  # (B, N, 3, S, S) -> (B*N, 3, S, S)
            sync = (b + 1) % cfg.batch_multiplier == 0 or b + 1 == n_batches
            ctx = (
                cast(nn.parallel.DistributedDataParallel, net).no_sync()  # world > 1: net is the DDP wrapper
                if world > 1 and not sync
                else contextlib.nullcontext()
            )
            with ctx:
                loss = criterion(net(x))
                (loss / cfg.batch_multiplier).backward()
            if sync:
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()
            value = loss.detach().clone()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            losses.append(float(value))
            if not math.isfinite(losses[-1]):  # the same value on every rank (all-reduced): all stop
                kept = f"{out / CHECKPOINT} (epoch {epoch})" if epoch else "no checkpoint (none was saved yet)"
                raise JobFailedError(
                    f"training diverged: the loss became {losses[-1]} at epoch {epoch + 1}, step {b + 1} of "
                    f"{n_batches}; {_what_to_try(cfg)}, and train again with --overwrite (kept: {kept})"
                )
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        seconds = time.perf_counter() - t0
        step_losses.extend(losses)
        top1 = None
        if (
            val_set is not None
            and bank_set is not None
            and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs)
        ):
            if rank == 0:
                top1 = knn_eval(model, bank_set, val_set, knn_tf, dev, cfg.knn_k, cfg.temperature, workers=workers)
            if world > 1:
                dist.barrier()
        row = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / max(len(losses), 1),
            "knn_top1": top1,
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(seconds, 3),
            "images_per_s": round(n_batches * cfg.batch_size / seconds, 2) if seconds > 0 else None,
        }
        history.append(row)
        why = exploding(history)
        if why is not None:
            kept = f"{out / CHECKPOINT} (epoch {epoch})"
            if on_divergence == "stop":
                raise JobFailedError(
                    f"training diverged: {why}; {_what_to_try(cfg)}, and train again with --overwrite (kept: {kept})"
                )
            if rank == 0 and not warned:  # once: later epochs stay far above the first until it recovers
                log.warning("the loss is exploding: %s; %s (or pass --on-divergence stop)", why, _what_to_try(cfg))
            warned = True
        if rank == 0:
            msg = f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}"
            log.info(msg + (f", kNN top-1 {top1:.2f}%" if top1 is not None else ""))
            state = {
                "state_dict": checkpoint_state(model),
                "epoch": epoch + 1,
                "arch": cfg.arch,
                "top1": top1,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "criterion": {k: v.cpu() for k, v in criterion.state_dict().items()},
                "rng": rng_state(),
                "config": _plain(asdict(cfg)),
                "history": history,
                "step_losses": step_losses,
                "data_fingerprint": imageset.fingerprint(),
                "layertap": meta,
            }
            _save(state, out / CHECKPOINT)
            if keep_checkpoints:
                _save(state, out / f"checkpoint_epoch{epoch + 1:03d}.pth.tar")
            write_logs(out, history, step_losses, do_plot)
        if world > 1:
            dist.barrier()
    return TrainResult(history, step_losses, out / CHECKPOINT, model, cfg)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _has_matplotlib() -> bool:
    return package_available("matplotlib")


def _progress(it: Any, desc: str, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch", leave=False)
