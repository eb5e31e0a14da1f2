"""``layertap process`` and ``layertap ensemble``: new runs computed from a finished run."""

from __future__ import annotations

import argparse
import logging

from layertap.cli.formatting import add_command
from layertap.cli.options import add_seed, keyword_args, pca_components, positive
from layertap.errors import LayertapError

log = logging.getLogger("layertap")


def add_process(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap process``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "process",
        cmd_process,
        help="post-process a finished run into a new run: center, l2-normalise, PCA, random projection",
        description="Write a new run with each layer centred (--center), l2-normalised per image (--normalize), "
        "reduced by PCA (--pca) and/or a sparse random projection (--project), in that order.",
        epilog="example:\n  layertap process ./acts --out ./acts-pca --center --pca 0.9",
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
    p.add_argument("--project", type=positive(int), default=None, metavar="K", help="sparse random projection to K dimensions")
    add_seed(p, "seed for the random projection")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def add_ensemble(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap ensemble``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "ensemble",
        cmd_ensemble,
        help="feature-map ensemble (COLING 2020): flatten + concatenate layers (+ penultimate), then PCA",
        description="Flatten and concatenate conv / max-pool layers of a run (plus --penultimate), optionally "
        "reduce by PCA, and store the result as the layer 'ensemble' of a new run.",
        epilog="example:\n  layertap ensemble ./acts --layers features.2 features.5 features.12 "
        "--penultimate classifier.4 --pca 0.9 --out ./ens",
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--layers", nargs="+", required=True, help="conv / max-pool layers of the run")
    p.add_argument("--penultimate", default=None, help="also concatenate this layer (e.g. classifier.4)")
    p.add_argument("--pca", type=float, default=None, metavar="K", help="components (integer) or variance fraction")
    p.add_argument("--out", "-o", required=True, help="new run directory holding the layer 'ensemble'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def cmd_process(args: argparse.Namespace) -> None:
    """Write the post-processed run.

    Args:
        args: the parsed command line.
    """
    from layertap.process.postprocess import postprocess

    if not (args.center or args.normalize or args.pca or args.project):
        raise LayertapError("nothing to do: give --center, --normalize, --pca K and/or --project K")
    run = postprocess(
        args.run,
        args.out,
        args.layers,
        **keyword_args(postprocess, args, pca=pca_components(args.pca), projection=args.project),
    )
    log.info("wrote %s (%s)", run.path, ", ".join(f"{n} {'x'.join(map(str, run[n].shape))}" for n in run.layers))


def cmd_ensemble(args: argparse.Namespace) -> None:
    """Write the ensemble run.

    Args:
        args: the parsed command line.
    """
    from layertap.process.ensemble import feature_map_ensemble

    feats = feature_map_ensemble(
        args.run, args.layers, args.penultimate, pca_components(args.pca), out=args.out, overwrite=args.overwrite
    )
    assert not isinstance(feats, tuple)  # without return_pca=True it returns the features alone
    log.info("wrote the ensemble (%s) to %s", "x".join(map(str, feats.shape)), args.out)
