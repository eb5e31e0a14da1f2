"""Layers: naming, glob resolution with suggestions, and the architecture table.

Layers are modules, named by their dotted ``named_modules()`` path (``features.10``,
``layer3.1.conv2``). Patterns: ``*`` matches within one name component (``features.*`` = the
direct children of ``features``), ``?`` one character, ``[..]`` a set, and ``**`` any number of
components (``layer4.**`` = everything inside ``layer4``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layertap.errors import LayertapError, close_matches
from layertap.extraction.aliases import is_alias as _is_alias
from layertap.extraction.aliases import resolve_alias as _resolve_alias
from layertap.globs import glob_regex, is_pattern
from layertap.models.registry import LoadedModel, as_loaded

#: the pseudo-layer for the model's own output (the root module has no name of its own)
OUTPUT = "output"


def tappable(model: nn.Module | LoadedModel) -> dict[str, nn.Module]:
    """Every tappable name -> module: dotted module names in definition order, then the
    source's aliases (e.g. Hugging Face ``hidden_states.3``), then ``output`` (the whole model)."""
    loaded = model if isinstance(model, LoadedModel) else None
    mod = model.module if isinstance(model, LoadedModel) else model
    named = {name: m for name, m in mod.named_modules() if name}
    table = dict(named)
    if loaded is not None:
        table.update({alias: named[target] for alias, target in loaded.layer_aliases.items() if target in named})
    table.setdefault(OUTPUT, mod)
    return table


def module_names(model: nn.Module | LoadedModel) -> list[str]:
    """Every tappable name (see :func:`tappable`)."""
    return list(tappable(model))


def resolve_layers(module: nn.Module | LoadedModel, layers: str | list[str]) -> list[str]:
    """Expand names and glob patterns into tappable names (each once, in the order asked for).

    Args:
        module: the model.
        layers: one name or several: module names, globs (``*`` within one dotted component,
            ``**`` across them; patterns match module names only, not aliases), aliases
            (``penultimate``, ``block:-1``, a source's own such as ``hidden_states.3``), ``output``
            (the model's own output), ``input`` or ``MODULE:input``.

    Returns:
        The resolved names.

    Raises:
        LayertapError: no layers, or an unknown name or a pattern that matches nothing (naming the
            closest valid names).

    Example:
        >>> resolve_layers(lt.load_model("resnet18", weights="random"), ["layer4.*.conv1", "avgpool"])
        ['layer4.0.conv1', 'layer4.1.conv1', 'avgpool']
    """
    wanted = [layers] if isinstance(layers, str) else list(layers)
    if not wanted:
        raise LayertapError("no layers given; name one or more, e.g. --layers avgpool (see 'layertap layers MODEL')")
    names = module_names(module)
    known = set(names)
    raw = module.module if isinstance(module, LoadedModel) else module
    plain = [n for n, _ in raw.named_modules() if n]  # what patterns match: real modules, not aliases or output
    out: list[str] = []
    for want in wanted:
        if is_pattern(want):
            rx = glob_regex(want)
            hits = [n for n in plain if rx.match(n)]
            if not hits:
                raise LayertapError(
                    f"layer pattern '{want}' matches no module{close_matches(want.replace('*', ''), names)}; "
                    "run 'layertap layers MODEL' to see the names"
                )
        elif want in known:
            hits = [want]
        elif want == "input" or (want.endswith(":input") and want[: -len(":input")] in known):
            hits = [want]  # the model's input / a module's input (forward pre-hook)
        elif _is_alias(want):
            hits = [_resolve_alias(module, want)]
        else:
            raise LayertapError(
                f"unknown layer '{want}'{close_matches(want, names)}; run 'layertap layers MODEL' to see the names"
            )
        out.extend(h for h in hits if h not in out)
    return out


