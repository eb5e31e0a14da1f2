"""``layertap models``, ``layertap layers`` and ``layertap text``: what can be loaded, and what it holds."""

from __future__ import annotations

import argparse
import logging
import sys

from layertap.cli.formatting import add_command
from layertap.cli.options import add_model_option, add_seed, model_options

log = logging.getLogger("layertap")


def add_models(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap models``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "models",
        cmd_models,
        help="list the models layertap can load, with pretrained availability and the extra each needs",
        description="List loadable models as source:name, whether published weights exist ('pretrained') or "
        "only random weights ('random-only'), the pip extra the source needs ('core': none) and details. "
        "Listing every source imports each source's library (seconds); --source or --sources is faster.",
        epilog="examples:\n  layertap models --sources\n  layertap models --source torchvision\n"
        "  layertap models vit --pretrained",
    )
    p.add_argument("--source", default=None, help="only this source (e.g. torchvision; default: every installed one)")
    p.add_argument("--sources", action="store_true", help="list the sources only: installed or not, and the extra")
    p.add_argument("--pretrained", action="store_true", help="only models with published weights")
    p.add_argument(
        "--refresh", action="store_true", help="rebuild the cached model lists (kept per installed library version)"
    )
    p.add_argument("filter", nargs="?", default=None, help="only names containing this text (default: all)")


def add_layers(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap layers``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "layers",
        cmd_layers,
        help="print a model's layers: name, type, output shape, parameters",
        description="Print the architecture as a table: dotted module name (what --layers takes), type, output "
        "shape for one image and parameter count. One forward pass of a blank image on the CPU; names and shapes "
        "do not depend on the weights, so random weights are the default (no download).",
        epilog="examples:\n  layertap layers alexnet\n  layertap layers resnet50 --aliases\n"
        "  layertap layers timm:vit_small_patch16_224 --input-size 384 384",
    )
    p.add_argument("model", help="model name (see 'layertap models')")
    add_model_option(p)
    p.add_argument(
        "--weights",
        default="random",
        help="weights to load (default random: names and shapes do not depend on weights)",
    )
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="image size for the output shapes (default: the model's input size)",
    )
    p.add_argument(
        "--aliases",
        action="store_true",
        help="also list the layer aliases (input, output, logits, penultimate, embedding, block:K, depth:P%%) "
        "and the layers they resolve to for this model",
    )


def add_text(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap text``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "text",
        cmd_text,
        help="CLIP text features for a list of texts (e.g. THINGS concept names)",
        description="Encode texts with a CLIP model's text tower into OUT/text_features.npy (l2-normalised unless "
        "--no-normalize), OUT/texts.tsv and a manifest. Several --template values are averaged (prompt ensembling).",
        epilog="example:\n  layertap text --model clip:ViT-B-32 --texts things_concepts.tsv "
        "--template 'a photo of a {}' --out ./text",
    )
    p.add_argument("--model", "-m", required=True, help="a CLIP model, e.g. clip:ViT-B-32")
    p.add_argument("--texts", required=True, help=".txt (one per line) or .tsv/.csv (Word/text/concept/name column)")
    p.add_argument("--column", default=None, help="column of a .tsv/.csv to read")
    p.add_argument(
        "--template",
        action="append",
        default=None,
        metavar="TEMPLATE",
        help="prompt template with {} for the text, e.g. 'a photo of a {}' (repeat to average several)",
    )
    p.add_argument("--out", "-o", required=True, help="folder for text_features.npy, texts.tsv, manifest.json")
    p.add_argument(
        "--weights", default="pretrained", help="'pretrained' (OpenAI's where published), a tag, 'random' or a file"
    )
    add_seed(p, "seed for random weights")
    add_model_option(p, "model option, e.g. quick_gelu=false")
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not l2-normalised) embeddings")


