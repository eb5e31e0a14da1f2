"""Taps: how the outputs of named layers are collected during a forward pass.

Strategies sit behind one protocol, :class:`Tap`:

- :class:`HookTap`: forward hooks on the named modules of the eager model. It keeps every call of
  a module that runs several times per forward, copies outputs that a later in-place op
  (``ReLU(inplace=True)``) could change, and stops the forward once every requested output exists.
- :class:`GraphTap`: the tapped part of the model as one ``torch.fx`` graph
  (:func:`layertap.extraction.graph.tap_graph`), run through ``torch.compile``. A subclass that
  overrides :meth:`GraphTap.compile_graph` runs the same graph on another engine:
- :class:`EngineTap`: ONNX Runtime or OpenVINO (see :mod:`layertap.extraction.engines`).

All hand their raw outputs to :class:`LayerOutputs`, which turns them into what is stored (batch
first, reduced, flattened), so every strategy stores the same numbers. :class:`Extractor`, the
public tap (``lt.Extractor``), chooses the strategy explicitly and falls back to hooks, with one
logged and recorded reason, when a graph cannot be built or its first run fails. An Extractor held
by the caller is the reusable object across calls: its folded model copy and its compiled graph
are built once (``lt.extract(tap, ...)`` uses them); there is no hidden cache.
"""

from __future__ import annotations

import contextlib
import logging
from operator import attrgetter
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from layertap.errors import LayertapError, option_name, option_spelling
from layertap.extraction.aliases import INPUT, INPUT_SUFFIX
from layertap.extraction.engines import (
    AUTO_MIN_IMAGES,
    ENGINES,
    EngineGraph,
    HookedForward,
    check_backend,
    engine_version,
    resolve_backend,
)
from layertap.extraction.graph import fold_untapped, tap_graph
from layertap.extraction.layers import OUTPUT, output_tensor, resolve_layers, tappable
from layertap.extraction.layouts import CHANNELS_FIRST, CHANNELS_LAST, UNKNOWN, layer_layouts
from layertap.extraction.reducers import Reducer, reducer_for
from layertap.models.registry import LoadedModel, as_loaded

log = logging.getLogger("layertap")

#: ``autocast`` names -> the dtype torch.autocast computes in
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_autocast(autocast: str | None) -> None:
    """Refuse an ``autocast`` name that is not a key of :data:`AUTOCAST_DTYPES`.

    Raises:
        LayertapError: naming the choices.
    """
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise LayertapError(f"{option_name('autocast')} must be one of {', '.join(AUTOCAST_DTYPES)}, not '{autocast}'")


