"""Plan a run before doing it: per layer shape and bytes, total bytes, an estimated time, free space.

``lt.plan(model, images, layers, out=...)`` (``layertap plan`` / ``layertap extract --dry-run``)
runs one probe batch through the same tap an extraction uses (same layers, reducers, flatten,
storage dtype), so the shapes and bytes are the ones the run will write: ``total_bytes`` equals the
sum of the run's arrays' ``nbytes`` (every image decodes; skipped images only make a run smaller).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layertap._optional import require
from layertap.data.images import default_workers
from layertap.errors import StorageError
from layertap.extraction.pipeline import ExtractConfig, prepare
from layertap.extraction.tap import Extractor
from layertap.store.blocks import ITEMSIZE
from layertap.units import human_bytes


def human_seconds(s: float) -> str:
    """``s`` seconds as ``42 s``, ``3.5 min`` or ``2.1 h``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class LayerPlan:
    """One stored array: ``shape`` excludes the image axis; ``reduce`` is the reducer applied."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes_per_image: int
    total_bytes: int
    reduce: str | None = None


@dataclass
class Plan:
    """What a run will store and take. ``free_bytes`` is the free space where ``out`` will be.

    Example:
        >>> p = lt.plan("resnet18", "photos/", ["avgpool"], out="runs/", weights="random")
        >>> p.total_bytes, p.fits, p.estimated_seconds
    """

    model: str
    n_images: int
    layers: list[LayerPlan]
    dtype: str
    out: str | None = None
    free_bytes: int | None = None
    seconds_per_image: float | None = None
    #: one-off time per run: the first image through the whole model (learning how often layers run)
    overhead_seconds: float = 0.0
    #: alternative ``--reduce`` specs with the total bytes each would store
    suggestions: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bytes_per_image(self) -> int:
        return sum(lp.bytes_per_image for lp in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(lp.total_bytes for lp in self.layers)

    @property
    def estimated_seconds(self) -> float | None:
        if self.seconds_per_image is None:
            return None
        return self.seconds_per_image * self.n_images + self.overhead_seconds

    @property
    def fits(self) -> bool:
        """Whether the arrays fit the free space (True when the free space is unknown)."""
        return self.free_bytes is None or self.total_bytes <= self.free_bytes

    def to_pandas(self) -> Any:
        """The per-layer table as a ``pandas.DataFrame`` (one row per stored array)."""
        pd = require("pandas", "labels")
        return pd.DataFrame(
            [
                {
                    "layer": lp.name,
                    "shape": "x".join(map(str, lp.shape)),
                    "reduce": lp.reduce,
                    "bytes_per_image": lp.bytes_per_image,
                    "total_bytes": lp.total_bytes,
                }
                for lp in self.layers
            ]
        )

    def __str__(self) -> str:
        rows = [("layer", "stored shape", "per image", "total")]
        for lp in self.layers:
            shape = "x".join(map(str, lp.shape)) + (f"  ({lp.reduce})" if lp.reduce else "")
            rows.append((lp.name, shape, human_bytes(lp.bytes_per_image), human_bytes(lp.total_bytes)))
        rows.append(("all", "", human_bytes(self.bytes_per_image), human_bytes(self.total_bytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        head = f"plan: {self.model}, {self.n_images} images, {self.dtype}"
        tail = []
        if self.estimated_seconds is not None and self.seconds_per_image is not None:
            tail.append(
                f"estimated time: {human_seconds(self.estimated_seconds)} "
                f"({self.seconds_per_image * 1000:.1f} ms per image, timed on a probe batch on this machine)"
            )
        if self.free_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            tail.append(f"free space at {self.out}: {human_bytes(self.free_bytes)} ({verdict})")
        if self.suggestions:
            tail.append("smaller with --reduce (total bytes):")
            tail.extend(f"  --reduce {spec:<10} {human_bytes(size)}" for spec, size in self.suggestions)
        return "\n".join([head, *lines, *tail])


def free_space(out: str | os.PathLike[str]) -> tuple[Path, int]:
    """The nearest existing folder at or above ``out`` and its free bytes (``shutil.disk_usage``)."""
    path = Path(out).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free


def check_space(p: Plan, yes: bool = False) -> None:
    """Refuse a run whose arrays would not fit the free space, unless ``yes``.

    Raises:
        StorageError: naming the sizes and the smallest suggested ``--reduce``.
    """
    if p.fits or yes:
        return
    hint = ""
    fitting = [s for s in p.suggestions if p.free_bytes is None or s[1] <= p.free_bytes]
    if fitting:
        spec, size = min(fitting, key=lambda s: -s[1])
        hint = f"; e.g. --reduce {spec} stores {human_bytes(size)}"
    raise StorageError(
        f"the run needs {human_bytes(p.total_bytes)} but {p.out} has {human_bytes(p.free_bytes or 0)} free"
        f"{hint}; see 'layertap plan', or pass --yes to start anyway"
    )


def _suggest(
    shapes: dict[str, tuple[int, ...]],
    raw: dict[str, tuple[int, ...]],
    n: int,
    itemsize: int,
    layouts: dict[str, str] | None = None,
) -> list:
    """Alternative reducers: the stored size of every layer under each spec (layers it does not
    apply to keep their current size). ``layouts``: per layer, "channels_last" for (H, W, C) maps."""
    current = {k: math.prod(s) for k, s in shapes.items()}
    specs: dict[str, dict[str, int]] = {}
    for key, shape in raw.items():
        layout = (layouts or {}).get(key.split("#")[0], "channels_first")
        if len(shape) == 3 and layout != "unknown":  # a conv map (C, H, W) or (H, W, C)
            c, shape = (shape[-1], (shape[-1], *shape[:-1])) if layout == "channels_last" else (shape[0], shape)
            specs.setdefault("avg", {})[key] = c
            if shape[1] > 2:
                specs.setdefault("avg:2", {})[key] = c * 4
        elif len(shape) == 2:  # tokens (L, D)
            specs.setdefault("cls", {})[key] = shape[1]
            specs.setdefault("mean", {})[key] = shape[1]
        if math.prod(shape) > 4096:
            specs.setdefault("srp:4096", {})[key] = 4096
    out = []
    for spec, sizes in specs.items():
        total = sum(sizes.get(k, current[k]) for k in shapes) * itemsize * n
        if total < sum(current.values()) * itemsize * n:
            out.append((spec, total))
    return sorted(out, key=lambda s: -s[1])


def plan(
    model: Any,
    images: Any,
    layers: str | list[str],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: str = "pretrained",
    batch_size: int = 64,
    device: str = "cpu",
    workers: int | None = None,
    flatten: bool = False,
    reduce: str | dict[str, str] | None = None,
    dtype: str = "float32",
    fraction: float | None = None,
    seed: int = 0,
    things: bool = False,
    fold_bn: bool = True,
    backend: str = "auto",
    probe: int = 8,
) -> Plan:
    """Plan :func:`layertap.extract` with the same arguments, without writing anything.

    The model, stimuli, layers and tap are made by the same :func:`layertap.extraction.pipeline.prepare`
    step as an extraction's.

    Args:
        model, images, layers, out, weights, batch_size, device, workers, flatten, reduce, dtype,
            fraction, seed, things, fold_bn, backend: as for :func:`layertap.extract` (an engine
            backend exports the model for the probe, once: the export is cached for the run).
        probe: images in the timed probe batch (at most ``batch_size`` and the number of images);
            0 skips the timing and runs one blank image for the shapes only.

    Returns:
        A :class:`Plan`: per layer stored shape and bytes, totals, the estimated time (decode +
        forward of the probe batch, timed after a warm-up pass, scaled to all images), the free
        space at ``out`` and smaller ``--reduce`` alternatives.

    Raises:
        LayertapError: as :func:`layertap.extract` does for bad settings, layers or stimuli.

    Example:
        >>> p = lt.plan("resnet18", "photos/", ["layer3"], out="runs/", reduce="avg")
        >>> print(p)  # per layer shape and bytes, estimated time, free space
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
        fold_bn=fold_bn,  # the run's speed, not its shapes, depends on it
        backend=backend if probe else "torch",  # shapes only: no engine export for them
    )
    job = prepare(model, images, layers, config)
    loaded, imageset, tap, dev = job.model, job.imageset, job.tap, job.device
    n = len(imageset)
    k = min(probe, batch_size, n)
    seconds = None
    if k > 0:
        t0 = time.perf_counter()
        # decoded as the run will (EXIF, --fast-decode), in this process: the first batch only
        batches = imageset.iter_batches(
            loaded.transform, k, workers=0, exif_transpose=config.exif_transpose, draft=job.draft
        )
        batch = next(iter(batches))
        decode = (time.perf_counter() - t0) / max(1, k)
        if batch.mixed_shapes or not batch.indices:
            x = torch.zeros((1, *loaded.input_size))
            k = 0
        else:
            x = batch.images
    else:
        x = torch.zeros((1, *loaded.input_size))
    x = x.to(dev)
    if job.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    overhead = 0.0
    with tap:
        t0 = time.perf_counter()
        feats = tap(x)  # the first call also learns how often each layer runs (warm-up)
        warm = time.perf_counter() - t0
        if k:
            t0 = time.perf_counter()
            feats = tap(x)
            forward = (time.perf_counter() - t0) / k
            overhead = max(0.0, warm - forward * k)
            decoders = default_workers() if workers is None else workers
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            # Decoding workers run beside the model: with cores to spare the slower of the two paces
            # the run; on a small machine (<= 2 cores) they share the cores, so the times add up.
            seconds = max(forward, decode / decoders) if decoders and cores > 2 else forward + decode
    if flatten:  # the unflattened shapes need a second pass
        with Extractor(tap.running, tap.layers) as plain:
            raw = {key: tuple(t.shape[1:]) for key, t in plain(x[:1]).items()}
    else:  # only unreduced layers' raw shapes are used, and those are what the tap gave
        raw = {key: tuple(t.shape[1:]) for key, t in feats.items()}
    itemsize = ITEMSIZE[dtype]
    layer_plans = []
    for key, t in feats.items():
        shape = tuple(int(s) for s in t.shape[1:])
        per = math.prod(shape) * itemsize
        base = key.split("#")[0]
        red = tap.reducers[base]
        applied = red.spec if tap.reduced.get(base) and red.kind != "none" else None
        layer_plans.append(LayerPlan(key, shape, dtype, per, per * n, applied))
    shapes = {lp.name: lp.shape for lp in layer_plans}
    unreduced = {lp.name: raw[lp.name] for lp in layer_plans if lp.reduce is None and lp.name in raw}
    free = None
    where = None
    if out is not None:
        place, free = free_space(out)
        where = str(place)
    return Plan(
        model=loaded.name,
        n_images=n,
        layers=layer_plans,
        dtype=dtype,
        out=where,
        free_bytes=free,
        seconds_per_image=seconds,
        overhead_seconds=overhead,
        suggestions=_suggest(shapes, unreduced, n, itemsize, tap.layouts),
    )
