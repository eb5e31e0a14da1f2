"""``layertap train ipcl`` and ``layertap train linear-probe``: wired in with :func:`add_train_commands`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from layertap.cli.formatting import add_command
from layertap.cli.options import (
    add_batch_size,
    add_device,
    add_quiet,
    add_seed,
    add_workers,
    keyword_args,
    positive,
    resolve_workers,
)

EXAMPLES = """examples:
  layertap train ipcl --images ./train --val ./val --out ./runs/ipcl --epochs 100 --batch-size 128
  layertap train ipcl --images ./train --out ./runs/small --arch resnet18 --size 64 --augment tensor
  layertap train ipcl --out ./runs/ipcl --images ./train --resume
  torchrun --nproc_per_node 4 $(which layertap) train ipcl --images ./train --out ./runs/ddp --device cuda
  layertap train linear-probe --run ./runs/ipcl --layer fc7 --images ./train --val ./val
"""


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` (with ``ipcl`` and ``linear-probe``) to the ``layertap`` subcommands.

    Args:
        sub: the subparsers action of the ``layertap`` parser.
    """
    p = add_command(
        sub,
        "train",
        None,  # the leaves (ipcl, linear-probe) set what runs
        help="train a model (IPCL self-supervised) or a linear probe on a frozen layer",
        description="Training: 'ipcl' trains an IPCL model and checkpoints it every epoch; "
        "'linear-probe' evaluates a frozen layer with a linear classifier.",
        epilog=EXAMPLES,
    )
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    _add_ipcl(tsub)
    _add_probe(tsub)


def _add_ipcl(tsub: argparse._SubParsersAction) -> None:
    p = add_command(
        tsub,
        "ipcl",
        cmd_train_ipcl,
        help="instance-prototype contrastive learning (Konkle & Alvarez)",
        description="Train with the IPCL objective: N augmentations per image, prototype = mean sample "
        "embedding, negatives from a queue of recent embeddings, NCE (or softmax) loss. Writes RUN/"
        "checkpoint.pth.tar every epoch (loadable with --model ipcl:alexnet_gn --weights FILE), log.csv, "
        "log.json, training.png. Under torchrun it trains with DistributedDataParallel.",
        epilog=EXAMPLES,
    )
    p.add_argument("--images", "-i", required=True, help="training images (folder or list; labels not needed)")
    p.add_argument("--out", "-o", required=True, help="run folder (checkpoint, logs, plot)")
    p.add_argument("--val", help="held-out labelled folder: kNN top-1 accuracy after each epoch")
    p.add_argument("--knn-train", help="labelled kNN reference images (default: --images)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a run")
    p.add_argument("--stop-after", type=positive(int), help="stop after this epoch (resume later)")
    p.add_argument("--keep-checkpoints", action="store_true", help="also keep checkpoint_epochNNN.pth.tar per epoch")
    m = p.add_argument_group("model and objective")
    m.add_argument("--arch", default="alexnet_gn", help="alexnet_gn (default) or any model name of 'layertap models'")
    m.add_argument("--arch-weights", default="random", help="initial backbone weights for registry models: random, pretrained, a weights id or a file")
    m.add_argument("--out-dim", type=positive(int), default=128, help="embedding dimension (default 128)")
    m.add_argument("--size", type=positive(int), default=224, help="crop size in pixels (default 224)")
    m.add_argument("--n-samples", type=positive(int), default=5, help="augmentations per image (default 5)")
    m.add_argument("--queue-size", type=positive(int), default=4096, help="negatives kept (default 4096)")
    m.add_argument("--temperature", type=positive(float), default=0.07, help="softmax temperature (default 0.07)")
    m.add_argument(
        "--loss",
        choices=["nce", "softmax"],
        default="nce",
        help="nce (noise-contrastive estimation, as in the paper) or softmax (cross-entropy over 1 + queue)",
    )
    m.add_argument(
        "--layout",
        choices=["interleaved", "contiguous"],
        default="interleaved",
        help="order of the augmentations in a batch: interleaved (aug0 of all images, then aug1, ...; the "
        "original loader's) or contiguous (all augmentations of image 0, then image 1, ...)",
    )
    m.add_argument("--norm-prototype", action="store_true", help="l2-normalise the prototypes")
    m.add_argument("--prototype-grad", action="store_true", help="let gradients flow through the prototypes")
    m.add_argument("--store-prototype", action="store_true", help="queue the prototypes, not the samples")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=positive(int), default=100, help="passes over --images")
    add_batch_size(o, 128, "images per step, summed over all ranks")
    o.add_argument(
        "--batch-multiplier", type=positive(int), default=1, help="gradient accumulation: steps per optimiser step"
    )
    o.add_argument("--lr", type=positive(float), default=0.03, help="peak learning rate (default 0.03)")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default %(default)s; 0 helps on small data sets, see README)")
    o.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    o.add_argument(
        "--scheduler",
        choices=["onecycle", "cosine", "none"],
        default="onecycle",
        help="learning-rate schedule over all steps: one-cycle (cosine up then down), cosine decay, or constant",
    )
    o.add_argument(
        "--div-factor", type=positive(float), default=1000.0, help="one-cycle: the start lr is lr / div-factor"
    )
    o.add_argument("--pct-start", type=float, default=0.4, help="one-cycle rising fraction (default 0.4)")
    o.add_argument(
        "--final-div-factor",
        type=positive(float),
        default=1e7,
        help="one-cycle: the final lr is lr / div-factor / final-div-factor (default %(default)g)",
    )
    o.add_argument(
        "--on-divergence",
        choices=["warn", "stop"],
        default="warn",
        help="an exploding loss (an epoch's mean over 10x the first epoch's): warn (default) or stop; "
        "a NaN/inf loss always stops",
    )
    d = p.add_argument_group("data and machine")
    d.add_argument("--augment", choices=["cpu", "tensor"], default="cpu", help="torchvision (cpu) or batched on device")
    d.add_argument("--scale-min", type=float, default=0.2, help="smallest crop area fraction (default 0.2)")
    d.add_argument("--knn-k", type=positive(int), default=200, help="neighbours voting in the kNN accuracy")
    d.add_argument(
        "--knn-every", type=positive(int), default=1, help="kNN accuracy on --val every this many epochs"
    )
    add_device(d)
    add_workers(d)
    add_seed(d, "seed for the initial weights, augmentations and order")
    d.add_argument("--no-plot", action="store_true", help="do not write training.png")
    add_quiet(d)


