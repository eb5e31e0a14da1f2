"""Extraction of a dataset: :func:`extract` streams the outputs of named layers into a run directory.

The flow, one object per step::

    extract(...)  ->  ExtractConfig  ->  prepare()  ->  Job  ->  _run_batches()  ->  RunWriter
    (arguments)       (checked once)     (model, stimuli,       (decode, tap,       (the store)
                                          layers, tap, device)    check, write)

:func:`layertap.plan` runs the same :func:`prepare` step. The tap itself (hooks or a compiled
graph) is :class:`layertap.extraction.tap.Extractor`; sharding is an option of :func:`extract`
that calls into :mod:`layertap.shards`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layertap.data.images import ALPHA_BACKGROUND, ImageSet, draft_size
from layertap.data.stimuli import open_stimuli
from layertap.devices import resolve_device
from layertap.errors import LayertapError, LayertapFailure, option_name, option_spelling
from layertap.extraction.aliases import used_aliases
from layertap.extraction.engines import check_backend, describe_backend, resolve_backend
from layertap.extraction.layers import resolve_layers
from layertap.extraction.tap import Extractor, check_autocast
from layertap.models.registry import LoadedModel, as_loaded, load_model
from layertap.models.weights import check_seed, module_fingerprint
from layertap.shards.merge import try_merge
from layertap.shards.spec import resolve_shard, shard_device, shard_dir
from layertap.store.blocks import STORAGE_DTYPES
from layertap.store.files import ARRAYS, MANIFEST, PROGRESS, disk_error, write_text_atomic
from layertap.store.manifest import ImagesSection, LayerInfo, Manifest, ShardInfo, read_manifest
from layertap.store.run import Run
from layertap.store.writer import RunWriter

log = logging.getLogger("layertap")


@dataclass(frozen=True)
class ExtractConfig:
    """Every setting of an extraction job (all but the model, images, layers and ``out``), checked once.

    The fields and their defaults are :func:`extract`'s keyword arguments; see there.

    Raises:
        LayertapError: a setting out of range (dtype, on_error, batch_size, workers, chunk_rows,
            seed, autocast), when the config is made.

    Example:
        >>> ExtractConfig(batch_size=32, reduce="avg").tap_settings()["reduce"]
        'avg'
    """

    weights: str = "pretrained"
    batch_size: int = 64
    device: str | torch.device = "auto"
    workers: int | None = None
    flatten: bool = False
    reduce: str | dict[str, str] | None = None
    dtype: str = "float32"
    fraction: float | None = None
    seed: int = 0
    things: bool = False
    on_error: str = "skip"
    overwrite: bool = False
    channels_last: bool | str = "auto"
    chunk_rows: int | None = None
    exif_transpose: bool = True
    fast_decode: bool = False
    fold_bn: bool = True
    compile: bool = False
    autocast: str | None = None
    backend: str = "auto"
    shard: str | tuple[int, int] | None = "auto"
    merge: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise LayertapError(f"unknown dtype '{self.dtype}'; choose one of {', '.join(STORAGE_DTYPES)}")
        if self.on_error not in ("skip", "fail"):
            raise LayertapError(f"{option_name('on_error')} must be 'skip' or 'fail', not '{self.on_error}'")
        if self.batch_size < 1:
            raise LayertapError(f"{option_name('batch_size')} must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise LayertapError(f"{option_name('workers')} must be 0 (decode in this process) or more, got {self.workers}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise LayertapError(
                f"{option_name('chunk_rows')} must be at least 1, got {self.chunk_rows} (leave it out for ~16 MB chunks)"
            )
        check_seed(self.seed)
        check_autocast(self.autocast)
        check_backend(self.backend)

    def tap_settings(self) -> dict[str, Any]:
        """The settings that make the tap (compared with those of an :class:`Extractor` passed as the model)."""
        return {
            "flatten": self.flatten,
            "stop_early": True,
            "reduce": self.reduce,
            "compile": self.compile,
            "autocast": self.autocast,
            "fold_bn": self.fold_bn,
        }


@dataclass
class Job:
    """A prepared extraction: the config and what :func:`prepare` built from it.

    Attributes:
        config: the settings.
        model: the model as given, with the provenance that identifies the job.
        imageset: the stimuli (after ``fraction``; a shard's slice for a shard).
        tap: the tap, its module on ``device``.
        device: where the model runs.
        channels_last: whether the module uses channels_last memory.
        draft: the JPEG draft size (``fast_decode``), or None.
    """

    config: ExtractConfig
    model: LoadedModel
    imageset: ImageSet
    tap: Extractor
    device: torch.device
    channels_last: bool
    draft: int | None

    @property
    def layers(self) -> list[str]:
        """The resolved layer names."""
        return self.tap.layers


def prepare(
    model: nn.Module | LoadedModel | Extractor | str,
    images: str | os.PathLike[str] | ImageSet,
    layers: str | list[str],
    config: ExtractConfig,
) -> Job:
    """Load the model, open the stimuli, resolve the layers, build the tap and place it on the device.

    Shared by :func:`extract` and :func:`layertap.plan`.

    Args:
        model: a loaded model, any ``nn.Module``, a name for :func:`load_model` (with
            ``config.weights`` and ``config.seed``) or an :class:`Extractor` to reuse (its layers and
            tap settings must be the ones asked for).
        images: a folder, a .txt/.csv list, a video, a stimulus array or an :class:`ImageSet`.
        layers: names or globs.
        config: the settings.

    Returns:
        The :class:`Job`.

    Raises:
        LayertapError: unknown layers, unreadable stimuli, an unavailable device, or an
            :class:`Extractor` built with other layers or settings.

    Example:
        >>> job = prepare("resnet18", "photos/", ["avgpool"], ExtractConfig(weights="random"))
    """
    held = model if isinstance(model, Extractor) else None
    if isinstance(model, Extractor):
        loaded = model.model
    elif isinstance(model, str):
        loaded = load_model(model, config.weights, seed=config.seed)
    else:
        loaded = as_loaded(model)
    # images, videos (frames or clips, by the model) or a stimulus array
    imageset = images if isinstance(images, ImageSet) else open_stimuli(images, things=config.things, model=loaded)
    if config.fraction is not None:
        imageset = imageset.subset(config.fraction, config.seed)
    names = resolve_layers(loaded, layers)
    draft = None
    if config.fast_decode:
        draft = draft_size(loaded.transform)
        if draft is None:
            log.warning("fast_decode: cannot tell this model's resize size from its transform; decoding fully")
    dev = resolve_device(config.device)
    # decided from the whole job (all shards), so that a resume and every shard choose the same
    backend = resolve_backend(config.backend, dev.type, len(imageset), compile=config.compile, autocast=config.autocast)
    if held is not None:
        _check_held(held, names, config)
        tap = held
    else:
        tap = Extractor(loaded, names, **config.tap_settings(), backend=backend)
    use_cl = tap.to_device(dev, config.channels_last)
    return Job(config, loaded, imageset, tap, dev, use_cl, draft)


def _check_held(tap: Extractor, names: list[str], config: ExtractConfig) -> None:
    """Refuse an Extractor whose layers or tap settings differ from the job's (they define what is stored)."""
    if names != tap.layers:
        raise LayertapError(
            f"the Extractor taps {', '.join(tap.layers)}, not the layers asked for ({', '.join(names)})"
        )
    wanted = config.tap_settings()
    if config.backend != "auto":  # "auto" takes the held tap's backend
        wanted["backend"] = config.backend
    differ = [k for k, v in wanted.items() if tap.settings.get(k) != v]
    if differ:
        have = ", ".join(f"{k}={tap.settings.get(k)!r}" for k in differ)
        raise LayertapError(f"the Extractor was built with {have}: pass the same to extract (or build another)")


def identify_model(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with an in-memory module's weights hashed into its provenance.

    The weights' content of a module the caller built is part of the job: a resume must not mix models.
    """
    if loaded.provenance.get("weights", {}).get("kind") != "user-module":
        return loaded
    weights_id = {**loaded.provenance["weights"], "sha256": module_fingerprint(loaded.module)}
    return replace(loaded, provenance={**loaded.provenance, "weights": weights_id})


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array to store (bfloat16 as its uint16 bit patterns).

    Args:
        t: the tensor (any device).
        dtype: the storage dtype: float32, float16 or bfloat16.

    Returns:
        A numpy array on the CPU.

    Example:
        >>> to_storage(torch.ones(2), "bfloat16")
        array([16256, 16256], dtype=uint16)
    """
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).cpu().numpy()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("layertap", "torch", "torchvision", "numpy", "pillow", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def extract(
    model: nn.Module | LoadedModel | Extractor | str,
    images: str | os.PathLike[str] | ImageSet,
    layers: str | list[str],
    out: str | os.PathLike[str],
    *,
    weights: str = "pretrained",
    batch_size: int = 64,
    device: str | torch.device = "auto",
    workers: int | None = None,
    flatten: bool = False,
    reduce: str | dict[str, str] | None = None,
    dtype: str = "float32",
    fraction: float | None = None,
    seed: int = 0,
    things: bool = False,
    on_error: str = "skip",
    overwrite: bool = False,
    channels_last: bool | str = "auto",
    chunk_rows: int | None = None,
    exif_transpose: bool = True,
    fast_decode: bool = False,
    fold_bn: bool = True,
    compile: bool = False,  # noqa: A002 - the torch name
    autocast: str | None = None,
    backend: str = "auto",
    shard: str | tuple[int, int] | None = "auto",
    merge: bool = True,
    progress: bool = True,
) -> Run:
    """Extract ``layers`` of ``model`` for every image in ``images`` into the run directory ``out``.

    Activations are written batch by batch (memory stays bounded by the batch and one chunk per
    layer). Re-running the same call on an interrupted run resumes it and gives the same bytes
    as an uninterrupted run; on a finished run it returns that run.

    Args:
        model: a loaded model, any ``nn.Module``, a name for :func:`load_model` (with ``weights``
            and ``seed``), or an :class:`~layertap.extraction.tap.Extractor` held across calls (built
            with this call's layers, ``flatten``, ``reduce``, ``compile``, ``autocast`` and
            ``fold_bn``): its folded copy and compiled graph are then made once, not per call.
        images: a folder, a .txt/.csv list, a video, a stimulus array or an :class:`ImageSet`.
        layers: names or globs (see :func:`layertap.extraction.layers.resolve_layers`).
        out: the run directory.
        weights: the weights of a named model (``pretrained``, ``random`` or a file).
        batch_size: images per forward pass.
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        workers: decoding processes (default: cores - 1; 0 decodes in this process).
        flatten: store each output as (images, N).
        reduce: pool or project outputs on the device before storing (see
            :mod:`layertap.extraction.reducers`; e.g. ``"avg"`` for conv maps, ``"cls"`` for ViT
            tokens, ``{"layer3": "max:2"}``).
        dtype: the storage type (float32, float16, bfloat16); computation is float32.
        fraction: a reproducible random subset of the images (drawn with ``seed``).
        seed: the seed of random weights and of ``fraction``.
        things: ``images`` is a THINGS folder (concept labels).
        on_error: ``"skip"`` (log and record images that cannot be decoded) or ``"fail"``.
        overwrite: replace a run of another job in ``out``.
        channels_last: channels_last memory for conv nets (``"auto"``: on cpu and cuda).
        chunk_rows: rows per stored chunk (default: ~16 MB chunks).
        exif_transpose: apply the EXIF orientation of photos.
        fast_decode: (opt-in, recorded) decode large JPEGs at reduced scale (libjpeg DCT scaling)
            when the transform first resizes them anyway; pixel values differ slightly from a full decode.
        fold_bn: fold eval-mode BatchNorm into the convolution before it where no tapped output
            changes (see :func:`layertap.extraction.graph.fold_untapped`): float32-rounding-level
            differences.
        compile: run the tapped layers as one ``torch.compile``'d graph (see
            :class:`~layertap.extraction.tap.Extractor`): faster after a one-off compile, which pays
            only where decoding does not compete for the same cores; float32-rounding-level
            differences; whether it ran is recorded in the manifest (``compiled``).
        autocast: ``"float16"`` or ``"bfloat16"`` (opt-in, recorded) computes under
            ``torch.autocast``: for GPUs; it changes the numbers (~1e-2 relative).
        backend: what runs the float32 forward on the CPU: ``"torch"``, or an exact inference
            engine, ``"onnxruntime"`` or ``"openvino"`` (``pip install 'layertap[cpu]'``; faster
            where the engine's kernels beat torch's: see the README's speed section), equal to torch to
            float32 rounding; the export is cached on disk (see :mod:`layertap.extraction.engines`).
            ``"auto"`` (default) takes an installed engine on a CPU for jobs of 256 images or more,
            torch otherwise and always on CUDA/MPS. Part of
            the job: a resume with another backend is refused. What an engine cannot export or
            run falls back to torch with one warning, recorded in the manifest (``backend``).
        shard: ``(i, n)`` or ``"i/n"`` extracts the i-th of n disjoint slices (cut at batch
            boundaries) into ``out/shards/``; ``"auto"`` takes i and n from a Slurm job array or
            torchrun when there is one; None never shards.
        merge: the shard that finds all n complete merges them into ``out``, byte-identical to an
            unsharded run.
        progress: show a progress bar.

    Returns:
        The :class:`Run`: ``run["avgpool"]`` has shape (images, ...) or (images, N) with ``flatten``.

    Raises:
        LayertapError: bad settings, unknown layers, undecodable stimuli with ``on_error="fail"``,
            a full disk, or another job's run in ``out`` (without ``overwrite``).

    Example:
        >>> run = lt.extract("resnet18", "photos/", ["layer3", "avgpool"], "runs/r18", reduce="avg")
        >>> with lt.Extractor(lt.load_model("resnet18"), ["avgpool"], fold_bn=True) as tap:
        ...     a = lt.extract(tap, "set_a/", ["avgpool"], "runs/a")  # folds once for both runs
        ...     b = lt.extract(tap, "set_b/", ["avgpool"], "runs/b")
    """
    config = ExtractConfig(
        weights=weights,
        batch_size=batch_size,
        device=device,
        workers=workers,
        flatten=flatten,
        reduce=reduce,
        dtype=dtype,
        fraction=fraction,
        seed=seed,
        things=things,
        on_error=on_error,
        overwrite=overwrite,
        channels_last=channels_last,
        chunk_rows=chunk_rows,
        exif_transpose=exif_transpose,
        fast_decode=fast_decode,
        fold_bn=fold_bn,
        compile=compile,
        autocast=autocast,
        backend=backend,
        shard=shard,
        merge=merge,
        progress=progress,
    )
    return run_job(model, images, layers, out, config)


def run_job(
    model: nn.Module | LoadedModel | Extractor | str,
    images: str | os.PathLike[str] | ImageSet,
    layers: str | list[str],
    out: str | os.PathLike[str],
    config: ExtractConfig,
) -> Run:
    """:func:`extract` with its settings in one :class:`ExtractConfig`: prepare, then run (or shard)."""
    part = resolve_shard(config.shard)
    if part is not None and (str(config.device) == "auto" or os.environ.get("LAYERTAP_DEVICE")):
        # the launcher's device for this shard, or cuda:LOCAL_RANK under torchrun
        config = replace(config, device=shard_device())
    if config.backend == "auto" and not config.overwrite:
        # A re-run continues with the backend the run was started with (runs from before backends existed: torch),
        # not with what "auto" would pick on this machine today: the stored numbers depend on it.
        recorded = _recorded_backend(Path(out) if part is None else shard_dir(out, *part))
        if recorded is not None:
            config = replace(config, backend=recorded)
    job = prepare(model, images, layers, config)
    job = replace(job, model=identify_model(job.model))
    options = _options(job)
    manifest = run_manifest(job, layers, options)
    if job.config.autocast and job.device.type == "cpu":
        log.warning("autocast %s on the CPU: usually much slower than float32 without AVX512/AMX", job.config.autocast)
    if part is None:
        return _extract_into(Path(out), job, _job_spec(job, options), manifest)
    index, count = part
    whole = job.imageset
    piece = replace(job, imageset=whole.shard(index, count, align=job.config.batch_size))
    shard_manifest = manifest.updated(
        shard=ShardInfo(
            index=index,
            count=count,
            offset=piece.imageset.selection["shard_offset"],
            parent=str(Path(out).resolve()),
            parent_spec=_job_spec(job, options),
            parent_images={
                "root": whole.root,
                "layout": whole.layout,
                "n_total": len(whole),
                "classes": whole.classes,
                "concepts": whole.concepts,
                "selection": whole.selection,
            },
        )
    )
    spec = {**_job_spec(piece, options), "shard": [index, count]}
    # _extract_into says what this shard stored (or that it was complete already): its path names the shard
    run = _extract_into(shard_dir(out, index, count), piece, spec, shard_manifest)
    if job.config.merge:
        merged = try_merge(out)
        if merged is not None:
            log.info("all %d shards complete: merged %d images into %s", count, len(merged.images), merged.path)
            return merged
    return run


def _recorded_backend(run_dir: Path) -> str | None:
    """The backend of the run already in ``run_dir`` (None: no readable run there; the usual checks handle it)."""
    if not (run_dir / MANIFEST).is_file():
        return None
    try:
        spec = read_manifest(run_dir).spec
    except LayertapError:
        return None
    return str(spec.get("backend", "torch")) if spec else None


def _options(job: Job) -> dict[str, Any]:
    """The job's options, as the manifest records them (``options``, and in the job spec)."""
    c = job.config
    return {
        "batch_size": c.batch_size,
        "flatten": c.flatten,
        "reduce": c.reduce,
        "dtype": c.dtype,
        "device": str(job.device),
        "channels_last": job.channels_last,
        "folded_batchnorms": job.tap.folded_batchnorms,
        "compile": c.compile,
        "autocast": c.autocast,
        "backend": job.tap.settings["backend"],
        "chunk_rows": c.chunk_rows,
        "exif_transpose": c.exif_transpose,
        "jpeg_draft": job.draft,
        "on_error": c.on_error,
        "seed": c.seed,
    }


def _job_spec(job: Job, options: dict[str, Any]) -> dict[str, Any]:
    """What identifies the job's stored numbers (a resume must match it)."""
    spec_ = {
        "model": job.model.provenance,
        "layers": job.layers,
        "images": job.imageset.fingerprint(),
        "n_images": len(job.imageset),
        **options,
    }
    spec_.pop("on_error")  # how failures are handled does not change what is stored
    if spec_["backend"] == "torch":  # as before backends existed: older unfinished runs still resume
        spec_.pop("backend")
    # The device type matters (kernels differ); which GPU of several does not.
    spec_["device"] = job.device.type
    return spec_


def run_manifest(job: Job, layers: str | list[str], options: dict[str, Any]) -> Manifest:
    """The run manifest as written when the run starts (``layers``: the layers as asked for)."""
    loaded, workers, fraction = job.model, job.config.workers, job.config.fraction
    exif_transpose, draft = job.config.exif_transpose, job.draft
    return Manifest(
        layertap="run",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=_versions(),
        command=sys.argv if Path(sys.argv[0]).name == "layertap" else None,
        model=loaded.provenance,
        layers_requested=[layers] if isinstance(layers, str) else list(layers),
        layer_aliases=used_aliases(loaded, layers),  # alias asked for -> the real name stored
        options={**options, "workers": workers, "fraction": fraction},
        decode={
            "library": "PIL",
            "exif_transpose": exif_transpose,
            "jpeg_draft": (
                f"JPEGs decoded at reduced scale keeping both sides >= {draft} px (fast_decode)" if draft else None
            ),
            "alpha_background": list(ALPHA_BACKGROUND),
            "gray_16bit": "scaled to 8 bits (value / 257, rounded)",
        },
    )


def _extract_into(out: Path, job: Job, spec: dict[str, Any], manifest: Manifest) -> Run:
    """Extract ``job.imageset`` into the run directory ``out`` (create, resume, or find it complete)."""
    imageset, config = job.imageset, job.config
    n = len(imageset)
    try:
        writer = RunWriter(out, spec, overwrite=config.overwrite)
    except LayertapError as err:
        done = None if config.overwrite else _finished_read_only(out, spec, err)
        if done is None:
            raise
        log.info("nothing to do: %s is complete (%d images; read-only)", out, len(done.images))
        return done
    with writer:
        if writer.already_complete and writer.damage:
            _repair(writer, job)
            return Run(out)
        if writer.already_complete:
            done = Run(out)
            log.info(
                "nothing to do: %s is complete (%d images; pass %s to redo it)",
                out,
                len(done.images),
                option_spelling("overwrite"),
            )
            return done
        t0 = time.perf_counter()
        resuming = writer.started  # an unfinished run of this job was found
        # every image listed from the start, so that the committed rows of a run still being written can be named
        writer.begin(manifest.updated(images=images_section(imageset, [])))
        start = writer.resume_image
        if resuming:
            log.info("resuming %s: %d of %d images done, %d to go", out, start, n, n - start)
        first = (start // config.batch_size) * config.batch_size  # same batches as the first attempt: same bytes
        values = ValueLog(out / VALUES_LOG, start)
        try:
            _run_batches(job, writer, values, first=first, start=start, progress=config.progress)
        except LayertapError as err:
            if not isinstance(err, LayertapFailure) and not resuming:  # bad input in the first batches: no run left
                _discard_unstarted(writer, values)
            raise
        skipped = writer.finish(n)
        # A shard may have no rows (more shards than batches, or all its images skipped): it is a
        # complete shard all the same, and the merge takes its skip records.
        if not writer.has_layers and "shard" not in spec:
            first_error = skipped[0][1] if skipped else "no images"
            raise LayertapError(f"none of the {n} images could be decoded (first error: {first_error})")
        assert writer.manifest is not None  # begin() set it
        counts = values.summary(list(writer.manifest.layers))
        values.close()
        writer.complete(
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            images=images_section(imageset, skipped),
            compiled=job.tap.compiled,
            backend={**describe_backend(job.tap.settings["backend"]), "fallback": job.tap.fallback},
            values=counts,
        )
        values.close(remove=True)
    warn_values(counts, config.dtype)
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped (listed in the manifest)", len(skipped), n)
    run = Run(out)
    shapes = ", ".join(f"{name} {'x'.join(map(str, run[name].shape))}" for name in run.layers) or "no rows"
    log.info(
        "stored %s in %s: %d images in %.1f s, %d skipped, %d rows in all",
        shapes,
        out,
        n - start,
        time.perf_counter() - t0,
        len([i for i, _ in skipped if i >= start]),
        len(run.images),
    )
    return run


class _RepairDone(Exception):
    """Every damaged chunk is rewritten: the batch loop can stop."""


class _Repair:
    """Stands in for the RunWriter (and the value log) in :func:`_run_batches` while a complete
    run's damaged chunks are recomputed: keeps the rows of those chunks, rewrites each chunk as
    soon as all its rows are in, and ends the loop after the last one."""

    has_layers = True

    def __init__(self, writer: RunWriter, n_images: int, chunks: list[int]) -> None:
        assert writer.manifest is not None and writer.manifest.images is not None  # a complete run
        self.writer, self.manifest = writer, writer.manifest
        skipped = {int(sk["index"]) for sk in writer.manifest.images["skipped"]}
        stored = [i for i in range(n_images) if i not in skipped]  # row -> image: skips leave gaps
        step = writer.chunk_rows
        self.want: dict[int, tuple[int, int]] = {}  # image -> (chunk, row in the chunk)
        self.left: dict[int, int] = {}
        self.size: dict[int, int] = {}
        for c in chunks:
            rows = stored[c * step : (c + 1) * step]
            self.left[c] = self.size[c] = len(rows)
            self.want.update({img: (c, k) for k, img in enumerate(rows)})
        self.first_image = min(self.want) if self.want else 0
        self.buffers: dict[int, dict[str, np.ndarray]] = {}

    def skip(self, image_index: int, reason: str) -> None:
        pass  # recorded in the manifest already

    def count(self, *args: Any) -> None:
        pass  # the value counts of the run are in its manifest already

    def add(self, features: dict[str, np.ndarray], image_indices: list[int]) -> None:
        for k, img in enumerate(image_indices):
            if img not in self.want:
                continue
            c, pos = self.want.pop(img)
            buf = self.buffers.setdefault(c, {n: np.empty_like(b) for n, b in self.writer._buffers.items()})
            for name in buf:
                buf[name][pos] = features[name][k]
            self.left[c] -= 1
            if self.left[c] == 0:
                self.writer.rewrite_chunk(c, self.buffers.pop(c), self.size[c])
        if not self.want:
            raise _RepairDone


def _repair(writer: RunWriter, job: Job) -> None:
    """Recompute and rewrite the damaged chunks of a complete run (found by the check on open):
    the same batches as the original run, so the repaired run is byte-identical to it."""
    chunks = sorted({c for ch in writer.damage.values() for c in ch})
    sink = _Repair(writer, len(job.imageset), chunks)
    log.info("%s: recomputing %d damaged chunk(s): %s", writer.path, len(chunks), ", ".join(map(str, chunks)))
    first = (sink.first_image // job.config.batch_size) * job.config.batch_size
    try:
        _run_batches(job, sink, sink, first=first, start=sink.first_image, progress=False)
    except _RepairDone:
        pass
    if sink.want:
        raise LayertapError(f"{writer.path}: could not recompute {len(sink.want)} image(s) of the damaged chunks")
    writer.repaired()
    log.info("%s: repaired", writer.path)


def _discard_unstarted(writer: RunWriter, values: ValueLog) -> None:
    """Remove a new run that failed before any row was committed (its manifest would block another
    job in the same directory). The lock file stays: unlinking a lock others may wait on races."""
    writer.close()
    values.close()
    if int(writer.progress.get("rows", 0)):
        return  # rows were committed: keep them (the same command resumes)
    for name in (MANIFEST, PROGRESS, VALUES_LOG):
        (writer.path / name).unlink(missing_ok=True)
    shutil.rmtree(writer.path / ARRAYS, ignore_errors=True)


def _finished_read_only(out: Path, spec: dict[str, Any], err: LayertapError) -> Run | None:
    """The complete run in ``out`` when it holds exactly this job but cannot be written (a read-only
    file system or permissions): re-running a finished command then has nothing to do."""
    cause = err.__context__  # disk_error() raises "from None": the OSError is still the context
    if not isinstance(cause, OSError) or cause.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    try:
        run = Run(out)
    except (LayertapError, OSError, ValueError):
        return None
    return run if run.complete and run.manifest.spec == spec else None


def images_section(imageset: ImageSet, skipped: list[tuple[int, str]]) -> ImagesSection:
    """The manifest's ``images``: one row per stored row (path, target, class) and the skipped.

    Args:
        imageset: the stimuli of the run.
        skipped: (image index, reason) of the images that could not be decoded.

    Returns:
        The section (rows in image order, skipped images left out of them).
    """
    skipped_set = {i for i, _ in skipped}
    rows = []
    for i, path in enumerate(imageset.paths):
        if i in skipped_set:
            continue
        row: dict[str, Any] = {"path": imageset.relpath(path)}
        if imageset.targets is not None:
            row["target"] = imageset.targets[i]
            row["class"] = imageset.class_name(i)
        row_fields = getattr(imageset, "row_fields", None)  # videos: frame, time; arrays: index, id
        if row_fields is not None:
            row.update(row_fields(i))
        rows.append(row)
    return {
        "root": imageset.root,
        "layout": imageset.layout,
        "n_total": len(imageset),
        "n_stored": len(rows),
        "classes": imageset.classes,
        "concepts": imageset.concepts,
        "selection": imageset.selection,
        "rows": rows,
        "skipped": [{"path": imageset.relpath(imageset.paths[i]), "reason": r, "index": i} for i, r in skipped],
    }


def _mixed_sizes(imageset: ImageSet, i: int, a: tuple[int, ...], j: int, b: tuple[int, ...]) -> str:
    return (
        f"the transform gave images of different sizes ({'x'.join(map(str, a))} for {imageset.relpath(imageset.paths[i])}, "
        f"{'x'.join(map(str, b))} for {imageset.relpath(imageset.paths[j])}): your transform must resize "
        "(and crop) every image to one fixed size"
    )


def _check_shapes(feats: dict[str, torch.Tensor], layers: dict[str, LayerInfo]) -> None:
    """Refuse a batch whose outputs differ in name or shape from the arrays created for the first one."""
    for key in sorted(set(feats) | set(layers)):
        if key not in feats or key not in layers:
            seen = "ran" if key in feats else "did not run"
            raise LayertapError(
                f"'{key}' {seen} in this batch's forward pass, unlike the first batch's: a layer must run the same "
                "number of times for every batch; tap another layer"
            )
        got, want = list(feats[key].shape[1:]), list(layers[key]["shape"])
        if got != want:
            raise LayertapError(
                f"layer '{key}' gave {'x'.join(map(str, got)) or 'a scalar'} per image in this batch but "
                f"{'x'.join(map(str, want)) or 'a scalar'} before: its output shape changes between batches; tap a "
                f"layer with a fixed output shape (or pool it with {option_spelling('reduce', 'avg')})"
            )


#: storage dtype name -> the torch dtype values are converted to (on the device) before copying out
STORAGE_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: per-image counts of non-finite values, kept until the run completes (resumed runs count old rows too)
VALUES_LOG = "values.jsonl"


class ValueLog:
    """Counts NaN/inf in the model's outputs and values that overflow the storage dtype, per image.

    The counts are taken on the device, batch by batch (``torch.isfinite``; one synchronisation
    per batch). Images with a non-zero count are appended to ``out/values.jsonl`` *before* their
    rows are handed to the writer, so after a kill the log covers every committed row; a resumed
    run keeps the entries below its resume point and recounts the rest. :meth:`summary` gives the
    manifest's ``values`` section.

    Args:
        path: the log file (``out/values.jsonl``).
        start: the resume point: entries of images before it are kept, the rest recounted.

    Example:
        >>> log = ValueLog(Path("run/values.jsonl"), start=0)
        >>> log.count({"fc": out}, {"fc": out.half()}, rows=[0, 1]); log.summary(["fc"])["nonfinite"]
    """

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.entries: dict[tuple[int, str], tuple[int, int]] = {}
        if start and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                    if e["i"] < start:
                        self.entries[(int(e["i"]), str(e["layer"]))] = (int(e["nonfinite"]), int(e["overflow"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill: its rows were not committed (written before them)
        try:  # keep only what still counts; later batches append
            write_text_atomic(path, "".join(self._line(i, k, *c) + "\n" for (i, k), c in sorted(self.entries.items())))
        except OSError as err:
            raise disk_error(err, path) from None
        self._file: Any = None

    @staticmethod
    def _line(i: int, layer: str, nonfinite: int, overflow: int) -> str:
        return json.dumps({"i": i, "layer": layer, "nonfinite": nonfinite, "overflow": overflow})

    def count(self, feats: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], rows: list[int]) -> None:
        """Count per image: non-finite values of ``feats`` (float32), and values finite there but
        not in ``stored`` (the storage dtype)."""
        if not rows:
            return
        keys = list(feats)
        bad = [torch.isfinite(feats[k]).logical_not_().reshape(len(rows), -1).sum(1) for k in keys]
        bad_stored = [
            bad[n] if stored[k] is feats[k] else torch.isfinite(stored[k]).logical_not_().reshape(len(rows), -1).sum(1)
            for n, k in enumerate(keys)
        ]
        if not any(torch.stack([b.sum() for b in bad_stored]).tolist()):  # one sync; non-finite stays non-finite
            return
        lines = []
        for k, b, bs in zip(keys, bad, bad_stored, strict=True):
            nonfinite, over = b.cpu().tolist(), (bs - b).cpu().tolist()
            for i, nf, ov in zip(rows, nonfinite, over, strict=True):
                if nf or ov:
                    self.entries[(i, k)] = (nf, ov)
                    lines.append(self._line(i, k, nf, ov))
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._file.write("".join(ln + "\n" for ln in lines))
            self._file.flush()
            os.fsync(self._file.fileno())  # rare (only batches with such values): durable before the commit
        except OSError as err:
            raise disk_error(err, self.path) from None

    def summary(self, layers: list[str]) -> dict[str, Any]:
        """The manifest's ``values`` section: per layer, values and images affected."""
        out: dict[str, Any] = {
            "checked": "every stored value: NaN/inf in the model's float32 output ('nonfinite'), and finite values "
            "that became inf in the storage dtype ('overflow')",
            "nonfinite": dict.fromkeys(layers, 0),
            "overflow": dict.fromkeys(layers, 0),
            "nonfinite_images": dict.fromkeys(layers, 0),
            "overflow_images": dict.fromkeys(layers, 0),
        }
        for (_, k), (nf, ov) in self.entries.items():
            if k in out["nonfinite"]:
                out["nonfinite"][k] += nf
                out["overflow"][k] += ov
                out["nonfinite_images"][k] += nf > 0
                out["overflow_images"][k] += ov > 0
        return out

    def close(self, remove: bool = False) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove:
            self.path.unlink(missing_ok=True)


def warn_values(values: dict[str, Any], dtype: str) -> None:
    """One warning line per layer with NaN/inf or storage overflow.

    Args:
        values: the counts, from :meth:`ValueLog.summary` (the manifest's ``values``).
        dtype: the storage dtype (named in the overflow advice).
    """
    for layer, n in values.get("nonfinite", {}).items():
        if n:
            log.warning(
                "layer %s: %d NaN/inf values in the model's output (%d images); stored as computed, counted in the "
                "manifest ('values')",
                layer,
                n,
                values["nonfinite_images"][layer],
            )
    for layer, n in values.get("overflow", {}).items():
        if n:
            log.warning(
                "layer %s: %d values overflowed to inf in %s storage (%d images; finite in float32); "
                "use %s or %s to keep them",
                layer,
                n,
                dtype,
                values["overflow_images"][layer],
                option_spelling("dtype", "float32"),
                option_spelling("dtype", "bfloat16"),
            )


def _layer_info(tap: Extractor, feats: dict[str, torch.Tensor]) -> dict[str, LayerInfo]:
    """The manifest's ``layers`` entries for the first batch's outputs: module, shape, reducer, layout."""
    info: dict[str, LayerInfo] = {}
    for key, t in feats.items():
        layer = key.split("#")[0]
        info[key] = {"module": layer, "shape": list(t.shape[1:])}
        reducer = tap.reducers[layer]
        if tap.reduced.get(layer) and reducer.kind != "none":
            info[key]["reduce"] = reducer.spec
        elif reducer.kind == "projection":  # D <= K units: nothing to reduce, say so
            units = math.prod(t.shape[1:])
            info[key]["reduce_skipped"] = f"{reducer.spec}: {units} units <= {reducer.max_units}"
        if layer in tap.layout_used:  # the tapped map's axes; spatial reducers store (C, ...)
            info[key]["layout"] = tap.layout_used[layer]
    return info


def _batches(job: Job, first: int) -> Any:
    """The job's batches from image ``first`` on (videos and arrays decode their own rows)."""
    c, imageset, transform = job.config, job.imageset, job.tap.model.transform
    return imageset.iter_batches(
        transform,
        c.batch_size,
        start=first,
        workers=c.workers,
        pin_memory=job.device.type == "cuda",
        exif_transpose=c.exif_transpose,
        draft=job.draft,
    )


def _run_batches(
    job: Job, writer: RunWriter | _Repair, values: ValueLog | _Repair, *, first: int, start: int, progress: bool
) -> None:
    """The batch loop: decode from image ``first`` on, tap, check, and hand rows from ``start`` on to ``writer``.

    Args:
        job: the prepared job.
        writer: the run writer (or the repair sink, which keeps only damaged chunks' rows).
        values: where non-finite / overflowing values are counted.
        first: the first image decoded (a batch boundary: the same batches as the first attempt).
        start: the first image stored (the resume point).
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    tap, imageset, c = job.tap, job.imageset, job.config
    n = len(imageset)
    bar = tqdm(total=n, initial=start, unit="img", desc="extract", disable=None if progress else True, smoothing=0.1)
    input_shape: tuple[int, ...] | None = None
    with tap, bar:
        for batch in _batches(job, first):
            if batch.mixed_shapes:
                (i, a), (j, b) = batch.mixed_shapes
                raise LayertapError(_mixed_sizes(imageset, i, a, j, b))
            for idx, reason in batch.failed:
                if idx < start:
                    continue  # recorded by the interrupted attempt
                path = imageset.paths[idx]
                if c.on_error == "fail":
                    raise LayertapError(f"cannot decode {path}: {reason} (use {option_spelling('on_error', 'skip')} to skip such images)")
                log.warning("skipping %s: %s", path, reason)
                writer.skip(idx, reason)
            if batch.indices:
                if input_shape is None:
                    input_shape, first_image = tuple(batch.images.shape[1:]), batch.indices[0]
                elif tuple(batch.images.shape[1:]) != input_shape:
                    shape = tuple(batch.images.shape[1:])
                    raise LayertapError(_mixed_sizes(imageset, first_image, input_shape, batch.indices[0], shape))
                x = batch.images.to(job.device, non_blocking=True)
                if job.channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                batch.images = x  # no second copy of the batch alive during the forward
                feats = tap(x)
                keep = [k for k, i in enumerate(batch.indices) if i >= start]
                if not writer.has_layers:
                    assert isinstance(writer, RunWriter)  # a repair's run has its layers
                    writer.create_layers(_layer_info(tap, feats), n, c.dtype, c.chunk_rows)
                else:
                    assert writer.manifest is not None  # it has layers
                    _check_shapes(feats, writer.manifest.layers)
                if len(keep) < len(batch.indices):
                    feats = {k: t[keep] for k, t in feats.items()}
                rows = [batch.indices[k] for k in keep]
                stored = {k: t.to(STORAGE_TORCH[c.dtype]) for k, t in feats.items()}  # a no-op for float32
                values.count(feats, stored, rows)  # before add(): the log covers every row a commit covers
                writer.add({k: to_storage(t, c.dtype) for k, t in stored.items()}, rows)
                del stored
            bar.update(sum(1 for i in batch.indices if i >= start) + sum(1 for i, _ in batch.failed if i >= start))
