"""How much ``--fast-decode`` (libjpeg's reduced-scale draft decode) saves per image, against a full decode.

Decodes the same photo-like 1200x900 JPEGs (bench/make_images.py) with :func:`layertap.data.images.load_rgb`
both ways, then resizes to the transform's 256, and prints milliseconds per image (best of 5 passes)
as a Markdown table; ``--append`` adds it to bench/RESULTS.md.

    .venv/bin/python bench/fast_decode.py --n 32 --append
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_images import make_images  # noqa: E402

from layertap.data.images import load_rgb  # noqa: E402


def ms_per_image(paths: list[Path], draft: int | None, passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for p in paths:
            load_rgb(str(p), draft=draft).resize((256, 256))
        best = min(best, time.perf_counter() - t0)
    return best / len(paths) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="images (default 32)")
    parser.add_argument("--out", default="bench/.work/images-1200x900", help="image folder (cached)")
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    folder = make_images(args.out, args.n, [(1200, 900)])
    paths = sorted(folder.glob("*.jpg"))
    full, fast = ms_per_image(paths, None), ms_per_image(paths, 256)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## {when} --fast-decode: {len(paths)} photo-like 1200x900 JPEGs, decode + resize to 256\n\n"
        f"CPU: {os.cpu_count()} logical cores; load average {os.getloadavg()[0]:.1f} (shared machine); "
        "best of 5 passes, one process.\n\n"
        "| decode | ms per image | speed-up |\n|---|---:|---:|\n"
        f"| full (default) | {full:.1f} | 1.00x |\n"
        f"| `--fast-decode` (draft: libjpeg at 1/2, 1/4, 1/8 scale, sides >= 256) | {fast:.1f} | {full / fast:.2f}x |\n"
        "\n`.venv/bin/python bench/fast_decode.py --append`\n"
    )
    print(text)
    if args.append:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
