"""Merging shard runs into the run an unsharded extraction would have written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from layertap.errors import LayertapError, StorageError
from layertap.store.files import MANIFEST, SHARDS
from layertap.store.manifest import ImagesSection, LayerInfo
from layertap.store.run import Run
from layertap.store.writer import RunWriter


def shard_runs(out: str | os.PathLike[str]) -> list[Run]:
    """The shard runs under ``out/shards/``, in shard order.

    Args:
        out: the run the shards merge into.

    Returns:
        The shard runs found (opened; an empty list when there are none).

    Example:
        >>> [r.manifest.shard["index"] for r in shard_runs("acts")]  # doctest: +SKIP
        [0, 1, 2, 3]
    """
    root = Path(out) / SHARDS
    dirs = sorted(d for d in root.glob("*-of-*") if (d / MANIFEST).is_file()) if root.is_dir() else []
    return [Run(d) for d in dirs]


def merge_values(sections: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The manifest ``values`` section (NaN/inf and overflow counts per layer) of merged shards: the sums.

    Args:
        sections: each shard's ``values`` section (None for a shard without one).

    Returns:
        The summed section, or None when no shard has one.

    Example:
        >>> merge_values([{"nonfinite": {"fc": 1}}, None, {"nonfinite": {"fc": 2}}])
        {'nonfinite': {'fc': 3}}
    """
    present = [s for s in sections if isinstance(s, dict)]
    if not present:
        return None
    out: dict[str, Any] = {k: v for k, v in present[0].items() if not isinstance(v, dict)}
    for section in present:
        for key, per_layer in section.items():
            if isinstance(per_layer, dict):
                total = out.setdefault(key, {})
                for layer, n in per_layer.items():
                    total[layer] = total.get(layer, 0) + int(n)
    return out


