"""The analysis commands: ``layertap rdm``, ``layertap compare`` (layers, a reference, or subjects' RDMs)
and ``layertap report``.

Handlers print short results to stdout and raise :class:`~layertap.errors.LayertapError` for bad input,
which :func:`layertap.cli.app.main` turns into one line and its exit code.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from layertap.analysis import METHODS, METRICS
from layertap.analysis.plots import (
    _figure,
    _save,
    measure_label,
    plot_layer_similarity,
    plot_mds,
    plot_rdm,
    plot_reference_bars,
)
from layertap.analysis.rdms import rdm_to_disk
from layertap.analysis.results import ReferenceScores, bootstrap_ci
from layertap.analysis.similarity import compare_to_reference, layer_similarity
from layertap.cli.formatting import add_command
from layertap.cli.options import keyword_args, non_negative, positive
from layertap.errors import LayertapError
from layertap.store.files import disk_error
from layertap.store.run import open_complete_run

ANALYSIS_EXAMPLES = """examples:
  layertap rdm ./acts --layer classifier.4 --metric correlation --out rdm.npy --plot rdm.png
  layertap compare ./acts --method rdm-spearman --out layers.csv --plot layers.png
  layertap compare ./acts ./acts-resnet --method cka-linear
  layertap compare ./acts --reference brain_rdm.mat --key rdm --out scores.csv
"""


def add_analysis_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``rdm`` and ``compare`` subcommands to the main parser's subparsers.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "rdm",
        cmd_rdm,
        help="compute the representational dissimilarity matrix (RDM) of one stored layer",
        description="Compute the images x images RDM of one layer of a run and stream it to a .npy file "
        "(memory stays bounded: the RDM is written block by block).",
        epilog=ANALYSIS_EXAMPLES,
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--layer", "-l", required=True, help="stored layer name")
    p.add_argument("--metric", default="correlation", choices=METRICS, help="dissimilarity (default correlation)")
    p.add_argument("--out", "-o", required=True, help="output .npy file (N x N float64)")
    p.add_argument("--plot", default=None, metavar="FILE", help="also draw the RDM, grouped by class (.png or .svg)")
    p.add_argument("--mds", default=None, metavar="FILE", help="also draw a 2-D MDS embedding of the images (.png or .svg)")
    p.add_argument("--block-rows", type=positive(int), default=None, help="images per block (default: about 128 MB per block)")

    p = add_command(
        sub,
        "compare",
        cmd_compare,
        help="compare layers: all layers of one or two runs, or each layer with a reference RDM/response matrix",
        description="Similarity between the stored layers of one run (or of two runs on the same images), "
        "or of each layer with a reference (.npy/.csv/.mat): a square symmetric zero-diagonal matrix is used as "
        "an RDM (missing pairs as NaN allowed: they are left out, with a count), anything else as a response "
        "matrix (images x units) in the run's image order.",
        epilog=ANALYSIS_EXAMPLES,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("run2", nargs="?", default=None, help="second run on the same images (rows: RUN, columns: RUN2)")
    p.add_argument("--layers", nargs="+", default=None, help="layers of RUN (names or globs; default all)")
    p.add_argument("--layers2", nargs="+", default=None, help="layers of RUN2 (default: all of RUN2)")
    p.add_argument("--method", default="rdm-spearman", choices=METHODS, help="similarity (default rdm-spearman)")
    p.add_argument("--metric", default="correlation", choices=METRICS, help="RDM dissimilarity (default correlation)")
    p.add_argument("--reference", default=None, metavar="FILE", help="compare each layer with this RDM/response file")
    p.add_argument("--key", default=None, help="variable name in a .mat reference holding several matrices")
    p.add_argument(
        "--subject-rdms",
        nargs="+",
        default=None,
        metavar="FILE",
        help="RSA with a noise ceiling: one RDM per subject (files, or one subjects x N x N file); prints each "
        "layer's mean over subjects and rsatoolbox's lower/upper ceiling bounds (layertap.encode.rsa)",
    )
    p.add_argument("--stimuli", default=None, metavar="FILE", help="with --subject-rdms: ids of the RDM rows")
    p.add_argument("--out", "-o", default=None, metavar="FILE.csv", help="write the result as CSV")
    p.add_argument("--plot", default=None, metavar="FILE", help="draw the result as a heatmap (.png or .svg)")


def add_report(sub: argparse._SubParsersAction) -> None:
    """Add ``layertap report``.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "report",
        cmd_report,
        help="write one self-contained HTML page for a run: model, layers, image thumbnails, RDMs, timing",
        description="Write RUN/report.html (or --out): model, weights, transform, layers with shapes and sizes, "
        "image thumbnails with classes, skipped images, an RDM per layer, the layer x layer similarity and "
        "timing. Everything is inlined (base64): the file opens offline and can be mailed as it is.",
        epilog="example: layertap report ./acts --max-images 24",
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--out", "-o", default=None, help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--max-images", type=non_negative(int), default=48, help="image thumbnails shown")
    p.add_argument("--max-layers", type=non_negative(int), default=12, help="layers with an RDM figure")
    p.add_argument("--metric", default="correlation", choices=["correlation", "euclidean", "cosine"], help="RDM metric")


