"""Labelled views of stored results: xarray / pandas objects with named dimensions and image coordinates,
and the HTML a notebook shows for a run. Needs ``pip install 'layertap[labels]'`` (xarray, pandas).

Dimension names by the shape of one image's output (also written into each Zarr v3 array's
``dimension_names``, after ``image``):

=================  ===========================  =======================================
per-image shape    dimensions                   what
=================  ===========================  =======================================
(N,)               ``unit``                     pooled, flattened or projected features
(C, H, W)          ``channel, y, x``            conv feature maps
(L, D)             ``token, dim``               transformer token sequences
(C, T, H, W)       ``channel, time, y, x``      video models' feature maps
other              ``dim_0, dim_1, ...``
=================  ===========================  =======================================
"""

from __future__ import annotations

import html
import math
from typing import Any

from layertap._optional import require
from layertap.errors import LayertapError
from layertap.store.blocks import ITEMSIZE


def dims_for(shape: tuple[int, ...] | list[int]) -> tuple[str, ...]:
    """Names of the per-image dimensions of an output of this shape (see the module's table)."""
    by_rank = {1: ("unit",), 2: ("token", "dim"), 3: ("channel", "y", "x"), 4: ("channel", "time", "y", "x")}
    return by_rank.get(len(shape), tuple(f"dim_{i}" for i in range(len(shape))))


def _image_coords(run: Any) -> dict[str, Any]:
    import numpy as np

    coords: dict[str, Any] = {"path": ("image", list(run.images))}
    targets = run.targets
    if targets is not None:
        coords["target"] = ("image", targets)
        classes = run.classes
        if classes:
            coords["class"] = ("image", np.array([classes[int(t)] if 0 <= int(t) < len(classes) else "" for t in targets]))
    return coords


def to_xarray(run: Any, layer: str) -> Any:
    """``run[layer]`` loaded as an ``xarray.DataArray``: dims ``image`` + :func:`dims_for`, coords
    ``path``, ``target`` and ``class`` along ``image``; attrs model, layer, dtype.

    Args:
        run: a :class:`layertap.Run`.
        layer: a stored layer name.

    Returns:
        The DataArray (all rows loaded into memory; slice ``run[layer]`` first for very large layers).
    """
    xr = require("xarray", "labels")
    arr = run[layer]
    data = arr[:]
    dims = ("image", *dims_for(arr.shape[1:]))
    model = run.manifest.model or {}
    return xr.DataArray(
        data,
        dims=dims,
        coords=_image_coords(run),
        name=layer,
        attrs={"model": str(model.get("name", "")), "layer": layer, "dtype": str(arr.stored_dtype)},
    )


def to_pandas(run: Any, layer: str) -> Any:
    """A 2-D layer (images x units) as a ``pandas.DataFrame``: one row per image indexed by its path,
    one column per unit.

    Raises:
        LayertapError: for a layer with more than one dimension per image (use :func:`to_xarray`,
            or extract with ``--flatten`` / a reducer).
    """
    pd = require("pandas", "labels")
    arr = run[layer]
    if len(arr.shape) != 2:
        raise LayertapError(
            f"layer '{layer}' is {'x'.join(map(str, arr.shape[1:]))} per image, not a vector; use run.to_xarray('{layer}'), "
            "or extract it with --flatten or --reduce"
        )
    frame = pd.DataFrame(arr[:], index=pd.Index(run.images, name="path"))
    frame.columns.name = "unit"
    return frame


def run_html(run: Any) -> str:
    """The notebook view of a run: model, weights, images and a table of its layers."""
    m = run.manifest
    model = m.model or {}
    weights = model.get("weights", {})
    w = weights.get("id") or weights.get("kind") or "" if isinstance(weights, dict) else str(weights)
    rows = []
    for name in run.layers:
        arr = run[name]
        nbytes = math.prod(arr.shape) * ITEMSIZE.get(arr.stored_dtype, arr.dtype.itemsize)
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code></td><td>{'x'.join(map(str, arr.shape[1:]))}</td>"
            f"<td>{html.escape(', '.join(dims_for(arr.shape[1:])))}</td><td>{arr.stored_dtype}</td>"
            f"<td style='text-align:right'>{nbytes / 1e6:.2f} MB</td></tr>"
        )
    e = html.escape
    return (
        f"<div><b>layertap run</b> <code>{e(str(run.path))}</code> ({e(str(m.status))})<br>"
        f"model <b>{e(str(model.get('name', '')))}</b>, weights {e(str(w))}; {len(run.images)} images, "
        f"{len(run.skipped)} skipped"
        "<table><thead><tr><th>layer</th><th>shape per image</th><th>dims</th><th>dtype</th><th>size</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
