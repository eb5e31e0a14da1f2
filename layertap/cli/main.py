"""The ``layertap`` command: a thin layer over the library; errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from layertap.errors import LayertapError

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
        formatter_class=_Help,
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
        help="image folder (flat or class subfolders; THINGS recognised) or a .txt/.csv list of paths; "
        "a video, folder or .txt list of videos (see --fps, --every, --times, --clip-len); "
        "or a stimulus array stimuli.npy / stimuli.h5:DATASET (N x H x W x C, uint8 or float in [0, 1])",
    )
    v = p.add_argument_group("videos and stimulus arrays")
    v.add_argument("--fps", type=float, default=None, help="video: sample the frame shown every 1/FPS seconds")
    v.add_argument("--every", type=int, default=None, metavar="N", help="video: every N-th frame (default: all)")
    v.add_argument(
        "--times",
        default=None,
        metavar="TSV",
        help="video: sample at these times (a 'time' column in seconds; optional 'video' and 'id' columns); "
        "for video models each time starts a clip",
    )
    v.add_argument(
        "--clip-len", type=int, default=None, help="video models: frames per clip (default: the model's, 16)"
    )
    v.add_argument(
        "--clip-stride", type=int, default=None, help="video models: sampled frames between clip starts (default: clip length)"
    )
    v.add_argument("--ids", default=None, help="stimulus array: a table of row ids (.txt, or .csv/.tsv with 'id' column)")
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
    o = p.add_argument_group("extraction")
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
        metavar="FORMAT",
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
        help="extract the I-th of N slices (0-based) into OUT/shards/; default auto: the shard of a Slurm job array "
        "task or torchrun rank, else the whole set",
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
    o.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (per layer shape and bytes, total, estimated time, free space) and stop",
    )
    o.add_argument("--yes", "-y", action="store_true", help="start even when the output would not fit the free space")
    p.set_defaults(func=cmd_extract)


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written, and each option's default shown (unless its help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings or action.nargs == 0:
            return text  # said already, nothing to show, a positional, or a flag (its default is its absence)
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line with a pointer to this command's --help (not a 12-line usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="layertap",
        description="Tap the hidden layers of vision models: list models and layers, extract activations "
        "for image folders to disk, export them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    from layertap import __version__

    parser.add_argument("--version", action="version", version=f"layertap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "models",
        help="list the models layertap can load, with pretrained availability and the extra each needs",
        description="List loadable models as source:name, whether published weights exist ('pretrained') or "
        "only random weights ('random-only'), the pip extra the source needs ('core': none) and details. "
        "Listing every source imports each source's library (seconds); --source or --sources is faster.",
        epilog="examples:\n  layertap models --sources\n  layertap models --source torchvision\n"
        "  layertap models vit --pretrained",
        formatter_class=_Help,
    )
    p.add_argument("--source", default=None, help="only this source (e.g. torchvision; default: every installed one)")
    p.add_argument("--sources", action="store_true", help="list the sources only: installed or not, and the extra")
    p.add_argument("--pretrained", action="store_true", help="only models with published weights")
    p.add_argument(
        "--refresh", action="store_true", help="rebuild the cached model lists (kept per installed library version)"
    )
    p.add_argument("filter", nargs="?", default=None, help="only names containing this text (default: all)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "layers",
        help="print a model's layers: name, type, output shape, parameters",
        description="Print the architecture as a table: dotted module name (what --layers takes), type, output "
        "shape for one image and parameter count. One forward pass of a blank image on the CPU; names and shapes "
        "do not depend on the weights, so random weights are the default (no download).",
        epilog="examples:\n  layertap layers alexnet\n  layertap layers resnet50 --aliases\n"
        "  layertap layers timm:vit_small_patch16_224 --input-size 384 384",
        formatter_class=_Help,
    )
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
    p.add_argument(
        "--aliases",
        action="store_true",
        help="also list the layer aliases (input, output, logits, penultimate, embedding, block:K, depth:P%%) "
        "and the layers they resolve to for this model",
    )
    p.set_defaults(func=cmd_layers)

    _add_extract(sub)

    p = sub.add_parser(
        "plan",
        help="plan an extraction: per layer shape and bytes, total, estimated time, free space, --reduce options",
        description="Plan an extraction without writing anything: the same as 'layertap extract ARGS --dry-run'. "
        "A probe batch of up to 8 images runs through the model to time it and to read the stored shapes.",
        epilog="example: layertap plan --model resnet50 --layers 'layer?' avgpool --flatten --images ./images --out ./acts",
        formatter_class=_Help,
    )
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="the arguments of 'layertap extract'")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "text",
        help="CLIP text features for a list of texts (e.g. THINGS concept names)",
        description="Encode texts with a CLIP model's text tower into OUT/text_features.npy (l2-normalised unless "
        "--no-normalize), OUT/texts.tsv and a manifest. Several --template values are averaged (prompt ensembling).",
        epilog="example:\n  layertap text --model clip:ViT-B-32 --texts things_concepts.tsv "
        "--template 'a photo of a {}' --out ./text",
        formatter_class=_Help,
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
    p.add_argument("--seed", type=int, default=0, help="seed for random weights")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="model option, e.g. quick_gelu=false"
    )
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not l2-normalised) embeddings")
    p.set_defaults(func=cmd_text)

    from layertap.cli.analysis import add_analysis_commands

    add_analysis_commands(sub)

    from layertap.cli.encode import add_encode_command

    add_encode_command(sub)

    from layertap.cli.train import add_train_commands

    add_train_commands(sub)

    p = sub.add_parser(
        "process",
        help="post-process a finished run into a new run: center, l2-normalise, PCA, random projection",
        description="Write a new run with each layer centred (--center), l2-normalised per image (--normalize), "
        "reduced by PCA (--pca) and/or a sparse random projection (--project), in that order.",
        epilog="example:\n  layertap process ./acts --out ./acts-pca --center --pca 0.9",
        formatter_class=_Help,
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
        "ensemble",
        help="feature-map ensemble (COLING 2020): flatten + concatenate layers (+ penultimate), then PCA",
        description="Flatten and concatenate conv / max-pool layers of a run (plus --penultimate), optionally "
        "reduce by PCA, and store the result as the layer 'ensemble' of a new run.",
        epilog="example:\n  layertap ensemble ./acts --layers features.2 features.5 features.12 "
        "--penultimate classifier.4 --pca 0.9 --out ./ens",
        formatter_class=_Help,
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--layers", nargs="+", required=True, help="conv / max-pool layers of the run")
    p.add_argument("--penultimate", default=None, help="also concatenate this layer (e.g. classifier.4)")
    p.add_argument("--pca", type=float, default=None, metavar="K", help="components (integer) or variance fraction")
    p.add_argument("--out", "-o", required=True, help="new run directory holding the layer 'ensemble'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser(
        "verify",
        help="check a run: every chunk present, full size, and equal to its checksum recorded at commit",
        description="Check a run directory. Prints one line; exits 0 when the run is intact, 1 when it is "
        "damaged (naming the lost rows: re-run the extract command to recompute them).",
        epilog="example:\n  layertap verify ./acts && echo intact",
        formatter_class=_Help,
    )
    p.add_argument("run", help="the run directory (an --out of extract)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page for a run: model, layers, image thumbnails, RDMs, timing",
        description="Write RUN/report.html (or --out): model, weights, transform, layers with shapes and sizes, "
        "image thumbnails with classes, skipped images, an RDM per layer, the layer x layer similarity and "
        "timing. Everything is inlined (base64): the file opens offline and can be mailed as it is.",
        epilog="example: layertap report ./acts --max-images 24",
        formatter_class=_Help,
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--out", "-o", default=None, help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--max-images", type=int, default=48, help="image thumbnails shown")
    p.add_argument("--max-layers", type=int, default=12, help="layers with an RDM figure")
    p.add_argument("--metric", default="correlation", choices=["correlation", "euclidean", "cosine"], help="RDM metric")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "merge",
        help="merge the shards of a sharded extraction into one run",
        description="Merge the shard runs of 'layertap extract --shard I/N' (or a Slurm job array) into OUT, "
        "byte-identical to an unsharded run. The last shard to finish does this by itself unless --no-merge.",
        epilog="example:\n  layertap merge ./acts",
        formatter_class=_Help,
    )
    p.add_argument("out", help="the --out of the sharded extraction (its shards are in OUT/shards/)")
    p.add_argument("shards", nargs="*", help="shard run directories (default: all in OUT/shards/)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "slurm",
        help="write sbatch scripts: a job array of extraction shards and a dependent merge job",
        description="Write OUT/slurm/extract.sbatch (job array), merge.sbatch and submit.sh for an extraction. "
        "Give the extract arguments after '--'. Relative paths in them (--images, --out, weights and model "
        "files) are written into the scripts as absolute paths, and the jobs run in the current directory.",
        epilog="examples:\n  layertap slurm --shards 8 --gpus-per-task 1 -- --model resnet50 --layers avgpool \\\n"
        "      --images /data/things --out /scratch/acts\n"
        "  layertap slurm --shards 16 --partition gpu --setup 'module load cuda' --submit -- \\\n"
        "      --model alexnet --layers 'features.*' --images ./images --out ./acts",
        formatter_class=_Help,
    )
    p.add_argument("--shards", type=int, required=True, help="number of array tasks")
    p.add_argument("--cpus-per-task", type=int, default=4, help="CPU cores per array task (default: %(default)s)")
    p.add_argument("--mem", default="16G", help="memory per array task and for the merge job (default: %(default)s)")
    p.add_argument("--time", default="04:00:00", help="time limit per job, HH:MM:SS (default: %(default)s)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", default=None, help="Slurm account (default: yours)")
    p.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per array task (default: %(default)s)")
    p.add_argument("--setup", default=None, help="shell line run first in each job, e.g. 'module load cuda'")
    p.add_argument("--script-dir", default=None, help="where to write the scripts (default OUT/slurm)")
    p.add_argument("--submit", action="store_true", help="also run submit.sh now")
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="-- then the arguments of 'layertap extract'")
    p.set_defaults(func=cmd_slurm)

    p = sub.add_parser(
        "launch",
        help="run one extraction process per device on this machine (e.g. one per GPU), then merge",
        description="Start one 'layertap extract' process per device, each extracting one shard into OUT/shards/, "
        "and merge them into OUT when all succeed. Give the extract arguments after '--'. Running the same "
        "command again resumes failed or interrupted shards.",
        formatter_class=_Help,
        epilog="example:\n  layertap launch --devices cuda:0 cuda:1 cuda:2 cuda:3 -- --model resnet50 --layers avgpool \\\n"
        "      --images ./images --out ./acts",
    )
    p.add_argument("--devices", nargs="+", required=True, help="one shard per device, e.g. cuda:0 cuda:1")
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="-- then the arguments of 'layertap extract'")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser(
        "export",
        help="export a run's layers: npy, txt, h5, mat (v5 / v7.3), pt, parquet, csv",
        description="Export every (or the chosen) layer of a run with images.csv (path, class per row).",
        epilog="examples:\n  layertap export ./acts --format npy\n  layertap export ./acts --format mat --layers avgpool",
        formatter_class=_Help,
    )
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


def _options(items: list[str]) -> dict[str, object]:
    """``--option KEY=VALUE`` items as keyword arguments for the source.

    A VALUE is read as JSON (numbers, true/false, objects); plain words stay strings
    (``transform=validation``). A VALUE that starts like a JSON object, list or string must be
    valid JSON: a typo there is one error saying where, not a confusing failure inside the source.

    Args:
        items: the ``--option`` arguments as given.

    Returns:
        {KEY: value}.
    """
    import json

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LayertapError(f"--option '{item}': write KEY=VALUE, e.g. transform=validation")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as err:
            if value.lstrip()[:1] in ("{", "[", '"'):
                shown = value if len(value) <= 60 else value[:57] + "..."
                raise LayertapError(
                    f"--option {key}: invalid JSON at column {err.colno} ({err.msg}) in {shown!r}; "
                    f"""write e.g. {key}='{{"hidden_size": 384}}' (keys and strings in double quotes)"""
                ) from None
            out[key] = value
    return out


def _warn_random(seed: int) -> None:
    """The one loud warning whenever a command runs on untrained weights."""
    log.warning("using RANDOM (untrained) weights, seed %d, as asked", seed)


def cmd_text(args: argparse.Namespace) -> None:
    from layertap.clip import read_texts, write_text_features
    from layertap.models.registry import load_model

    texts = read_texts(args.texts, args.column)
    model = load_model(args.model, args.weights, seed=args.seed, **_options(args.option))
    if args.weights == "random":
        _warn_random(args.seed)
    out = write_text_features(model, texts, args.out, args.template, normalize=not args.no_normalize)
    log.info("wrote %d text embeddings to %s", len(texts), out / "text_features.npy")


def cmd_layers(args: argparse.Namespace) -> None:
    from layertap.extraction.layers import format_layer_table, list_layers
    from layertap.models.registry import load_model

    model = load_model(args.model, args.weights, **_options(args.option))
    size = None if args.input_size is None else (*model.input_size[:-2], *args.input_size)  # video: (C, T, H, W)
    print(f"{model.name}  (input {'x'.join(map(str, size or model.input_size))})")
    infos = list_layers(model, size)
    print(format_layer_table(infos))
    if args.aliases:
        print()
        print(_alias_lines(model, infos))


def _alias_lines(model: object, infos: list) -> str:
    """The aliases this model supports: alias, the name it resolves to, and that layer's output shape."""
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


