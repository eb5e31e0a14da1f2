"""``layertap report RUN``: one self-contained HTML page per run (no network needed to view it).

Model, weights, transform, layers (shapes, sizes, reducers), a grid of image thumbnails with their
classes, skipped images, one RDM per layer, the layer x layer similarity and timing. Images and
figures are inlined as base64 (``data:`` URIs); the page has no scripts and loads nothing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from layertap.analysis.plots import plot_layer_similarity, plot_rdm
from layertap.analysis.rdms import rdm
from layertap.analysis.similarity import layer_similarity
from layertap.data.images import load_rgb
from layertap.errors import LayertapError
from layertap.store.blocks import ITEMSIZE
from layertap.store.files import disk_error
from layertap.store.manifest import Manifest
from layertap.store.run import Run
from layertap.units import human_bytes

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.num{text-align:right}.grid{display:flex;flex-wrap:wrap;gap:8px}
.cell{width:112px;font-size:11px;text-align:center;word-break:break-all}.cell img{width:96px;height:96px;object-fit:cover}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{width:360px}code{background:#f4f4f4;padding:0 3px}
"""


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(path: Path, size: int = 96) -> str | None:
    """A JPEG thumbnail of the image as a data URI (None when it cannot be decoded)."""
    try:
        img = load_rgb(str(path))
    except Exception:  # noqa: BLE001 - a report shows what it can
        return None
    img.thumbnail((size * 2, size * 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return _uri(buf.getvalue(), "image/jpeg")


def _figure_uri(draw: Any) -> str:
    """Run ``draw(path)`` (a layertap.analysis.plots function writing a PNG) and return the PNG as a data URI."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fig.png"
        draw(path)
        return _uri(path.read_bytes(), "image/png")


def _timing(m: Manifest) -> str:
    """Created to finished, and images per second, or "unknown" (an unfinished or older run)."""
    if m.created is None or m.finished is None:
        return "unknown"
    try:
        t0, t1 = datetime.fromisoformat(m.created), datetime.fromisoformat(m.finished)
    except (TypeError, ValueError):
        return "unknown"
    seconds = (t1 - t0).total_seconds()
    n = len((m.images or {}).get("rows", []))
    rate = f", {n / seconds:.1f} images/s" if seconds > 0 else ""
    return f"{seconds:.0f} s from {m.created} to {m.finished}{rate}"


def write_report(
    run: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    max_images: int = 48,
    max_layers: int = 12,
    metric: str = "correlation",
) -> Path:
    """Write the run's HTML report (one file, everything inlined: thumbnails, figures; no scripts).

    Args:
        run: a :class:`layertap.Run` or its directory.
        out: the HTML file (default ``RUN/report.html``).
        max_images: thumbnails shown (the first ones in run order).
        max_layers: RDMs drawn (the first layers).
        metric: the RDM dissimilarity (``correlation``, ``euclidean``, ``cosine``).

    Returns:
        The path written.

    Raises:
        LayertapError: a run with no stored layers.
        StorageError: the file cannot be written.

    Example:
        >>> write_report("./acts")  # doctest: +SKIP
        PosixPath('acts/report.html')
    """
    r = run if isinstance(run, Run) else Run(run)
    m = r.manifest
    model = m.model or {}
    e = html.escape
    name = str(model.get("name", ""))
    weights = model.get("weights", {})
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>layertap report: {e(name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>layertap run: {e(name)}</h1>",
        "<table>",
        f"<tr><th>run</th><td><code>{e(str(r.path))}</code> ({e(m.status)})</td></tr>",
        f"<tr><th>model</th><td>{e(name)} (source {e(str(model.get('source', '')))})</td></tr>",
        f"<tr><th>weights</th><td><code>{e(str(weights))}</code></td></tr>",
        f"<tr><th>transform</th><td><code>{e(str(model.get('transform', '')))}</code></td></tr>",
        f"<tr><th>images</th><td>{len(r.images)} stored, {len(r.skipped)} skipped</td></tr>",
        f"<tr><th>timing</th><td>{e(_timing(m))}</td></tr>",
        f"<tr><th>options</th><td><code>{e(str(m.options or {}))}</code></td></tr>",
        "</table>",
        "<h2>Layers</h2><table><tr><th>layer</th><th>shape per image</th><th>dtype</th><th>reducer</th>"
        "<th class='num'>size</th></tr>",
    ]
    aliases = {v: k for k, v in (m.get("layer_aliases") or {}).items()}
    for layer in r.layers:
        arr = r[layer]
        info = m["layers"][layer]
        size = math.prod(arr.shape) * ITEMSIZE.get(arr.stored_dtype, 4)
        label = f"{layer} ({aliases[layer]})" if layer in aliases else layer
        parts.append(
            f"<tr><td><code>{e(label)}</code></td><td>{'x'.join(map(str, arr.shape[1:]))}</td>"
            f"<td>{e(arr.stored_dtype)}</td><td>{e(str(info.get('reduce', '')))}</td>"
            f"<td class='num'>{human_bytes(size)}</td></tr>"
        )
    parts.append("</table>")

    root = Path(str(m.get("images", {}).get("root", "")))
    rows = m.get("images", {}).get("rows", [])
    classes = r.classes
    parts.append(f"<h2>Images (first {min(max_images, len(rows))} of {len(rows)})</h2><div class='grid'>")
    for row in rows[:max_images]:
        path = Path(row["path"])
        uri = _thumbnail(path if path.is_absolute() else root / path)
        cls = row.get("class")
        if cls is None and classes and row.get("target") is not None:
            cls = classes[int(row["target"])]
        img = f"<img src='{uri}' alt='{e(row['path'])}'>" if uri else "<div>(not readable now)</div>"
        parts.append(f"<div class='cell'>{img}<br><b>{e(str(cls or ''))}</b><br>{e(row['path'])}</div>")
    parts.append("</div>")
    skipped = r.skipped
    parts.append(f"<h2>Skipped images ({len(skipped)})</h2>")
    if skipped:
        parts.append("<table><tr><th>image</th><th>reason</th></tr>")
        parts.extend(f"<tr><td>{e(s.get('path', ''))}</td><td>{e(s.get('reason', ''))}</td></tr>" for s in skipped)
        parts.append("</table>")

    if len(r.images) >= 3 and r.layers:
        parts.append(f"<h2>RDM per layer ({e(metric)})</h2><div class='figs'>")
        short = name.split(":", 1)[-1]
        rdms: dict[str, Any] = {}  # reused by the layer x layer comparison below
        for layer in r.layers[:max_layers]:
            d = rdms[layer] = rdm(r[layer], metric)
            uri = _figure_uri(
                lambda p, d=d, layer=layer: plot_rdm(
                    d, p, r.targets, classes, title=f"{short}, {layer}: RDM", measure=metric, dpi=80
                )
            )
            parts.append(f"<img src='{uri}' alt='RDM of {e(layer)}'>")
        parts.append("</div>")
        if len(r.layers) >= 2:
            sim = layer_similarity(r, method="rdm-spearman", metric=metric, rdms=rdms)
            uri = _figure_uri(
                lambda p: plot_layer_similarity(
                    sim.matrix, sim.rows, sim.cols, p, title=f"{short}: layer x layer", measure="rdm-spearman", dpi=110
                )
            )
            parts.append(f"<h2>Layer x layer similarity</h2><img src='{uri}' alt='layer similarity' width='480'>")
    elif not r.layers:
        raise LayertapError(f"run {r.path} has no stored layers yet; report it when it has rows")
    parts.append("</body></html>")
    target = Path(out) if out is not None else r.path / "report.html"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(parts), encoding="utf-8")
    except OSError as err:
        raise disk_error(err, target) from None
    return target
