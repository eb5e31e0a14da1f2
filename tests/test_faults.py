"""Faults and bad input: a corpus of bad images, a fuzzer on the decode path, full and read-only disks,
layers that return no tensor."""

from __future__ import annotations

import functools
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import independent_rgb, photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import layertap as lt
from layertap.data.images import _Decoded, load_rgb


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG file that claims huge dimensions (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    good = io.BytesIO()
    Image.fromarray(photo("coffee", 0, (120, 90))).save(good, format="JPEG", quality=90)
    jpg = good.getvalue()
    (root / "ok.jpg").write_bytes(jpg)
    (root / "zero_bytes.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (root / "text_named.jpg").write_text("this is not an image\n")
    Image.fromarray(photo("rocket", 1, (80, 60))).save(root / "png_named.jpg", format="PNG")
    Image.fromarray(photo("chelsea", 2, (70, 50))[..., 0].astype(np.uint16) * 257).save(root / "gray16.png")
    Image.fromarray(photo("astronaut", 3, (64, 64))).convert("CMYK").save(root / "cmyk.jpg")
    pal = Image.fromarray(photo("astronaut", 4, (60, 60))).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(root / "palette_transparent.png", transparency=3)
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(root / "one_pixel.png")
    (root / "bomb.png").write_bytes(png_with_size(40000, 40000))
    rot = Image.fromarray(photo("rocket", 5, (90, 60)))
    exif = rot.getexif()
    exif[0x0112] = 8
    rot.save(root / "exif_rotated.jpg", exif=exif.tobytes())
    Image.fromarray(photo("coffee", 6, (50, 50))).save(root / "ünïcödé 写真.png")
    Image.fromarray(photo("coffee", 7, (50, 50))).save(os.fsencode(root) + b"/latin1_\xe9t\xe9.png")
    os.symlink(root / "ok.jpg", root / "symlink.jpg")
    (root / "loop").mkdir()
    os.symlink(root / "loop", root / "loop" / "again")  # a symlink loop must not hang the scan
    Image.fromarray(photo("rocket", 8, (50, 50))).save(root / "loop" / "inside.png")
    return root


EXPECTED_SKIPPED = {"zero_bytes.jpg", "truncated.jpg", "text_named.jpg", "bomb.png"}


def test_bad_image_corpus_outcomes(bad_corpus: Path, tmp_path: Path) -> None:
    from conftest import reference_outputs
    from torchvision.models import AlexNet_Weights

    model = lt.load_model("alexnet", weights="random")
    run = lt.extract(model, bad_corpus, ["classifier.1"], tmp_path / "r", workers=1, batch_size=4)
    skipped = {s["path"]: s["reason"] for s in run.skipped}
    assert set(skipped) == EXPECTED_SKIPPED
    assert "DecompressionBomb" in skipped["bomb.png"]
    stored = set(run.images)
    for name in (
        "ok.jpg",
        "png_named.jpg",
        "gray16.png",
        "cmyk.jpg",
        "palette_transparent.png",
        "one_pixel.png",
        "exif_rotated.jpg",
        "ünïcödé 写真.png",
        "symlink.jpg",
        "loop/inside.png",
    ):
        assert name in stored, name
    assert any(p.startswith("latin1_") for p in stored)  # non-UTF-8 name kept (surrogate-escaped)
    # every stored row is the model's output for that very image, decoded independently
    tf = AlexNet_Weights.DEFAULT.transforms()
    x = torch.stack([tf(independent_rgb(bad_corpus / p)) for p in run.images])
    want = reference_outputs(model.module, x, ["classifier.1"])["classifier.1"][0].numpy()
    np.testing.assert_allclose(run["classifier.1"][:], want, rtol=1e-4, atol=1e-4)
    latin = next(p for p in stored if p.startswith("latin1_"))
    assert load_rgb(str(bad_corpus / latin)).size == (50, 50)  # the recorded path opens again
    assert "loop/again/inside.png" not in stored
    lt.export(run, "csv", tmp_path / "csv")  # the index file copes with those names too


@functools.cache
def _transform():  # noqa: ANN202
    return lt.load_model("alexnet", weights="random").transform


@pytest.mark.timeout(300)  # a hang fails here; per-example deadlines would be flaky on a busy machine
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), cut=st.integers(0, 5000), flips=st.lists(st.integers(0, 5000), max_size=8))
def test_decode_fuzz_never_raises(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, cut: int, flips: list[int]
) -> None:
    """Random bytes and mutated real JPEG/PNG files: a tensor or a skip reason, never an exception or hang."""
    base = tmp_path_factory.getbasetemp() / "fuzz"
    base.mkdir(exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(photo("chelsea", 0, (48, 40))).save(buf, format="JPEG" if cut % 2 else "PNG")
    mutated = bytearray(buf.getvalue()[: max(cut, 8)])
    for f in flips:
        if f < len(mutated):
            mutated[f] ^= 0xFF
    tf = _transform()
    paths = []
    for k, blob in enumerate((data, bytes(mutated))):
        p = base / f"f{k}.jpg"
        p.write_bytes(blob)
        paths.append(str(p))
    ds = _Decoded(paths, tf, exif_transpose=True)
    for i in range(len(paths)):
        idx, tensor, err = ds[i]
        assert idx == i
        assert (tensor is None) != (err is None)
        if tensor is not None:
            assert tensor.shape == (3, 224, 224)
            with Image.open(paths[i]) as img:  # what PIL itself decodes from the same bytes
                img.load()
                if img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1:
                    torch.testing.assert_close(tensor, tf(img.convert("RGB")), rtol=0, atol=0)


def _mount_tmpfs(path: Path, size: str, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")


@pytest.fixture()
def small_disk(tmp_path: Path):
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "3m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_then_resume(image_dir: Path, small_disk: Path, tmp_path: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "layertap",
        "extract",
        "--model",
        "resnet18",
        "--weights",
        "random",
        "--layers",
        "layer1",
        "--images",
        str(image_dir),
        "--batch-size",
        "2",
        "--chunk-rows",
        "1",
        "--workers",
        "0",
        "-q",
        "--yes",  # past the free-space check (tests/test_plan.py), so that the disk does fill up
    ]
    full = subprocess.run([*args, "--out", str(small_disk / "run")], capture_output=True, text=True)
    assert full.returncode == 1, full.stderr
    assert "disk full while writing" in full.stderr and "run the same command again to resume" in full.stderr
    assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) <= 2
    done_rows = lt.open_run(small_disk / "run")  # the store is still a valid (unfinished) run
    assert not done_rows.complete
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    resumed = subprocess.run([*args, "--out", str(small_disk / "run")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref")], capture_output=True, text=True)
    assert ref.returncode == 0
    a, b = lt.open_run(small_disk / "run"), lt.open_run(tmp_path / "ref")
    assert a.images == b.images and a["layer1"][:].tobytes() == b["layer1"][:].tobytes()


def test_read_only_output_and_missing_input(image_dir: Path, tmp_path: Path, layertap_cli) -> None:
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "1m", "ro")
    try:
        p = layertap_cli(
            "extract",
            "--model",
            "alexnet",
            "--weights",
            "random",
            "--layers",
            "classifier.4",
            "--images",
            str(image_dir),
            "--out",
            str(ro / "acts"),
        )
        assert p.returncode == 1 and "cannot write to" in p.stderr and "choose a writable --out" in p.stderr
        assert "Traceback" not in p.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    p = layertap_cli(
        "extract",
        "--model",
        "alexnet",
        "--weights",
        "random",
        "--layers",
        "classifier.4",
        "--images",
        str(tmp_path / "missing"),
        "--out",
        str(tmp_path / "o"),
    )
    assert p.returncode == 2 and "image path not found" in p.stderr


class Outputs(torch.nn.Module):
    """Submodules that return a tuple, a dict and None."""

    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x * 3

    class Dict(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": x + 1, "b": x - 1}

    class Nothing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    def __init__(self) -> None:
        super().__init__()
        self.pair, self.dict, self.nothing = self.Pair(), self.Dict(), self.Nothing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.pair(x)
        d = self.dict(a)
        self.nothing(x)
        return d["a"]


def test_layers_that_do_not_return_a_tensor() -> None:
    net = Outputs()
    x = torch.randn(2, 3)
    with lt.Extractor(net, ["pair", "dict"]) as tap:
        out = tap(x)
    torch.testing.assert_close(out["pair"], x * 2)  # tuple: its first tensor
    torch.testing.assert_close(out["dict"], x * 2 + 1)  # dict: its first tensor value
    with pytest.raises(lt.LayertapError, match="layer 'nothing' returns NoneType, not a tensor"):
        lt.Extractor(net, ["nothing"])(x)
