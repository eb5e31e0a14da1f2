"""The run store: resume after kill -9 (byte-identical), skipped images, overwrite, lock, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

import layertap as lt


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many")
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    for i in range(72):
        Image.fromarray(photo(names[i % 4], seed=i, size=(96, 80))).save(root / f"im{i:03d}.jpg", quality=90)
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "layertap", *args]


def _arrays_bytes(run_dir: Path) -> dict[str, bytes]:
    run = lt.open_run(run_dir)
    return {k: run[k][:].tobytes() for k in run.layers}


def test_resume_after_kill_is_byte_identical(many_images: Path, tmp_path: Path) -> None:
    args = [
        "extract",
        "--model",
        "resnet18",
        "--weights",
        "random",
        "--layers",
        "layer1",
        "avgpool",
        "--images",
        str(many_images),
        "--batch-size",
        "4",
        "--chunk-rows",
        "4",
        "--workers",
        "1",
        "-q",
    ]
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(*args, "--out", str(ref_dir)), check=True, capture_output=True)

    for kill_at_rows in (4, 28):  # two kills at different points, then let it finish
        proc = subprocess.Popen(
            _cli(*args, "--out", str(killed_dir)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        progress = killed_dir / "progress.json"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(progress.read_text())["rows"] >= kill_at_rows:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not lt.open_run(killed_dir).complete
    done = subprocess.run(_cli(*args, "--out", str(killed_dir)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref, resumed = lt.open_run(ref_dir), lt.open_run(killed_dir)
    assert resumed.complete and resumed.images == ref.images and len(ref.images) == 72
    assert _arrays_bytes(killed_dir) == _arrays_bytes(ref_dir)


def test_corrupt_images_are_skipped_and_recorded(image_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    (bad / "ok").mkdir(parents=True)
    for p in sorted(image_dir.rglob("*.jpg"))[:3]:
        (bad / "ok" / p.name).write_bytes(p.read_bytes())
    good = (bad / "ok" / "img00.jpg").read_bytes()
    (bad / "ok" / "a_empty.jpg").write_bytes(b"")
    (bad / "ok" / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "ok" / "c_text.jpg").write_text("not an image")
    Image.fromarray(photo("coffee", 1, (64, 64))).save(bad / "ok" / "d_png_named.jpg", format="PNG")
    model = lt.load_model("alexnet", weights="random")
    run = lt.extract(model, bad, ["classifier.1"], tmp_path / "r", workers=0, batch_size=2)
    skipped = {s["path"]: s["reason"] for s in run.skipped}
    assert set(skipped) == {"ok/a_empty.jpg", "ok/b_truncated.jpg", "ok/c_text.jpg"}
    assert run.images == ["ok/d_png_named.jpg", "ok/img00.jpg", "ok/img01.jpg", "ok/img02.jpg"]
    assert run["classifier.1"].shape == (4, 4096)
    # rows line up with the images that were kept: same numbers as a run on the good images alone
    good_only = tmp_path / "good"
    (good_only / "ok").mkdir(parents=True)
    for p in run.images:
        (good_only / p).write_bytes((bad / p).read_bytes())
    clean = lt.extract(model, good_only, ["classifier.1"], tmp_path / "c", workers=0, batch_size=2)
    assert clean.images == run.images
    np.testing.assert_allclose(clean["classifier.1"][:], run["classifier.1"][:], rtol=1e-4, atol=1e-4)
    with pytest.raises(lt.LayertapError, match="cannot decode .*a_empty.jpg.*on_error='skip'"):
        lt.extract(model, bad, ["classifier.1"], tmp_path / "f", workers=0, on_error="fail")


def test_finished_run_is_not_overwritten(image_dir: Path, tmp_path: Path) -> None:
    model = lt.load_model("alexnet", weights="random")
    out = tmp_path / "r"
    lt.extract(model, image_dir, ["classifier.4"], out, workers=0)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = lt.extract(model, image_dir, ["classifier.4"], out, workers=0)  # same job: nothing to do
    assert again.complete and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(lt.LayertapError, match=r"holds a different run \(differs in: layers\).*overwrite=True"):
        lt.extract(model, image_dir, ["classifier.5"], out, workers=0)
    redone = lt.extract(model, image_dir, ["classifier.5"], out, workers=0, overwrite=True)
    assert redone.layers == ["classifier.5"] and not (out / "arrays" / "classifier.4").exists()


def test_second_writer_is_refused(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)",
            str(out / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lt.LayertapError, match="another layertap process is writing"):
            lt.extract("alexnet", image_dir, ["classifier.4"], out, weights="random", workers=0)
    finally:
        holder.kill()
        holder.wait()
    assert lt.extract("alexnet", image_dir, ["classifier.4"], out, weights="random", workers=0).complete


def test_manifest_records_provenance(image_dir: Path, tmp_path: Path) -> None:
    run = lt.extract(
        "resnet18",
        image_dir,
        ["avgpool"],
        tmp_path / "r",
        weights="random",
        seed=9,
        workers=0,
        fraction=0.5,
        flatten=True,
    )
    m = run.manifest
    assert m["status"] == "complete" and m["model"]["name"] == "torchvision:resnet18"
    assert m["model"]["weights"] == {"kind": "random", "seed": 9}
    assert "crop_size=[224]" in m["model"]["transform"] and m["versions"]["torch"]
    assert m["layers"]["avgpool"] == {"module": "avgpool", "shape": [512], "dtype": "float32"}
    assert m["images"]["selection"] == {"fraction": 0.5, "fraction_seed": 9} and m["images"]["n_stored"] == 4
    assert m["images"]["classes"] == ["cat", "dog", "rocket"] and "target" in m["images"]["rows"][0]
    assert m["decode"]["exif_transpose"] is True


def test_export_round_trip(image_dir: Path, tmp_path: Path) -> None:
    run = lt.extract(
        "alexnet", image_dir, ["features.12", "classifier.4"], tmp_path / "r", weights="random", workers=0, chunk_rows=4
    )
    npy = lt.export(run, "npy", tmp_path / "npy")
    txt = lt.export(run, "txt", tmp_path / "txt")
    for layer in run.layers:
        a = run[layer][:]
        np.testing.assert_array_equal(np.load(tmp_path / "npy" / f"{layer}.npy"), a)
        back = np.loadtxt(tmp_path / "txt" / f"{layer}.txt", dtype=np.float32).reshape(a.shape)
        np.testing.assert_array_equal(back, a)
    index = (tmp_path / "npy" / "images.csv").read_text().splitlines()
    # every row against the folder itself: sorted relative paths, class = subfolder, target = its rank
    files = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*.jpg"))
    classes = sorted({f.split("/")[0] for f in files})
    want = [f"{i},{f},{classes.index(f.split('/')[0])},{f.split('/')[0]}" for i, f in enumerate(files)]
    assert index == ["row,path,target,class", *want]
    assert index == (tmp_path / "txt" / "images.csv").read_text().splitlines()
    assert len(npy) == len(txt) == 3
