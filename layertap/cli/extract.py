"""The extraction commands: ``extract``, ``plan``, ``merge``, ``slurm``, ``launch``, ``verify``, ``export``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from layertap.cli.formatting import add_command
from layertap.cli.models import alias_lines, complete_names, warn_random
from layertap.cli.options import (
    add_batch_size,
    add_device,
    add_model_option,
    add_quiet,
    add_seed,
    add_workers,
    keyword_args,
    model_options,
    non_negative,
    pca_components,
    positive,
)
from layertap.errors import LayertapError, StorageError

log = logging.getLogger("layertap")

EXAMPLES = """examples:
  layertap models
  layertap layers alexnet
  layertap extract --model alexnet --layers features.10 classifier.4 --images ./images --out ./acts
  layertap extract --model resnet50 --layers 'layer?' avgpool --flatten --images ./images --out ./acts
  layertap extract --model alexnet --interactive --images ./images --out ./acts
  layertap export ./acts --format npy
"""


def add_extract(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``layertap extract``; returns its parser (``plan``, ``slurm`` and ``launch`` read its arguments).

    Args:
        sub: the subparsers action of the ``layertap`` parser.

    Returns:
        The ``extract`` parser.
    """
    p = add_command(
        sub,
        "extract",
        cmd_extract,
        help="extract activations of one or more layers for a folder of images",
        description="Extract activations of one or more layers for every image and stream them to a run "
        "directory (Zarr arrays + manifest.json). Re-running the same command resumes an interrupted run. "
        "The underscore spellings of the original extract.py (--model_name, --module_name, --in_path, ...) "
        "are accepted too.",
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
    # what cmd_extract hands to open_stimuli when any of them is given: this group's options, whatever they are
    p.set_defaults(stimulus_options=tuple(a.dest for a in v._group_actions))
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
    add_model_option(
        w, "model option for the source, e.g. transform=validation (IPCL) or config='{\"hidden_size\": 64}' (hf)"
    )
    o = p.add_argument_group("extraction")
    add_batch_size(o, 64, "images per forward pass", "--batch_size")
    add_device(o)
    add_workers(o)
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
    add_seed(o, "seed for random weights and --fraction", "--rnd_seed")
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
    o.add_argument(
        "--no-merge",
        dest="merge",
        action="store_false",
        help="do not merge the shards into OUT when the last one ends",
    )
    o.add_argument("--no-channels-last", action="store_true", help="keep the default memory layout for conv nets")
    o.add_argument(
        "--no-fold-bn",
        dest="fold_bn",
        action="store_false",
        help="do not fold BatchNorm into the preceding convolution (see README)",
    )
    o.add_argument(
        "--no-exif-transpose",
        dest="exif_transpose",
        action="store_false",
        help="ignore EXIF orientation tags (default: apply them)",
    )
    o.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at reduced scale when the transform shrinks them anyway (faster decoding, see "
        "bench/RESULTS.md; pixels differ slightly from a full decode, so off by default; recorded in the manifest)",
    )
    o.add_argument(
        "--compile",
        action="store_true",
        help="run the tapped part of the model through torch.compile, after a one-off compile: a faster bare "
        "forward, which may not pay where decoding competes for the cores (measurements: bench/RESULTS.md); "
        "equal to the eager forward to float32 rounding",
    )
    o.add_argument(
        "--autocast",
        choices=["float16", "bfloat16"],
        default=None,
        help="compute under torch.autocast in this dtype (for GPUs; changes the numbers by ~1e-2 relative; "
        "default: float32, exact)",
    )
    o.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime", "openvino"],
        default="auto",
        help="what runs the float32 forward: torch, or an exact CPU engine (ONNX Runtime, OpenVINO; "
        "pip install 'layertap[cpu]'; faster on most CPUs (numbers: README), equal to torch to float32 rounding, the export cached "
        "on disk). auto (default): an installed engine on a CPU for jobs of 256 images or more, else torch",
    )
    add_quiet(o)
    o.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (per layer shape and bytes, total, estimated time, free space) and stop",
    )
    o.add_argument("--yes", "-y", action="store_true", help="start even when the output would not fit the free space")
    return p


