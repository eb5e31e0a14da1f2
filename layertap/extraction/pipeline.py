"""Extraction: the :class:`Extractor` tap (hooks on named layers) and the dataset-level :func:`extract`.

The tap keeps every call of a module that runs several times per forward, copies outputs so
that a later in-place op (``ReLU(inplace=True)``) cannot change them, and stops the forward pass
once every requested layer has produced all of its outputs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layertap.data.images import ALPHA_BACKGROUND, ImageSet, iter_batches
from layertap.errors import LayertapError, option_spelling
from layertap.extraction.aliases import INPUT, INPUT_SUFFIX
from layertap.extraction.layers import output_tensor, resolve_layers, tappable
from layertap.extraction.layouts import CHANNELS_FIRST, CHANNELS_LAST, UNKNOWN, layer_layouts
from layertap.extraction.reducers import Reducer, reducer_for
from layertap.models.registry import LoadedModel, as_loaded, check_seed, load_model
from layertap.store.run import ARRAYS, MANIFEST, PROGRESS, STORAGE_DTYPES, Run, RunWriter, disk_error, write_text_atomic

log = logging.getLogger("layertap")


#: ``autocast`` names -> the dtype torch.autocast computes in
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class _StopForward(Exception):
    """Raised from the last hook to end a forward pass whose remaining layers are not needed."""


class Extractor:
    """Tap named layers of a model, in memory: ``with Extractor(model, ["layer3", "avgpool"]) as tap``.

    ``tap(x)`` runs ``x`` (a batch already on the model's device) through the model and returns
    ``{layer: Tensor}`` with the batch axis first (sequence-first transformer outputs are
    transposed). A module that runs ``k > 1`` times per forward gives ``layer#0`` …
    ``layer#{k-1}``. ``reduce`` applies a reducer on the device (see :mod:`layertap.reducers`):
    one spec for all layers or ``{layer_or_pattern: spec}``. ``flatten=True`` then reshapes each
    output to (B, N).
    ``stop_early=True`` ends the forward as soon as all requested outputs exist (before the first
    batch, one image runs through the whole model to learn how many times each layer runs). Hooks are removed on
    exit, whatever happens.

    ``compile=True`` runs the tapped part of the model as one ``torch.compile``'d graph instead of
    hooks (see :func:`layertap.speed.tap_graph`): a 1.1–1.2x faster forward on a 2-core CPU after
    a one-off compile (~20–30 s for a ResNet-50), equal to the eager forward to float32 rounding. The first call
    fixes the batch size: smaller batches are padded to it (no recompilation). A model that
    ``torch.fx`` cannot trace, or a compiler failure, logs a warning and runs eagerly instead;
    ``compiled`` tells which ran.

    ``autocast="float16"|"bfloat16"`` (opt-in, for GPUs) runs the forward under ``torch.autocast``:
    faster on GPUs with tensor cores, but the numbers are no longer the float32 model's
    (about 1e-2 relative difference for a ResNet's pooled features).
    """

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        layers: str | list[str],
        *,
        flatten: bool = False,
        stop_early: bool = True,
        reduce: str | dict[str, str] | None = None,
        compile: bool = False,  # noqa: A002 - the torch name
        autocast: str | None = None,
    ) -> None:
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise LayertapError(f"--autocast must be one of {', '.join(AUTOCAST_DTYPES)}, not '{autocast}'")
        self.autocast = autocast
        self.model = as_loaded(model)
        self.module = self.model.module
        self.layers = resolve_layers(self.model, layers)
        self.reducers: dict[str, Reducer] = {n: reducer_for(n, reduce) for n in self.layers}
        #: per layer, whether its reducer applied to its output (known after the first call)
        self.reduced: dict[str, bool] = {}
        # Known from the modules, not the shapes: (B, C, H, W) and (B, H, W, C) look alike.
        self.layouts = layer_layouts(self.module, tappable(self.model), self.layers)
        #: the layout of each layer's 4-/5-D output where it matters: pooled by a spatial/time reducer,
        #: or stored not channels-first (known after the first call; recorded in the manifest)
        self.layout_used: dict[str, str] = {}
        self.flatten = flatten
        self.stop_early = stop_early
        self.calls: dict[str, int] | None = None
        self._seq_first = {
            n: any(n == p or n.startswith(p + ".") for p in self.model.sequence_first) for n in self.layers
        }
        self._handles: list[Any] = []
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._remaining: int | None = None
        #: whether tap(x) runs a torch.compile'd graph of the tapped layers (else hooks, eagerly)
        self.compiled = False
        self._graph: Any = None
        if compile:
            self._build_graph()

    def _finish(self, name: str, out: Any, copy: bool) -> torch.Tensor:
        """A layer's raw output as stored: batch first, reduced, flattened; ``copy`` when a later
        in-place op could still change it."""
        raw = output_tensor(out, name)
        t = raw.detach()
        if self._seq_first[name] and t.ndim == 3:
            t = t.transpose(0, 1)
        reducer = self.reducers[name]
        self.reduced[name] = reducer.applies(t)
        pooled = self.reduced[name] and reducer.kind in ("spatial", "time")
        if t.ndim in (4, 5) and (pooled or self.layouts[name] != CHANNELS_FIRST):
            self.layout_used[name] = self.layouts[name]
        if pooled:
            t = self._channels_first(name, t, reducer.spec)
        t = reducer(t, self.model.num_prefix_tokens)
        if self.flatten:
            t = t.reshape(t.shape[0], -1)
        if copy and t.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            t = t.clone()  # a view would change under a later in-place op
        return t

    def _channels_first(self, name: str, t: torch.Tensor, spec: str) -> torch.Tensor:
        """``t`` as (B, C, H, W) / (B, C, T, H, W) for a spatial reducer, from either layout."""
        layout = self.layouts[name]
        if layout == UNKNOWN:
            raise LayertapError(
                f"--reduce {spec}: cannot tell whether layer {name}'s {tuple(t.shape)} output is channels-first or "
                f"channels-last; store it unreduced (--reduce {name}=none) or tap the block that contains it"
            )
        return t.movedim(-1, 1) if layout == CHANNELS_LAST else t

    def _hook(self, name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            last = self._remaining == 1  # the forward stops right here: nothing can overwrite the output
            self._outputs[name].append(self._finish(name, out, copy=not last))
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining == 0:
                    raise _StopForward

        return hook

    def __enter__(self) -> Extractor:
        if self.compiled:
            return self
        modules = tappable(self.model)
        self._handles = [self._register(modules, n) for n in self.layers]
        return self

    def _register(self, modules: dict[str, nn.Module], name: str) -> Any:
        """A forward hook on the layer; for ``input`` / ``MODULE:input`` (see :mod:`layertap.aliases`)
        a forward pre-hook on the model / that module, which captures its first positional input."""
        if name == INPUT or name.endswith(INPUT_SUFFIX):
            target = self.module if name == INPUT else modules[name.removesuffix(INPUT_SUFFIX)]
            hook = self._hook(name)
            return target.register_forward_pre_hook(lambda m, args: hook(m, args, args[0] if args else None))
        return modules[name].register_forward_hook(self._hook(name))

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._outputs = {}

    def _forward(self, x: torch.Tensor, stop: bool) -> dict[str, list[torch.Tensor]]:
        self._outputs = {n: [] for n in self.layers}
        self._remaining = sum(self.calls.values()) if (stop and self.calls) else None
        try:
            with self._mode(x):
                self.module(x)
        except _StopForward:
            pass
        finally:
            self._remaining = None
        outputs, self._outputs = self._outputs, {n: [] for n in self.layers}
        return outputs

    def _mode(self, x: torch.Tensor) -> contextlib.ExitStack:
        """inference_mode, plus autocast when asked for."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast:
            stack.enter_context(torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.autocast]))
        return stack

    def calibrate(self, x: torch.Tensor) -> dict[str, int]:
        """Run ``x`` through the whole model once to learn how often each layer runs per forward."""
        self.calibrate_from(self._forward(x, stop=False))
        return self.calls  # type: ignore[return-value]

    def _build_graph(self) -> None:
        from layertap.extraction.graph import compiled_tap_graph
        from layertap.extraction.layers import OUTPUT

        named = {n for n, _ in self.module.named_modules() if n}
        targets = [n if n in named else self.model.layer_aliases.get(n, "" if n == OUTPUT else n) for n in self.layers]
        try:
            self._graph, self._keys = compiled_tap_graph(self.module, targets)
        except Exception as err:  # noqa: BLE001 - untraceable models run eagerly: same numbers, less speed
            log.warning("compile: cannot trace %s with torch.fx (%s); running without compile", self.module_name, err)
            return
        self._batch: int | None = None
        self._graph_ran = False
        self.calls = {n: sum(1 for pos, _ in self._keys if pos == i) for i, n in enumerate(self.layers)}
        self.compiled = True

    @property
    def module_name(self) -> str:
        return self.model.name or type(self.module).__name__

    def _run_graph(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        b = x.shape[0]
        if self._batch is None:
            self._batch = b
        elif b < self._batch:  # pad to the compiled shape: per-image results do not depend on the others
            fill = x[-1:].expand(self._batch - b, *x.shape[1:])
            cl = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
            x = torch.cat([x, fill]).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        with self._mode(x):
            raw = self._graph(x)
        outputs: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for (pos, _), out in zip(self._keys, raw, strict=True):
            name = self.layers[pos]
            outputs[name].append(self._finish(name, out, copy=False)[:b])
        return outputs

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compiled:
            try:
                outputs = self._run_graph(x)
            except Exception as err:
                if self._graph_ran:  # it compiled and ran before: a real error, not the compiler's
                    raise
                log.warning("compile: torch.compile failed (%s); running without compile", str(err).splitlines()[0])
                self.compiled, self.calls = False, None
                return self(x)
            self._graph_ran = True
            return self._flat(outputs)
        if not self._handles:
            with self:
                return self(x)
        if self.calls is None and self.stop_early and x.shape[0] > 1:
            self.calibrate(x[:1])  # one image through the whole model, then the batch stops early
        outputs = self._forward(x, stop=self.stop_early)
        if self.calls is None:
            self.calibrate_from(outputs)
        return self._flat(outputs)

    @staticmethod
    def _flat(outputs: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for name, outs in outputs.items():
            if len(outs) == 1:
                result[name] = outs[0]
            else:
                result.update({f"{name}#{k}": t for k, t in enumerate(outs)})
        return result

    def calibrate_from(self, outputs: dict[str, list[torch.Tensor]]) -> None:
        silent = [n for n, v in outputs.items() if not v]
        if silent:
            raise LayertapError(
                f"layer(s) {', '.join(silent)} never ran during the forward pass; tap modules that forward() uses"
            )
        self.calls = {n: len(v) for n, v in outputs.items()}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks cuda, then mps, then cpu; anything else is checked to exist."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LayertapError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise LayertapError(f"--device {device}: layertap runs on cpu, cuda, cuda:N or mps (or auto)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayertapError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LayertapError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    return dev


def fold_untapped(loaded: LoadedModel, names: list[str]) -> tuple[LoadedModel, int]:
    """Fold BatchNorm layers into the convs before them, except where a tapped layer would change.

    Args:
        loaded: the model.
        names: the tapped layers (resolved names).

    Returns:
        The model (a folded copy when anything was folded: the caller's model is untouched) and
        the number of BatchNorm layers folded.
    """
    from dataclasses import replace

    from layertap.extraction.graph import fold_batchnorm

    # A tapped conv must keep its own (pre-BatchNorm) output; aliases name modules too.
    protected = set(names) | {loaded.layer_aliases[n] for n in names if n in loaded.layer_aliases}
    module, folded = fold_batchnorm(loaded.module, protected)
    return (replace(loaded, module=module) if folded else loaded), folded


def prepare_module(module: nn.Module, device: torch.device, channels_last: bool | str = "auto") -> bool:
    """Move the module to ``device`` (in place); use channels_last memory for conv nets.

    channels_last changes the order of float operations inside convolutions, not what is
    computed: results agree with the default layout to float32 rounding (tested), and it is
    15–30% faster on CPUs. Returns whether channels_last is used.
    """
    if channels_last == "auto":
        channels_last = device.type in ("cpu", "cuda") and any(isinstance(m, nn.Conv2d) for m in module.modules())
    module.to(device)
    # both ways: a folded copy is reused across calls (see speed.fold_batchnorm) that may ask differently
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    module.eval()
    return bool(channels_last)


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array to store (bfloat16 as its uint16 bit patterns)."""
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
    model: nn.Module | LoadedModel | str,
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
    shard: str | tuple[int, int] | None = "auto",
    merge: bool = True,
    progress: bool = True,
) -> Run:
    """Extract ``layers`` of ``model`` for every image in ``images`` into the run directory ``out``.

    Activations are written batch by batch (memory stays bounded by the batch and one chunk per
    layer). Re-running the same call on an interrupted run resumes it and gives the same bytes
    as an uninterrupted run; on a finished run it returns that run. Returns the :class:`Run`:
    ``run["avgpool"]`` has shape (images, ...) or (images, N) with ``flatten``.

    ``model`` is a loaded model, any ``nn.Module``, or a name for :func:`load_model` (with
    ``weights`` and ``seed``). ``images`` is a folder, a .txt/.csv list or an :class:`ImageSet`;
    ``fraction`` takes a reproducible random subset (drawn with ``seed``). ``reduce`` pools or
    projects outputs on the device before storing (see :mod:`layertap.reducers`; e.g. ``"avg"``
    for conv maps, ``"cls"`` for ViT tokens, ``{"layer3": "max:2"}``). Images that cannot
    be decoded are skipped, logged and recorded (``on_error="fail"`` stops instead).
    ``dtype`` is the storage type (float32, float16, bfloat16); computation is float32.
    ``fast_decode`` (opt-in, recorded) decodes large JPEGs at reduced scale (libjpeg DCT scaling)
    when the transform first resizes them anyway: 2x faster decoding of 1200x900 photos, but
    pixel values differ slightly from a full decode, so it is off by default.
    ``fold_bn`` folds eval-mode BatchNorm into the convolution before it where no tapped output
    changes (see :mod:`layertap.speed`): float32-rounding-level differences, ~25% faster ResNets.
    ``compile`` runs the tapped layers as one ``torch.compile``'d graph (see :class:`Extractor`):
    a faster forward after a one-off compile (~20–30 s on a 2-core CPU), which pays only where
    decoding does not compete for the same cores; float32-rounding-level differences; whether it
    ran is recorded in the manifest (``compiled``).
    ``autocast`` ("float16" or "bfloat16", opt-in, recorded) computes under ``torch.autocast``: for
    GPUs; it changes the numbers (~1e-2 relative) and is ~25x slower on CPUs without AVX512/AMX.

    ``shard=(i, n)`` (or ``"i/n"``) extracts the i-th of n disjoint slices (cut at batch
    boundaries) into ``out/shards/``; ``"auto"`` (default) takes i and n from a Slurm job array
    or torchrun when there is one. With ``merge``, the shard that finds all n complete merges
    them into ``out``, byte-identical to an unsharded run (see :func:`layertap.storage.merge_shards`).
    """
    from layertap.extraction.aliases import used_aliases
    from layertap.shards.cluster import resolve_shard, shard_dir

    if dtype not in STORAGE_DTYPES:
        raise LayertapError(f"unknown dtype '{dtype}'; choose one of {', '.join(STORAGE_DTYPES)}")
    if on_error not in ("skip", "fail"):
        raise LayertapError(f"--on-error must be 'skip' or 'fail', not '{on_error}'")
    if batch_size < 1:
        raise LayertapError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise LayertapError(f"--workers must be 0 (decode in this process) or more, got {workers}")
    if chunk_rows is not None and chunk_rows < 1:
        raise LayertapError(f"--chunk-rows must be at least 1, got {chunk_rows} (leave it out for ~16 MB chunks)")
    check_seed(seed)
    part = resolve_shard(shard)
    if part is not None and (str(device) == "auto" or os.environ.get("LAYERTAP_DEVICE")):
        from layertap.shards.cluster import shard_device

        device = shard_device()  # the launcher's device for this shard, or cuda:LOCAL_RANK under torchrun
    loaded = load_model(model, weights, seed=seed) if isinstance(model, str) else as_loaded(model)
    if loaded.provenance.get("weights", {}).get("kind") == "user-module":
        from dataclasses import replace as _replace

        from layertap.models.registry import module_fingerprint

        # An in-memory module: its weights' content is part of the job (a resume must not mix models).
        weights_id = {**loaded.provenance["weights"], "sha256": module_fingerprint(loaded.module)}
        loaded = _replace(loaded, provenance={**loaded.provenance, "weights": weights_id})
    if isinstance(images, ImageSet):
        imageset = images
    else:  # images, videos (frames or clips, by the model) or a stimulus array
        from layertap.data.stimuli import open_stimuli

        imageset = open_stimuli(images, things=things, model=loaded)
    if fraction is not None:
        imageset = imageset.subset(fraction, seed)
    names = resolve_layers(loaded, layers)
    draft = None
    if fast_decode:
        from layertap.data.images import draft_size

        draft = draft_size(loaded.transform)
        if draft is None:
            log.warning("fast_decode: cannot tell this model's resize size from its transform; decoding fully")
    dev = resolve_device(device)
    folded = 0
    if fold_bn:
        loaded, folded = fold_untapped(loaded, names)
    use_cl = prepare_module(loaded.module, dev, channels_last)
    options = {
        "batch_size": batch_size,
        "flatten": flatten,
        "reduce": reduce,
        "dtype": dtype,
        "device": str(dev),
        "channels_last": use_cl,
        "folded_batchnorms": folded,
        "compile": compile,
        "autocast": autocast,
        "chunk_rows": chunk_rows,
        "exif_transpose": exif_transpose,
        "jpeg_draft": draft,
        "on_error": on_error,
        "seed": seed,
    }

    def job_spec(images_: ImageSet) -> dict[str, Any]:
        spec_ = {
            "model": loaded.provenance,
            "layers": names,
            "images": images_.fingerprint(),
            "n_images": len(images_),
            **options,
        }
        spec_.pop("on_error")  # how failures are handled does not change what is stored
        # The device type matters (kernels differ); which GPU of several does not.
        spec_["device"] = dev.type
        return spec_

    manifest = {
        "layertap": "run",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "command": sys.argv if Path(sys.argv[0]).name == "layertap" else None,
        "model": loaded.provenance,
        "layers_requested": [layers] if isinstance(layers, str) else list(layers),
        "layer_aliases": used_aliases(loaded, layers),  # alias asked for -> the real name stored
        "options": {**options, "workers": workers, "fraction": fraction},
        "decode": {
            "library": "PIL",
            "exif_transpose": exif_transpose,
            "jpeg_draft": (
                f"JPEGs decoded at reduced scale keeping both sides >= {draft} px (fast_decode)" if draft else None
            ),
            "alpha_background": list(ALPHA_BACKGROUND),
            "gray_16bit": "scaled to 8 bits (value / 257, rounded)",
        },
    }
    if autocast and dev.type == "cpu":
        log.warning("autocast %s on the CPU: usually much slower than float32 without AVX512/AMX", autocast)
    tap = Extractor(loaded, names, flatten=flatten, reduce=reduce, compile=compile, autocast=autocast)
    settings = (dev, use_cl, batch_size, workers, dtype, on_error, chunk_rows, exif_transpose, draft, progress)
    if part is None:
        return _extract_into(Path(out), imageset, job_spec(imageset), manifest, tap, settings, overwrite)
    index, count = part
    piece = imageset.shard(index, count, align=batch_size)
    shard_manifest = {
        **manifest,
        "shard": {
            "index": index,
            "count": count,
            "offset": piece.selection["shard_offset"],
            "parent": str(Path(out).resolve()),
            "parent_spec": job_spec(imageset),
            "parent_images": {
                "root": imageset.root,
                "layout": imageset.layout,
                "n_total": len(imageset),
                "classes": imageset.classes,
                "concepts": imageset.concepts,
                "selection": imageset.selection,
            },
        },
    }
    spec = {**job_spec(piece), "shard": [index, count]}
    # _extract_into says what this shard stored (or that it was complete already): its path names the shard
    run = _extract_into(shard_dir(out, index, count), piece, spec, shard_manifest, tap, settings, overwrite)
    if merge:
        from layertap.store.run import try_merge

        merged = try_merge(out)
        if merged is not None:
            log.info("all %d shards complete: merged %d images into %s", count, len(merged.images), merged.path)
            return merged
    return run


def _extract_into(
    out: Path,
    imageset: ImageSet,
    spec: dict[str, Any],
    manifest: dict[str, Any],
    tap: Extractor,
    settings: tuple[Any, ...],
    overwrite: bool,
) -> Run:
    """Extract ``imageset`` into the run directory ``out`` (create, resume, or find it complete)."""
    dev, use_cl, batch_size, workers, dtype, on_error, chunk_rows, exif_transpose, draft, progress = settings
    n = len(imageset)
    try:
        writer = RunWriter(out, spec, overwrite=overwrite)
    except LayertapError as err:
        done = None if overwrite else _finished_read_only(out, spec, err)
        if done is None:
            raise
        log.info("nothing to do: %s is complete (%d images; read-only)", out, len(done.images))
        return done
    with writer:
        if writer.already_complete and writer.damage:
            _repair(writer, imageset, tap, settings)
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
        resuming = bool(writer.manifest)  # an unfinished run of this job was found
        # every image listed from the start, so that the committed rows of a run still being written can be named
        writer.begin({**manifest, "images": images_section(imageset, [])})
        start = writer.resume_image
        if resuming:
            log.info("resuming %s: %d of %d images done, %d to go", out, start, n, n - start)
        first = (start // batch_size) * batch_size  # same batches as the first attempt: same bytes
        values = ValueLog(out / VALUES_LOG, start)
        try:
            _run_batches(
                tap,
                imageset,
                writer,
                values,
                dev,
                use_cl,
                first,
                start,
                batch_size,
                workers,
                dtype,
                on_error,
                chunk_rows,
                exif_transpose,
                draft,
                progress,
            )
        except LayertapError as err:
            if err.exit_code == 2 and not resuming:  # bad input found in the first batches: leave no run behind
                _discard_unstarted(writer, values)
            raise
        skipped = writer.finish(n)
        # A shard may have no rows (more shards than batches, or all its images skipped): it is a
        # complete shard all the same, and the merge takes its skip records.
        if not writer.has_layers and "shard" not in spec:
            first_error = skipped[0][1] if skipped else "no images"
            raise LayertapError(f"none of the {n} images could be decoded (first error: {first_error})")
        counts = values.summary(list(writer.manifest.get("layers", {})))
        values.close()
        writer.complete(
            {
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "images": images_section(imageset, skipped),
                "compiled": tap.compiled,
                "values": counts,
            }
        )
        values.close(remove=True)
    warn_values(counts, dtype)
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
        self.writer, self.manifest = writer, writer.manifest
        skipped = {int(sk["index"]) for sk in writer.manifest["images"]["skipped"]}
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


def _repair(writer: RunWriter, imageset: ImageSet, tap: Extractor, settings: tuple[Any, ...]) -> None:
    """Recompute and rewrite the damaged chunks of a complete run (found by the check on open):
    the same batches as the original run, so the repaired run is byte-identical to it."""
    dev, use_cl, batch_size, workers, dtype, on_error, chunk_rows, exif_transpose, draft, _ = settings
    chunks = sorted({c for ch in writer.damage.values() for c in ch})
    sink = _Repair(writer, len(imageset), chunks)
    log.info("%s: recomputing %d damaged chunk(s): %s", writer.path, len(chunks), ", ".join(map(str, chunks)))
    first = (sink.first_image // batch_size) * batch_size
    try:
        _run_batches(
            tap, imageset, sink, sink, dev, use_cl, first, sink.first_image, batch_size, workers, dtype,
            on_error, chunk_rows, exif_transpose, draft, False,
        )  # fmt: skip
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
    return run if run.complete and run.manifest.get("spec") == spec else None


def images_section(imageset: ImageSet, skipped: list[tuple[int, str]]) -> dict[str, Any]:
    """The manifest's ``images``: one row per stored row (path, target, class) and the skipped."""
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


def _check_shapes(feats: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]]) -> None:
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
                "layer with a fixed output shape (or pool it with --reduce avg)"
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
            b, over = b.cpu().tolist(), (bs - b).cpu().tolist()
            for i, nf, ov in zip(rows, b, over, strict=True):
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
    """One warning line per layer with NaN/inf or storage overflow (counts from :meth:`ValueLog.summary`)."""
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
                "use --dtype float32 or bfloat16 to keep them",
                layer,
                n,
                dtype,
                values["overflow_images"][layer],
            )