def unwrap_output(output: Any) -> torch.Tensor | None:
    """The tensor a module produced, for modules that return containers (the one unwrapping rule).

    Args:
        output: what a module's ``forward`` returned.

    Returns:
        A tensor is itself; a tuple/list gives its first tensor (the hidden state for transformer
        blocks and RNNs); a dict or HF ``ModelOutput`` gives ``last_hidden_state`` or its first
        tensor value; None when there is no tensor.

    Example:
        >>> unwrap_output((torch.zeros(2), None)).shape
        torch.Size([2])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        output = [output["last_hidden_state"]] if "last_hidden_state" in output else list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def output_tensor(output: Any, name: str) -> torch.Tensor:
    """:func:`unwrap_output`, where no tensor is an error naming the layer.

    Raises:
        LayertapError: ``output`` holds no tensor (e.g. ``None``).
    """
    t = unwrap_output(output)
    if t is None:
        raise LayertapError(
            f"layer '{name}' returns {type(output).__name__}, not a tensor; tap one of its submodules instead"
        )
    return t


@dataclass
class LayerInfo:
    """One row of the architecture table. ``shape`` excludes the batch axis; ``params`` counts
    every parameter in the module and its children; ``calls`` is how often it ran per forward.

    Example:
        >>> info = lt.list_layers(lt.load_model("resnet18", weights="random"))[-2]
        >>> info.name, info.shape, info.calls
        ('fc', (1000,), 1)
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    params: int
    calls: int

    @property
    def depth(self) -> int:
        return 0 if self.name == OUTPUT else self.name.count(".")


def list_layers(model: nn.Module | LoadedModel, input_size: tuple[int, int, int] | None = None) -> list[LayerInfo]:
    """Every module with its type, output shape for one image of ``input_size`` and parameter count.

    Runs one forward pass on a single zero image on the CPU. Modules that never run in
    ``forward`` get ``shape=None`` and ``calls=0``.

    Args:
        model: the model.
        input_size: (C, H, W) of the zero image; default the model's own input size.

    Returns:
        One :class:`LayerInfo` per module, in definition order, then ``output``.

    Raises:
        LayertapError: a non-positive ``input_size``.

    Example:
        >>> [i.name for i in lt.list_layers(lt.load_model("resnet18", weights="random"))][:3]
        ['conv1', 'bn1', 'relu']
    """
    loaded = as_loaded(model)
    mod = loaded.module
    size = tuple(input_size or loaded.input_size)
    if any(int(s) < 1 for s in size):
        raise LayertapError(f"--input-size must be positive, got {'x'.join(map(str, size[-2:]))}")
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in shapes:
                try:
                    shapes[name] = tuple(output_tensor(out, name).shape[1:])
                except LayertapError:
                    shapes[name] = None

        return hook

    named = [(n, m) for n, m in mod.named_modules() if n] + [(OUTPUT, mod)]
    for name, m in named:
        handles.append(m.register_forward_hook(make_hook(name)))
    try:
        device = next((p.device for p in mod.parameters()), torch.device("cpu"))
        with torch.inference_mode():
            mod(torch.zeros((1, *size), device=device))
    except (RuntimeError, ValueError) as err:
        if input_size is None:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LayertapError(
            f"the model cannot run on {'x'.join(map(str, size[-2:]))} images ({first[:200]}); give a larger --input-size"
        ) from None
    finally:
        for h in handles:
            h.remove()
    return [
        LayerInfo(name, type(m).__name__, shapes.get(name), sum(p.numel() for p in m.parameters()), calls.get(name, 0))
        for name, m in named
    ]


def format_layer_table(infos: list[LayerInfo]) -> str:
    """The architecture as an indented table: name, type, output shape, parameters."""
    rows = [("layer", "type", "output shape", "params")]
    for info in infos:
        shape = "-" if info.shape is None else "x".join(str(s) for s in info.shape)
        if info.calls > 1:
            shape += f"  (x{info.calls} calls)"
        rows.append(("  " * info.depth + info.name, info.type, shape, f"{info.params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