def add_plan(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap plan`` (:func:`layertap.cli.app.main` turns it into ``extract ... --dry-run``).

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "plan",
        cmd_plan,
        help="plan an extraction: per layer shape and bytes, total, estimated time, free space, --reduce options",
        description="Plan an extraction without writing anything: the same as 'layertap extract ARGS --dry-run'. "
        "A probe batch of up to 8 images runs through the model to time it and to read the stored shapes.",
        epilog="example: layertap plan --model resnet50 --layers 'layer?' avgpool --flatten --images ./images --out ./acts",
    )
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="the arguments of 'layertap extract'")


def add_verify(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap verify``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "verify",
        cmd_verify,
        help="check a run: every chunk present, full size, and equal to its checksum recorded at commit",
        description="Check a run directory. Prints one line; exits 0 when the run is intact, 1 when it is "
        "damaged (naming the lost rows: re-run the extract command to recompute them).",
        epilog="example:\n  layertap verify ./acts && echo intact",
    )
    p.add_argument("run", help="the run directory (an --out of extract)")


def add_merge(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap merge``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "merge",
        cmd_merge,
        help="merge the shards of a sharded extraction into one run",
        description="Merge the shard runs of 'layertap extract --shard I/N' (or a Slurm job array) into OUT, "
        "byte-identical to an unsharded run. The last shard to finish does this by itself unless --no-merge.",
        epilog="example:\n  layertap merge ./acts",
    )
    p.add_argument("out", help="the --out of the sharded extraction (its shards are in OUT/shards/)")
    p.add_argument("shards", nargs="*", help="shard run directories (default: all in OUT/shards/)")


def add_slurm(sub: argparse._SubParsersAction, extract: argparse.ArgumentParser) -> None:
    """Add ``layertap slurm``.

    Args:
        sub: the subparsers action.
        extract: the ``extract`` parser, which checks the arguments given after ``--``.
    """
    p = add_command(
        sub,
        "slurm",
        cmd_slurm,
        help="write sbatch scripts: a job array of extraction shards and a dependent merge job",
        description="Write OUT/slurm/extract.sbatch (job array), merge.sbatch and submit.sh for an extraction. "
        "Give the extract arguments after '--'. Relative paths in them (--images, --out, weights and model "
        "files) are written into the scripts as absolute paths, and the jobs run in the current directory.",
        epilog="examples:\n  layertap slurm --shards 8 --gpus-per-task 1 -- --model resnet50 --layers avgpool \\\n"
        "      --images /data/things --out /scratch/acts\n"
        "  layertap slurm --shards 16 --partition gpu --setup 'module load cuda' --submit -- \\\n"
        "      --model alexnet --layers 'features.*' --images ./images --out ./acts",
    )
    p.add_argument("--shards", type=positive(int), required=True, help="number of array tasks")
    p.add_argument("--cpus-per-task", type=positive(int), default=4, help="CPU cores per array task (default: %(default)s)")
    p.add_argument("--mem", default="16G", help="memory per array task and for the merge job (default: %(default)s)")
    p.add_argument("--time", default="04:00:00", help="time limit per job, HH:MM:SS (default: %(default)s)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", default=None, help="Slurm account (default: yours)")
    p.add_argument("--gpus-per-task", type=non_negative(int), default=0, help="GPUs per array task (default: %(default)s)")
    p.add_argument("--setup", default=None, help="shell line run first in each job, e.g. 'module load cuda'")
    p.add_argument("--script-dir", default=None, help="where to write the scripts (default OUT/slurm)")
    p.add_argument("--submit", action="store_true", help="also run submit.sh now")
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="-- then the arguments of 'layertap extract'")
    p.set_defaults(extract_parser=extract)


