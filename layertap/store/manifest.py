"""The manifest of a run (``manifest.json``): a typed object with a schema version, one reader, one writer.

What a run records (model, weights, transform, layers, images, options, status) is a :class:`Manifest`. It is
written only by :func:`write_manifest` (atomically, fsynced) and read only by :func:`read_manifest`, which
checks its structure and upgrades older schemas: runs written before ``schema_version`` existed are schema 0
and differ from schema 1 only by lacking the field. A manifest of a newer schema than this layertap knows is
refused in one line that says to upgrade.

For code (and users) that read the manifest as JSON, :class:`Manifest` is also a read-only mapping of its
JSON object: ``run.manifest["images"]["rows"]`` is ``run.manifest.images["rows"]``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypedDict

from layertap.errors import StorageError
from layertap.store.files import MANIFEST, disk_error, read_run_json, write_json_atomic

#: the manifest schema this layertap writes (and the newest it reads)
SCHEMA_VERSION = 1

_FIX = "restore it, or re-run the extract command with --overwrite to redo the run"


class LayerInfo(TypedDict, total=False):
    """One stored layer: ``shape`` (without the image axis) and ``dtype`` always; the rest when it applies."""

    shape: list[int]
    dtype: str
    module: str
    reduce: str
    #: a projection reducer that had nothing to reduce (``"srp:4096: 1000 units <= 4096"``)
    reduce_skipped: str
    layout: str
    #: a postprocessed layer: the source layer(s) it was computed from
    derived_from: str | list[str]


class StorageInfo(TypedDict):
    """How the arrays are stored."""

    format: str
    chunk_rows: int
    compression: str | None


class ImagesSection(TypedDict, total=False):
    """The stimuli: one ``rows`` entry per stored row (path, target, class, frame, ...) and the skipped."""

    root: str | None
    layout: str | None
    n_total: int
    n_stored: int
    classes: list[str] | None
    concepts: Any
    selection: Any
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]]


class ShardInfo(TypedDict):
    """Which slice of a job a shard run holds, and what the merged run will record."""

    index: int
    count: int
    offset: int
    parent: str
    parent_spec: dict[str, Any]
    parent_images: dict[str, Any]


@dataclass(eq=False, kw_only=True)
class Manifest:
    """What a run is: written by :func:`write_manifest`, read by :func:`read_manifest`.

    Every field but ``status``, ``spec`` and ``layers`` is optional: ``None`` leaves it out of the JSON
    (a run being written has no ``images`` rows yet; only shard runs have ``shard``). Keys this schema
    does not name are kept in ``extra`` and written back as they were.

    Args:
        status: ``"running"`` while being written, ``"complete"`` once finished.
        spec: what identifies the job (re-running the same spec resumes; another spec is refused).
        layers: per stored layer, its :class:`LayerInfo`.
        storage: chunking and compression of the arrays.
        images: the stimuli and their rows (:class:`ImagesSection`).
        layertap: the kind of directory (``"run"``).
        created: when the run was started (ISO 8601, UTC).
        finished: when it was completed.
        versions: versions of python, layertap, torch and the other libraries that wrote it.
        command: the command line, when run from the ``layertap`` command.
        model: the model's provenance (source, name, weights, transform).
        layers_requested: the layers as asked for (names, globs, aliases).
        layer_aliases: alias asked for -> the real name stored.
        options: the extraction options.
        decode: how images were decoded.
        compiled: whether the compiled graph ran (else hooks).
        values: NaN/inf and float16 overflow counts per layer.
        backend: the inference engine that ran the model (a record of its own).
        shard: for a shard run, which slice it holds (:class:`ShardInfo`).
        merged_from: for a merged run, the shard runs it was merged from.
        per_shard: for a merged run whose shards ran differently (other library versions, an engine that
            fell back to torch in one shard, ...): per such field, every shard's value, in shard order
            (the top-level field is the first shard's).
        postprocessing: for a postprocessed run, each postprocessing step (source, steps, layers).
        postprocessing_unfinished: the source run, while a postprocess output is being written.
        extra: any other top-level key, kept verbatim.
        schema_version: the schema this manifest follows (:data:`SCHEMA_VERSION` when written).

    Example:
        >>> m = Manifest(spec={"n_images": 2}, layers={"fc": {"shape": [10], "dtype": "float32"}})
        >>> m.layers["fc"]["shape"], m["status"], m.to_dict()["schema_version"]
        ([10], 'running', 1)
    """

    # in the order the JSON object is written (that of manifests written before schema_version)
    layertap: str | None = None
    schema_version: int = SCHEMA_VERSION
    created: str | None = None
    versions: dict[str, Any] | None = None
    command: list[str] | None = None
    model: dict[str, Any] | None = None
    layers_requested: list[str] | None = None
    layer_aliases: dict[str, str] | None = None
    options: dict[str, Any] | None = None
    decode: dict[str, Any] | None = None
    shard: ShardInfo | None = None
    merged_from: list[str] | None = None
    per_shard: dict[str, list[Any]] | None = None
    images: ImagesSection | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    storage: StorageInfo | None = None
    postprocessing: list[dict[str, Any]] | None = None
    postprocessing_unfinished: str | None = None
    finished: str | None = None
    compiled: bool | None = None
    backend: dict[str, Any] | None = None
    values: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- the JSON object ---------------------------------------------------------------------------
    def _items(self) -> Iterator[tuple[str, Any]]:
        """The JSON object's (key, value) pairs, in the order they are written."""
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is not None or (f.name == "command" and self.layertap is not None):
                yield f.name, value  # a run's "command" is null when not run from the command line
        yield from self.extra.items()

    def to_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object written to ``manifest.json``.

        Returns:
            A dict (shares its nested values with this manifest: copy before changing them).

        Example:
            >>> Manifest(status="complete").to_dict()
            {'schema_version': 1, 'spec': {}, 'status': 'complete', 'layers': {}}
        """
        return dict(self._items())

    def to_json(self) -> str:
        """The text of ``manifest.json``.

        Returns:
            Indented JSON.
        """
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str | os.PathLike[str] = MANIFEST) -> Manifest:
        """A manifest from its JSON object, upgraded to :data:`SCHEMA_VERSION`.

        Args:
            obj: the JSON object (a schema 0 one has no ``schema_version``).
            where: the file it came from, for the error messages.

        Returns:
            The manifest (sharing nested values with ``obj``).

        Raises:
            LayertapError: a newer schema than this layertap reads, or fields of the wrong type.

        Example:
            >>> Manifest.from_dict({"status": "complete", "spec": {}, "layers": {}, "note": 1}).extra
            {'note': 1}
        """
        version = obj.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise StorageError(f"{where} is damaged (schema_version {version!r}); {_FIX}")
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{where} was written by a newer layertap (manifest schema {version}; this layertap reads up to "
                f"{SCHEMA_VERSION}): upgrade layertap (pip install -U layertap)")
        known = {f.name for f in fields(cls)} - {"extra", "schema_version"}
        kwargs = {k: v for k, v in obj.items() if k in known}
        extra = {k: v for k, v in obj.items() if k not in known and k not in ("schema_version", "extra")}
        if "extra" in obj:  # a key of that name is the user's, not ours
            extra["extra"] = obj["extra"]
        # schema 0 -> 1: only schema_version was added; nothing else to convert
        return cls(**kwargs, extra=extra, schema_version=SCHEMA_VERSION)

    def copy(self) -> Manifest:
        """A deep copy (nothing shared)."""
        return copy.deepcopy(self)

    def updated(self, **sections: Any) -> Manifest:
        """A copy with these top-level fields replaced (a key that is no field goes to ``extra``).

        Args:
            **sections: field name -> new value.

        Returns:
            The new manifest (nested values are shared, not copied).

        Example:
            >>> Manifest().updated(status="complete", note="x").extra
            {'note': 'x'}
        """
        known = {f.name for f in fields(self)} - {"extra", "schema_version"}
        extra = {**self.extra, **{k: v for k, v in sections.items() if k not in known}}
        return replace(self, **{k: v for k, v in sections.items() if k in known}, extra=extra)

    # -- read-only mapping of the JSON object (what code reading manifest.json as JSON expects) --------
    # Not a collections.abc.Mapping: its values() would clash with the ``values`` field (the value counts).
    def __getitem__(self, key: str) -> Any:
        for k, v in self._items():
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, or ``default`` when the JSON object has no such key."""
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        """The JSON object's keys (``dict(manifest)`` and ``{**manifest}`` work)."""
        return [k for k, _ in self._items()]

    def items(self) -> list[tuple[str, Any]]:
        """The JSON object's (key, value) pairs."""
        return list(self._items())

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self._items())

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items())

    def __len__(self) -> int:
        return sum(1 for _ in self._items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Manifest, Mapping)):
            return self.to_dict() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    # -- what code asks of a manifest --------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Whether the run is finished."""
        return self.status == "complete"

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The image rows (``images["rows"]``); empty while there are none."""
        rows = self.images.get("rows") if self.images is not None else None
        return rows if isinstance(rows, list) else []

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk of the arrays (0 before they exist)."""
        return int(self.storage.get("chunk_rows") or 0) if self.storage is not None else 0


