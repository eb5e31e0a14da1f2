"""The ``layertap encode`` command (wired into :mod:`layertap.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from layertap.cli.formatting import add_command
from layertap.cli.options import add_quiet, add_seed, keyword_args, positive

ENCODE_EXAMPLES = """examples:
  layertap encode ./acts --responses betas.h5 --stimuli stimulus_ids.tsv --out ./scores      # every layer
  layertap encode ./acts --layers 'layer?' avgpool --responses eeg.npy --stimuli ids.txt --folds 5 \\
      --alphas 1e-2:1e5:20 --out ./scores
  layertap encode ./acts --responses betas.h5 --key betas --repeats trials.h5 --rois rois.tsv \\
      --stimuli ids.tsv --test-split test_ids.txt --ceiling ncsnr --out ./scores

Responses are matched to the run's images by stimulus id (relative path, path stem, file name or
stem), never by position: --stimuli gives one id per response row (or a .csv/.tsv response file
holds them in its first column). Writes OUT/scores.parquet, scores.csv (tidy: layer, target, roi,
metric, value), summary.csv (per layer x ROI: median and 95% bootstrap CI), manifest.json and
scores.png (layer profile per ROI with the noise-ceiling band).
"""


def add_encode_command(sub: argparse._SubParsersAction) -> None:
    """Add the ``encode`` subcommand to the main parser's subparsers.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    # the encode package imports its fitting stack (seconds); its choices are read when the parser is built
    from layertap.encode.ceiling import CEILINGS
    from layertap.encode.ridge import BACKENDS, DEFAULT_ALPHAS, SOLVERS

    p = add_command(
        sub,
        "encode",
        cmd_encode,
        help="score every layer of a run as a ridge encoding model of brain/behaviour responses",
        description="Fit ridge regression (one alpha per target, chosen by inner CV on training stimuli only) from "
        "each stored layer to a response matrix, score Pearson r and R^2 on held-out stimuli, with noise ceilings "
        "from repeated measurements and per-ROI summaries.",
        epilog=ENCODE_EXAMPLES,
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--responses", "-r", required=True, metavar="FILE",
                   help="(stimuli x targets) or (repetitions x stimuli x targets): .npy, .h5, .mat, .csv, .tsv")
    p.add_argument("--key", default=None, help="dataset / variable name in an .h5 / .mat responses file")
    p.add_argument("--stimuli", "-s", default=None, metavar="FILE",
                   help="stimulus ids, one per response row: .txt (one per line) or .tsv/.csv (column 'stimulus')")
    p.add_argument("--stimulus-column", default=None, help="column of --stimuli holding the ids")
    p.add_argument("--repeats", default=None, metavar="FILE", help="repetitions x stimuli x targets for the ceiling")
    p.add_argument("--repeats-key", default=None, help="dataset / variable name in the --repeats file")
    p.add_argument("--rois", default=None, metavar="FILE", help="one ROI label per target: .txt, .npy or .tsv/.csv")
    p.add_argument("--roi-column", default=None, help="column of --rois holding the labels")
    p.add_argument("--layers", nargs="+", default=None, help="layers (names or globs; default all)")
    p.add_argument("--folds", type=positive(int), default=5, help="outer K-fold over stimuli (default 5)")
    p.add_argument("--test-split", default=None, metavar="FILE", help="ids of the test stimuli (instead of --folds)")
    p.add_argument(
        "--inner-folds", type=positive(int), default=5, help="inner K-fold choosing each target's alpha (default 5)"
    )
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"LO:HI:N log-spaced, or a,b,c (default {DEFAULT_ALPHAS})")
    p.add_argument("--reduce", default=None, metavar="SPEC",
                   help="pca:K (fitted on each fold's training stimuli) or srp:K[:SEED] before the ridge")
    p.add_argument("--solver", default="auto", choices=SOLVERS,
                   help="auto (kernel ridge when features outnumber stimuli), primal or dual")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="himalaya backend: auto (torch_cuda when CUDA is available, else numpy), numpy, torch, torch_cuda")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "float64"), help="working precision of the fits"
    )
    p.add_argument("--threads", type=positive(int), default=None,
                   help="BLAS/torch threads for the fits (default: all; 1 is often faster on a busy machine)")
    p.add_argument("--ceiling", default=None, choices=CEILINGS, help="noise ceiling from --repeats: split-half (Spearman-Brown, default) or ncsnr (NSD)")
    p.add_argument("--on-missing", default="error", choices=("error", "drop"),
                   help="stimulus ids not in the run: error (default) or drop them (reported)")
    p.add_argument("--transpose", action="store_true", help="responses are targets x stimuli")
    add_seed(p, "seed of the folds, ceiling splits and bootstrap")
    p.add_argument(
        "--bootstrap",
        dest="n_bootstrap",
        metavar="BOOTSTRAP",
        type=positive(int),
        default=1000,
        help="bootstrap resamples of targets for CIs",
    )
    p.add_argument("--metric", default="r", choices=("r", "r2", "r_norm", "r2_norm"), help="metric of the figure")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw scores.png")
    p.add_argument("--plot", dest="plot", action="store_true", default=True, help="draw scores.png (default)")
    add_quiet(p, "no progress bar")


def cmd_encode(args: argparse.Namespace) -> None:
    """Run :func:`layertap.encode` and write its table, summary, manifest and figure.

    Args:
        args: the parsed command line.
    """
    from layertap.encode.encoding import encode

    # progress: None lets encode() decide (a bar on a terminal); --quiet turns it off
    kwargs = keyword_args(encode, args, progress=False if args.quiet else None)
    scores = encode(args.run, args.responses, args.stimuli, **kwargs)
    paths = scores.save(Path(args.out), plot=args.plot, metric=args.metric)
    s = scores.summary
    rows = s[(s["metric"] == "r") & s["layer"].notna()]
    width = max(len(n) for n in scores.layers)
    for roi in scores.rois:
        part = rows[rows["roi"] == roi].set_index("layer")
        if roi != "all" or len(scores.rois) == 1:
            print(f"ROI {roi}: median r [95% CI]   (best: {scores.best_layer(roi)})")
            for layer in scores.layers:
                row = part.loc[layer]
                print(f"  {layer:<{width}}  {row['median']: .4f} [{row['ci_low']: .4f}, {row['ci_high']: .4f}]")
        ceil = scores.ceiling_summary(roi, "r")
        if ceil is not None and (roi != "all" or len(scores.rois) == 1):
            print(f"  {'ceiling':<{width}}  {ceil[0]: .4f} [{ceil[1]: .4f}, {ceil[2]: .4f}]")
    for kind, path in paths.items():
        print(f"{kind} -> {path}")