def _run_batches(
    tap: Extractor,
    imageset: ImageSet,
    writer: RunWriter,
    values: ValueLog,
    dev: torch.device,
    use_cl: bool,
    first: int,
    start: int,
    batch_size: int,
    workers: int | None,
    dtype: str,
    on_error: str,
    chunk_rows: int | None,
    exif_transpose: bool,
    draft: int | None,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    n = len(imageset)
    own_batches = getattr(imageset, "iter_batches", None)  # videos and arrays decode their own rows
    if own_batches is not None:
        batches = own_batches(tap.model.transform, batch_size, start=first, workers=workers, pin_memory=dev.type == "cuda")
    else:
        batches = iter_batches(
            imageset.paths,
            tap.model.transform,
            batch_size,
            start=first,
            workers=workers,
            pin_memory=dev.type == "cuda",
            exif_transpose=exif_transpose,
            draft=draft,
        )
    bar = tqdm(total=n, initial=start, unit="img", desc="extract", disable=None if progress else True, smoothing=0.1)
    input_shape: tuple[int, ...] | None = None
    with tap, bar:
        for batch in batches:
            if batch.mixed_shapes:
                (i, a), (j, b) = batch.mixed_shapes
                raise LayertapError(_mixed_sizes(imageset, i, a, j, b))
            for idx, reason in batch.failed:
                if idx < start:
                    continue  # recorded by the interrupted attempt
                path = imageset.paths[idx]
                if on_error == "fail":
                    raise LayertapError(f"cannot decode {path}: {reason} (use --on-error skip to skip such images)")
                log.warning("skipping %s: %s", path, reason)
                writer.skip(idx, reason)
            if batch.indices:
                if input_shape is None:
                    input_shape, first_image = tuple(batch.images.shape[1:]), batch.indices[0]
                elif tuple(batch.images.shape[1:]) != input_shape:
                    shape = tuple(batch.images.shape[1:])
                    raise LayertapError(_mixed_sizes(imageset, first_image, input_shape, batch.indices[0], shape))
                x = batch.images.to(dev, non_blocking=True)
                if use_cl and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                batch.images = x  # no second copy of the batch alive during the forward
                feats = tap(x)
                keep = [k for k, i in enumerate(batch.indices) if i >= start]
                if not writer.has_layers:
                    info: dict[str, dict[str, Any]] = {}
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
                    writer.create_layers(info, n, dtype, chunk_rows)
                else:
                    _check_shapes(feats, writer.manifest["layers"])
                if len(keep) < len(batch.indices):
                    feats = {k: t[keep] for k, t in feats.items()}
                rows = [batch.indices[k] for k in keep]
                stored = {k: t.to(STORAGE_TORCH[dtype]) for k, t in feats.items()}  # a no-op for float32
                values.count(feats, stored, rows)  # before add(): the log covers every row a commit covers
                writer.add({k: to_storage(t, dtype) for k, t in stored.items()}, rows)
                del stored
            bar.update(sum(1 for i in batch.indices if i >= start) + sum(1 for i, _ in batch.failed if i >= start))
