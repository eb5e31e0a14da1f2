"""Axis layout of each tapped layer's output: channels-first or channels-last.

Spatial and time reducers (:mod:`layertap.extraction.reducers`) pool the spatial axes of a conv map, so
they must know where the channels are. Most models give channels-first maps, (B, C, H, W) or
(B, C, T, H, W), but some give channels-last ones: torchvision ``swin_*``/``swin_v2_*``
``features.*`` (B, H, W, C), torchvision ``swin3d_*`` (B, T, H, W, C), timm models whose
``output_fmt`` is ``"NHWC"`` (swin, swinv2, mambaout, sequencer, ...). A shape alone cannot
tell the two apart, so the layout is inferred from the modules, once, before the first batch:

1. known module types: ``torchvision.ops.Permute`` (from its ``dims``), modules with a timm
   ``output_fmt`` attribute, torchvision's Swin blocks (channels-last) and ConvNeXt block
   (channels-first), exact ``nn.Linear``/``nn.LayerNorm`` (they act on the last axis, so on a
   map the last axis is the channels), convolutions, batch/group norms and pooling
   (channels-first by definition);
2. ``nn.Sequential``: the layout of its last child; an elementwise child (activation,
   dropout, identity) has the layout of its input, i.e. of the child before it;
3. any other module: channels-last inside a channels-last model (torchvision Swin, timm
   ``output_fmt="NHWC"``); channels-first in a model with no channels-last part at all (as
   before); otherwise :data:`UNKNOWN`, and a spatial reducer on it is refused.
"""

from __future__ import annotations

from torch import nn

from layertap.extraction.aliases import INPUT, INPUT_SUFFIX

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
UNKNOWN = "unknown"

# torchvision classes (by module, name) whose 4-/5-D outputs are channels-last / channels-first
_TV_LAST = {
    "SwinTransformerBlock",
    "SwinTransformerBlockV2",
    "PatchMerging",
    "PatchMergingV2",
    "ShiftedWindowAttention",
    "ShiftedWindowAttentionV2",
    "ShiftedWindowAttention3d",
    "PatchEmbed3d",
}
# blocks that use nn.Linear/LayerNorm on a permuted map inside but return a channels-first map
_KNOWN_FIRST = {
    ("torchvision.", "CNBlock"),
    ("timm.", "ConvNeXtBlock"),
    ("transformers.", "ConvNextLayer"),
    ("transformers.", "ConvNextV2Layer"),
}
_TV_LAST_MODELS = {"SwinTransformer", "SwinTransformer3d"}

# modules defined on channels-first maps
_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
)
# modules whose output has the layout of their input
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
)


def _torchvision_class(m: nn.Module) -> str | None:
    cls = type(m)
    return cls.__name__ if cls.__module__.startswith("torchvision.") else None


def _fmt(m: nn.Module) -> str | None:
    """A timm ``output_fmt`` (a str enum) as a layout, if the module has one."""
    fmt = getattr(m, "output_fmt", None)
    fmt = str(getattr(fmt, "value", fmt) or "").upper()
    return {"NHWC": CHANNELS_LAST, "NCHW": CHANNELS_FIRST}.get(fmt)


def _permute(m: nn.Module) -> str | None:
    dims = getattr(m, "dims", None)
    if type(m).__name__ != "Permute" or not isinstance(dims, (list, tuple)):
        return None
    dims = list(dims)
    if dims in ([0, 2, 3, 1], [0, 2, 3, 4, 1]):
        return CHANNELS_LAST
    if dims in ([0, 3, 1, 2], [0, 4, 1, 2, 3]):
        return CHANNELS_FIRST
    return UNKNOWN


def _last_axis_norm(m: nn.Module) -> bool:
    """A LayerNorm over the last axis: ``nn.LayerNorm`` or a subclass such as timm's, but not the
    ``LayerNorm2d``/``LayerNorm3d`` subclasses (torchvision, timm) that normalise channels-first maps."""
    return isinstance(m, nn.LayerNorm) and not type(m).__name__.lower().endswith(("2d", "3d"))


def _acts_on_last_axis(m: nn.Module) -> bool:
    """Whether ``m``'s direct children include an nn.Linear or a last-axis LayerNorm and no
    convolution/batch norm/pooling (with those, as in a ResNet with its ``fc``, the maps are
    channels-first)."""
    children = list(m.children())
    return any(type(c) is nn.Linear or _last_axis_norm(c) for c in children) and not any(
        isinstance(c, _FIRST_TYPES) for c in children
    )


