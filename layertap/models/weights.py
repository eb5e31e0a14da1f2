"""Weights: what ``weights=`` may be, reading and checking weights files, and the provenance record of each kind.

``weights="pretrained"`` (or a source's weights id) is the source's published weights, ``"random"`` a seeded
untrained model, a path a state_dict or checkpoint file read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from layertap.errors import LayertapError, UnavailableError, option_name, option_spelling
from layertap.hashing import file_sha256


def _short_reason(err: BaseException, limit: int = 160) -> str:
    """One short clause for why a download failed: 'offline' in plain words, else the message cut at a word."""
    text = " ".join(str(err).split()) or type(err).__name__
    low = text.lower()
    offline_words = ("local cache", "offline", "name resolution", "network is unreachable", "connection")
    if any(w in low for w in offline_words):
        return "not in the local cache, and the internet cannot be reached"
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def weights_unavailable(what: str, err: BaseException, where: str) -> LayertapError:
    """The one error for published weights that cannot be had (network, hub, cache or hash failure).

    Args:
        what: what could not be loaded, e.g. ``"CLIP weights ViT-B-32/openai"``.
        err: the library's exception (shortened to one clause, never cut mid-word).
        where: how to get them (e.g. where to put the file). Never followed by random weights.

    Returns:
        The error to raise (an :class:`~layertap.errors.UnavailableError`: the environment, not the input).

    Example:
        >>> str(weights_unavailable("weights for x", OSError("offline"), "connect once"))
        "cannot load weights for x (not in the local cache, and the internet cannot be reached); connect once; use weights='random' only if you want an untrained model"
    """
    return UnavailableError(
        f"cannot load {what} ({_short_reason(err)}); {where}; "
        f"use {option_spelling('weights', 'random')} only if you want an untrained model"
    )


def check_seed(seed: int) -> int:
    """``seed`` if torch and numpy can both use it (0 to 2**64 - 1), else a one-line error.

    Args:
        seed: the seed to check (a Python or numpy integer; not a bool).

    Returns:
        ``seed`` as an int.

    Raises:
        LayertapError: not a whole number in range.

    Example:
        >>> check_seed(np.int64(3))
        3
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise LayertapError(f"{option_name('seed')} must be a whole number from 0 to {2**64 - 1}, got {seed}")
    return int(seed)


@dataclass(frozen=True)
class Pretrained:
    """Published weights: the source's default (``id="pretrained"``), or one of the source's weights ids
    (a torchvision enum name, a timm tag, a Hugging Face revision).

    Example:
        >>> Pretrained().default, Pretrained("IMAGENET1K_V2").default
        (True, False)
    """

    id: str = "pretrained"

    @property
    def default(self) -> bool:
        """Whether these are the source's default published weights."""
        return self.id == "pretrained"


@dataclass(frozen=True)
class Random:
    """Untrained weights, initialised reproducibly from the seed :func:`~layertap.models.load_model` is given.

    Example:
        >>> weights_spec("random") == Random()
        True
    """


@dataclass(frozen=True)
class File:
    """A state_dict or checkpoint file, loaded strictly into the built architecture.

    Example:
        >>> File(Path("resnet18.pt")).path.name
        'resnet18.pt'
    """

    path: Path


#: what ``weights=`` means once read: a source builds a model for one of these
Weights = Pretrained | Random | File


def weights_spec(weights: str | os.PathLike[str] | Weights) -> Weights:
    """Read the ``weights`` argument: ``"pretrained"``, ``"random"``, a weights id, or an existing file.

    Args:
        weights: a string or path as users pass it, or an already read :data:`Weights`.

    Returns:
        :class:`Pretrained`, :class:`Random` or :class:`File`.

    Raises:
        LayertapError: something that looks like a path (a separator or a weights-file suffix) does not exist.

    Example:
        >>> weights_spec("random"), weights_spec("IMAGENET1K_V2")
        (Random(), Pretrained(id='IMAGENET1K_V2'))
    """
    if isinstance(weights, (Pretrained, Random, File)):
        return weights
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    w = str(weights)
    if w == "random":
        return Random()
    if w == "pretrained":
        return Pretrained()
    looks_like_path = os.sep in w or "/" in w or w.endswith((".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors"))
    if os.path.exists(w):
        return File(Path(w))
    if looks_like_path:
        raise LayertapError(f"weights file not found: {w}")
    return Pretrained(w)