def _ask_layers(model: object, names: list[str]) -> list[str]:
    from layertap.extraction.layers import format_layer_table, list_layers, resolve_layers

    infos = list_layers(model)  # type: ignore[arg-type]
    print(format_layer_table(infos))
    print()
    print(_alias_lines(model, infos))
    print(
        "\nLayers are named by their dotted path, e.g. " + ", ".join(names[:3]) + " (globs such as 'features.*' "
        "and the aliases above work)."
    )
    _complete_names([i.name for i in infos])
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


def _complete_names(names: list[str]) -> None:
    """Tab completion of layer names and aliases at the prompt (where readline exists and input is a terminal)."""
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


def cmd_extract(args: argparse.Namespace) -> None:
    from layertap.extraction.pipeline import extract
    from layertap.extraction.reducers import parse_reduce_args
    from layertap.models.registry import load_model
    from layertap.store.export import export

    sources = [s for s in (args.weights, "pretrained" if args.pretrained else None, args.model_path) if s]
    if len(set(sources)) > 1:
        raise LayertapError(
            f"conflicting weights: {', '.join(sources)}; give one of --weights, --pretrained, --model_path"
        )
    weights = sources[0] if sources else "pretrained"
    if args.file_format:
        from layertap.store.export import format_name

        format_name(args.file_format)  # fail before hours of extraction, not after
    if not args.layers and not args.interactive:
        raise LayertapError("name the layer(s) with --layers (see 'layertap layers MODEL') or use --interactive")
    model = load_model(args.model, weights, seed=args.seed, **_options(args.option))
    if weights == "random":
        _warn_random(args.seed)
    layers = args.layers or _ask_layers(model, [n for n, _ in model.module.named_modules() if n])
    images: object = args.images
    stimulus_options = {k: getattr(args, k) for k in ("fps", "every", "times", "clip_len", "clip_stride", "ids")}
    if any(v is not None for v in stimulus_options.values()):
        from layertap.data.stimuli import open_stimuli

        images = open_stimuli(args.images, things=args.things, model=model, **stimulus_options)
    if _plan_first(args, model, images, layers):
        return
    run = extract(
        model,
        images,
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
    # extract() itself says what it did: what it stored (images, rows, seconds), or "nothing to do"
    if args.center_acts or args.normalize_reps or args.compress_acts:
        from layertap.process.postprocess import postprocess

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
    from layertap.process.postprocess import postprocess

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
    from layertap.process.postprocess import feature_map_ensemble

    feats = feature_map_ensemble(
        args.run, args.layers, args.penultimate, _components(args.pca), out=args.out, overwrite=args.overwrite
    )
    log.info("wrote the ensemble (%s) to %s", "x".join(map(str, feats.shape)), args.out)


def cmd_verify(args: argparse.Namespace) -> None:
    from layertap.store.run import verify_run

    result = verify_run(args.run)
    if not result.ok:
        raise LayertapError(result.summary, exit_code=1)
    print(result.summary)


def _plan_first(args: argparse.Namespace, model: object, images: object, layers: list[str]) -> bool:
    """--dry-run: print the plan and return True. Otherwise refuse (before any work) a run whose
    arrays would not fit the free space, unless --yes; returns False to go on."""
    from layertap.extraction.planning import check_space, plan
    from layertap.extraction.reducers import parse_reduce_args

    kwargs = {
        "batch_size": args.batch_size,
        "flatten": args.flatten,
        "reduce": parse_reduce_args(args.reduce),
        "dtype": args.dtype,
        "fraction": args.fraction,
        "seed": args.seed,
        "things": args.things,
    }
    if args.dry_run:
        p = plan(model, images, layers, args.out, device=args.device, workers=args.workers, **kwargs)
        print(p)
        if not p.fits:
            print("the run would not fit: 'layertap extract' refuses it without --yes")
        return True
    if args.yes:
        return False
    try:  # shapes only (one blank image): errors in the job itself are extract's to report
        p = plan(model, images, layers, args.out, device="cpu", probe=0, fold_bn=False, **kwargs)
    except Exception:  # noqa: BLE001
        log.debug("no plan for the free-space check", exc_info=True)
        return False
    check_space(p)
    return False


def cmd_plan(args: argparse.Namespace) -> None:
    """Reached only for 'layertap plan' without extract arguments (main() turns the rest into extract --dry-run)."""
    raise LayertapError("give the extract arguments, e.g. layertap plan --model alexnet --layers fc --images I --out O")


def cmd_report(args: argparse.Namespace) -> None:
    from layertap.analysis.report import write_report

    path = write_report(args.run, args.out, max_images=args.max_images, max_layers=args.max_layers, metric=args.metric)
    print(f"report -> {path}")


def cmd_merge(args: argparse.Namespace) -> None:
    from layertap.store.run import merge_shards

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

    from layertap.shards.cluster import write_slurm_scripts

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
    from layertap.shards.cluster import launch

    rest, out = _extract_args(args.extract_args)
    launch(rest, args.devices, out)
    log.info("all %d shards done and merged into %s", len(args.devices), out)


def cmd_export(args: argparse.Namespace) -> None:
    from layertap.store.export import export

    paths = export(args.run, args.format, args.out, args.layers)
    log.info("wrote %d files to %s", len(paths), paths[0].parent)


INTERRUPTED = "layertap: interrupted; run the same command again to resume"


def _quiet_interrupt(_signum: int, _frame: object) -> None:
    """SIGINT once the command is over (interpreter shutdown: atexit handlers, worker and thread
    joins): exit at once with one line instead of a KeyboardInterrupt traceback."""
    try:
        print(INTERRUPTED, file=sys.stderr, flush=True)
    finally:
        os._exit(130)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``layertap`` command. Returns the exit code: 0, 1 (environment), 2 (bad input), 130 (Ctrl-C).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``, and then a Ctrl-C during interpreter
            shutdown also exits quietly with 130).
    """
    from layertap.errors import set_cli_spelling

    set_cli_spelling(True)
    model_name = None
    # Our handler lives only while the command runs: a later library call in the same process (a
    # notebook, a test) must not write to a stderr that may be gone by then.
    saved_logging = (log.handlers[:], log.propagate, log.level)
    try:
        parser = build_parser()
        words = sys.argv[1:] if argv is None else list(argv)
        if words[:1] == ["plan"] and not {"-h", "--help"} & set(words[1:]):
            words = ["extract", *words[1:], "--dry-run"]  # plan = extract --dry-run (same arguments)
        args = parser.parse_args(words)
        model_name = getattr(args, "model", None)
        quiet = getattr(args, "quiet", False)
        # Our own logger only: libraries (open_clip, timm, ...) keep their default (warnings only).
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("layertap: %(message)s"))
        log.handlers[:] = [handler]
        log.propagate = False
        log.setLevel(logging.WARNING if quiet else logging.INFO)
        args.func(args)
    except LayertapError as err:
        msg = str(err)
        if isinstance(model_name, str):  # name the model instead of the placeholder
            msg = msg.replace("'layertap layers MODEL'", f"'layertap layers {model_name}'")
        print(f"layertap: error: {msg}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if argv is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _quiet_interrupt)  # a second Ctrl-C: no traceback either
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    finally:
        set_cli_spelling(False)
        log.handlers[:], log.propagate = saved_logging[0], saved_logging[1]
        log.setLevel(saved_logging[2])
        if argv is None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _quiet_interrupt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
