"""Memory is bounded: layertap's peak RSS must stay flat as the number of images grows.

Extracts resnet18 ``layer1`` unflattened and stored (64x56x56 float32, ~0.8 MB per image) for 1k,
2k and 3k images, each count in its own subprocess (started through a launcher, see
bench/common.py), and reports the peak RSS of the main process and of the largest DataLoader
worker per count. Targets: main peak RSS + worker private memory under 1.5 GB at 3k images, and flat: the largest count's
peak within 10% (or 100 MB) of the smallest count's.

    .venv/bin/python bench/memory.py            # 1000, 2000, 3000 images (~3 GB written, then deleted)
    .venv/bin/python bench/memory.py --quick    # 100, 200, 300 images

The images are small JPEGs (320x240: the transform resizes to 224 anyway); results are appended to
bench/RESULTS.md (quick: bench/.work/RESULTS-quick.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
from make_images import make_images, parse_sizes  # noqa: E402

WORK = BENCH / ".work"
ARCH, LAYER = "resnet18", "layer1"


def child(spec_file: str) -> None:
    """One count: extract with layertap, print the result line."""
    spec = common.load_spec_file(spec_file)
    import layertap as lt

    loaded = lt.load_model(ARCH, weights=spec["weights"])
    images = lt.ImageSet(paths=spec["images"], root=spec["image_dir"])
    out = Path(spec["out"])
    with common.Timer() as t:
        run = lt.extract(
            loaded,
            images,
            [LAYER],
            out,
            batch_size=spec["batch_size"],
            workers=spec["workers"],
            device="cpu",
            progress=False,
        )
    stored = run.manifest["images"]["n_stored"]
    nbytes = sum(f.stat().st_size for f in (out / "arrays").rglob("*") if f.is_file())
    common.emit(spec, t.seconds, stored=stored, stored_mb=round(nbytes / 1e6, 1), shape=run.manifest["layers"])


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description="layertap peak RSS vs number of images (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="100, 200, 300 images")
    p.add_argument("--counts", help="comma-separated image counts (default 1000,2000,3000)")
    p.add_argument("--size", default="320x240", help="JPEG size (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="default %(default)s, as bench/run.py")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: layertap's default)")
    p.add_argument("--threads", type=int)
    p.add_argument("--limit-mb", type=float, default=1500, help="target: main + worker peak RSS below this")
    p.add_argument("--results", type=Path)
    a = p.parse_args(argv)

    import torch

    from layertap.data.images import default_workers

    counts = [int(c) for c in a.counts.split(",")] if a.counts else ([100, 200, 300] if a.quick else [1000, 2000, 3000])
    workers = default_workers() if a.workers is None else a.workers
    threads = a.threads or torch.get_num_threads()
    results_file = a.results or (WORK / "RESULTS-quick.md" if a.quick else BENCH / "RESULTS.md")
    t0 = time.perf_counter()
    n = max(counts)
    image_dir = make_images(WORK / f"images-{n}-{a.size}", n, parse_sizes(a.size))
    paths = common.list_images(str(image_dir))
    weights = common.save_random_weights(ARCH, WORK / "weights" / f"{ARCH}-seed0.pt")
    rows = []
    for count in counts:
        out = WORK / "out" / f"memory-{count}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        spec = {
            "contender": "layertap",
            "images": paths[:count],
            "image_dir": str(image_dir),
            "weights": weights,
            "batch_size": a.batch_size,
            "workers": workers,
            "threads": threads,
            "out": str(out / "run"),
        }
        spec_file = out / "spec.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, "-c", common.LAUNCHER, sys.executable, __file__, "--child", str(spec_file)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(common.RESULT_PREFIX)]
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0 or not lines:
            print(f"{count} images: FAILED (exit {proc.returncode})", flush=True)
            return 1
        r = json.loads(lines[-1][len(common.RESULT_PREFIX) :])
        r["count"] = count
        rows.append(r)
        print(
            f"{count} images: {r['img_per_s']} img/s, peak RSS main {r['rss_main_mb']:.0f} MB, worker private "
            f"{r['private_workers_mb']:.0f} MB (RSS {r['rss_workers_mb']:.0f}), stored {r['stored_mb']:.0f} MB",
            flush=True,
        )

    total = [r["rss_main_mb"] + r["private_workers_mb"] for r in rows]
    main_rss = [r["rss_main_mb"] for r in rows]
    growth = main_rss[-1] - main_rss[0]
    flat = growth <= max(100.0, 0.10 * main_rss[0])
    under = max(total) < a.limit_mb
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {stamp} memory{' (quick)' if a.quick else ''}: {ARCH} {LAYER} unflattened, stored",
        "",
        f"{a.size} JPEGs, batch {a.batch_size}, {workers} worker(s), {threads} threads, random weights; one "
        "subprocess per count. main = peak RSS of the main process (getrusage(RUSAGE_SELF).ru_maxrss); worker = "
        "peak private memory of the DataLoader worker (smaps_rollup, sampled; its peak RSS, which counts pages "
        "shared with main, in parentheses); total = main + worker.",
        "",
        "| images | stored MB | img/s | main MB | worker MB | total MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r, tot in zip(rows, total, strict=True):
        lines.append(
            f"| {r['count']} | {r['stored_mb']:.0f} | {r['img_per_s']:.1f} | {r['rss_main_mb']:.0f} | "
            f"{r['private_workers_mb']:.0f} ({r['rss_workers_mb']:.0f}) | {tot:.0f} |"
        )
    lines += [
        "",
        f"- flat: main peak grows {growth:+.0f} MB from {counts[0]} to {counts[-1]} images "
        f"(allowed: 10% or 100 MB): **{'PASS' if flat else 'FAIL'}**",
        f"- bounded: largest total {max(total):.0f} MB < {a.limit_mb:.0f} MB: **{'PASS' if under else 'FAIL'}**",
        f"- wall time: {(time.perf_counter() - t0) / 60:.1f} min",
        "",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    if not results_file.exists():
        results_file.write_text("# layertap benchmark results\n\nAppended by `bench/run.py`; see bench/README.md.\n\n")
    with open(results_file, "a") as f:
        f.write(text)
    print(f"appended to {results_file}")
    return 0 if (flat and under) else 2


if __name__ == "__main__":
    sys.exit(main())