def add_launch(sub: argparse._SubParsersAction, extract: argparse.ArgumentParser) -> None:
    """Add ``layertap launch``.

    Args:
        sub: the subparsers action.
        extract: the ``extract`` parser, which checks the arguments given after ``--``.
    """
    p = add_command(
        sub,
        "launch",
        cmd_launch,
        help="run one extraction process per device on this machine (e.g. one per GPU), then merge",
        description="Start one 'layertap extract' process per device, each extracting one shard into OUT/shards/, "
        "and merge them into OUT when all succeed. Give the extract arguments after '--'. Running the same "
        "command again resumes failed or interrupted shards.",
        epilog="example:\n  layertap launch --devices cuda:0 cuda:1 cuda:2 cuda:3 -- --model resnet50 --layers avgpool \\\n"
        "      --images ./images --out ./acts",
    )
    p.add_argument("--devices", nargs="+", required=True, help="one shard per device, e.g. cuda:0 cuda:1")
    p.add_argument("extract_args", nargs=argparse.REMAINDER, help="-- then the arguments of 'layertap extract'")
    p.set_defaults(extract_parser=extract)


def add_export(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap export``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "export",
        cmd_export,
        help="export a run's layers: npy, txt, h5, mat (v5 / v7.3), pt, parquet, csv",
        description="Export every (or the chosen) layer of a run with images.csv (path, class per row).",
        epilog="examples:\n  layertap export ./acts --format npy\n  layertap export ./acts --format mat --layers avgpool",
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


def _ask_layers(model: object, names: list[str]) -> list[str]:
    """--interactive: show the layers and aliases, and ask until the answer names layers of the model."""
    from layertap.extraction.layers import format_layer_table, list_layers, resolve_layers

    infos = list_layers(model)  # type: ignore[arg-type]
    print(format_layer_table(infos))
    print()
    print(alias_lines(model, infos))
    print(
        "\nLayers are named by their dotted path, e.g. " + ", ".join(names[:3]) + " (globs such as 'features.*' "
        "and the aliases above work)."
    )
    complete_names([i.name for i in infos])
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
    """Load the model, extract into OUT (or only plan it with ``--dry-run``), then post-process and export.

    Args:
        args: the parsed command line.
    """
    from layertap.data.stimuli import open_stimuli
    from layertap.extraction.pipeline import extract
    from layertap.extraction.reducers import parse_reduce_args
    from layertap.models.registry import load_model
    from layertap.store.export import export, format_name

    sources = [s for s in (args.weights, "pretrained" if args.pretrained else None, args.model_path) if s]
    if len(set(sources)) > 1:
        raise LayertapError(
            f"conflicting weights: {', '.join(sources)}; give one of --weights, --pretrained, --model_path"
        )
    weights = sources[0] if sources else "pretrained"
    if args.file_format:
        format_name(args.file_format)  # fail before hours of extraction, not after
    if not args.layers and not args.interactive:
        raise LayertapError("name the layer(s) with --layers (see 'layertap layers MODEL') or use --interactive")
    model = load_model(args.model, weights, seed=args.seed, **model_options(args.option))
    if weights == "random":
        warn_random(args.seed)
    layers = args.layers or _ask_layers(model, [n for n, _ in model.module.named_modules() if n])
    images: Any = args.images
    stimulus_options = {k: getattr(args, k) for k in args.stimulus_options}
    if any(v is not None for v in stimulus_options.values()):
        images = open_stimuli(args.images, things=args.things, model=model, **stimulus_options)
    reduce = parse_reduce_args(args.reduce)
    if _plan_first(args, model, images, layers, weights, reduce):
        return
    run = extract(
        model,
        images,
        layers,
        args.out,
        **keyword_args(
            extract,
            args,
            weights=weights,
            reduce=reduce,
            channels_last=False if args.no_channels_last else "auto",
            progress=not args.quiet,
        ),
    )
    # extract() itself says what it did: what it stored (images, rows, seconds), or "nothing to do"
    if args.center_acts or args.normalize_reps or args.compress_acts:
        from layertap.process.postprocess import postprocess

        run = postprocess(
            run,
            run.path / "processed",
            center=args.center_acts,
            normalize=args.normalize_reps,
            pca=pca_components(args.compress_acts),
            seed=args.seed,
            overwrite=True,
        )
        log.info("post-processed copy in %s", run.path)
    if args.file_format:
        paths = export(run, args.file_format)
        log.info("exported %d files to %s", len(paths), paths[0].parent)


def _plan_first(
    args: argparse.Namespace, model: object, images: object, layers: list[str], weights: str, reduce: object
) -> bool:
    """--dry-run: print the plan and return True. Otherwise refuse (before any work) a run whose
    arrays would not fit the free space, unless --yes; returns False to go on."""
    from layertap.extraction.planning import check_space, plan

    if args.dry_run:
        p = plan(model, images, layers, args.out, **keyword_args(plan, args, weights=weights, reduce=reduce))
        print(p)
        if not p.fits:
            print("the run would not fit: 'layertap extract' refuses it without --yes")
        return True
    if args.yes:
        return False
    # shapes only (one blank image, on the CPU, unfolded): errors in the job itself are extract's to report
    shapes_only = keyword_args(plan, args, weights=weights, reduce=reduce, device="cpu", probe=0, fold_bn=False)
    try:
        p = plan(model, images, layers, args.out, **shapes_only)
    except Exception:  # noqa: BLE001
        log.debug("no plan for the free-space check", exc_info=True)
        return False
    check_space(p)
    return False


def cmd_plan(args: argparse.Namespace) -> None:
    """Reached only for 'layertap plan' without extract arguments (main() turns the rest into extract --dry-run).

    Args:
        args: the parsed command line.
    """
    raise LayertapError("give the extract arguments, e.g. layertap plan --model alexnet --layers fc --images I --out O")


def cmd_verify(args: argparse.Namespace) -> None:
    """Print the run's check in one line; a damaged run is a :class:`StorageError` (exit code 1).

    Args:
        args: the parsed command line.
    """
    from layertap.store.run import verify_run

    result = verify_run(args.run)
    if not result.ok:
        raise StorageError(result.summary)
    print(result.summary)


def cmd_merge(args: argparse.Namespace) -> None:
    """Merge the shards into OUT.

    Args:
        args: the parsed command line.
    """
    from layertap.shards.merge import merge_shards

    run = merge_shards(args.out, args.shards or None)
    log.info("merged %d images into %s", len(run.images), run.path)


def _extract_args(args: argparse.Namespace) -> tuple[list[str], str]:
    """Validate the arguments after '--' as 'layertap extract' arguments; return them and --out."""
    rest = args.extract_args[1:] if args.extract_args[:1] == ["--"] else args.extract_args
    if not rest:
        raise LayertapError(
            "give the extract arguments after '--', e.g. -- --model alexnet --layers fc --images I --out O"
        )
    try:
        parsed = args.extract_parser.parse_args(rest)
    except SystemExit:
        raise LayertapError("the arguments after '--' are not valid 'layertap extract' arguments (see above)") from None
    if parsed.interactive:
        raise LayertapError("--interactive cannot run in batch jobs; name the layers with --layers")
    return rest, parsed.out


def cmd_slurm(args: argparse.Namespace) -> None:
    """Write the sbatch scripts (and submit them with ``--submit``).

    Args:
        args: the parsed command line.
    """
    import subprocess

    from layertap.shards.slurm import write_slurm_scripts

    rest, out = _extract_args(args)
    paths = write_slurm_scripts(
        rest,
        out,
        args.shards,
        **keyword_args(write_slurm_scripts, args),
    )
    print(f"wrote {paths['extract.sbatch']}, {paths['merge.sbatch']} and {paths['submit.sh']}")
    if args.submit:
        subprocess.run(["bash", str(paths["submit.sh"])], check=True)
    else:
        print(f"submit with: bash {paths['submit.sh']}")


def cmd_launch(args: argparse.Namespace) -> None:
    """Run one extract process per device, then merge.

    Args:
        args: the parsed command line.
    """
    from layertap.shards.launch import launch

    rest, out = _extract_args(args)
    launch(rest, args.devices, out)
    log.info("all %d shards done and merged into %s", len(args.devices), out)


def cmd_export(args: argparse.Namespace) -> None:
    """Export the run's layers.

    Args:
        args: the parsed command line.
    """
    from layertap.store.export import export

    paths = export(args.run, args.format, args.out, args.layers)
    log.info("wrote %d files to %s", len(paths), paths[0].parent)
