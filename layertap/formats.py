"""Export a run's layers to other file formats, streaming chunk by chunk (bounded memory)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import LayertapError
from .storage import LayerArray, Run, disk_error, open_run


def _write_npy(arr: LayerArray, path: Path) -> None:
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=arr.dtype, shape=arr.shape)
    for start, block in arr.iter_chunks():
        mm[start : start + len(block)] = block
    mm.flush()
    del mm


def _write_txt(arr: LayerArray, path: Path) -> None:
    # 2-D only (images x units); '%.9g' round-trips float32 exactly.
    with open(path, "w", encoding="ascii") as f:
        for _, block in arr.iter_chunks():
            np.savetxt(f, block.reshape(len(block), -1), fmt="%.9g")


WRITERS: dict[str, tuple[str, Callable[[LayerArray, Path], None]]] = {
    "npy": (".npy", _write_npy),
    "txt": (".txt", _write_txt),
}


def write_index(run: Run, path: Path) -> None:
    """``images.csv``: one line per stored row (row, path, target, class), in array order."""
    rows = run.manifest["images"]["rows"]
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "target", "class"])
        for i, r in enumerate(rows):
            w.writerow([i, r["path"], r.get("target", ""), r.get("class", "")])


def export(
    run: Run | str | os.PathLike[str],
    fmt: str = "npy",
    out: str | os.PathLike[str] | None = None,
    layers: list[str] | None = None,
) -> list[Path]:
    """Write each layer of ``run`` to ``out/<layer>.<fmt>`` plus ``out/images.csv``.

    ``out`` defaults to ``RUN/export-<fmt>``. txt files hold 2-D matrices (images x units; conv
    maps are flattened in C order). Returns the written paths.
    """
    run = run if isinstance(run, Run) else open_run(run)
    if not run.complete:
        raise LayertapError(f"{run.path} is not complete; run the same extract command again to finish it first")
    fmt = fmt.lstrip(".").lower()
    if fmt not in WRITERS:
        raise LayertapError(f"unknown export format '{fmt}'; choose one of {', '.join(WRITERS)}")
    ext, writer = WRITERS[fmt]
    dest = Path(out) if out is not None else run.path / f"export-{fmt}"
    written = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for layer in layers or run.layers:
            path = dest / f"{layer}{ext}"
            writer(run[layer], path)
            written.append(path)
        write_index(run, dest / "images.csv")
    except OSError as err:
        raise disk_error(err, dest) from None
    return [*written, dest / "images.csv"]