def check_manifest(m: Mapping[str, Any], where: Path) -> None:
    """Refuse, in one line, a manifest whose structure is broken (hand-edited, truncated by a tool).

    Args:
        m: the JSON object.
        where: the run directory (for the message).

    Raises:
        LayertapError: required fields are missing or of the wrong type.
    """
    layers = m.get("layers", {})
    ok = isinstance(m.get("spec", {}), dict) and isinstance(layers, dict)
    ok = ok and all(isinstance(v, dict) and isinstance(v.get("shape"), list) and "dtype" in v for v in layers.values())
    if ok and m.get("status") == "complete":
        imgs = m.get("images")
        ok = isinstance(imgs, dict) and isinstance(imgs.get("rows"), list)
    if not ok or "status" not in m:
        raise StorageError(f"{where / MANIFEST} is damaged (required fields missing); {_FIX}")


def read_manifest(path: str | os.PathLike[str], fix: str = _FIX) -> Manifest:
    """Read a run's manifest: the one reader of ``manifest.json``.

    Args:
        path: the run directory, or its ``manifest.json``.
        fix: what the user can do about a damaged file (ends the message).

    Returns:
        The :class:`Manifest`, upgraded to :data:`SCHEMA_VERSION`.

    Raises:
        LayertapError: the file is unreadable, damaged, or of a newer schema (one line each).

    Example:
        >>> m = read_manifest("runs/resnet18")  # doctest: +SKIP
        >>> m.model["name"], m.layers["avgpool"]["shape"]  # doctest: +SKIP
        ('torchvision:resnet18', [512, 1, 1])
    """
    p = Path(path)
    run_dir, file = (p.parent, p) if p.name == MANIFEST else (p, p / MANIFEST)
    obj = read_run_json(file, fix)
    manifest = Manifest.from_dict(obj, file)
    check_manifest(obj, run_dir)
    return manifest