def cmd_report(args: argparse.Namespace) -> None:
    """Write the run's HTML report.

    Args:
        args: the parsed command line.
    """
    from layertap.analysis.report import write_report

    path = write_report(args.run, args.out, **keyword_args(write_report, args))
    print(f"report -> {path}")


def cmd_rdm(args: argparse.Namespace) -> None:
    """Stream the layer's RDM to OUT (and draw it with ``--plot`` / ``--mds``).

    Args:
        args: the parsed command line.
    """
    out = Path(args.out)
    if out.suffix.lower() != ".npy":
        raise LayertapError(f"--out must be a .npy file, not {out.name}")
    run = open_complete_run(args.run)
    arr = run[args.layer]
    rdm_to_disk(arr, out, args.metric, args.block_rows, labels=run.images, what=args.layer)
    n = arr.shape[0]
    print(f"{args.layer}: {n}x{n} {args.metric} RDM -> {out}")
    if args.plot:
        path = plot_rdm(
            np.load(out, mmap_mode="r"),
            args.plot,
            run.targets,
            run.classes,
            title=f"{_model_name(run)}, {args.layer}: RDM",
            measure=args.metric,
        )
        print(f"plot -> {path}")
    if args.mds:
        title = f"{_model_name(run)}, {args.layer}: MDS ({args.metric})"
        path = plot_mds(np.load(out), args.mds, run.targets, run.classes, metric=args.metric, title=title)
        print(f"MDS -> {path}")


def _model_name(run: object) -> str:
    """The run's model name without its source prefix (for figure titles)."""
    name = str(getattr(run, "manifest", {}).get("model", {}).get("name", "") or "")
    return name.split(":", 1)[-1]