def cmd_models(args: argparse.Namespace) -> None:
    """Print the loadable models (or, with ``--sources``, the sources), one per line.

    Args:
        args: the parsed command line.
    """
    from layertap.models.catalog import model_catalog
    from layertap.models.registry import _sources

    if args.sources:  # one line per source: no source library is imported
        for src in _sources().values():
            ok = src.available()
            install = "core" if src.extra is None else f"pip install 'layertap[{src.extra}]'"
            print(f"{src.name:<12} {'installed' if ok else 'not installed':<14} {install:<32} {src.description}")
        return
    for entry in model_catalog(args.source, refresh=args.refresh):
        if args.filter is None or args.filter.lower() in entry.name.lower():
            if args.pretrained and entry.pretrained is not True:
                continue
            mark = {None: "-", True: "pretrained", False: "random-only"}[entry.pretrained]
            print(f"{entry.name:<40} {mark:<11} {entry.extra or 'core':<5} {entry.info}".rstrip())


def warn_random(seed: int) -> None:
    """The one loud warning whenever a command runs on untrained weights.

    Args:
        seed: the seed the weights were drawn from.
    """
    log.warning("using RANDOM (untrained) weights, seed %d, as asked", seed)


def cmd_text(args: argparse.Namespace) -> None:
    """Encode the texts with the CLIP model's text tower into OUT.

    Args:
        args: the parsed command line.
    """
    from layertap.clip import read_texts, write_text_features
    from layertap.models.registry import load_model

    texts = read_texts(args.texts, args.column)
    model = load_model(args.model, args.weights, seed=args.seed, **model_options(args.option))
    if args.weights == "random":
        warn_random(args.seed)
    out = write_text_features(model, texts, args.out, args.template, normalize=not args.no_normalize)
    log.info("wrote %d text embeddings to %s", len(texts), out / "text_features.npy")


def cmd_layers(args: argparse.Namespace) -> None:
    """Print the model's layer table (and, with ``--aliases``, its aliases).

    Args:
        args: the parsed command line.
    """
    from layertap.extraction.layers import format_layer_table, list_layers
    from layertap.models.registry import load_model

    model = load_model(args.model, args.weights, **model_options(args.option))
    size = None if args.input_size is None else (*model.input_size[:-2], *args.input_size)  # video: (C, T, H, W)
    print(f"{model.name}  (input {'x'.join(map(str, size or model.input_size))})")
    infos = list_layers(model, size)
    print(format_layer_table(infos))
    if args.aliases:
        print()
        print(alias_lines(model, infos))


def alias_lines(model: object, infos: list) -> str:
    """The aliases this model supports: alias, the name it resolves to, and that layer's output shape.

    Args:
        model: the loaded model.
        infos: its layers (:func:`layertap.extraction.layers.list_layers`).

    Returns:
        A table, one alias per line, under a header.
    """
    from layertap.extraction.aliases import alias_table

    shapes = {i.name: i.shape for i in infos}
    rows = [("alias", "layer", "output shape")]
    for alias, name in alias_table(model):
        base = name.removesuffix(":input")
        shape = shapes.get(base) if base == name else None
        if name == "input":
            shape = tuple(model.input_size)  # type: ignore[attr-defined]
        elif base != name:  # a head's input: what a Linear reads is in_features wide
            width = getattr(dict(model.module.named_modules()).get(base), "in_features", None)  # type: ignore[attr-defined]
            shape = None if width is None else (width,)
        rows.append((alias, name, "-" if shape is None else "x".join(map(str, shape))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def complete_names(names: list[str]) -> None:
    """Tab completion of layer names and aliases at the prompt (where readline exists and input is a terminal).

    Args:
        names: the model's layer names.
    """
    if not sys.stdin.isatty():
        return
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows
        return
    words = [*names, "input", "output", "logits", "penultimate", "embedding", "block:", "depth:"]

    def complete(text: str, state: int) -> str | None:
        hits = [w for w in words if w.startswith(text)]
        return hits[state] if state < len(hits) else None

    readline.set_completer_delims(" ")
    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")