def write_manifest(run_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write ``run_dir/manifest.json``: the one writer (atomic and fsynced: readers see the old or the new file).

    Args:
        run_dir: the run directory.
        manifest: what to write (``schema_version`` is set to :data:`SCHEMA_VERSION`).

    Raises:
        LayertapError: the disk is full or not writable (one line; the run can be resumed).

    Example:
        >>> write_manifest(tmp, Manifest(spec={"n_images": 3}))  # doctest: +SKIP
    """
    manifest.schema_version = SCHEMA_VERSION
    path = Path(run_dir) / MANIFEST
    try:
        write_json_atomic(path, manifest.to_dict())
    except OSError as err:
        raise disk_error(err, path) from None


def spec_diff(old: Any, new: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """The fields (dotted, e.g. ``model.options.scale``) in which two job specs differ.

    Args:
        old: one spec.
        new: the other.
        prefix: prepended to every field (for the recursion).
        depth: how deep to name fields.

    Returns:
        The differing fields, sorted.

    Example:
        >>> spec_diff({"model": {"name": "a"}, "n": 1}, {"model": {"name": "b"}, "n": 1})
        ['model.name']
    """
    if isinstance(old, dict) and isinstance(new, dict) and depth > 0:
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                out += spec_diff(old.get(k), new.get(k), f"{prefix}{k}.", depth - 1) or [f"{prefix}{k}"]
        return out
    return [prefix.rstrip(".")] if old != new and prefix else []


def row_label(row: Mapping[str, Any]) -> str:
    """A row's name: the rows of a video share its file, so each gets a unique one.

    Args:
        row: a manifest row (``path`` and, for videos/arrays, ``id``, ``frame``, ``frames``).

    Returns:
        ``id`` when given, else ``path#first-last`` (a clip), ``path#frame`` (a frame), else ``path``
        (an image file; an array row's path is already ``file[index]``).

    Example:
        >>> row_label({"path": "a.mp4", "frame": 3}), row_label({"path": "x.jpg"})
        ('a.mp4#3', 'x.jpg')
    """
    if row.get("id"):
        return str(row["id"])
    path = row["path"]
    if "frames" in row:
        return f"{path}#{row['frames'][0]}-{row['frames'][1]}"
    if "frame" in row:
        return f"{path}#{row['frame']}"
    return str(path)
