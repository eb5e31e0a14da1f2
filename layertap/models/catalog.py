"""The model catalogue behind ``layertap models``: names, published weights, the extra to install.

Listing timm, open_clip and transformers means importing them (seconds), so each source's
entries are cached on disk, keyed by the versions of layertap, torch/torchvision and the source's
package: a second listing reads a small JSON file per source. A new version of any of them is a new
key, so a stale list is never shown; ``refresh=True`` (``layertap models --refresh``) rebuilds it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from layertap._version import __version__
from layertap.models.registry import Source, installed_sources

log = logging.getLogger("layertap")

#: import name -> distribution name, for the packages whose version keys a source's cached list
_DISTRIBUTIONS = {"timm": "timm", "open_clip": "open_clip_torch", "transformers": "transformers"}


@dataclass(frozen=True)
class ModelEntry:
    """One loadable model as ``layertap models`` shows it.

    Attributes:
        name: ``source:name``, as ``load_model`` takes it.
        pretrained: True when ``weights="pretrained"`` loads published weights, False when the model
            exists only untrained, None when the source cannot tell without loading it.
        extra: the ``pip install 'layertap[extra]'`` the source needs (None: core).
        info: type, training data and details, where the source knows them.

    Example:
        >>> ModelEntry("ipcl:ipcl1", pretrained=True, extra=None, info="ipcl | ImageNet | primary model").name
        'ipcl:ipcl1'
    """

    name: str
    pretrained: bool | None
    extra: str | None
    info: str = ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def cache_file(source: Source) -> Path:
    """Where ``source``'s list is cached: ``$XDG_CACHE_HOME/layertap/models/<source>-<versions>.json``.

    Args:
        source: the source.

    Returns:
        The file's path (keyed by the versions of layertap, torch, torchvision and the source's package).

    Example:
        >>> from layertap.models.registry import installed_sources
        >>> cache_file(installed_sources("ipcl")[0]).name.startswith("ipcl-")
        True
    """
    parts = [source.name, __version__, _version("torch"), _version("torchvision")]
    if source.package is not None:
        parts.append(_version(_DISTRIBUTIONS.get(source.package, source.package)))
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "layertap" / "models" / ("-".join(parts).replace(os.sep, "_") + ".json")


def _build(source: Source) -> list[ModelEntry]:
    have = source.pretrained_names()
    out = []
    for model in source.list_models():
        info = source.model_info(model)
        text = " | ".join(str(info[k]) for k in ("type", "training_data", "details") if info.get(k))
        out.append(ModelEntry(f"{source.name}:{model}", None if have is None else model in have, source.extra, text))
    return out


def source_entries(source: Source, *, refresh: bool = False) -> list[ModelEntry]:
    """Every model of one (installed) source, from the on-disk cache when it is current.

    Args:
        source: a :class:`~layertap.models.registry.Source` whose package is installed.
        refresh: rebuild the list (and the cache) even when a cached one exists.

    Returns:
        The source's models in ``source.list_models()`` order.

    Example:
        >>> from layertap.models.registry import installed_sources
        >>> source_entries(installed_sources("ipcl")[0])[0].name  # doctest: +SKIP
        'ipcl:alexnet_gn'
    """
    path = cache_file(source)
    if not refresh:
        try:
            return [ModelEntry(**e) for e in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            pass  # missing, unreadable or damaged: rebuild
    entries = _build(source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([asdict(e) for e in entries]))
        os.replace(tmp, path)  # atomic: a concurrent listing reads the old file or the new one
    except OSError as err:  # a read-only home: list without caching
        log.debug("cannot cache the model list at %s: %s", path, err)
    return entries


def model_catalog(source: str | None = None, *, refresh: bool = False) -> list[ModelEntry]:
    """Every loadable model of the installed sources (or of one source), with weights and extras.

    Args:
        source: one source's name (``"timm"``...), or None for all installed sources.
        refresh: rebuild the cached lists.

    Returns:
        :class:`ModelEntry` rows, sources in registry order.

    Example:
        >>> [e.name for e in model_catalog("ipcl")][:2]  # doctest: +SKIP
        ['ipcl:alexnet_gn', 'ipcl:ipcl1']
    """
    return [e for s in installed_sources(source) for e in source_entries(s, refresh=refresh)]
