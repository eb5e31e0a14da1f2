"""The ``layertap rdm`` and ``layertap compare`` commands (wired into :mod:`layertap.cli`).

    from .cli_analysis import add_analysis_commands
    add_analysis_commands(sub)     # sub = parser.add_subparsers(...)

Handlers print short results to stdout and raise :class:`LayertapError` for bad input, which the
main CLI turns into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from layertap.errors import LayertapError

ANALYSIS_EXAMPLES = """examples:
  layertap rdm ./acts --layer classifier.4 --metric correlation --out rdm.npy --plot rdm.png
  layertap compare ./acts --method rdm-spearman --out layers.csv --plot layers.png
  layertap compare ./acts ./acts-resnet --method cka-linear
  layertap compare ./acts --reference brain_rdm.mat --key rdm --out scores.csv
"""


def add_analysis_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``rdm`` and ``compare`` subcommands to the main parser's subparsers."""
    from layertap.analysis.similarity import METHODS, METRICS
    from layertap.cli.main import _Help  # the CLI's one formatter: examples as written, defaults shown

    p = sub.add_parser(
        "rdm",
        help="compute the representational dissimilarity matrix (RDM) of one stored layer",
        description="Compute the images x images RDM of one layer of a run and stream it to a .npy file "
        "(memory stays bounded: the RDM is written block by block).",
        formatter_class=_Help,
        epilog=ANALYSIS_EXAMPLES,
    )
    p.add_argument("run", help="run directory written by 'layertap extract'")
    p.add_argument("--layer", "-l", required=True, help="stored layer name")
    p.add_argument("--metric", default="correlation", choices=METRICS, help="dissimilarity (default correlation)")
    p.add_argument("--out", "-o", required=True, help="output .npy file (N x N float64)")
    p.add_argument("--plot", default=None, metavar="FILE", help="also draw the RDM, grouped by class (.png or .svg)")
    p.add_argument("--mds", default=None, metavar="FILE", help="also draw a 2-D MDS embedding of the images (.png or .svg)")
    p.add_argument("--block-rows", type=int, default=None, help="images per block (default: about 128 MB per block)")
    p.set_defaults(func=cmd_rdm)

    p = sub.add_parser(
        "compare",
        help="compare layers: all layers of one or two runs, or each layer with a reference RDM/response matrix",
        description="Similarity between the stored layers of one run (or of two runs on the same images), "
        "or of each layer with a reference (.npy/.csv/.mat): a square symmetric zero-diagonal matrix is used as "
        "an RDM (missing pairs as NaN allowed: they are left out, with a count), anything else as a response "
        "matrix (images x units) in the run's image order.",
        formatter_class=_Help,
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
    p.set_defaults(func=cmd_compare)


def cmd_rdm(args: argparse.Namespace) -> None:
    from layertap.analysis.similarity import _as_run, rdm_to_disk

    out = Path(args.out)
    if out.suffix.lower() != ".npy":
        raise LayertapError(f"--out must be a .npy file, not {out.name}")
    run = _as_run(args.run)
    arr = run[args.layer]
    rdm_to_disk(arr, out, args.metric, args.block_rows, labels=run.images, what=args.layer)
    n = arr.shape[0]
    print(f"{args.layer}: {n}x{n} {args.metric} RDM -> {out}")
    if args.plot:
        from layertap.analysis.plots import plot_rdm

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
        from layertap.analysis.plots import plot_mds

        title = f"{_model_name(run)}, {args.layer}: MDS ({args.metric})"
        path = plot_mds(np.load(out), args.mds, run.targets, run.classes, metric=args.metric, title=title)
        print(f"MDS -> {path}")


def _model_name(run: object) -> str:
    """The run's model name without its source prefix (for figure titles)."""
    name = str(getattr(run, "manifest", {}).get("model", {}).get("name", "") or "")
    return name.split(":", 1)[-1]


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    from layertap.store.run import disk_error

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    except OSError as err:
        raise disk_error(err, path) from None


def cmd_compare(args: argparse.Namespace) -> None:
    from layertap.analysis.similarity import compare_to_reference, layer_similarity

    if args.reference and args.run2:
        raise LayertapError("give either a second run or --reference, not both")
    if args.layers2 and not args.run2:
        raise LayertapError("--layers2 needs a second run")
    if args.out and Path(args.out).suffix.lower() != ".csv":
        raise LayertapError(f"--out must be a .csv file, not {Path(args.out).name}")
    if getattr(args, "subject_rdms", None):
        if args.reference or args.run2:
            raise LayertapError("give --subject-rdms alone, without --reference or a second run")
        from layertap.encode.rsa import cmd_compare_subjects

        return cmd_compare_subjects(args)
    if args.reference:
        scores = compare_to_reference(args.run, args.reference, args.layers, args.method, args.metric, key=args.key)
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
        from layertap.analysis.plots import measure_label, plot_layer_similarity, plot_reference_bars
        from layertap.analysis.similarity import _as_run

        run = _as_run(args.run)
        if args.reference:
            path = plot_reference_bars(
                scores,
                args.plot,
                _reference_cis(run, args, scores) if args.method.startswith("rdm-") else None,
                measure=args.method,
                title=f"{_model_name(run)} vs {Path(args.reference).name}",
            )
        else:
            names = (_model_name(run), _model_name(_as_run(args.run2)) if args.run2 else None)
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


def _reference_cis(run: object, args: argparse.Namespace, scores: dict) -> dict[str, tuple[float, float]]:
    """95% bootstrap CIs (over images) of each layer's RDM similarity with the reference."""
    from layertap.analysis.results import bootstrap_ci
    from layertap.analysis.similarity import is_rdm, load_matrix, rdm

    ref = load_matrix(args.reference, args.key)
    ref_rdm = ref if is_rdm(ref) else rdm(ref, args.metric)
    return {
        layer: bootstrap_ci(rdm(run[layer], args.metric), ref_rdm, args.method)  # type: ignore[index]
        for layer in scores
    }
