"""Models: one registry of sources, one entry point (:func:`load_model`), one loaded-model record.

A *source* (torchvision, timm, CLIP, ...) is a small module under :mod:`layertap.models.sources` that
calls :func:`register_source` when imported. Everything else goes through one path, so every source behaves
the same way: names and loading here, weights and their provenance in :mod:`.weights`, preprocessing in
:mod:`.transforms`:

* ``weights="pretrained"`` loads the source's published weights through its own download/cache
  path and **never** falls back to random weights when that fails;
* ``weights="random"`` is an explicit, seeded, untrained model;
* ``weights="path/to/file.pt"`` loads a state_dict (or a checkpoint dict holding one, with
  ``module.`` prefixes from DataParallel) with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from layertap._optional import package_available, require
from layertap.errors import LayertapError, MissingDependencyError, close_matches
from layertap.models.transforms import Transform, describe_transform, imagenet_transform
from layertap.models.weights import (
    File,
    Weights,
    apply_state_dict,
    check_seed,
    read_state_dict,
    weights_provenance,
    weights_spec,
)


@dataclass
class LoadedModel:
    """A model ready for extraction: the module (eval mode, CPU), its preprocessing, its provenance.

    Attributes:
        module: the ``nn.Module``, in eval mode.
        transform: one RGB ``PIL.Image`` -> a float tensor of shape ``input_size``: (C, H, W), or (C, T, H, W)
            for video models (clips of T frames; their transform takes (T, C, H, W) uint8 frames).
        name: ``source:name``.
        input_size: the input's shape without the batch dimension.
        provenance: exactly what was loaded (source, name, weights id or file sha256, transform), copied
            verbatim into every run's manifest.

    Example:
        >>> m = load_model("resnet18", "random")
        >>> sorted(m.provenance)
        ['input_size', 'name', 'source', 'transform', 'weights']
    """

    module: nn.Module
    transform: Transform
    name: str
    input_size: tuple[int, ...] = (3, 224, 224)
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


@contextmanager
def library_root_logging() -> Iterator[None]:
    """Keep libraries that log through the root logger (open_clip's ``logging.error``) from configuring it.

    A bare ``logging.error(...)`` with no root handler calls ``logging.basicConfig()``, which prints
    ``ERROR:root:...`` lines before layertap's own one-line error. A temporary NullHandler prevents
    that; a root logger the user configured is left as it is.

    Yields:
        Nothing: the guard holds while the ``with`` block runs.

    Example:
        >>> with library_root_logging():
        ...     logging.error("seen by no one")  # no basicConfig, no ERROR:root line
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


@dataclass
class Built:
    """What a source's :meth:`Source.build` hands to the shared finishing step of :meth:`Source.load`.

    Attributes:
        module: the model (for a :class:`~layertap.models.weights.File`, still with its initial weights).
        transform: its preprocessing.
        input_size: the input's shape without the batch dimension.
        weights_id: the full id of the published weights it loaded (e.g. ``ResNet50_Weights.IMAGENET1K_V2``).
        extra: source-specific provenance (config, URL, data config, ...), added to the record.
        weights_target: where a weights file is loaded (default ``module``; CLIP: the full image+text model
            while ``module`` is its image tower).
        recorded: the weights record when the source knows better than the weights asked for (ipcl16's
            published weights are the untrained control; a custom factory's own weights), else None.
        fields: other :class:`LoadedModel` fields (``num_prefix_tokens``, ``layer_aliases``, ...).

    Example:
        >>> Built(nn.Linear(4, 2), transform=lambda x: x, input_size=(4,)).weights_id is None
        True
    """

    module: nn.Module
    transform: Transform
    input_size: tuple[int, ...]
    weights_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    weights_target: nn.Module | None = None
    recorded: dict[str, Any] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """A family of models that :func:`load_model` can build by name: one small adapter per model library.

    :meth:`load` is the same for every source (a template method): the source's :meth:`build` makes the
    architecture with the weights asked for (published ones through its own download/cache path, or a seeded
    initialisation), then :func:`finish_loading` loads a weights file, records provenance and freezes the model.

    Example:
        >>> from layertap.models.weights import Random, seeded_build
        >>> class Tiny(Source):
        ...     name = "tiny"
        ...     def list_models(self): return ["mlp"]
        ...     def build(self, name, weights, seed, **options):
        ...         return Built(seeded_build(lambda: nn.Linear(4, 2), seed), lambda x: x, (4,))
        >>> Tiny().load("mlp", Random(), seed=0).provenance["weights"]
        {'kind': 'random', 'seed': 0}
    """

    name: str = ""
    description: str = ""
    #: the optional package the source needs (None: always there) and the pip extra providing it
    package: str | None = None
    extra: str | None = None

    @abstractmethod
    def list_models(self) -> list[str]:
        """Model names this source can build (without the ``source:`` prefix)."""

    @abstractmethod
    def build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        """Build ``name``: published weights for :class:`~layertap.models.weights.Pretrained`, else the
        architecture initialised from ``seed`` (a :class:`~layertap.models.weights.File` is loaded afterwards)."""

    def load(self, name: str, weights: Weights, seed: int, **options: Any) -> LoadedModel:
        """Build ``name`` with ``weights`` and finish it the same way for every source.

        Args:
            name: the model's name in this source (no ``source:`` prefix).
            weights: what to load.
            seed: the seed of the initialisation.
            **options: the source's own options.

        Returns:
            The loaded model (eval mode, gradients off) with its provenance.

        Example:
            >>> load_model("ipcl:alexnet_gn", "random").provenance["weights"]
            {'kind': 'random', 'seed': 0}
        """
        return finish_loading(self.build(name, weights, seed, **options), f"{self.name}:{name}", weights, seed)

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

    def pretrained_names(self) -> set[str] | None:
        """Names (as :meth:`list_models` spells them) that have published weights: ``weights="pretrained"``
        loads them. None (the default) when the source cannot tell without loading each model."""
        return None


_SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    """Add a source to the registry (each :mod:`layertap.models.sources` module calls it on import).

    A source registered later with the same name replaces the earlier one; bare model names are looked
    up in registration order.

    Args:
        source: the source; its ``name`` is the ``source:`` prefix of its models.

    Returns:
        ``source`` itself (so a module can write ``MY = register_source(MySource())``).

    Example:
        >>> from layertap.models.weights import seeded_build
        >>> class Tiny(Source):
        ...     name = "tiny"
        ...     def list_models(self): return ["mlp"]
        ...     def build(self, name, weights, seed, **options):
        ...         return Built(seeded_build(lambda: nn.Linear(4, 2), seed), lambda x: x, (4,))
        >>> _ = register_source(Tiny())
        >>> load_model("tiny:mlp", "random").provenance["weights"]
        {'kind': 'random', 'seed': 0}
        >>> del _SOURCES["tiny"]
    """
    _SOURCES[source.name] = source
    return source


def _sources() -> dict[str, Source]:
    # The built-in sources register themselves when the package layertap.models is imported.
    return _SOURCES


def list_sources() -> list[str]:
    """The names of the registered sources, installed or not, in lookup order.

    Returns:
        Source names, e.g. ``["torchvision", "ipcl", "custom", "timm", "clip", "hf"]``.

    Example:
        >>> list_sources()[:2]
        ['torchvision', 'ipcl']
    """
    return list(_sources())


def installed_sources(source: str | None = None) -> list[Source]:
    """The installed sources, or just ``source``.

    Args:
        source: one source's name, or None for every source whose package is installed.

    Returns:
        The sources, in lookup order.

    Raises:
        LayertapError: an unknown source.
        MissingDependencyError: ``source``'s package is not installed.

    Example:
        >>> [s.name for s in installed_sources("ipcl")]
        ['ipcl']
    """
    srcs = _sources()
    if source is None:
        return [s for s in srcs.values() if s.available()]
    if source not in srcs:
        raise LayertapError(f"unknown model source '{source}'{close_matches(source, list(srcs))}")
    if not srcs[source].available():
        require(srcs[source].package or source, srcs[source].extra or source)  # raises the install hint
    return [srcs[source]]


def list_models(source: str | None = None) -> list[str]:
    """All loadable model names as ``source:name``, of the installed sources or of one source.

    Args:
        source: one source's name, or None for every installed source.

    Returns:
        Names as :func:`load_model` takes them, sources in lookup order.

    Raises:
        LayertapError: ``source`` is unknown.
        MissingDependencyError: ``source``'s package is not installed.

    Example:
        >>> list_models("ipcl")[:2]
        ['ipcl:alexnet_gn', 'ipcl:ipcl1']
    """
    return [f"{s.name}:{m}" for s in installed_sources(source) for m in s.list_models()]


def resolve_model_name(name: str) -> tuple[Source, str]:
    """Split ``'source:name'`` (or find the source of a bare name) into (source, name).

    Args:
        name: ``source:name``, or a bare name (the first installed source that has it).

    Returns:
        The source and the name within it.

    Raises:
        LayertapError: an unknown model (with close matches).
        MissingDependencyError: the named source's package is not installed.

    Example:
        >>> source, model = resolve_model_name("resnet18")
        >>> source.name, model
        ('torchvision', 'resnet18')
    """
    srcs = _sources()
    if ":" in name and name.split(":", 1)[0] in srcs:
        src_name, model = name.split(":", 1)
        src = srcs[src_name]
        if not src.available():
            raise MissingDependencyError(
                f"model source '{src_name}' needs its package: pip install 'layertap[{src.extra}]'"
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
    name: str, weights: str | os.PathLike[str] | Weights = "pretrained", *, seed: int = 0, **options: Any
) -> LoadedModel:
    """Build a model by name: ``load_model("resnet50")``, ``load_model("torchvision:alexnet", "random")``.

    Args:
        name: ``source:name``, or a bare name (the first source that has it, in :func:`list_sources` order).
        weights: ``"pretrained"`` (the source's default published weights, downloaded or read from its
            cache; an error, never random weights, if they cannot be had), ``"random"`` (untrained,
            initialised reproducibly from ``seed``), a source-specific weights id (e.g. ``"IMAGENET1K_V2"``
            for torchvision), or the path of a state_dict / checkpoint file; or the same as a
            :class:`~layertap.models.weights.Pretrained`, :class:`~layertap.models.weights.Random` or
            :class:`~layertap.models.weights.File`.
        seed: the seed of random weights (0 to 2**64 - 1).
        **options: passed to the source (e.g. ``transform="validation"`` for IPCL, ``config={...}`` for
            Hugging Face models built from a config); recorded in the provenance.

    Returns:
        The model in eval mode on the CPU, with its transform and provenance.

    Raises:
        LayertapError: an unknown model or weights id, a bad seed, an unreadable or unfitting weights file.
        UnavailableError: published weights that cannot be downloaded or read from the cache.

    Example:
        >>> model = load_model("resnet18", "random", seed=1)
        >>> model.name, model.input_size, model.provenance["weights"]
        ('torchvision:resnet18', (3, 224, 224), {'kind': 'random', 'seed': 1})
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


def finish_loading(built: Built, name: str, weights: Weights, seed: int) -> LoadedModel:
    """The step every source shares: load a weights file, record provenance, freeze, wrap.

    Args:
        built: what the source built.
        name: ``source:name``.
        weights: the weights asked for (a :class:`~layertap.models.weights.File` is loaded here, strictly).
        seed: the seed of the initialisation (recorded for random weights).

    Returns:
        The :class:`LoadedModel`; its provenance is ``{"source", "weights", **built.extra}``.

    Example:
        >>> from layertap.models.weights import Random
        >>> finish_loading(Built(nn.Linear(4, 2), lambda x: x, (4,)), "tiny:mlp", Random(), 7).provenance["weights"]
        {'kind': 'random', 'seed': 7}
    """
    target = built.weights_target or built.module
    if isinstance(weights, File):
        apply_state_dict(target, read_state_dict(weights.path), name)
    record = built.recorded or weights_provenance(weights, seed, built.weights_id)
    prov: dict[str, Any] = {"source": name.split(":", 1)[0], "weights": record, **built.extra}
    for p in target.parameters():
        p.requires_grad_(False)
    target.eval()
    return LoadedModel(
        module=built.module.eval(),
        transform=built.transform,
        name=name,
        input_size=built.input_size,
        provenance=prov,
        **built.fields,
    )


def from_module(
    module: nn.Module,
    transform: Transform | None = None,
    name: str = "custom",
    input_size: tuple[int, ...] = (3, 224, 224),
) -> LoadedModel:
    """Wrap any ``nn.Module`` (your own model) so that every layertap function accepts it.

    Args:
        module: the model (put in eval mode).
        transform: one image -> input tensor; default: the ImageNet evaluation transform (resize 256,
            center-crop ``input_size[-1]``).
        name: the name runs record.
        input_size: the input tensor's shape without the batch dimension.

    Returns:
        A :class:`LoadedModel` whose provenance says the weights are the user's module.

    Example:
        >>> from torch import nn
        >>> model = from_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), name="mine")
        >>> model.provenance["weights"], model.input_size
        ({'kind': 'user-module'}, (3, 224, 224))
    """
    if transform is None:
        transform = imagenet_transform(crop=input_size[-1])
    prov = {"source": "custom", "weights": {"kind": "user-module"}}
    return LoadedModel(module=module.eval(), transform=transform, name=name, input_size=input_size, provenance=prov)


def as_loaded(model: nn.Module | LoadedModel) -> LoadedModel:
    """``model`` itself if it is a :class:`LoadedModel`, else :func:`from_module` of it.

    Args:
        model: a loaded model or any ``nn.Module``.

    Returns:
        A :class:`LoadedModel`.

    Example:
        >>> as_loaded(nn.Identity()).provenance["source"]
        'custom'
    """
    return model if isinstance(model, LoadedModel) else from_module(model)
