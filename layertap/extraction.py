"""Extraction: the :class:`Extractor` tap (hooks on named layers) and the dataset-level :func:`extract`.

The tap keeps every call of a module that runs several times per forward, copies outputs so
that a later in-place op (``ReLU(inplace=True)``) cannot change them, and stops the forward pass
once every requested layer has produced all of its outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import ALPHA_BACKGROUND, ImageSet, iter_batches
from .errors import LayertapError
from .layers import output_tensor, resolve_layers, tappable
from .models import LoadedModel, as_loaded, load_model
from .reducers import Reducer, reducer_for
from .storage import STORAGE_DTYPES, Run, RunWriter

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
        t = reducer(t, self.model.num_prefix_tokens)
        if self.flatten:
            t = t.reshape(t.shape[0], -1)
        if copy and t.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            t = t.clone()  # a view would change under a later in-place op
        return t

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
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]
        return self

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
        from .layers import OUTPUT
        from .speed import compiled_tap_graph

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
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayertapError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LayertapError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    return dev


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
    from .cluster import resolve_shard, shard_dir

    if dtype not in STORAGE_DTYPES:
        raise LayertapError(f"unknown dtype '{dtype}'; choose one of {', '.join(STORAGE_DTYPES)}")
    if on_error not in ("skip", "fail"):
        raise LayertapError(f"--on-error must be 'skip' or 'fail', not '{on_error}'")
    if batch_size < 1:
        raise LayertapError(f"--batch-size must be at least 1, got {batch_size}")
    part = resolve_shard(shard)
    if part is not None and (str(device) == "auto" or os.environ.get("LAYERTAP_DEVICE")):
        from .cluster import shard_device

        device = shard_device()  # the launcher's device for this shard, or cuda:LOCAL_RANK under torchrun
    loaded = load_model(model, weights, seed=seed) if isinstance(model, str) else as_loaded(model)
    imageset = images if isinstance(images, ImageSet) else ImageSet.from_path(images, things=things)
    if fraction is not None:
        imageset = imageset.subset(fraction, seed)
    names = resolve_layers(loaded, layers)
    draft = None
    if fast_decode:
        from .data import draft_size

        draft = draft_size(loaded.transform)
        if draft is None:
            log.warning("fast_decode: cannot tell this model's resize size from its transform; decoding fully")
    dev = resolve_device(device)
    folded = 0
    if fold_bn:
        from dataclasses import replace

        from .speed import fold_batchnorm

        # A tapped conv must keep its own (pre-BatchNorm) output; aliases name modules too.
        protected = set(names) | {loaded.layer_aliases[n] for n in names if n in loaded.layer_aliases}
        module, folded = fold_batchnorm(loaded.module, protected)
        if folded:
            loaded = replace(loaded, module=module)  # a folded copy: the caller's model is untouched
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
    run = _extract_into(shard_dir(out, index, count), piece, spec, shard_manifest, tap, settings, overwrite)
    log.info("shard %d/%d complete: %s", index, count, run.path)
    if merge:
        from .storage import try_merge

        merged = try_merge(out)
        if merged is not None:
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
    writer = RunWriter(out, spec, overwrite=overwrite)
    with writer:
        if writer.already_complete:
            log.info("%s is already complete; nothing to do (pass overwrite=True to redo it)", out)
            return Run(out)
        writer.begin(manifest)
        start = writer.resume_image
        if start:
            log.info("resuming %s at image %d of %d", out, start, n)
        first = (start // batch_size) * batch_size  # same batches as the first attempt: same bytes
        _run_batches(
            tap,
            imageset,
            writer,
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
        skipped = writer.finish(n)
        if not writer.has_layers:
            raise LayertapError(f"none of the {n} images could be decoded (first error: {skipped[0][1]})")
        writer.complete(
            {
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "images": images_section(imageset, skipped),
                "compiled": tap.compiled,
            }
        )
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped (listed in the manifest)", len(skipped), n)
    return Run(out)


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


def _run_batches(
    tap: Extractor,
    imageset: ImageSet,
    writer: RunWriter,
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
    with tap, bar:
        for batch in batches:
            for idx, reason in batch.failed:
                if idx < start:
                    continue  # recorded by the interrupted attempt
                path = imageset.paths[idx]
                if on_error == "fail":
                    raise LayertapError(f"cannot decode {path}: {reason} (use --on-error skip to skip such images)")
                log.warning("skipping %s: %s", path, reason)
                writer.skip(idx, reason)
            if batch.indices:
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
                        if tap.reduced.get(layer) and tap.reducers[layer].kind != "none":
                            info[key]["reduce"] = tap.reducers[layer].spec
                    writer.create_layers(info, n, dtype, chunk_rows)
                if len(keep) < len(batch.indices):
                    feats = {k: t[keep] for k, t in feats.items()}
                writer.add({k: to_storage(t, dtype) for k, t in feats.items()}, [batch.indices[k] for k in keep])
            bar.update(sum(1 for i in batch.indices if i >= start) + sum(1 for i, _ in batch.failed if i >= start))