def _write_csv(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> None:
    """A CSV table (the ``--out`` of ``compare``); a failed write is one line naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    except OSError as err:
        raise disk_error(err, path) from None


def cmd_compare(args: argparse.Namespace) -> None:
    """Print (and write, and draw) the layers' similarities: between runs, to a reference, or to subjects.

    Args:
        args: the parsed command line.
    """
    if args.reference and args.run2:
        raise LayertapError("give either a second run or --reference, not both")
    if args.layers2 and not args.run2:
        raise LayertapError("--layers2 needs a second run")
    if args.out and Path(args.out).suffix.lower() != ".csv":
        raise LayertapError(f"--out must be a .csv file, not {Path(args.out).name}")
    if args.subject_rdms:
        if args.reference or args.run2:
            raise LayertapError("give --subject-rdms alone, without --reference or a second run")
        return _compare_subjects(args)
    if args.reference:
        # the figure's bootstrap CIs resample the very RDMs the scores came from (not computed twice)
        scores = compare_to_reference(
            args.run,
            args.reference,
            args.layers,
            args.method,
            args.metric,
            key=args.key,
            keep_rdms=bool(args.plot) and args.method.startswith("rdm-"),
        )
        width = max(len(n) for n in scores)
        for layer, value in scores.items():
            print(f"{layer:<{width}}  {value: .4f}")
        matrix = np.array([[v] for v in scores.values()])
        rows, cols = list(scores), ["reference"]
        if args.out:
            _write_csv(Path(args.out), ["layer", args.method], [[k, repr(float(v))] for k, v in scores.items()])
    else:
        matrix, rows, cols = layer_similarity(
            args.run, args.run2, args.layers, args.layers2, method=args.method, metric=args.metric
        )
        width = max(len(r) for r in rows)
        cw = max(10, *(len(c) for c in cols))  # full labels: features.1 and features.12 must differ
        print(" " * width + "  " + "  ".join(f"{c:>{cw}}" for c in cols))
        for r, line in zip(rows, matrix, strict=True):
            print(f"{r:<{width}}  " + "  ".join(f"{v:>{cw}.4f}" for v in line))
        if args.out:
            _write_csv(
                Path(args.out),
                ["", *cols],
                [[r, *map(repr, map(float, line))] for r, line in zip(rows, matrix, strict=True)],
            )
    if args.out:
        print(f"table -> {args.out}")
    if args.plot:
        run = open_complete_run(args.run)
        if args.reference:
            path = plot_reference_bars(
                scores,
                args.plot,
                _reference_cis(scores, args.method) if args.method.startswith("rdm-") else None,
                measure=args.method,
                title=f"{_model_name(run)} vs {Path(args.reference).name}",
            )
        else:
            names = (_model_name(run), _model_name(open_complete_run(args.run2)) if args.run2 else None)
            if names[1] is not None:  # the axes name the runs; the ticks are plain layer names
                rows, cols = [r.removeprefix("A:") for r in rows], [c.removeprefix("B:") for c in cols]
            title = f"{names[0]}" + (f" vs {names[1]}" if names[1] else "") + f": {measure_label(args.method)}"
            path = plot_layer_similarity(
                matrix,
                rows,
                cols,
                args.plot,
                title=title,
                measure=args.method,
                row_title=f"{names[0]} ({args.run})" if names[1] else None,
                col_title=f"{names[1]} ({args.run2})" if names[1] else None,
            )
        print(f"plot -> {path}")


def _reference_cis(scores: ReferenceScores, method: str) -> dict[str, tuple[float, float]]:
    """95% bootstrap CIs (over images) of each layer's RDM similarity with the reference.

    Args:
        scores: :func:`compare_to_reference`'s result, with the RDMs it compared (``keep_rdms=True``).
        method: the ``rdm-*`` comparison.

    Returns:
        ``{layer: (low, high)}``.
    """
    rdms, reference = scores.rdms, scores.reference_rdm
    assert rdms is not None and reference is not None  # asked for with keep_rdms=True
    return {layer: bootstrap_ci(rdms[layer], reference, method) for layer in scores}


def _compare_subjects(args: argparse.Namespace) -> None:
    """``layertap compare RUN --subject-rdms ...``: per layer the mean over subjects, and the noise ceiling.

    Args:
        args: the parsed command line.
    """
    from layertap.encode.rsa import compare_to_subjects

    scores, (lower, upper) = compare_to_subjects(
        args.run, args.subject_rdms, args.layers, args.method, args.metric, args.stimuli, args.key
    )
    width = max(len(n) for n in scores)
    n_sub = len(next(iter(scores.values())))
    print(f"{'layer':<{width}}  mean over {n_sub} subjects  (sem)")
    for layer, v in scores.items():
        print(f"{layer:<{width}}  {v.mean(): .4f}  ({v.std(ddof=1) / np.sqrt(len(v)):.4f})")
    print(f"noise ceiling ({args.method}): lower {lower:.4f}, upper {upper:.4f}")
    if args.out:
        header = ["layer", "mean", "sem", *[f"subject{i}" for i in range(n_sub)], "ceiling_lower", "ceiling_upper"]
        rows = [
            [k, repr(float(v.mean())), repr(float(v.std(ddof=1) / np.sqrt(len(v)))), *map(repr, map(float, v)),
             repr(lower), repr(upper)]
            for k, v in scores.items()
        ]  # fmt: skip
        _write_csv(Path(args.out), header, rows)
        print(f"table -> {args.out}")
    if args.plot:
        names = list(scores)
        fig = _figure((max(4.5, 0.55 * len(names) + 2.5), 3.4))
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(names))
        means = np.array([scores[k].mean() for k in names])
        sems = np.array([scores[k].std(ddof=1) / np.sqrt(n_sub) for k in names])
        ax.bar(x, means, yerr=sems, color="C0", capsize=3, label=f"mean over {n_sub} subjects (± sem)", zorder=2)
        # the ceiling over the bars (as rsatoolbox draws it), translucent so the bars stay readable
        ax.axhspan(lower, upper, color="0.55", alpha=0.3, linewidth=0, label="noise ceiling (lower-upper)", zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=40 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
        ax.set_ylabel(args.method)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, fontsize=8)
        print(f"plot -> {_save(fig, args.plot, 200)}")
