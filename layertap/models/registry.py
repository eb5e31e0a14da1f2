"""Models: one registry of sources, one entry point (:func:`load_model`), one loaded-model record.

A *source* (torchvision, later timm, CLIP, ...) is a small module under ``layertap.sources`` that
calls :func:`register_source` when imported. Everything else — names, weights, transforms,
provenance — goes through the functions here, so every source behaves the same way:

* ``weights="pretrained"`` loads the source's published weights through its own download/cache
  path and **never** falls back to random weights when that fails;
* ``weights="random"`` is an explicit, seeded, untrained model;
* ``weights="path/to/file.pt"`` loads a state_dict (or a checkpoint dict holding one, with
  ``module.`` prefixes from DataParallel) with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layertap.errors import LayertapError, close_matches, option_spelling
from layertap.hashing import file_sha256

Transform = Callable[[Any], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A model ready for extraction: the module (eval mode, CPU), its preprocessing, its provenance.

    ``transform`` maps one RGB ``PIL.Image`` to a float tensor of shape ``input_size`` (C, H, W).
    ``provenance`` says exactly what was loaded (source, name, weights id or file sha256,
    transform) and is copied verbatim into every run's manifest.
    """

    module: nn.Module
    transform: Transform
    name: str
    input_size: tuple[int, int, int] = (3, 224, 224)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: tokens before the patch tokens in transformer outputs (class + register tokens)
    num_prefix_tokens: int = 0
    #: module-name prefixes whose outputs are (sequence, batch, features); stored batch-first
    sequence_first: tuple[str, ...] = ()
    #: extra layer names (e.g. HF 'hidden_states.3') mapped to module names
    layer_aliases: dict[str, str] = field(default_factory=dict)
    #: what else a source hands over (CLIP: the full model and its tokenizer)
    components: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module.eval()
        self.provenance.setdefault("name", self.name)
        self.provenance.setdefault("transform", describe_transform(self.transform))
        self.provenance.setdefault("input_size", list(self.input_size))


def require(package: str, extra: str) -> Any:
    """Import an optional package, or fail with the one-line install hint."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise LayertapError(
            f"this needs the '{package}' package: pip install 'layertap[{extra}]'", exit_code=1
        ) from None


def package_available(package: str) -> bool:
    import importlib.util
    import sys

    if package in sys.modules:
        return sys.modules[package] is not None  # None: import blocked on purpose
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


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
        The error to raise (exit code 1: the environment, not the input).
    """
    return LayertapError(
        f"cannot load {what} ({_short_reason(err)}); {where}; "
        f"use {option_spelling('weights', 'random')} only if you want an untrained model",
        exit_code=1,
    )


@contextmanager
def library_root_logging() -> Iterator[None]:
    """Keep libraries that log through the root logger (open_clip's ``logging.error``) from configuring it.

    A bare ``logging.error(...)`` with no root handler calls ``logging.basicConfig()``, which prints
    ``ERROR:root:...`` lines before layertap's own one-line error. A temporary NullHandler prevents
    that; a root logger the user configured is left as it is.
    """
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


class Source(ABC):
    """A family of models that :func:`load_model` can build by name."""

    name: str = ""
    description: str = ""
    #: the optional package the source needs (None: always there) and the pip extra providing it
    package: str | None = None
    extra: str | None = None

    @abstractmethod
    def list_models(self) -> list[str]:
        """Model names this source can build (without the ``source:`` prefix)."""

    @abstractmethod
    def load(self, name: str, weights: str | Path, seed: int, **options: Any) -> LoadedModel:
        """Build ``name`` with ``weights`` ('pretrained', 'random', a weights id, or a file)."""

    def available(self) -> bool:
        """Whether the source's package is installed (sources without one always are)."""
        return self.package is None or package_available(self.package)

    def lib(self) -> Any:
        """The source's package, imported now (or the one-line install hint)."""
        assert self.package is not None
        return require(self.package, self.extra or self.package)

    def has_model(self, name: str) -> bool:
        return name in self.list_models()

    def model_info(self, name: str) -> dict[str, Any]:
        """Extra metadata shown by ``layertap models`` (training data, paper, ...)."""
        return {}


_SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    """Add a source to the registry (called by each ``layertap.sources`` module on import)."""
    _SOURCES[source.name] = source
    return source


def _sources() -> dict[str, Source]:
    # The built-in sources register themselves when the package layertap.models is imported.
    return _SOURCES


def list_sources() -> list[str]:
    return list(_sources())


def installed_sources(source: str | None = None) -> list[Source]:
    """The installed sources, or just ``source`` (an unknown or uninstalled one is a one-line error)."""
    srcs = _sources()
    if source is None:
        return [s for s in srcs.values() if s.available()]
    if source not in srcs:
        raise LayertapError(f"unknown model source '{source}'{close_matches(source, list(srcs))}")
    if not srcs[source].available():
        require(srcs[source].package or source, srcs[source].extra or source)  # raises the install hint
    return [srcs[source]]


def list_models(source: str | None = None) -> list[str]:
    """All loadable model names as ``source:name``, optionally for one source only."""
    return [f"{s.name}:{m}" for s in installed_sources(source) for m in s.list_models()]


