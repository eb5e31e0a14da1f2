"""The ``layertap`` command: a thin layer over the library; errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .errors import LayertapError

log = logging.getLogger("layertap")

EXAMPLES = """examples:
  layertap models
  layertap layers alexnet
  layertap extract --model alexnet --layers features.10 classifier.4 --images ./images --out ./acts
  layertap extract --model resnet50 --layers 'layer?' avgpool --flatten --images ./images --out ./acts
  layertap extract --model alexnet --interactive --images ./images --out ./acts
  layertap export ./acts --format npy
"""


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="extract activations of one or more layers for a folder of images",
        description="Extract activations of one or more layers for every image and stream them to a run "
        "directory (Zarr arrays + manifest.json). Re-running the same command resumes an interrupted run. "
        "The underscore spellings of the original extract.py (--model_name, --module_name, --in_path, ...) "
        "are accepted too.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument(
        "--model",
        "--model_name",
        "-m",
        required=True,
        help="model name, e.g. alexnet or torchvision:resnet50 (see 'layertap models')",
    )
    p.add_argument(
        "--layers",
        "--layer",
        "--module_name",
        "-l",
        nargs="+",
        metavar="LAYER",
        help="module names or glob patterns ('features.*', 'layer?', 'layer4.**'); see 'layertap layers MODEL'",
    )
    p.add_argument("--interactive", action="store_true", help="print the model and ask which layer(s) to extract")
    p.add_argument(
        "--images",
        "--in_path",
        "-i",
        required=True,
        help="image folder (flat or class subfolders; THINGS recognised) or a .txt/.csv list of paths",
    )
    p.add_argument(
        "--out", "--out_path", "-o", required=True, help="run directory to write (created; resumed if unfinished)"
    )
    w = p.add_argument_group("weights")
    w.add_argument(
        "--weights",
        default=None,
        help="'pretrained' (default: the source's published weights, never silently replaced), 'random' "
        "(untrained, from --seed), a weights id such as IMAGENET1K_V2, or a state_dict/checkpoint file",
    )
    w.add_argument("--pretrained", action="store_true", help="same as --weights pretrained (original extract.py flag)")
    w.add_argument(
        "--model_path", "--model-path", metavar="FILE", help="same as --weights FILE (original extract.py flag)"
    )
    w.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option for the source, e.g. transform=validation (IPCL) or config='{\"hidden_size\": 64}' (hf)",
    )
    o = p.add_argument_group("options")
    o.add_argument("--batch-size", "--batch_size", type=int, default=64, help="images per forward pass (default 64)")
    o.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: the best available)")
    o.add_argument("--workers", type=int, default=None, help="image decoding processes (default: cores - 1)")
    o.add_argument(
        "--flatten",
        "--flatten_acts",
        action="store_true",
        help="store each image's activations as a vector (images x N)",
    )
    o.add_argument(
        "--reduce",
        nargs="+",
        metavar="SPEC",
        default=None,
        help="reduce outputs on the device before storing: one SPEC for all layers or LAYER=SPEC each: "
        "avg, max (global pooling), avg:K, max:K (K x K), cls, mean, cls+mean (ViT tokens), srp:K[:SEED]",
    )
    o.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="storage type (computation is always float32; default float32)",
    )
    o.add_argument(
        "--seed", "--rnd_seed", type=int, default=0, help="seed for random weights and --fraction (default 0)"
    )
    o.add_argument(
        "--fraction", type=float, default=None, help="extract a reproducible random fraction of the images (0-1]"
    )
    o.add_argument(
        "--things", action="store_true", help="images are THINGS (images/<concept>/...): require things_concepts.tsv"
    )
    o.add_argument(
        "--on-error",
        "--on_error",
        default="skip",
        choices=["skip", "fail"],
        help="unreadable image: skip it and record it in the manifest (default) or stop",
    )
    o.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    o.add_argument(
        "--format",
        "--file_format",
        dest="file_format",
        default=None,
        help="also export when done, into OUT/export-<format>: npy, txt, h5, mat, mat73, pt, parquet, csv",
    )
    o.add_argument(
        "--center_acts",
        "--center-acts",
        action="store_true",
        help="also write OUT/processed with each unit centred (mean over images subtracted)",
    )
    o.add_argument(
        "--normalize_reps",
        "--normalize-reps",
        action="store_true",
        help="also write OUT/processed with each image's vector l2-normalised",
    )
    o.add_argument(
        "--compress_acts",
        "--compress-acts",
        type=float,
        nargs="?",
        const=0.9,
        default=None,
        metavar="K",
        help="also write OUT/processed reduced by PCA to K components or a variance fraction (default 0.9)",
    )
    o.add_argument(
        "--chunk-rows", type=int, default=None, help="rows per stored chunk (default: about 16 MB per chunk)"
    )
    o.add_argument(
        "--shard",
        default="auto",
        metavar="I/N",
        help="extract the I-th of N slices (0-based) into OUT/shards/; default: from a Slurm job array or torchrun",
    )
    o.add_argument("--no-merge", action="store_true", help="do not merge the shards into OUT when the last one ends")
    o.add_argument("--no-channels-last", action="store_true", help="keep the default memory layout for conv nets")
    o.add_argument(
        "--no-fold-bn", action="store_true", help="do not fold BatchNorm into the preceding convolution (see README)"
    )
    o.add_argument(
        "--no-exif-transpose", action="store_true", help="ignore EXIF orientation tags (default: apply them)"
    )
    o.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at reduced scale when the transform shrinks them anyway (about 2x faster decoding; "
        "pixels differ slightly from a full decode, so off by default; recorded in the manifest)",
    )
    o.add_argument(
        "--compile",
        action="store_true",
        help="run the tapped part of the model through torch.compile, after a one-off compile of ~20-30 s: the bare "
        "forward is 1.1-1.2x faster on a 2-core CPU, but with decoding competing for the cores it may not pay "
        "(see README); equal to the eager forward to float32 rounding",
    )
    o.add_argument(
        "--autocast",
        choices=["float16", "bfloat16"],
        default=None,
        help="compute under torch.autocast in this dtype (for GPUs; changes the numbers by ~1e-2 relative; "
        "default: float32, exact)",
    )
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or info messages")
    p.set_defaults(func=cmd_extract)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layertap",
        description="Tap the hidden layers of vision models: list models and layers, extract activations "
        "for image folders to disk, export them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"layertap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the models layertap can load")
    p.add_argument("--source", default=None, help="only this source (e.g. torchvision)")
    p.add_argument("filter", nargs="?", default=None, help="only names containing this text")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="print a model's layers: name, type, output shape, parameters")
    p.add_argument("model", help="model name (see 'layertap models')")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="model option for the source")
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
    p.set_defaults(func=cmd_layers)

    _add_extract(sub)

    p = sub.add_parser("text", help="CLIP text features for a list of texts (e.g. THINGS concept names)")
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
    p.add_argument("--seed", type=int, default=0, help="seed for random weights")
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not l2-normalised) embeddings")
    p.set_defaults(func=cmd_text)

    from .cli_analysis import add_analysis_commands

    add_analysis_commands(sub)

    from .training.cli import add_train_commands

    add_train_commands(sub)

    p = sub.add_parser(
        "process", help="post-process a finished run into a new run: center, l2-normalise, PCA, random projection"
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--out", "-o", required=True, help="new run directory")
    p.add_argument("--layers", nargs="+", default=None, help="only these layers (default all)")
    p.add_argument("--center", "--center_acts", action="store_true", help="subtract each unit's mean over images")
    p.add_argument("--normalize", "--normalize_reps", action="store_true", help="l2-normalise each image's vector")
    p.add_argument(
        "--pca",
        type=float,
        default=None,
        metavar="K",
        help="keep K principal components (integer) or a fraction of variance (0-1)",
    )
    p.add_argument("--project", type=int, default=None, metavar="K", help="sparse random projection to K dimensions")
    p.add_argument("--seed", type=int, default=0, help="seed for the random projection")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser(
        "ensemble", help="feature-map ensemble (COLING 2020): flatten + concatenate layers (+ penultimate), then PCA"
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--layers", nargs="+", required=True, help="conv / max-pool layers of the run")
    p.add_argument("--penultimate", default=None, help="also concatenate this layer (e.g. classifier.4)")
    p.add_argument("--pca", type=float, default=None, metavar="K", help="components (integer) or variance fraction")
    p.add_argument("--out", "-o", required=True, help="new run directory holding the layer 'ensemble'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("merge", help="merge the shards of a sharded extraction into one run")
    p.add_argument("out", help="the --out of the sharded extraction (its shards are in OUT/shards/)")
    p.add_argument("shards", nargs="*", help="shard run directories (default: all in OUT/shards/)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "slurm",
        help="write sbatch scripts: a job array of extraction shards and a dependent merge job",
        description="Write OUT/slurm/extract.sbatch (job array), merge.sbatch and submit.sh for an extraction. "
        "Give the extract arguments after '--'.",
        epilog="example: layertap slurm --shards 8 --gpus-per-task 1 -- --model resnet50 --layers avgpool "
        "--images /data/things --out /scratch/acts",
    )
    p.add_argument("--shards", type=int, required=True, help="number of array tasks")
    p.add_argument("--cpus-per-task", type=int, default=4)
    p.add_argument("--mem", default="16G")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--gpus-per-task", type=int, default=0)
    p.add_argument("--setup", default=None, help="shell line run first in each job, e.g. 'module load cuda'")
    p.add_argument("--script-dir", default=None, help="where to write the scripts (default OUT/slurm)")
    p.add_argument("--submit", action="store_true", help="also run submit.sh now")
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="-- then the arguments of 'layertap extract'")
    p.set_defaults(func=cmd_slurm)

    p = sub.add_parser(
        "launch",
        help="run one extraction process per device on this machine (e.g. one per GPU), then merge",
        epilog="example: layertap launch --devices cuda:0 cuda:1 cuda:2 cuda:3 -- --model resnet50 "
        "--layers avgpool --images ./images --out ./acts",
    )
    p.add_argument("--devices", nargs="+", required=True, help="one shard per device, e.g. cuda:0 cuda:1")
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="-- then the arguments of 'layertap extract'")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("export", help="export a run's layers: npy, txt, h5, mat (v5 / v7.3), pt, parquet, csv")
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument(
        "--format",
        "-f",
        default="npy",
        help="npy, txt, h5, mat (v7.3 above 2 GB), mat73, pt, parquet or csv (default npy)",
    )
    p.add_argument("--out", "-o", default=None, help="output folder (default RUN/export-<format>)")
    p.add_argument("--layers", nargs="+", default=None, help="only these layers")
    p.set_defaults(func=cmd_export)
    return parser


def cmd_models(args: argparse.Namespace) -> None:
    from .models import _sources, list_models

    for name in list_models(args.source):
        if args.filter is None or args.filter.lower() in name.lower():
            src, model = name.split(":", 1)
            info = _sources()[src].model_info(model)
            extra = " | ".join(str(info[k]) for k in ("type", "training_data", "details") if info.get(k))
            print(f"{name:<40} {extra}" if extra else name)


def _options(items: list[str]) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LayertapError(f"--option '{item}': write KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_text(args: argparse.Namespace) -> None:
    from .clip import read_texts, write_text_features
    from .models import load_model

    texts = read_texts(args.texts, args.column)
    model = load_model(args.model, args.weights, seed=args.seed)
    out = write_text_features(model, texts, args.out, args.template, normalize=not args.no_normalize)
    log.info("wrote %d text embeddings to %s", len(texts), out / "text_features.npy")


def cmd_layers(args: argparse.Namespace) -> None:
    from .layers import format_layer_table, list_layers
    from .models import load_model

    model = load_model(args.model, args.weights, **_options(args.option))
    size = None if args.input_size is None else (model.input_size[0], *args.input_size)
    print(f"{model.name}  (input {'x'.join(map(str, size or model.input_size))})")
    print(format_layer_table(list_layers(model, size)))


def _ask_layers(model: object, names: list[str]) -> list[str]:
    from .layers import resolve_layers

    print(model)
    print(
        "\nLayers are named by their dotted path, e.g. " + ", ".join(names[:3]) + " (globs such as 'features.*' work)."
    )
    while True:
        try:
            answer = input("Layer(s) to extract (separate several by spaces): ").split()
        except EOFError:
            raise LayertapError("no layer chosen (end of input); pass --layers instead of --interactive") from None
        if not answer:
            continue
        try:
            return resolve_layers(model, answer)  # type: ignore[arg-type]
        except LayertapError as err:
            print(f"  {err}", file=sys.stderr)


def cmd_extract(args: argparse.Namespace) -> None:
    from .extraction import extract
    from .formats import export
    from .models import load_model
    from .reducers import parse_reduce_args

    sources = [s for s in (args.weights, "pretrained" if args.pretrained else None, args.model_path) if s]
    if len(set(sources)) > 1:
        raise LayertapError(
            f"conflicting weights: {', '.join(sources)}; give one of --weights, --pretrained, --model_path"
        )
    weights = sources[0] if sources else "pretrained"
    if args.file_format:
        from .formats import format_name

        format_name(args.file_format)  # fail before hours of extraction, not after
    if not args.layers and not args.interactive:
        raise LayertapError("name the layer(s) with --layers (see 'layertap layers MODEL') or use --interactive")
    model = load_model(args.model, weights, seed=args.seed, **_options(args.option))
    if weights == "random":
        log.warning("using RANDOM (untrained) weights, seed %d, as asked", args.seed)
    layers = args.layers or _ask_layers(model, [n for n, _ in model.module.named_modules() if n])
    run = extract(
        model,
        args.images,
        layers,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        flatten=args.flatten,
        reduce=parse_reduce_args(args.reduce),
        dtype=args.dtype,
        fraction=args.fraction,
        seed=args.seed,
        things=args.things,
        on_error=args.on_error,
        overwrite=args.overwrite,
        channels_last=False if args.no_channels_last else "auto",
        chunk_rows=args.chunk_rows,
        exif_transpose=not args.no_exif_transpose,
        fast_decode=args.fast_decode,
        fold_bn=not args.no_fold_bn,
        compile=args.compile,
        autocast=args.autocast,
        shard=args.shard,
        merge=not args.no_merge,
        progress=not args.quiet,
    )
    shapes = ", ".join(f"{name} {'x'.join(map(str, run[name].shape))}" for name in run.layers)
    log.info("stored %s in %s", shapes, run.path)
    if args.center_acts or args.normalize_reps or args.compress_acts:
        from .postprocess import postprocess

        run = postprocess(
            run,
            run.path / "processed",
            center=args.center_acts,
            normalize=args.normalize_reps,
            pca=_components(args.compress_acts),
            seed=args.seed,
            overwrite=True,
        )
        log.info("post-processed copy in %s", run.path)
    if args.file_format:
        paths = export(run, args.file_format)
        log.info("exported %d files to %s", len(paths), paths[0].parent)


def _components(value: float | None) -> int | float | None:
    return None if value is None else (int(value) if value >= 1 else value)


def cmd_process(args: argparse.Namespace) -> None:
    from .postprocess import postprocess

    if not (args.center or args.normalize or args.pca or args.project):
        raise LayertapError("nothing to do: give --center, --normalize, --pca K and/or --project K")
    run = postprocess(
        args.run,
        args.out,
        args.layers,
        center=args.center,
        normalize=args.normalize,
        pca=_components(args.pca),
        projection=args.project,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    log.info("wrote %s (%s)", run.path, ", ".join(f"{n} {'x'.join(map(str, run[n].shape))}" for n in run.layers))


def cmd_ensemble(args: argparse.Namespace) -> None:
    from .postprocess import feature_map_ensemble

    feats = feature_map_ensemble(
        args.run, args.layers, args.penultimate, _components(args.pca), out=args.out, overwrite=args.overwrite
    )
    log.info("wrote the ensemble (%s) to %s", "x".join(map(str, feats.shape)), args.out)


def cmd_merge(args: argparse.Namespace) -> None:
    from .storage import merge_shards

    run = merge_shards(args.out, args.shards or None)
    log.info("merged %d images into %s", len(run.images), run.path)


def _extract_args(rest: list[str]) -> tuple[list[str], str]:
    """Validate the arguments after '--' as 'layertap extract' arguments; return them and --out."""
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if not rest:
        raise LayertapError(
            "give the extract arguments after '--', e.g. -- --model alexnet --layers fc --images I --out O"
        )
    parser = build_parser()
    try:
        parsed = parser.parse_args(["extract", *rest])
    except SystemExit:
        raise LayertapError("the arguments after '--' are not valid 'layertap extract' arguments (see above)") from None
    if parsed.interactive:
        raise LayertapError("--interactive cannot run in batch jobs; name the layers with --layers")
    return rest, parsed.out


def cmd_slurm(args: argparse.Namespace) -> None:
    import subprocess

    from .cluster import write_slurm_scripts

    rest, out = _extract_args(args.extract_args)
    paths = write_slurm_scripts(
        rest,
        out,
        args.shards,
        script_dir=args.script_dir,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        gpus_per_task=args.gpus_per_task,
        setup=args.setup,
    )
    print(f"wrote {paths['extract.sbatch']}, {paths['merge.sbatch']} and {paths['submit.sh']}")
    if args.submit:
        subprocess.run(["bash", str(paths["submit.sh"])], check=True)
    else:
        print(f"submit with: bash {paths['submit.sh']}")


def cmd_launch(args: argparse.Namespace) -> None:
    from .cluster import launch

    rest, out = _extract_args(args.extract_args)
    launch(rest, args.devices, out)
    log.info("all %d shards done and merged into %s", len(args.devices), out)


def cmd_export(args: argparse.Namespace) -> None:
    from .formats import export

    paths = export(args.run, args.format, args.out, args.layers)
    log.info("wrote %d files to %s", len(paths), paths[0].parent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    # Our own logger only: libraries (open_clip, timm, ...) keep their default (warnings only).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("layertap: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        args.func(args)
    except LayertapError as err:
        print(f"layertap: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("layertap: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