def forward_mode(device_type: str, autocast: str | None) -> contextlib.ExitStack:
    """``torch.inference_mode``, plus ``torch.autocast`` when ``autocast`` names a dtype."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if autocast:
        stack.enter_context(torch.autocast(device_type, dtype=AUTOCAST_DTYPES[autocast]))
    return stack


def prepare_module(module: nn.Module, device: torch.device, channels_last: bool | str = "auto") -> bool:
    """Move the module to ``device`` (in place), in eval mode; use channels_last memory for conv nets.

    channels_last changes the order of float operations inside convolutions, not what is
    computed: results agree with the default layout to float32 rounding (tested); it is faster on
    CPUs (bench/RESULTS.md).

    Args:
        module: the module.
        device: where it runs.
        channels_last: True, False or ``"auto"`` (on cpu and cuda for models with a Conv2d).

    Returns:
        Whether channels_last is used.

    Example:
        >>> prepare_module(nn.Conv2d(3, 4, 3), torch.device("cpu"))
        True
    """
    if channels_last == "auto":
        channels_last = device.type in ("cpu", "cuda") and any(isinstance(m, nn.Conv2d) for m in module.modules())
    module.to(device)
    # both ways: a held Extractor is reused across calls that may ask differently
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    module.eval()
    return bool(channels_last)


class LayerOutputs:
    """Turns a layer's raw output into what is stored: batch first, reduced, flattened.

    Shared by every tap strategy, so all of them store the same numbers.

    Args:
        model: the model that runs (its sequence-first modules, prefix tokens and layouts).
        layers: resolved layer names.
        reduce: one reducer spec for all layers or ``{layer_or_pattern: spec}`` (see
            :mod:`layertap.extraction.reducers`).
        flatten: reshape each output to (B, N) after reducing.

    Example:
        >>> outs = LayerOutputs(lt.load_model("resnet18", weights="random"), ["layer1"], "avg", False)
        >>> outs("layer1", torch.zeros(2, 64, 56, 56), copy=False).shape
        torch.Size([2, 64])
    """

    def __init__(
        self, model: LoadedModel, layers: list[str], reduce: str | dict[str, str] | None, flatten: bool
    ) -> None:
        self.model = model
        self.layers = layers
        self.flatten = flatten
        self.reducers: dict[str, Reducer] = {n: reducer_for(n, reduce) for n in layers}
        #: per layer, whether its reducer applied to its output (known after the first call)
        self.reduced: dict[str, bool] = {}
        # Known from the modules, not the shapes: (B, C, H, W) and (B, H, W, C) look alike.
        self.layouts = layer_layouts(model.module, tappable(model), layers)
        #: the layout of each layer's 4-/5-D output where it matters: pooled by a spatial/time reducer,
        #: or stored not channels-first (known after the first call; recorded in the manifest)
        self.layout_used: dict[str, str] = {}
        self._seq_first = {n: any(n == p or n.startswith(p + ".") for p in model.sequence_first) for n in layers}

    def __call__(self, name: str, out: Any, copy: bool) -> torch.Tensor:
        """Layer ``name``'s raw output ``out`` as stored.

        Args:
            name: the layer.
            out: what its module returned (containers are unwrapped).
            copy: whether a later in-place op could still change ``out`` (then the result never
                shares its storage).

        Returns:
            The tensor to store, batch first.
        """
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
                f"{option_spelling('reduce', spec)}: cannot tell whether layer {name}'s {tuple(t.shape)} output is channels-first or "
                f"channels-last; store it unreduced ({option_spelling('reduce', {name: 'none'})}) or tap the block that contains it"
            )
        return t.movedim(-1, 1) if layout == CHANNELS_LAST else t


@runtime_checkable
class Tap(Protocol):
    """One strategy for collecting the outputs of named layers (see the module docstring).

    ``__call__(x)`` runs a batch ``x`` (already on the model's device) and returns, per layer in
    ``layers`` order, its outputs in call order, each already finished by the shared
    :class:`LayerOutputs` (reduced, batch first). ``calls`` is how many outputs each layer gives
    per forward (None until known). ``close()`` releases what the tap attached to the model (it
    may be called any number of times; the tap stays usable). ``describe()`` is a JSON-able record
    of how outputs were computed.
    """

    #: short name of the strategy ("hooks", "torch.compile", ...)
    name: str
    layers: list[str]
    calls: dict[str, int] | None

    def __call__(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class _StopForward(Exception):
    """Raised from the last hook to end a forward pass whose remaining layers are not needed."""


class HookTap:
    """Forward hooks on the named layers of the eager model.

    Hooks are registered on the first call and stay until :meth:`close`. With ``stop_early`` the
    first call of a batch of more than one image runs one image through the whole model to learn
    how often each layer runs; later forwards stop once all outputs exist.

    Args:
        model: the model that runs.
        layers: resolved layer names (``input``, ``MODULE:input`` capture an input).
        outputs: the shared finisher.
        stop_early: end the forward after the last needed output.
        autocast: see :class:`Extractor`.

    Example:
        >>> model = lt.load_model("resnet18", weights="random")
        >>> tap = HookTap(model, ["layer1"], LayerOutputs(model, ["layer1"], None, False))
        >>> tap(torch.zeros(1, 3, 64, 64))["layer1"][0].shape
        torch.Size([1, 64, 16, 16])
        >>> tap.close()
    """

    name = "hooks"

    def __init__(
        self,
        model: LoadedModel,
        layers: list[str],
        outputs: LayerOutputs,
        *,
        stop_early: bool = True,
        autocast: str | None = None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.outputs = outputs
        self.stop_early = stop_early
        self.autocast = autocast
        self.calls: dict[str, int] | None = None
        self._handles: list[Any] = []
        self._collected: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self._remaining: int | None = None

    def _hook(self, name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            last = self._remaining == 1  # the forward stops right here: nothing can overwrite the output
            self._collected[name].append(self.outputs(name, out, copy=not last))
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining == 0:
                    raise _StopForward

        return hook

    def _register(self, modules: dict[str, nn.Module], name: str) -> Any:
        """A forward hook on the layer; for ``input`` / ``MODULE:input`` (see :mod:`layertap.extraction.aliases`)
        a forward pre-hook on the model / that module, which captures its first positional input."""
        if name == INPUT or name.endswith(INPUT_SUFFIX):
            target = self.model.module if name == INPUT else modules[name.removesuffix(INPUT_SUFFIX)]
            hook = self._hook(name)
            return target.register_forward_pre_hook(lambda m, args: hook(m, args, args[0] if args else None))
        return modules[name].register_forward_hook(self._hook(name))

    def open(self) -> None:
        """Register the hooks (done by the first call when not yet done)."""
        if not self._handles:
            modules = tappable(self.model)
            self._handles = [self._register(modules, n) for n in self.layers]

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward(self, x: torch.Tensor, stop: bool) -> dict[str, list[torch.Tensor]]:
        self.open()
        self._collected = {n: [] for n in self.layers}
        self._remaining = sum(self.calls.values()) if (stop and self.calls) else None
        try:
            with forward_mode(x.device.type, self.autocast):
                self.model.module(x)
        except _StopForward:
            pass
        finally:
            self._remaining = None
        collected, self._collected = self._collected, {n: [] for n in self.layers}
        return collected

    def calibrate(self, x: torch.Tensor) -> dict[str, int]:
        """Run ``x`` through the whole model once to learn how often each layer runs per forward."""
        self._learn_calls(self._forward(x, stop=False))
        return self.calls  # type: ignore[return-value]

    def _learn_calls(self, collected: dict[str, list[torch.Tensor]]) -> None:
        silent = [n for n, v in collected.items() if not v]
        if silent:
            raise LayertapError(
                f"layer(s) {', '.join(silent)} never ran during the forward pass; tap modules that forward() uses"
            )
        self.calls = {n: len(v) for n, v in collected.items()}

    def __call__(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        if self.calls is None and self.stop_early and x.shape[0] > 1:
            self.calibrate(x[:1])  # one image through the whole model, then the batch stops early
        collected = self._forward(x, stop=self.stop_early)
        if self.calls is None:
            self._learn_calls(collected)
        return collected

    def describe(self) -> dict[str, Any]:
        return {"tap": self.name, "stop_early": self.stop_early}


class GraphTap:
    """The tapped part of the model as one ``torch.fx`` graph, run through ``torch.compile``.

    The graph (:attr:`graph_module`) returns one tensor per output; :attr:`keys` maps output ``i``
    to (position in :attr:`layers`, call index). The first call fixes the batch size: smaller
    batches are padded to it (no recompilation) and the padding is cut off the results. Building
    raises whatever tracing raises (a model ``torch.fx`` cannot trace, a tapped module inside
    another one); :class:`Extractor` then falls back to hooks.

    A subclass runs the same graph on another engine by overriding :meth:`compile_graph` (and
    :attr:`name`, :meth:`describe`).

    Args:
        model: the model that runs.
        layers: resolved layer names.
        outputs: the shared finisher.
        autocast: see :class:`Extractor`.

    Example:
        >>> model = lt.load_model("resnet18", weights="random")
        >>> tap = GraphTap(model, ["layer1"], LayerOutputs(model, ["layer1"], None, False))
        >>> tap.keys
        [(0, 0)]
    """

    name = "torch.compile"

    def __init__(
        self, model: LoadedModel, layers: list[str], outputs: LayerOutputs, *, autocast: str | None = None
    ) -> None:
        self.model = model
        self.layers = layers
        self.outputs = outputs
        self.autocast = autocast
        named = {n for n, _ in model.module.named_modules() if n}
        #: per layer, the module path the graph taps ("" for the model's output)
        self.targets = [n if n in named else model.layer_aliases.get(n, "" if n == OUTPUT else n) for n in layers]
        self.graph_module, self.keys = tap_graph(model.module, self.targets)
        self.calls: dict[str, int] | None = {
            n: sum(1 for pos, _ in self.keys if pos == i) for i, n in enumerate(layers)
        }
        self._fn = self.compile_graph(self.graph_module)
        #: the batch size the graph runs at (fixed by the first call)
        self.batch: int | None = None

    def compile_graph(self, graph: torch.fx.GraphModule) -> Any:
        """What runs the graph: here ``torch.compile`` (which compiles on the first call)."""
        return torch.compile(graph)

    def __call__(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        b = x.shape[0]
        if self.batch is None:
            self.batch = b
        elif b < self.batch:  # pad to the compiled shape: per-image results do not depend on the others
            fill = x[-1:].expand(self.batch - b, *x.shape[1:])
            cl = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
            x = torch.cat([x, fill]).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        with forward_mode(x.device.type, self.autocast):
            raw = self._fn(x)
        collected: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for (pos, _), out in zip(self.keys, raw, strict=True):
            name = self.layers[pos]
            collected[name].append(self.outputs(name, out, copy=False)[:b])
        return collected

    def matches_model(self) -> bool:
        """Whether every submodule and tensor the graph reads is still the model's own (a module
        moved to another device has new buffers; a swapped submodule is another object)."""
        reads = [n.target for n in self.graph_module.graph.nodes if n.op in ("call_module", "get_attr")]
        try:
            return all(attrgetter(t)(self.graph_module) is attrgetter(t)(self.model.module) for t in reads)
        except AttributeError:
            return False

    def close(self) -> None:
        """Nothing to remove: the graph holds no hooks."""

    def describe(self) -> dict[str, Any]:
        return {"tap": self.name, "batch": self.batch}


class EngineTap(GraphTap):
    """The tapped graph run by an exact CPU inference engine (ONNX Runtime or OpenVINO).

    The graph is exported to ONNX on the first call, when the input shape is known, or read from
    the on-disk cache (see :mod:`layertap.extraction.engines`); its batch axis is dynamic, so
    batches of any size run without padding or a new export. A model that ``torch.fx`` cannot
    trace is exported through its own forward with hooks (:class:`~layertap.extraction.engines.HookedForward`,
    traced by ``torch.export``); what that cannot export either falls back to torch in :class:`Extractor`.

    Args:
        model, layers, outputs, autocast: see :class:`GraphTap` (``autocast`` must be None).
        engine: "onnxruntime" or "openvino".
    """

    name = "engine"

    def __init__(
        self,
        model: LoadedModel,
        layers: list[str],
        outputs: LayerOutputs,
        *,
        autocast: str | None = None,
        engine: str = "onnxruntime",
    ) -> None:
        if autocast is not None:
            raise LayertapError(f"the {engine} backend computes in float32: leave out autocast")
        self.engine = engine
        #: the module exported: the fx graph, or the hooked forward (for models torch.fx cannot trace)
        self.hooked: HookedForward | None = None
        try:
            super().__init__(model, layers, outputs)
        except Exception:  # noqa: BLE001 - torch.fx cannot trace it: torch.export runs the real forward
            self.hooked = HookedForward(model.module, self.targets)
            self.calls, self.batch = None, None
            self._fn = self.compile_graph(self.hooked)

    def compile_graph(self, graph: nn.Module) -> Any:
        """The engine's session, built on the first call."""
        return EngineGraph(self.engine, graph)

    def __call__(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        if self.hooked is not None and self.calls is None:  # which outputs the hooked forward returns
            with torch.inference_mode():
                self.hooked(x[:1])
            self.keys = self.hooked.keys
            self.calls = {n: sum(1 for pos, _ in self.keys if pos == i) for i, n in enumerate(self.layers)}
        self.batch = None  # the batch axis is dynamic: a smaller last batch runs as it is, unpadded
        return super().__call__(x)

    def matches_model(self) -> bool:
        if self.hooked is not None:
            return self.hooked.module is self.model.module
        return super().matches_model()

    def describe(self) -> dict[str, Any]:
        return {"tap": self.name, "engine": self.engine, "engine_version": engine_version(self.engine)}


class Extractor:
    """Tap named layers of a model, in memory: ``with Extractor(model, ["layer3", "avgpool"]) as tap``.

    ``tap(x)`` runs ``x`` (a batch already on the model's device) through the model and returns
    ``{layer: Tensor}`` with the batch axis first (sequence-first transformer outputs are
    transposed). A module that runs ``k > 1`` times per forward gives ``layer#0`` …
    ``layer#{k-1}``. Hooks are removed on exit, whatever happens (a call outside a ``with`` block
    removes them when it returns).

    The strategy (:attr:`strategy`) is chosen once, here: :class:`GraphTap` when ``compile=True``,
    else :class:`HookTap`. A graph that cannot be built, or whose first run fails, falls back to
    hooks with one warning; the reason is kept in :attr:`fallback`. An Extractor is reusable: hold
    it across calls (and pass it to :func:`layertap.extract` as the model) to fold and compile once.

    Args:
        model: a loaded model or any ``nn.Module``.
        layers: names or globs (see :func:`layertap.extraction.layers.resolve_layers`).
        flatten: reshape each output to (B, N).
        stop_early: end the forward as soon as all requested outputs exist (before the first
            batch, one image runs through the whole model to learn how many times each layer runs).
        reduce: a reducer applied on the device (see :mod:`layertap.extraction.reducers`): one
            spec for all layers or ``{layer_or_pattern: spec}``.
        compile: run the tapped part of the model as one ``torch.compile``'d graph instead of hooks
            (see :func:`layertap.extraction.graph.tap_graph`): a faster forward after a one-off
            compile, equal to the eager forward to float32 rounding; the first call fixes the batch
            size (smaller batches are padded). :attr:`compiled` tells which ran.
        autocast: ``"float16"`` or ``"bfloat16"`` (opt-in, for GPUs) runs the forward under
            ``torch.autocast``: the numbers are no longer the float32 model's (about 1e-2 relative).
        fold_bn: tap a copy of the model with BatchNorm folded into the convolutions before it,
            where no tapped output changes (see :func:`layertap.extraction.graph.fold_untapped`).
            The copy is made once, here: later changes to the model's weights are not seen.
        backend: ``"torch"``, or an exact CPU engine, ``"onnxruntime"`` / ``"openvino"``
            (:class:`EngineTap`: the tapped graph exported to ONNX on the first call, or read from
            the disk cache; equal to eager to float32 rounding), or ``"auto"`` (an installed engine
            when the model is on the CPU, see :func:`layertap.extraction.engines.resolve_backend`).
            What the engine cannot export or run falls back to torch with one warning.

    Raises:
        LayertapError: an unknown layer, reducer or backend, or a bad ``autocast``.

    Example:
        >>> model = lt.load_model("resnet18", weights="random")
        >>> with lt.Extractor(model, ["layer3", "avgpool"], reduce="avg") as tap:
        ...     feats = tap(torch.zeros(2, 3, 224, 224))
        >>> feats["layer3"].shape
        torch.Size([2, 256])
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
        fold_bn: bool = False,
        backend: str = "torch",
    ) -> None:
        check_autocast(autocast)
        check_backend(backend)
        #: the model as given (its provenance and transform)
        self.model = as_loaded(model)
        self.layers = resolve_layers(self.model, layers)
        if backend == "auto":  # a held tap runs many batches: decide as for a large job on the model's device
            device = next(self.model.module.parameters(), torch.zeros(0)).device.type
            backend = resolve_backend("auto", device, AUTO_MIN_IMAGES, compile=compile, autocast=autocast)
        self.settings: dict[str, Any] = {
            "flatten": flatten,
            "stop_early": stop_early,
            "reduce": reduce,
            "compile": compile,
            "autocast": autocast,
            "fold_bn": fold_bn,
            "backend": backend,
        }
        running, self.folded_batchnorms = fold_untapped(self.model, self.layers) if fold_bn else (self.model, 0)
        #: the model that runs: a folded copy (``fold_bn``) or the model as given
        self.running = running
        #: the module that runs
        self.module = running.module
        self.outputs = LayerOutputs(running, self.layers, reduce, flatten)
        self._hooks = HookTap(running, self.layers, self.outputs, stop_early=stop_early, autocast=autocast)
        #: why the chosen strategy was given up for hooks (None: it was not)
        self.fallback: str | None = None
        self._tap: Tap = self._hooks
        self._proven = False  # the chosen tap has run once: later failures are real errors
        self._entered = 0
        if compile:
            try:
                self._tap = GraphTap(running, self.layers, self.outputs, autocast=autocast)
            except Exception as err:  # noqa: BLE001 - untraceable models run eagerly: same numbers, less speed
                self._fall_back(f"compile: cannot trace {self.module_name} with torch.fx ({err})", "compile")
        elif backend in ENGINES:
            try:
                self._tap = EngineTap(running, self.layers, self.outputs, autocast=autocast, engine=backend)
            except Exception as err:  # noqa: BLE001 - untraceable models run in torch: same numbers, less speed
                reason = f"backend {backend}: cannot trace {self.module_name} with torch.fx ({err})"
                self._fall_back(reason, f"{backend} (torch runs the model: same numbers)")

    def _fall_back(self, reason: str, what: str) -> None:
        """Use the hooks from now on; log and keep the reason (once: hooks never fall back)."""
        log.warning("%s; running without %s", reason, what)
        self.fallback = reason
        self._tap.close()
        self._tap = self._hooks

    # --- what the tap is and did -----------------------------------------------------------------

    @property
    def strategy(self) -> Tap:
        """The tap that runs (a :class:`HookTap`, :class:`GraphTap` or :class:`EngineTap`)."""
        return self._tap

    @property
    def compiled(self) -> bool:
        """Whether ``tap(x)`` runs a ``torch.compile``'d graph of the tapped layers (else hooks, eagerly)."""
        return self._tap.name == GraphTap.name

    @property
    def calls(self) -> dict[str, int] | None:
        """How many outputs each layer gives per forward (None until the first hooked call)."""
        return self._tap.calls

    @property
    def flatten(self) -> bool:
        return self.outputs.flatten

    @property
    def stop_early(self) -> bool:
        return bool(self.settings["stop_early"])

    @property
    def autocast(self) -> str | None:
        return self.settings["autocast"]

    @property
    def reducers(self) -> dict[str, Reducer]:
        return self.outputs.reducers

    @property
    def reduced(self) -> dict[str, bool]:
        """Per layer, whether its reducer applied to its output (known after the first call)."""
        return self.outputs.reduced

    @property
    def layouts(self) -> dict[str, str]:
        return self.outputs.layouts

    @property
    def layout_used(self) -> dict[str, str]:
        """The layout of pooled or not-channels-first 4-/5-D outputs (known after the first call)."""
        return self.outputs.layout_used

    @property
    def module_name(self) -> str:
        return self.model.name or type(self.model.module).__name__

    def describe(self) -> dict[str, Any]:
        """How the outputs are computed: the strategy's record, the fallback reason and folded pairs.

        Example:
            >>> lt.Extractor(nn.Linear(2, 2), ["output"]).describe()["tap"]
            'hooks'
        """
        return {**self._tap.describe(), "fallback": self.fallback, "folded_batchnorms": self.folded_batchnorms}

    # --- running ---------------------------------------------------------------------------------

    def to_device(self, device: torch.device, channels_last: bool | str = "auto") -> bool:
        """Move the module that runs to ``device`` (in place; see :func:`prepare_module`).

        A graph that no longer reads the module's own tensors (moved to another device) is traced
        again; its compiled code is then rebuilt on the next call.

        Returns:
            Whether channels_last is used.
        """
        use_cl = prepare_module(self.module, device, channels_last)
        if isinstance(self._tap, EngineTap) and not self._tap.matches_model():
            self._tap = EngineTap(self.running, self.layers, self.outputs, engine=self._tap.engine)
            self._proven = False
        elif isinstance(self._tap, GraphTap) and not self._tap.matches_model():
            self._tap = GraphTap(self.running, self.layers, self.outputs, autocast=self.autocast)
            self._proven = False
        return use_cl

    def __enter__(self) -> Extractor:
        self._entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered -= 1
        if not self._entered:
            self._tap.close()

    def calibrate(self, x: torch.Tensor) -> dict[str, int]:
        """Run ``x`` through the whole model once to learn how often each layer runs (hooks)."""
        try:
            return self._hooks.calibrate(x)
        finally:
            if not self._entered:
                self._hooks.close()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            collected = self._run(x)
        finally:
            if not self._entered:
                self._tap.close()
        return flat_outputs(collected)

    def _run(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        if self._proven or self._tap is self._hooks:
            return self._tap(x)
        try:
            collected = self._tap(x)
        except Exception as err:  # noqa: BLE001 - the compiler's failure, before any result: hooks give the same numbers
            first_line = str(err).splitlines()[0] if str(err) else repr(err)
            if isinstance(self._tap, EngineTap):
                engine = self._tap.engine
                reason = f"backend {engine}: cannot export or run {self.module_name} ({first_line})"
                self._fall_back(reason, f"{engine} (torch runs the model: same numbers)")
            else:
                self._fall_back(f"compile: torch.compile failed ({first_line})", "compile")
            return self._tap(x)
        self._proven = True
        return collected


def flat_outputs(collected: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per layer, one tensor: ``layer`` for a single call, ``layer#k`` for the k-th of several."""
    result: dict[str, torch.Tensor] = {}
    for name, outs in collected.items():
        if len(outs) == 1:
            result[name] = outs[0]
        else:
            result.update({f"{name}#{k}": t for k, t in enumerate(outs)})
    return result