def resolve_model_name(name: str) -> tuple[Source, str]:
    """Split ``'source:name'`` (or find the source of a bare name) into (source, name)."""
    srcs = _sources()
    if ":" in name and name.split(":", 1)[0] in srcs:
        src_name, model = name.split(":", 1)
        src = srcs[src_name]
        if not src.available():
            raise LayertapError(
                f"model source '{src_name}' needs its package: pip install 'layertap[{src.extra}]'", exit_code=1
            )
        if not src.has_model(model):
            raise LayertapError(
                f"unknown model '{model}' in source '{src_name}'"
                f"{close_matches(model, src.list_models())}; run 'layertap models --source {src_name}'"
            )
        return src, model
    for src in srcs.values():
        if src.available() and src.has_model(name):
            return src, name
    every = [m.split(":", 1)[1] for m in list_models()]
    raise LayertapError(f"unknown model '{name}'{close_matches(name, every)}; run 'layertap models' to list them")


def load_model(
    name: str, weights: str | os.PathLike[str] = "pretrained", *, seed: int = 0, **options: Any
) -> LoadedModel:
    """Build a model by name: ``load_model("resnet50")``, ``load_model("torchvision:alexnet", "random")``.

    ``weights``: ``"pretrained"`` (the source's default published weights, downloaded or read
    from its cache; an error — never random weights — if they cannot be had), ``"random"``
    (untrained, initialised reproducibly from ``seed``), a source-specific weights id (e.g.
    ``"IMAGENET1K_V2"`` for torchvision), or the path of a state_dict / checkpoint file.
    ``options`` go to the source (e.g. ``transform="validation"`` for IPCL, ``config={...}`` for
    Hugging Face models built from a config).
    """
    check_seed(seed)
    src, model = resolve_model_name(name)
    loaded = src.load(model, weights_spec(weights), seed, **options)
    if options:
        # Options change the numbers (custom factories' arguments, configs): they are part of the
        # provenance, hence of the job's identity that a resume compares.
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps(options, sort_keys=True, default=_option_json))
        loaded.provenance.setdefault("options", json.loads(text))
    return loaded


def _option_json(obj: Any) -> Any:
    """JSON for an option value json cannot write: a set sorted (its order varies between processes
    and with insertion history), anything else its repr."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def check_seed(seed: int) -> int:
    """``seed`` if torch and numpy can both use it (0 to 2**64 - 1), else a one-line error."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise LayertapError(f"--seed must be a whole number from 0 to {2**64 - 1}, got {seed}")
    return int(seed)


def weights_spec(weights: str | os.PathLike[str]) -> str | Path:
    """Normalise the ``weights`` argument: 'pretrained', 'random', an id, or an existing Path."""
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    w = str(weights)
    if w in ("pretrained", "random"):
        return w
    looks_like_path = os.sep in w or "/" in w or w.endswith((".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors"))
    if os.path.exists(w):
        return Path(w)
    if looks_like_path:
        raise LayertapError(f"weights file not found: {w}")
    return w


def seeded_build(builder: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with its random initialisation drawn from ``seed``, leaving global RNG alone."""
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
    """Load ``state`` strictly; a mismatch is one error naming the missing/unexpected keys."""
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


def imagenet_transform(resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> Transform:
    """The standard ImageNet evaluation transform: resize shorter side, center crop, normalise."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    return T.Compose(
        [
            T.Resize(resize, interpolation=mode, antialias=True),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def describe_transform(transform: Any) -> str:
    """A one-line, stable description of a transform for manifests."""
    # without memory addresses (a function's repr has one), so that a resume in a new process agrees
    return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(transform).split()))


def finish_loading(
    module: nn.Module,
    transform: Transform,
    name: str,
    input_size: tuple[int, int, int],
    weights: str | Path,
    seed: int,
    weights_id: str | None = None,
    extra: dict[str, Any] | None = None,
    weights_target: nn.Module | None = None,
    **fields: Any,
) -> LoadedModel:
    """Record provenance for ``weights`` (and load them from a file) the same way for every source.

    A weights file is loaded into ``weights_target`` (default ``module``; CLIP loads the full
    image+text model while ``module`` is its image tower). ``fields`` set LoadedModel fields.
    """
    prov: dict[str, Any] = {"source": name.split(":", 1)[0]}
    if isinstance(weights, Path):
        apply_state_dict(weights_target or module, read_state_dict(weights), name)
        prov["weights"] = {"kind": "file", "path": str(weights.resolve()), "sha256": file_sha256(weights)}
    elif weights == "random":
        prov["weights"] = {"kind": "random", "seed": seed}
    else:
        prov["weights"] = {"kind": "pretrained", "id": weights_id or str(weights)}
    prov.update(extra or {})
    for p in (weights_target or module).parameters():
        p.requires_grad_(False)
    (weights_target or module).eval()
    return LoadedModel(
        module=module.eval(), transform=transform, name=name, input_size=input_size, provenance=prov, **fields
    )


def from_module(
    module: nn.Module,
    transform: Transform | None = None,
    name: str = "custom",
    input_size: tuple[int, int, int] = (3, 224, 224),
) -> LoadedModel:
    """Wrap any ``nn.Module`` (your own model) so that every layertap function accepts it.

    ``transform`` defaults to the ImageNet evaluation transform (resize 256, crop 224).
    """
    if transform is None:
        transform = imagenet_transform(crop=input_size[-1])
    prov = {"source": "custom", "weights": {"kind": "user-module"}}
    return LoadedModel(module=module.eval(), transform=transform, name=name, input_size=input_size, provenance=prov)


def as_loaded(model: nn.Module | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else from_module(model)
