"""Weighted kNN classification on l2-normalised features (the IPCL / lemniscate evaluation).

Each query's ``k`` most similar bank items (cosine similarity) vote for their class with weight
``exp(sim / T)``; the class with the largest summed weight wins (ties: the lowest class index).
``k`` is capped at the bank size. The paper used k=200, T=0.07 on the 128-d embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layertap.data.images import ImageSet, load_rgb
from layertap.errors import LayertapError


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    n_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores for each query: the summed ``exp(sim/T)`` votes of its k nearest bank items.

    Args:
        bank: (N, D) features of the labelled bank (l2-normalised here).
        bank_labels: (N,) int64 class indices.
        queries: (Q, D) features to classify (l2-normalised here).
        n_classes: the number of classes.
        k: neighbours that vote.
        temperature: T of the votes' weights.
        chunk: queries processed at a time, so memory is O(chunk * N).

    Returns:
        (Q, n_classes) scores.

    Example:
        >>> bank, labels = torch.eye(2), torch.tensor([0, 1])
        >>> knn_predict(bank, labels, torch.tensor([[1.0, 0.1]]), n_classes=2, k=1).argmax(1)
        tensor([0])
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float().to(bank.device), dim=1)
    labels = bank_labels.to(bank.device).long()
    k = min(k, bank.shape[0])
    scores = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], n_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, n_classes)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    n_classes: int,
    k: int = 200,
    temperature: float = 0.07,
) -> float:
    """Top-1 kNN accuracy in percent (0-100).

    Args:
        bank: (N, D) features of the labelled bank.
        bank_labels: (N,) int64 class indices.
        queries: (Q, D) features to classify.
        query_labels: (Q,) their true classes.
        n_classes: the number of classes.
        k: neighbours that vote.
        temperature: T of the votes' weights.

    Returns:
        The percentage of queries whose top class is their label.

    Example:
        >>> bank, labels = torch.eye(2), torch.tensor([0, 1])
        >>> knn_accuracy(bank, labels, torch.eye(2), torch.tensor([0, 0]), n_classes=2, k=1)
        50.0
    """
    scores = knn_predict(bank, bank_labels, queries, n_classes, k, temperature)
    pred = scores.argmax(dim=1).cpu()
    return float((pred == query_labels.cpu().long()).float().mean() * 100) if len(pred) else float("nan")


class _EvalSet(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[i]))


@torch.no_grad()
def embed(
    forward: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[str],
    transform: Callable[[Any], torch.Tensor],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
) -> torch.Tensor:
    """Run ``forward`` (already in eval mode) on every image: (N, D) float32 features on ``device``.

    Args:
        forward: images (B, C, H, W) -> features (B, ...), flattened here.
        paths: the image files.
        transform: one image -> input tensor.
        device: where the batches and features go.
        batch_size: images per forward pass.
        workers: decoding worker processes.

    Returns:
        One row per image, in ``paths`` order.

    Example:
        >>> feats = embed(model.eval(), imageset.paths, eval_transform(224), torch.device("cpu"))  # doctest: +SKIP
    """
    loader = torch.utils.data.DataLoader(_EvalSet(paths, transform), batch_size=batch_size, num_workers=workers)
    out = [forward(x.to(device)).flatten(1).float() for x in loader]
    return torch.cat(out)


def labelled(imageset: ImageSet, what: str, classes: list[str] | None = None) -> torch.Tensor:
    """Targets of a labelled image set as int64, re-indexed to ``classes`` (the training classes).

    Args:
        imageset: a set with class folders.
        what: how messages name the set (``"--val"``, ...).
        classes: the class names the indices refer to (default: the set's own).

    Returns:
        (N,) class indices.

    Raises:
        LayertapError: the set is not labelled, or has classes ``classes`` lacks.

    Example:
        >>> labelled(ImageSet.from_path("val/"), "val").shape  # doctest: +SKIP
    """
    if imageset.targets is None or imageset.classes is None:
        raise LayertapError(f"{what} must be a folder of class subfolders (or a list with a class column)")
    if classes is None:
        return torch.tensor(imageset.targets, dtype=torch.long)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(imageset.classes) - set(index))
    if unknown:
        raise LayertapError(f"{what} has classes the training images lack: {', '.join(unknown[:5])}")
    return torch.tensor([index[imageset.classes[t]] for t in imageset.targets], dtype=torch.long)


def knn_eval(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet,
    transform: Callable[[Any], torch.Tensor],
    device: torch.device,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 64,
    workers: int = 0,
) -> float:
    """kNN top-1 (%) of ``val`` against ``train`` on the model's output (the l2-normalised embedding).

    Args:
        model: the network (its output is the embedding).
        train: the labelled bank images.
        val: the labelled query images (classes among ``train``'s).
        transform: one image -> input tensor (the evaluation transform).
        device: where to run.
        k: neighbours that vote.
        temperature: T of the votes' weights.
        batch_size: images per forward pass.
        workers: decoding worker processes.

    Returns:
        The top-1 accuracy in percent.

    Example:
        >>> knn_eval(net, ImageSet.from_path("train/"), ImageSet.from_path("val/"), eval_transform(),
        ...          torch.device("cpu"))  # doctest: +SKIP
    """
    train_y = labelled(train, "the kNN training images")
    val_y = labelled(val, "the kNN validation images", train.classes)
    was_training = model.training
    model.eval()
    try:
        bank = embed(model, train.paths, transform, device, batch_size, workers)
        queries = embed(model, val.paths, transform, device, batch_size, workers)
    finally:
        model.train(was_training)
    return knn_accuracy(bank, train_y, queries, val_y, len(train.classes or []), k, temperature)