def merge_shards(out: str | os.PathLike[str], shards: list[str | os.PathLike[str]] | None = None) -> Run:
    """Merge shard runs (default: all of ``out/shards/``) into the run ``out``.

    The result is the run an unsharded extraction would have written: the same spec (so the
    unsharded command finds it complete), the same image rows, skipped images and layer arrays,
    byte for byte. Refuses, naming them, while any shard is missing or unfinished. Resumable.

    Args:
        out: the run to write (its shards are under ``out/shards/``).
        shards: the shard runs to merge instead of those found there.

    Returns:
        The merged run.

    Raises:
        LayertapError: shards missing, unfinished, mixed from different jobs or counts, or none with rows.

    Example:
        >>> run = merge_shards("acts")  # doctest: +SKIP
    """
    runs = [Run(s) for s in shards] if shards else shard_runs(out)
    if not runs:
        raise LayertapError(f"no shards to merge in {Path(out) / 'shards'}; run 'layertap extract --shard i/n' first")
    infos = [r.manifest.shard for r in runs]
    if any(i is None for i in infos):
        bad = [str(r.path) for r, i in zip(runs, infos, strict=True) if i is None]
        raise LayertapError(f"not shard runs: {', '.join(bad)}")
    count = infos[0]["count"]  # type: ignore[index]  # None refused above
    by_index = {i["index"]: r for r, i in zip(runs, infos, strict=True) if i is not None and i["count"] == count}
    missing = [i for i in range(count) if i not in by_index]
    unfinished = [i for i, r in sorted(by_index.items()) if not r.complete]
    if missing or unfinished or len(by_index) != len(runs):
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(map(str, missing))}")
        if unfinished:
            parts.append(f"unfinished: {', '.join(map(str, unfinished))}")
        if len(by_index) != len(runs):
            parts.append("shards of different counts were mixed")
        raise StorageError(
            f"cannot merge {out} yet ({count} shards expected; {'; '.join(parts)}): run or resubmit those shards, "
            "then merge again")
    ordered = [by_index[i] for i in range(count)]
    shard_infos = [r.manifest.shard for r in ordered if r.manifest.shard is not None]
    parent_spec = shard_infos[0]["parent_spec"]
    if any(info["parent_spec"] != parent_spec for info in shard_infos):
        raise LayertapError(f"the shards in {out} come from different jobs (model, layers, images or options differ)")
    first = ordered[0].manifest
    # Shards with no rows (more shards than batches, or every image undecodable) have no arrays.
    shaped = next((r.manifest for r in ordered if r.manifest.layers), None)
    if shaped is None:
        raise LayertapError(f"none of the images of the {count} shards in {out} could be decoded; nothing to merge")
    writer = RunWriter(out, parent_spec)
    if writer.already_complete and writer.damage:
        writer.close()
        writer = RunWriter(out, parent_spec, overwrite=True)  # the shards hold every row: merge again
    with writer:
        if writer.already_complete:
            return Run(out)
        # what the first shard records, less what is the shard's own (begin() sets spec and status)
        header = first.copy().updated(shard=None, layers={}, storage=None, images=None, finished=None)
        writer.begin(header.updated(merged_from=[str(r.path) for r in ordered], per_shard=_differing(ordered)))
        n_total = sum(_images(r)["n_total"] for r in ordered)
        if not writer.has_layers:
            layers = {
                k: cast(LayerInfo, {kk: vv for kk, vv in v.items() if kk != "dtype"}) for k, v in shaped.layers.items()
            }
            dtype = next(iter(shaped.layers.values()))["dtype"]
            writer.create_layers(layers, n_total, dtype, parent_spec.get("chunk_rows"))
        start = writer.resume_image
        rows_out: list[dict[str, Any]] = []
        skipped_out: list[dict[str, Any]] = []
        for run, info in zip(ordered, shard_infos, strict=True):
            offset = info["offset"]
            imgs = _images(run)
            rows_out.extend(imgs["rows"])
            skipped_out.extend({**sk, "index": offset + sk["index"]} for sk in imgs["skipped"])
            skipped_local = {sk["index"] for sk in imgs["skipped"]}
            glob = [offset + i for i in range(imgs["n_total"]) if i not in skipped_local]
            for sk in imgs["skipped"]:
                if offset + sk["index"] >= start:
                    writer.skip(offset + sk["index"], sk["reason"])
            if not glob:
                continue  # an empty shard, or one whose every image was skipped
            arrays = {name: run[name] for name in shaped.layers}
            step = writer.chunk_rows
            for r0 in range(0, len(glob), step):
                ids = glob[r0 : r0 + step]
                keep = [k for k, g in enumerate(ids) if g >= start]
                if not keep:
                    continue
                lo = r0 + keep[0]
                block = {name: arr.raw(slice(lo, r0 + len(ids))) for name, arr in arrays.items()}
                writer.add(block, ids[keep[0] :])
        writer.finish(n_total)
        parent_images = shard_infos[0]["parent_images"]
        writer.complete(
            finished=first.finished,
            images={**parent_images, "n_stored": len(rows_out), "rows": rows_out, "skipped": skipped_out},
            values=merge_values([r.manifest.values for r in ordered]),
        )
    return Run(out)


#: what each shard records about how it ran (the job spec is the same for all: checked above)
PER_SHARD = ("versions", "options", "decode", "compiled", "backend")


def _differing(runs: list[Run]) -> dict[str, list[Any]] | None:
    """Per field of :data:`PER_SHARD` on which the shards disagree, each shard's value (None: all agree)."""
    values = {key: [getattr(r.manifest, key) for r in runs] for key in PER_SHARD}
    out = {key: v for key, v in values.items() if any(x != v[0] for x in v[1:])}
    return out or None


def try_merge(out: str | os.PathLike[str]) -> Run | None:
    """Merge ``out``'s shards if every one is complete and nobody else is merging; else None.

    What the last shard to finish calls: the first that finds every shard complete merges them.

    Args:
        out: the run the shards merge into.

    Returns:
        The merged run, or None when a shard is missing or unfinished or a sibling is merging now.

    Example:
        >>> try_merge("acts") is None  # doctest: +SKIP
        True
    """
    runs = shard_runs(out)
    if not runs or not all(r.complete for r in runs):
        return None
    info = runs[0].manifest.shard
    if info is None or len(runs) < info["count"]:
        return None
    try:
        return merge_shards(out)
    except LayertapError as err:
        if "another layertap process" in str(err):
            return None  # a sibling shard is merging right now
        raise


def _images(run: Run) -> ImagesSection:
    """A complete run's ``images`` section (a complete run always has one)."""
    assert run.manifest.images is not None
    return run.manifest.images