def _declared(m: nn.Module) -> str | None:
    """The layout a module's type alone tells, or None."""
    tv = _torchvision_class(m)
    if tv in _TV_LAST:
        return CHANNELS_LAST
    cls = type(m)
    if any(cls.__module__.startswith(pkg) and cls.__name__ == name for pkg, name in _KNOWN_FIRST):
        return CHANNELS_FIRST
    for rule in (_permute, _fmt):
        found = rule(m)
        if found is not None:
            return found
    if type(m) is nn.Linear or _last_axis_norm(m):  # they act on the last axis: the channels
        return CHANNELS_LAST
    if isinstance(m, _FIRST_TYPES):
        return CHANNELS_FIRST
    return None


class LayoutInference:
    """Infers the output layout of modules of one model (see the module docstring)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.names = {id(m): n for n, m in root.named_modules()}
        self.modules = dict(root.named_modules())
        tv = _torchvision_class(root)
        #: a model whose feature maps are channels-last throughout
        self.last_model = tv in _TV_LAST_MODELS or (tv is None and _fmt(root) == CHANNELS_LAST)
        #: whether any part of the model declares channels-last outputs
        self.has_last = self.last_model or any(
            _declared(m) == CHANNELS_LAST and type(m) is not nn.Linear and not _last_axis_norm(m)
            for m in root.modules()
        )
        self._memo: dict[str, str] = {}

    def _parent(self, name: str) -> tuple[nn.Module, str] | None:
        if not name:
            return None
        parent = name.rpartition(".")[0]
        return self.modules[parent], parent

    def output(self, name: str) -> str:
        """The layout of the output of the module called ``name`` ("" = the whole model)."""
        if name not in self._memo:
            self._memo[name] = self._output(name)
        return self._memo[name]

    def _output(self, name: str) -> str:
        m = self.modules[name]
        declared = _declared(m)
        if declared is not None:
            return declared
        if isinstance(m, nn.Sequential) and len(m) > 0:
            return self.output(f"{name}.{len(m) - 1}" if name else str(len(m) - 1))
        # an activation, dropout, identity (also timm's own classes: a leaf without parameters)
        if isinstance(m, _ELEMENTWISE) or not (any(True for _ in m.children()) or any(True for _ in m.parameters())):
            found = self.input(name)
            if found != UNKNOWN:
                return found
            up = self._parent(name)
            # e.g. the activation in timm's Mlp between two nn.Linear: its input may be (B, H, W, C)
            if up is not None and _acts_on_last_axis(up[0]):
                return CHANNELS_LAST if self.last_model else UNKNOWN
        elif _acts_on_last_axis(m):  # e.g. timm's Mlp, a block with a LayerNorm: the map may be permuted
            return CHANNELS_LAST if self.last_model else UNKNOWN
        return self._default(m)

    def input(self, name: str) -> str:
        """The layout of the first input of module ``name``, where its parent makes it known."""
        up = self._parent(name)
        if up is None:
            return CHANNELS_FIRST  # the model's input: images (B, C, H, W) or clips (B, C, T, H, W)
        parent, pname = up
        if isinstance(parent, nn.Sequential):
            index = name.rpartition(".")[2]
            keys = list(parent._modules)
            pos = keys.index(index)
            if pos > 0:
                return self.output(f"{pname}.{keys[pos - 1]}" if pname else keys[pos - 1])
            return self.input(pname)
        return UNKNOWN

    def _default(self, m: nn.Module) -> str:
        if self.last_model:
            return CHANNELS_LAST
        if not self.has_last:
            return CHANNELS_FIRST
        # a model with some channels-last parts: channels-first unless this module contains one
        if any(_declared(sub) == CHANNELS_LAST for sub in m.modules()):
            return UNKNOWN
        return CHANNELS_FIRST

    def layer(self, layer: str, module: nn.Module) -> str:
        """The layout of a tapped layer: a module's output, or ``MODULE:input`` / ``input``."""
        if layer == INPUT:
            return CHANNELS_FIRST
        if layer.endswith(INPUT_SUFFIX):
            name = self.names.get(id(module))
            return UNKNOWN if name is None else self.input(name)
        name = self.names.get(id(module))
        return UNKNOWN if name is None else self.output(name)


def layer_layouts(root: nn.Module, modules: dict[str, nn.Module], layers: list[str]) -> dict[str, str]:
    """Per tapped layer, :data:`CHANNELS_FIRST`, :data:`CHANNELS_LAST` or :data:`UNKNOWN`.

    Args:
        root: the model.
        modules: tappable name -> module (see :func:`layertap.extraction.layers.tappable`).
        layers: the tapped layer names (``MODULE:input`` taps the input of ``MODULE``).

    Returns:
        ``{layer: layout}``, the layout of the layer's output before any reducer.
    """
    infer = LayoutInference(root)
    out: dict[str, str] = {}
    for layer in layers:
        base = layer.removesuffix(INPUT_SUFFIX)
        module = modules.get(base, root)
        out[layer] = infer.layer(layer, module)
    return out
