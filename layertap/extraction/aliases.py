"""Layer aliases that mean the same thing in every model family.

Resolved from the module tree (``named_modules()``, no forward pass) into real tappable names,
which are what the tap hooks and what the manifest stores (with the alias asked for under
``layer_aliases``).

=================  ==========================================================================
alias              resolves to
=================  ==========================================================================
``input``          the preprocessed image batch the model receives (stored as ``input``)
``output``         the model's output (logits of a classifier, CLIP's image embedding)
``logits``         ``output``, for models with a classifier head (error otherwise)
``penultimate``    ``HEAD:input``: the input of the classifier head, i.e. exactly what the
                   classifier reads (after any pooling/flatten/class-token slicing done in
                   ``forward``). HEAD is the last ``Linear`` (or, without one, the last ``Conv2d``)
                   after the last block: ``fc`` (ResNet, RegNet, GoogLeNet), ``classifier.6``
                   (VGG, AlexNet), ``heads.head`` (torchvision ViT), ``head`` (Swin, timm ViT),
                   ``head.fc`` (timm ConvNeXt), ``classifier.1`` (SqueezeNet's conv head),
                   ``fc8.0`` (IPCL). CLIP and bare Hugging Face backbones have no head: error
``embedding``      CLIP: ``output`` (the projected image embedding); IPCL: ``l2norm`` (the
                   normalised 128-d projection). Other families: error
``block:K``        the K-th block (0-based; negative counts from the end: ``block:-1`` = last)
                   of the model's block list, found by these rules, first match wins:
                   Hugging Face: the encoder layers (``hidden_states.1..N``);
                   ``layer1..layerN`` children of the model (ResNet/ResNeXt/Wide ResNet in
                   torchvision and timm, CLIP RN*); ``stages.*`` (timm ConvNeXt & co.);
                   ``stage2..N`` (ShuffleNet); ``trunk_output.*`` (RegNet);
                   ``features.denseblock*`` (DenseNet); ``blocks.*`` (timm ViT, MaxViT);
                   ``transformer.resblocks.*`` (CLIP ViT); ``encoder.layers.*`` (torchvision
                   ViT); ``inception*`` (GoogLeNet); ``Mixed_*`` (Inception v3);
                   ``conv_block_*`` (IPCL); else the composite children of ``features`` /
                   ``layers`` that are stages or blocks (ConvNeXt, Swin, EfficientNet,
                   MobileNet, MNASNet, SqueezeNet: stems, norms, patch merging and
                   downsampling layers are not blocks); else the ``MaxPool2d`` layers that end
                   each stage (VGG, AlexNet)
``depth:P%``       the block at relative depth P of the same list: index round(P/100 x (N-1)),
                   so ``depth:0%`` = first, ``depth:50%`` = middle, ``depth:100%`` = last
=================  ==========================================================================
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from layertap.errors import LayertapError

ALIASES = ("input", "output", "logits", "penultimate", "embedding", "block:K", "depth:P%")
#: the input pseudo-layer and the suffix tapping a module's input instead of its output
INPUT = "input"
INPUT_SUFFIX = ":input"

_PATTERNS = [
    r"layer\d+",
    r"stages\.\d+",
    r"stage\d+",
    r"trunk_output\.[^.]+",
    r"features\.denseblock\d+",
    r"blocks\.\d+",
    r"transformer\.resblocks\.\d+",
    r"encoder\.layers\.[^.]+",
    r"encoder\.layer\.\d+",
    r"inception\d[a-z]",
    r"Mixed_\d[a-z]",
    r"conv_block_\d+",
]
_NOT_BLOCKS = ("Conv2dNormActivation", "PatchMerging", "PatchMergingV2", "_Transition")


def is_alias(name: str) -> bool:
    """Whether ``name`` is alias syntax (``block:3``, ``depth:50%``, ``penultimate``, ...)."""
    return name in ("input", "logits", "penultimate", "embedding") or bool(re.fullmatch(r"(block|depth):.*", name))


def _source(loaded: Any) -> str:
    return str(getattr(loaded, "provenance", {}).get("source", ""))


def _composite(m: nn.Module) -> bool:
    return any(True for _ in m.children())


def blocks(loaded: Any) -> list[str]:
    """The model's ordered block (stage or transformer block) names, by the rules in the table."""
    mod = loaded.module if hasattr(loaded, "module") else loaded
    aliases = getattr(loaded, "layer_aliases", {}) or {}
    hidden = sorted((int(k.split(".")[1]), v) for k, v in aliases.items() if re.fullmatch(r"hidden_states\.\d+", k))
    if len(hidden) > 1:
        return [v for i, v in hidden if i > 0]
    named = dict(mod.named_modules())
    for pattern in _PATTERNS:
        rx = re.compile(pattern + r"\Z")
        hits = [n for n in named if n and rx.match(n)]
        if len(hits) >= 2:
            return hits
    for parent in ("features", "layers"):
        container = named.get(parent)
        if container is None:
            continue
        hits = [
            f"{parent}.{k}"
            for k, c in container.named_children()
            if _composite(c)
            and type(c).__name__ not in _NOT_BLOCKS
            and (type(c) is not nn.Sequential or any(_composite(g) for g in c.children()))
        ]
        if len(hits) >= 2:
            return hits
    pools = [n for n, m in named.items() if isinstance(m, nn.MaxPool2d)]
    if len(pools) >= 2:
        return pools
    raise LayertapError(
        f"no block list found in {type(mod).__name__}; name the modules (see 'layertap layers MODEL')"
    )