def _add_probe(tsub: argparse._SubParsersAction) -> None:
    p = add_command(
        tsub,
        "linear-probe",
        cmd_linear_probe,
        help="linear classifier on one frozen layer of a trained run",
        description="Train a linear readout of one frozen layer (one-cycle SGD) and report top-1 on --val. "
        "The layer's outputs are flattened; the trained model stays frozen.",
        epilog="examples:\n  layertap train linear-probe --run ./runs/ipcl --layer fc7 --images ./train --val ./val\n"
        "  layertap train linear-probe --run ./runs/ipcl/checkpoint.pth.tar --layer conv_block_5 --augment none \\\n"
        "      --images ./train --val ./val --out probe.json",
    )
    p.add_argument("--run", required=True, help="training run folder or checkpoint file")
    p.add_argument("--layer", required=True, help="layer name, e.g. fc7")
    p.add_argument("--images", "-i", required=True, help="labelled training images (class subfolders)")
    p.add_argument("--val", required=True, help="labelled validation images")
    p.add_argument("--out", help="result JSON (default RUN/linear_probe_LAYER.json for a run folder)")
    p.add_argument("--epochs", type=positive(int), default=10, help="passes over --images")
    add_batch_size(p, 256, "images per step")
    p.add_argument("--lr", type=positive(float), default=30.0, help="peak learning rate of the one-cycle schedule")
    p.add_argument(
        "--div-factor",
        type=positive(float),
        default=1e6,
        help="one-cycle: the start lr is lr / div-factor (default %(default)g)",
    )
    p.add_argument("--pct-start", type=float, default=0.3, help="one-cycle: fraction of the steps rising to lr")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    p.add_argument(
        "--augment",
        choices=["crop-flip", "none"],
        default="crop-flip",
        help="crop-flip: random resized crop and flip each epoch; none: the model's transform, features computed once",
    )
    add_device(p)
    add_workers(p)
    add_seed(p, "seed for the data order, crops and the head's weights")
    add_quiet(p)


def cmd_train_ipcl(args: argparse.Namespace) -> None:
    """Train (or resume) the IPCL run; print the last epoch's record as JSON (rank 0 under torchrun).

    Args:
        args: the parsed command line.
    """
    import torch.distributed as dist

    from layertap.training.ipcl import IPCLConfig, train_ipcl

    config: dict[str, Any] = {}
    if not args.resume:  # a resumed run keeps its saved settings
        # every IPCLConfig field the command line defines, under the same name
        config = {f.name: getattr(args, f.name) for f in dataclasses.fields(IPCLConfig) if hasattr(args, f.name)}
        config["detach_prototype"] = not args.prototype_grad
    result = train_ipcl(
        args.images,
        args.out,
        **keyword_args(
            train_ipcl,
            args,
            workers=resolve_workers(args.workers),
            progress=not args.quiet,
            plot=False if args.no_plot else "auto",
        ),
        **config,
    )
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # under torchrun, rank 0 reports
    last = result.history[-1] if result.history else {}
    print(json.dumps({"checkpoint": str(result.checkpoint), **last}), file=sys.stdout)


def cmd_linear_probe(args: argparse.Namespace) -> None:
    """Train the linear probe and print its top-1 accuracies.

    Args:
        args: the parsed command line.
    """
    from layertap.training.probe import linear_probe

    r = linear_probe(
        args.run,
        args.layer,
        args.images,
        args.val,
        **keyword_args(linear_probe, args, workers=resolve_workers(args.workers), progress=not args.quiet),
    )
    print(f"{r.layer}: val top-1 {r.val_top1:.2f}% (train {r.train_top1:.2f}%, {r.n_features} features)")
