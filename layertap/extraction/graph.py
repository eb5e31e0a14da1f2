"""Graph passes on a model for exact, faster inference: BatchNorm folding and the tapped-part graph.

In eval mode, BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one convolution
with rescaled weights and a new bias. The result differs only by float32 rounding (tested
against the unfolded model), and the pass saves a full read and write of every such feature map
(measured gains: bench/RESULTS.md).

A pair is folded only when (a) the data flow is certain: the BatchNorm is the only consumer of
the convolution's output, read off a ``torch.fx`` trace (models that do not trace are left
alone), (b) the convolution's own output is not tapped (after folding it would be the
normalised output) and (c) the BatchNorm uses running statistics. A tapped BatchNorm stays
correct: it becomes an Identity that passes on exactly what it produced before.

:func:`tap_graph` cuts a model down to the ``torch.fx`` graph of its tapped part (what
:class:`~layertap.extraction.tap.GraphTap` compiles). Nothing here is cached: reuse is the
caller's object (an :class:`~layertap.extraction.tap.Extractor` held across calls).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from layertap.models.registry import LoadedModel


def foldable_pairs(module: nn.Module, protected: set[str]) -> list[tuple[str, str]]:
    """The conv+BatchNorm pairs that can be folded without changing any tapped output.

    Args:
        module: the model (traced with ``torch.fx``; a model that does not trace gives no pairs).
        protected: tapped module names: a tapped conv keeps its own output, so it is not folded.

    Returns:
        (conv name, bn name) pairs, in graph order.

    Example:
        >>> foldable_pairs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), set())
        [('0', '1')]
    """
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - dynamic control flow etc.: no folding, never a failure
        return []
    mods = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn = mods.get(users[0].target)
        conv_name, bn_name = str(node.target), str(users[0].target)
        if (
            isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats
            and bn.running_mean is not None
            and conv_name not in protected
            and bn.num_features == mods[conv_name].out_channels
        ):
            pairs.append((conv_name, bn_name))
    return pairs


def _set(root: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, value)


def fold_batchnorm(module: nn.Module, protected: set[str]) -> tuple[nn.Module, int]:
    """A copy of ``module`` (eval mode) with foldable conv+BN pairs folded; the original is untouched.

    Nothing is cached: a caller that folds once and reuses the copy holds it (an
    :class:`~layertap.extraction.tap.Extractor` built with ``fold_bn=True`` does).

    Args:
        module: the model; put in eval mode.
        protected: tapped module names, whose outputs must not change (see :func:`foldable_pairs`).

    Returns:
        (module, number of pairs folded); when nothing can be folded, ``module`` itself.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> fold_batchnorm(net, set())[1]
        1
    """
    module.eval()
    pairs = foldable_pairs(module, protected)
    if not pairs:
        return module, 0
    folded = copy.deepcopy(module)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)  # as foldable_pairs checked
        _set(folded, conv_name, fuse_conv_bn_eval(conv, bn))
        _set(folded, bn_name, nn.Identity())
    folded.eval()
    return folded, len(pairs)


def fold_untapped(loaded: LoadedModel, names: list[str]) -> tuple[LoadedModel, int]:
    """Fold BatchNorm layers into the convs before them, except where a tapped layer would change.

    Args:
        loaded: the model.
        names: the tapped layers (resolved names).

    Returns:
        The model (a folded copy when anything was folded: the caller's model is untouched) and
        the number of BatchNorm layers folded.

    Example:
        >>> model = lt.load_model("resnet18", weights="random")
        >>> folded, n = fold_untapped(model, ["layer1.0.conv1"])  # n == 19: the tapped conv keeps its BN
    """
    # A tapped conv must keep its own (pre-BatchNorm) output; aliases name modules too.
    protected = set(names) | {loaded.layer_aliases[n] for n in names if n in loaded.layer_aliases}
    module, folded = fold_batchnorm(loaded.module, protected)
    return (replace(loaded, module=module) if folded else loaded), folded


# --- the tapped part of a model as one graph -------------------------------------------------------------------------------


class _TapTracer(torch.fx.Tracer):
    """A torch.fx tracer that keeps the tapped modules whole (one node per call)."""

    def __init__(self, keep: set[str]) -> None:
        super().__init__()
        self.keep = keep

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.keep or super().is_leaf_module(m, qualname)


def tap_graph(module: nn.Module, targets: list[str]) -> tuple[torch.fx.GraphModule, list[tuple[int, int]]]:
    """A ``torch.fx.GraphModule`` that computes only what ``targets`` need and returns their outputs.

    Everything after the last tapped call is cut off (the early stop of the hook path), and an
    output that a later operation reads is cloned inside the graph, so an in-place op
    (``ReLU(inplace=True)``, ``out += identity``) cannot change it. The graph calls the model's own
    submodules: their weights are read at call time.

    Args:
        module: the model.
        targets: module paths (``""`` is the model's own output).

    Returns:
        The graph module (it returns a tuple) and, per returned output, (position in ``targets``,
        call index): a module called k times gives k outputs in call order.

    Raises:
        ValueError: a target cannot be a node of its own (it contains another target), never runs,
            or the model's output is not one traced value; and whatever ``torch.fx`` raises for
            models it cannot trace.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3))
        >>> gm, keys = tap_graph(net, ["0", "2"])  # keys == [(0, 0), (1, 0)]
    """
    inner = [t for t in targets if t]
    for a in inner:
        for b in inner:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"'{a}' contains '{b}'")
    tracer = _TapTracer(set(inner))
    graph = tracer.trace(module)
    nodes = list(graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    picked: list[tuple[torch.fx.Node, int, int]] = []
    for pos, target in enumerate(targets):
        if not target:
            picked.append((out_node.args[0], pos, 0))
            continue
        calls = [n for n in nodes if n.op == "call_module" and n.target == target]
        if not calls:
            raise ValueError(f"'{target}' never runs in the traced forward")
        picked += [(n, pos, k) for k, n in enumerate(calls)]
    if any(not isinstance(n, torch.fx.Node) for n, _, _ in picked):
        raise ValueError("the model's output is not a single traced value")
    order = {n: i for i, n in enumerate(nodes)}
    last = max(order[n] for n, _, _ in picked)
    graph.erase_node(out_node)
    for n in reversed(nodes[last + 1 : order[out_node]]):  # the early stop: nothing after the last tap
        graph.erase_node(n)
    outputs = []
    for n, _, _ in picked:
        if n.users:  # read again later in the graph, maybe in place: keep this output's own copy
            with graph.inserting_after(n):
                n = graph.call_method("clone", (n,))
        outputs.append(n)
    graph.output(tuple(outputs))
    graph.lint()
    return torch.fx.GraphModule(tracer.root, graph), [(pos, k) for _, pos, k in picked]
