"""Checking a run's chunks: what is damaged, which rows and images that loses, and the one-line report.

:meth:`layertap.store.run.Run.verify` (and :func:`layertap.store.run.verify_run`) read every chunk and compare
it with the CRC-32 recorded when it was committed; what they find is recorded in ``damaged.json`` so that later
opens refuse those chunks and re-running the extract command recomputes them without reading the run again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layertap.errors import LayertapError
from layertap.store.chunks import chunk_crc, read_checksums, zarr_open
from layertap.store.files import ARRAYS, DAMAGED, read_json, write_json_atomic

if TYPE_CHECKING:  # the run module uses this one; a Run is only passed in
    from layertap.store.run import Run

log = logging.getLogger("layertap")


def read_damaged(path: Path) -> dict[str, dict[int, str]]:
    """The damage recorded by the last :func:`~layertap.store.run.verify_run` of run ``path``.

    Args:
        path: the run directory.

    Returns:
        ``{layer: {chunk: problem}}`` (``{}`` when none was recorded, or ``damaged.json`` is unreadable).

    Example:
        >>> read_damaged(Path("runs/resnet18"))  # doctest: +SKIP
        {'avgpool': {1: 'checksum mismatch'}}
    """
    try:
        obj = read_json(path / DAMAGED)
        return {str(k): {int(c): str(why) for c, why in v.items()} for k, v in obj["chunks"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s is unreadable (%s); ignored (run 'layertap verify' again)", path / DAMAGED, err)
        return {}


def record_damaged(path: Path, damage: dict[str, dict[int, str]]) -> None:
    """Record (or, when ``damage`` is empty, clear) what verify found, for the next open and re-run.

    Args:
        path: the run directory (a read-only one is let be).
        damage: ``{layer: {chunk: problem}}``.

    Example:
        >>> record_damaged(Path("runs/resnet18"), {})  # doctest: +SKIP
    """
    try:
        if damage:
            chunks = {k: {str(c): why for c, why in v.items()} for k, v in damage.items()}
            write_json_atomic(path / DAMAGED, {"chunks": chunks})
        else:
            (path / DAMAGED).unlink(missing_ok=True)
    except OSError as err:  # a read-only run: verify still reports; nothing could repair it there anyway
        log.debug("cannot record the damage in %s: %s", path / DAMAGED, err)


def _row_ranges(rows: list[int]) -> str:
    """[0, 1, 2, 7] -> '0-2, 7'."""
    parts: list[list[int]] = []
    for r in sorted(rows):
        if parts and r == parts[-1][1] + 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def lost_rows(run: Run, damage: dict[str, dict[int, str]]) -> list[int]:
    """The rows held by the damaged chunks, sorted.

    Args:
        run: the run.
        damage: ``{layer: {chunk: problem}}``.

    Returns:
        The row indices lost.

    Example:
        >>> lost_rows(run, {"avgpool": {1: "missing"}})  # chunks of 2 rows  # doctest: +SKIP
        [2, 3]
    """
    rows: set[int] = set()
    n = len(run.manifest.rows) if run.complete else int(run.rows or 0)
    for layer, chunks in damage.items():
        c_rows = _chunk_rows_of(run, layer)
        for c in chunks:
            rows.update(range(c * c_rows, min((c + 1) * c_rows, n)))
    return sorted(rows)


def _chunk_rows_of(run: Run, layer: str) -> int:
    try:
        return int(zarr_open(run.path / ARRAYS / layer).chunks[0])
    except Exception:  # noqa: BLE001 - a missing array: the run's chunking
        return max(1, run.manifest.chunk_rows or 1)


def damage_message(run: Run, damage: dict[str, dict[int, str]] | None = None) -> str:
    """One line: which layers and chunks are damaged, which rows and images that loses, what to do.

    Args:
        run: the run.
        damage: ``{layer: {chunk: problem}}`` (default: what opening the run found).

    Returns:
        The message.

    Example:
        >>> damage_message(run, {"avgpool": {1: "missing"}})  # doctest: +SKIP
        'runs/r is damaged: avgpool chunk 1 (missing); rows 2-3 are lost (2 images e.g. b.jpg, c.jpg); re-run ...'
    """
    damage = run.damage if damage is None else damage
    rows = lost_rows(run, damage)
    try:
        names = [run.images[r] for r in rows[:3]]
    except (LayertapError, IndexError):
        names = []
    where = "; ".join(
        f"{layer} chunk{'s' if len(ch) > 1 else ''} {', '.join(f'{c} ({why})' for c, why in sorted(ch.items())[:4])}"
        + (f" (+{len(ch) - 4} more)" if len(ch) > 4 else "")
        for layer, ch in damage.items()
    )
    example = f" e.g. {', '.join(names)}" if names else ""
    return (
        f"{run.path} is damaged: {where}; rows {_row_ranges(rows)} are lost ({len(rows)} images{example}); "
        "re-run the extract command to recompute them"
    )


@dataclass
class VerifyResult:
    """What :func:`~layertap.store.run.verify_run` found.

    Args:
        path: the run.
        ok: nothing is damaged.
        damage: ``{layer: {chunk: problem}}`` for damaged chunks.
        rows_lost: rows in the damaged chunks.
        images_lost: their image names.
        chunks_checked: chunks looked at.
        checksummed: chunks whose content was compared with a checksum recorded at commit (older runs have none).
        summary: one line for people.

    Example:
        >>> result = lt.verify_run("runs/resnet18")  # doctest: +SKIP
        >>> result.ok, result.rows_lost  # doctest: +SKIP
        (True, [])
    """

    path: Path
    ok: bool
    #: ``{layer: {chunk: problem}}`` for damaged chunks
    damage: dict[str, dict[int, str]]
    #: rows lost (in the damaged chunks) and their image paths
    rows_lost: list[int]
    images_lost: list[str]
    chunks_checked: int
    #: chunks whose content was compared with a checksum recorded at commit (older runs have none)
    checksummed: int
    summary: str


def check_run(run: Run) -> VerifyResult:
    """Check an opened run (opened with ``check=False``): every chunk file present at full size, and every
    chunk's content equal to the CRC-32 recorded when it was committed. Reads the whole run. The damaged
    chunks are recorded in ``damaged.json`` (removed when none are found).

    Args:
        run: the run (see :func:`layertap.store.run.verify_run`, which opens it).

    Returns:
        A :class:`VerifyResult`; ``summary`` is one line.

    Example:
        >>> check_run(Run("runs/resnet18", check=False)).ok  # doctest: +SKIP
        True
    """
    damage = run.check_chunks() if run.layers else {}  # afresh: not what an earlier verify recorded
    sums = read_checksums(run.path)
    checked = checksummed = 0
    for layer in run.layers:
        if layer in damage and any(v.startswith("array") for v in damage[layer].values()):
            continue
        arr = run[layer]
        step = arr.chunk_rows
        for c in range(-(-len(arr) // step)):
            checked += 1
            if c in damage.get(layer, {}):
                continue
            want = sums.get((layer, c))
            if want is None:
                continue
            lo, hi = c * step, min((c + 1) * step, len(arr))
            try:
                got = (hi - lo, chunk_crc(arr.raw(slice(lo, hi))))
            except Exception as err:  # noqa: BLE001 - an undecodable chunk file
                damage.setdefault(layer, {})[c] = f"unreadable ({type(err).__name__})"
                continue
            checksummed += 1
            if got != want:
                damage.setdefault(layer, {})[c] = "checksum mismatch"
    rows = lost_rows(run, damage)
    try:
        images = run.images
        lost_images = [images[r] for r in rows if r < len(images)]
    except LayertapError:
        lost_images = []
    n = run.rows if run.rows is not None else len(run.manifest.rows)
    record_damaged(run.path, damage)
    if damage:
        summary = damage_message(run, damage)
    else:
        state = "complete" if run.complete else "unfinished"
        summary = (
            f"ok: {run.path} ({state}, {n} rows, {len(run.layers)} layers, {checked} chunks, "
            f"{checksummed} checksums verified)"
        )
    return VerifyResult(run.path, not damage, damage, rows, lost_images, checked, checksummed, summary)
