"""Per-layer reducers applied on the device during extraction, before anything is stored.

A reducer turns one layer's output (batch first) into what is kept. Spatial reducers apply to
conv maps (B, C, H, W) only, token reducers to token sequences (B, L, D) only; on any other
output they do nothing, so one ``reduce="cls"`` can be given for a mix of layers. Each layer's
manifest entry records the reducer that was actually applied.

Spatial and time reducers need to know where the channels are: channels-last maps (torchvision
Swin ``features.*`` (B, H, W, C), Swin3D (B, T, H, W, C), timm models with ``output_fmt="NHWC"``)
are recognised from the modules (see :mod:`layertap.extraction.layouts`) and pooled over their H, W (T)
axes; the results below are always channels-first. The manifest records the ``layout`` of each
pooled layer (and of any stored channels-last one). A layer whose layout cannot be told (e.g. the
inside of timm's ConvNeXt MLP) is refused with a spatial reducer; store it with ``none``.

==============  =====================================================================
spec            result
==============  =====================================================================
``none``        the output as it is (default)
``avg``         global average pool of a conv map: (B, C)
``max``         global max pool of a conv map: (B, C)
``avg:K``       adaptive average pool to K x K: (B, C, K, K)   (also ``max:K``)
                video models' 5-D maps (B, C, T, H, W): ``avg``/``max`` pool T, H, W to (B, C);
                ``avg:K``/``max:K`` pool H, W to K x K and keep T: (B, C, T, K, K)
``time``        average over time of a 5-D map: (B, C, H, W)   (``time:max``: maximum)
``cls``         the class token of a token sequence: (B, D)
``mean``        mean of the patch tokens, excluding class/register tokens: (B, D)
``cls+mean``    both, concatenated: (B, 2D)
``tokens``      all tokens (same as ``none``, documented for clarity): (B, L, D)
``srp:K[:S]``   sparse random projection of the flattened output to K dims, seed S (default 0);
                an output with K units or fewer is left as it is (nothing to reduce)
==============  =====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layertap.errors import LayertapError, option_name
from layertap.globs import glob_regex, is_pattern
from layertap.process.projection import SparseRandomProjection

TOKEN_SPECS = ("cls", "mean", "cls+mean", "tokens")


@dataclass
class Reducer:
    """A parsed reducer spec; ``__call__(t, prefix_tokens)`` returns the reduced tensor, or ``t``
    itself where the spec does not apply to ``t``'s kind of output."""

    spec: str
    kind: str  # "none" | "spatial" | "time" | "token" | "projection"
    fn: Callable[[torch.Tensor, int], torch.Tensor]
    #: a projection applies only to outputs with more units (per image) than this
    max_units: int = 0

    def applies(self, t: torch.Tensor) -> bool:
        if self.kind == "spatial":
            return t.ndim in (4, 5)  # conv maps, and video models' (B, C, T, H, W)
        if self.kind == "time":
            return t.ndim == 5
        if self.kind == "token":
            return t.ndim == 3
        # Projecting D <= K units to K would change the values without reducing anything.
        return self.kind == "projection" and math.prod(t.shape[1:]) > self.max_units

    def __call__(self, t: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
        return self.fn(t, prefix_tokens) if self.applies(t) else t


def _cls(t: torch.Tensor, prefix: int) -> torch.Tensor:
    if prefix < 1:
        raise LayertapError("reduce 'cls' needs a model with a class token; use 'mean' for this layer")
    return t[:, 0]


def _mean(t: torch.Tensor, prefix: int) -> torch.Tensor:
    return t[:, prefix:].mean(dim=1)


def parse_reducer(spec: str | None) -> Reducer:
    """Parse a reducer spec such as ``"avg"``, ``"max:2"``, ``"cls+mean"``, ``"srp:4096:1"``."""
    spec = (spec or "none").strip().lower()
    head, _, arg = spec.partition(":")
    if spec in ("none", "tokens"):
        return Reducer(spec, "none", lambda t, p: t)
    if head in ("avg", "max") and not arg:
        op = torch.amax if head == "max" else torch.mean
        return Reducer(spec, "spatial", lambda t, p: op(t, dim=tuple(range(2, t.ndim))))  # (H, W) or (T, H, W)
    if head in ("avg", "max") and arg.isdigit() and int(arg) > 0:
        k = int(arg)
        pool = F.adaptive_max_pool2d if head == "max" else F.adaptive_avg_pool2d
        pool3 = F.adaptive_max_pool3d if head == "max" else F.adaptive_avg_pool3d
        return Reducer(spec, "spatial", lambda t, p: pool(t, k) if t.ndim == 4 else pool3(t, (t.shape[2], k, k)))
    if head == "time" and arg in ("", "avg", "max"):
        op = torch.amax if arg == "max" else torch.mean
        return Reducer(spec, "time", lambda t, p: op(t, dim=2))  # (B, C, T, H, W) -> (B, C, H, W)
    if spec == "cls":
        return Reducer(spec, "token", _cls)
    if spec == "mean":
        return Reducer(spec, "token", _mean)
    if spec == "cls+mean":
        return Reducer(spec, "token", lambda t, p: torch.cat([_cls(t, p), _mean(t, p)], dim=1))
    if head == "srp":
        parts = arg.split(":")
        if not parts[0].isdigit() or (len(parts) > 1 and not parts[1].isdigit()) or len(parts) > 2:
            raise LayertapError(f"bad reducer '{spec}': use srp:K or srp:K:SEED (K output dims)")
        return _srp_reducer(spec, int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
    raise LayertapError(
        f"unknown reducer '{spec}'; use none, avg, max, avg:K, max:K, time, time:max, cls, mean, cls+mean, tokens or srp:K[:SEED]"
    )


def _srp_reducer(spec: str, k: int, seed: int) -> Reducer:
    # The matrix depends only on (seed, input width, k), is built once per width and device,
    # and is applied on the device: a 200k-unit conv map leaves the GPU as k numbers per image.
    projection = SparseRandomProjection(k, seed=seed)
    return Reducer(spec, "projection", lambda t, _p: projection(t), max_units=k)


def reducer_for(layer: str, reduce: str | dict[str, str] | None) -> Reducer:
    """The reducer for ``layer``: one spec for all layers, or the first matching ``{pattern: spec}``."""
    if reduce is None or isinstance(reduce, str):
        return parse_reducer(reduce)
    base = layer.split("#")[0]
    for pattern, spec in reduce.items():
        if pattern == base or (is_pattern(pattern) and glob_regex(pattern).match(base)):
            return parse_reducer(spec)
    return parse_reducer(None)


def parse_reduce_args(items: list[str] | None) -> str | dict[str, str] | None:
    """CLI form: ``["avg"]`` for every layer or ``["layer3=avg", "blocks.*=cls"]`` per layer."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise LayertapError(f"{option_name('reduce')} '{item}': give LAYER=SPEC for each layer, or one SPEC for all layers")
        layer, spec = item.split("=", 1)
        out[layer] = spec
    return out