def head(loaded: Any) -> str:
    """The classifier head: the last Linear (else Conv2d) after the last block."""
    mod = loaded.module if hasattr(loaded, "module") else loaded
    source = _source(loaded)
    if source in ("clip", "hf") and not hasattr(mod, "classifier"):
        raise LayertapError(
            f"{getattr(loaded, 'name', 'this model')} has no classifier head, so no 'penultimate'/'logits'; "
            "use 'embedding', 'output' or 'block:-1'"
        )
    names = [n for n, _ in mod.named_modules() if n]
    try:
        last_block = blocks(loaded)[-1]
        after = names.index(last_block) + 1
        while after < len(names) and names[after].startswith(last_block + "."):
            after += 1
    except (LayertapError, ValueError):
        after = 0
    named = dict(mod.named_modules())
    tail = names[after:]
    for kind in (nn.Linear, nn.Conv2d):
        found = [n for n in tail if isinstance(named[n], kind)]
        if found:
            return found[-1]
    raise LayertapError(
        f"no classifier head (Linear or Conv2d after the last block) in {type(mod).__name__}; "
        "use 'output' or 'block:-1'"
    )


def resolve_alias(loaded: Any, alias: str) -> str:
    """The real tappable name for ``alias`` (see the module's table).

    Raises:
        LayertapError: for a malformed alias, an index out of range, or an alias this family lacks.
    """
    if alias in (INPUT, "output"):
        return alias
    if alias == "logits":
        head(loaded)  # an error without a classifier
        return "output"
    if alias == "penultimate":
        return head(loaded) + INPUT_SUFFIX
    if alias == "embedding":
        source = _source(loaded)
        if source == "clip":
            return "output"
        if source == "ipcl":
            return "l2norm"
        raise LayertapError(
            f"'embedding' is defined for CLIP and IPCL models, not {getattr(loaded, 'name', 'this model')}; "
            "use 'penultimate' or 'block:-1'"
        )
    kind, _, arg = alias.partition(":")
    found = blocks(loaded)
    if kind == "block":
        if not re.fullmatch(r"-?\d+", arg):
            raise LayertapError(f"bad alias '{alias}': use block:K with an integer K, e.g. block:0 or block:-1")
        k = int(arg)
        if not -len(found) <= k < len(found):
            raise LayertapError(f"'{alias}' is out of range: this model has {len(found)} blocks (block:0..block:{len(found) - 1})")
        return found[k]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%?", arg)
    if kind == "depth" and m and float(m.group(1)) <= 100:
        return found[round(float(m.group(1)) / 100 * (len(found) - 1))]
    raise LayertapError(f"bad alias '{alias}': use depth:P% with P from 0 to 100, e.g. depth:50%")


def alias_table(loaded: Any) -> list[tuple[str, str]]:
    """Every alias this model supports with the name it resolves to (``block:K`` listed per block)."""
    rows = []
    for alias in ("input", "output", "logits", "penultimate", "embedding"):
        try:
            rows.append((alias, resolve_alias(loaded, alias)))
        except LayertapError:
            continue
    try:
        found = blocks(loaded)
    except LayertapError:
        found = []
    for k, name in enumerate(found):
        rows.append((f"block:{k}" + (" / block:-1" if k == len(found) - 1 else ""), name))
    for p in (0, 25, 50, 75, 100):
        if found:
            rows.append((f"depth:{p}%", resolve_alias(loaded, f"depth:{p}%")))
    return rows


def used_aliases(loaded: Any, layers: str | list[str]) -> dict[str, str]:
    """``{alias: real name}`` for the aliases among ``layers`` (what the manifest records)."""
    wanted = [layers] if isinstance(layers, str) else list(layers)
    return {w: resolve_alias(loaded, w) for w in wanted if is_alias(w) and w != INPUT}
