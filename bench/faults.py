"""What layertap does when things go wrong: prints a table of what was tried and what happened.

    .venv/bin/python bench/faults.py [--kills 5] [--images 96]

Kill -9 at random points then resume (byte-identical to an uninterrupted run?), a full disk (a
small tmpfs; needs root), two writers on one directory, a corpus of bad images, weights that do
not fit, a read-only output and a missing input. Each row: the fault, the outcome, OK or FAIL.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import layertap as lt

ROWS: list[tuple[str, str, bool]] = []


def report(fault: str, outcome: str, ok: bool) -> None:
    ROWS.append((fault, outcome, ok))
    print(f"{'OK  ' if ok else 'FAIL'} {fault}: {outcome}", flush=True)


def cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layertap", *args], capture_output=True, text=True, **kw)


def photos(folder: Path, n: int, size: tuple[int, int] = (160, 120)) -> Path:
    import skimage.data as d

    folder.mkdir(parents=True, exist_ok=True)
    srcs = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        a = srcs[i % 4]
        y, x = rng.integers(0, a.shape[0] // 4), rng.integers(0, a.shape[1] // 4)
        Image.fromarray(a[y:, x:]).resize(size).save(folder / f"im{i:04d}.jpg", quality=90)
    return folder


def extract_args(*args: str) -> list[str]:
    """``layertap extract`` arguments with random weights (the faults do not depend on weights)."""
    return ["extract", "--weights", "random", *args]


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:150] if lines else ""


def kills(tmp: Path, images: Path, n_kills: int) -> None:
    args = extract_args(
        "--model",
        "resnet18",
        "--layers",
        "layer2",
        "avgpool",
        "--images",
        str(images),
        "--batch-size",
        "8",
        "--chunk-rows",
        "8",
        "--workers",
        "1",
        "-q",
    )
    ref, out = tmp / "kill-ref", tmp / "kill-run"
    cli(*args, "--out", str(ref), check=True)
    rng = random.Random(1)
    total = len(list(images.glob("*.jpg")))
    for k in range(n_kills):
        target = rng.randrange(8, total - 8)
        proc = subprocess.Popen(
            [sys.executable, "-m", "layertap", *args, "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        reached = 0
        while proc.poll() is None:
            try:
                reached = json.loads((out / "progress.json").read_text())["rows"]
            except (OSError, ValueError, KeyError):
                pass
            if reached >= target:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report(f"kill -9 #{k + 1}", f"killed at {reached} of {total} rows committed", True)
    done = cli(*args, "--out", str(out))
    a, b = lt.open_run(out), lt.open_run(ref)
    same = (
        done.returncode == 0
        and a.images == b.images
        and all(a[layer].raw(slice(None)).tobytes() == b[layer].raw(slice(None)).tobytes() for layer in b.layers)
    )
    rows = len(a.images) if a.complete else 0
    report(
        f"resume after {n_kills} kills", f"{rows} rows, no image missing or duplicated, byte-identical: {same}", same
    )


def disk_full(tmp: Path, images: Path) -> None:
    mnt = tmp / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        report("disk full", "skipped: mounting a tmpfs needs root", True)
        return
    try:
        args = extract_args(
            "--model",
            "resnet18",
            "--layers",
            "layer1",
            "--images",
            str(images),
            "--batch-size",
            "4",
            "--chunk-rows",
            "2",
            "--workers",
            "0",
            "-q",
            "--out",
            str(mnt / "r"),
        )
        full = cli(*args)
        ok = full.returncode == 1 and "disk full" in full.stderr and "Traceback" not in full.stderr
        report("disk full (4 MB tmpfs)", f"exit {full.returncode}: {last_line(full.stderr)}", ok)
        subprocess.run(["mount", "-o", "remount,size=512m", str(mnt)], check=True)
        again = cli(*args)
        report(
            "disk full, space freed, same command",
            f"exit {again.returncode}, complete: {lt.open_run(mnt / 'r').complete}",
            again.returncode == 0 and lt.open_run(mnt / "r").complete,
        )
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def two_writers(tmp: Path, images: Path) -> None:
    # resnet50 in batches of 2: slow enough that the second writer starts while the first still runs
    args = extract_args(
        "--model",
        "resnet50",
        "--layers",
        "avgpool",
        "--batch-size",
        "2",
        "--images",
        str(images),
        "--workers",
        "0",
        "-q",
        "--out",
        str(tmp / "shared"),
    )
    first = subprocess.Popen([sys.executable, "-m", "layertap", *args], stderr=subprocess.PIPE, text=True)
    while not (tmp / "shared" / "manifest.json").exists() and first.poll() is None:
        time.sleep(0.05)
    second = cli(*args)
    first.wait()
    ok = second.returncode == 1 and "another layertap process" in second.stderr and first.returncode == 0
    report("two writers, one --out", f"second: exit {second.returncode}: {last_line(second.stderr)}", ok)


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_images(tmp: Path) -> None:
    root = tmp / "corpus"
    photos(root, 1)
    good = (root / "im0000.jpg").read_bytes()
    arr = np.asarray(Image.open(root / "im0000.jpg"))
    corpus = {
        "zero_bytes.jpg": b"",
        "truncated.jpg": good[: len(good) // 3],
        "text_named.jpg": b"hello",
        "decompression_bomb.png": bomb_png(40000, 40000),
    }
    for name, data in corpus.items():
        (root / name).write_bytes(data)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    (root / "png_named.jpg").write_bytes(buf.getvalue())
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(root / "gray16.png")
    Image.fromarray(arr).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(arr).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png", transparency=0)
    Image.fromarray(arr[:1, :1]).save(root / "one_pixel.png")
    rot = Image.fromarray(arr)
    exif = rot.getexif()
    exif[0x0112] = 6
    rot.save(root / "exif_rotated.jpg", exif=exif.tobytes())
    Image.fromarray(arr).save(root / "ünïcode 名前.png")
    Image.fromarray(arr).save(os.fsencode(root) + b"/latin1_\xe9.png")
    os.symlink(root / "im0000.jpg", root / "symlink.jpg")
    (root / "loop").mkdir()
    os.symlink(root / "loop", root / "loop" / "again")
    run = lt.extract("alexnet", root, ["classifier.4"], tmp / "corpus-run", weights="random", workers=0, progress=False)
    skipped = {s["path"]: s["reason"] for s in run.skipped}
    stored = set(run.images)
    for p in sorted(stored | set(skipped)):
        outcome = f"skipped, recorded: {skipped[p][:70]}" if p in skipped else "converted to RGB, stored"
        report(f"image {p!r}", outcome, (p in corpus) == (p in skipped))
    empty = tmp / "empty"
    empty.mkdir()
    r = cli(*extract_args("--model", "alexnet", "--layers", "fc", "--images", str(empty), "--out", str(tmp / "e")))
    report("empty folder", f"exit {r.returncode}: {last_line(r.stderr)}", r.returncode == 2)


def bad_setup(tmp: Path, images: Path) -> None:
    import torch
    import torchvision

    w = tmp / "alexnet.pt"
    torch.save(torchvision.models.alexnet().state_dict(), w)
    r = cli(
        "extract",
        "--model",
        "resnet18",
        "--weights",
        str(w),
        "--layers",
        "avgpool",
        "--images",
        str(images),
        "--out",
        str(tmp / "w"),
    )
    report(
        "weights of another architecture",
        f"exit {r.returncode}: {last_line(r.stderr)}",
        r.returncode == 2 and "missing keys" in r.stderr,
    )
    r = cli(
        *extract_args(
            "--model", "resnet18", "--layers", "avgpool", "--images", str(tmp / "nope"), "--out", str(tmp / "x")
        )
    )
    report("missing input folder", f"exit {r.returncode}: {last_line(r.stderr)}", r.returncode == 2)
    r = cli(
        *extract_args(
            "--model", "resnet18", "--layers", "avgpool", "--images", str(images), "--out", "/sys/layertap-out"
        )
    )
    report(
        "read-only output location",
        f"exit {r.returncode}: {last_line(r.stderr)}",
        r.returncode == 1 and "Traceback" not in r.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--images", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        images = photos(tmp / "images", args.images)
        kills(tmp, images, args.kills)
        disk_full(tmp, photos(tmp / "few", 16))
        two_writers(tmp, images)
        bad_images(tmp)
        bad_setup(tmp, photos(tmp / "two", 2))
    print("\n| fault | outcome | ok |\n|---|---|---|")
    for fault, outcome, ok in ROWS:
        print(f"| {fault} | {outcome} | {'yes' if ok else 'NO'} |")
    sys.exit(0 if all(ok for *_, ok in ROWS) else 1)


if __name__ == "__main__":
    main()