#: what a builder returns (a module; open_clip: a (model, preprocess, preprocess) tuple)
_Built = TypeVar("_Built")


def seeded_build(builder: Callable[[], _Built], seed: int) -> _Built:
    """Build something with its random initialisation drawn from ``seed``, leaving the global RNG alone.

    Args:
        builder: builds it (a module; open_clip: a (model, preprocess, preprocess) tuple).
        seed: the seed of torch's CPU generator while it builds.

    Returns:
        What ``builder`` returned.

    Example:
        >>> a = seeded_build(lambda: nn.Linear(3, 2), seed=1)
        >>> b = seeded_build(lambda: nn.Linear(3, 2), seed=1)
        >>> torch.equal(a.weight, b.weight)
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes, bytes): what an
    in-memory model computes with, so that a run of other weights is never taken for this one.

    Args:
        module: the model.

    Returns:
        The hex digest (about 0.1 s per 100 MB of weights).

    Example:
        >>> module_fingerprint(nn.Linear(2, 1)) == module_fingerprint(nn.Linear(2, 1))  # other random weights
        False
    """
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a weights file, safely (``weights_only=True``: no code runs).

    Accepts a bare state_dict, or a checkpoint dict holding one under ``state_dict`` (or
    ``model_state_dict``/``model``/...), with DataParallel/DDP ``module.`` prefixes removed.
    ``.safetensors`` files are read with safetensors.

    Args:
        path: the file.

    Returns:
        Parameter name -> tensor.

    Raises:
        LayertapError: the file cannot be read safely, or holds no state_dict.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "ckpt.pt"
        >>> torch.save({"state_dict": {"module.w": torch.ones(2)}}, path)
        >>> read_state_dict(path)
        {'w': tensor([1., 1.])}
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LayertapError(
            f"cannot read weights file {path}: {first[:300]} (it must be a PyTorch state_dict or checkpoint "
            "saved with torch.save; files that need arbitrary code to load are refused)"
        ) from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LayertapError(f"weights file {path} holds no state_dict (a mapping of parameter names to tensors)")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def apply_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` strictly; a mismatch is one error naming the missing/unexpected keys.

    Args:
        module: the model to load into.
        state: parameter name -> tensor (see :func:`read_state_dict`).
        what: the model's name, for the error message.

    Raises:
        LayertapError: missing or unexpected keys, or shapes that differ.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> apply_state_dict(net, {"weight": torch.zeros(1, 2), "bias": torch.ones(1)}, "linear")
        >>> net.bias
        Parameter containing:
        tensor([1.], requires_grad=True)
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch (file vs model): {few(wrong)}")
        raise LayertapError(f"weights do not fit {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def weights_provenance(weights: Weights, seed: int, weights_id: str | None = None) -> dict[str, Any]:
    """The manifest's record of which weights a model computes with.

    Args:
        weights: the weights.
        seed: the seed of random weights.
        weights_id: the source's full id of the published weights it loaded (default: the id asked for).

    Returns:
        ``{"kind": "file", "path", "sha256"}``, ``{"kind": "random", "seed"}`` or ``{"kind": "pretrained", "id"}``.

    Example:
        >>> weights_provenance(Random(), seed=3)
        {'kind': 'random', 'seed': 3}
    """
    if isinstance(weights, File):
        return {"kind": "file", "path": str(weights.path.resolve()), "sha256": file_sha256(weights.path)}
    if isinstance(weights, Random):
        return {"kind": "random", "seed": seed}
    return {"kind": "pretrained", "id": weights_id or weights.id}
