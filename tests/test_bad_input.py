"""Never silently wrong, never a traceback: value checks at extraction (NaN/inf, float16 overflow),
bad input given as one line, odd files (FIFOs, non-UTF-8 names, list files), read-only runs, Ctrl-C."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, reference_outputs
from PIL import Image
from torch import nn
from torchvision import transforms as T

import layertap as lt
import layertap.shards.merge as lt_store
from layertap.cli.app import main
from layertap.data.images import ImageSet, load_rgb
from layertap.store import files, writer

SIZE = 32
TF = T.Compose([T.Resize((SIZE, SIZE)), T.ToTensor()])


class Odd(nn.Module):
    """A tiny net whose 'log' layer has NaN (log of negatives) and whose 'big' layer overflows float16."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same weights for every instance
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.log = Lambda(torch.log)
        self.big = Lambda(lambda x: x * 2e5)
        self.fail_after, self.seen = fail_after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.seen >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.seen += len(x)
        y = self.conv(x)
        return self.log(y) + self.big(y)


class Lambda(nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def tiny() -> lt.LoadedModel:
    """A three-layer conv net (fixed weights) with a fixed-size transform: fast enough for many runs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return lt.from_module(module, transform=TF, name="tiny")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven small photos of different sizes."""
    root = tmp_path_factory.mktemp("small")
    names = ["astronaut", "coffee", "chelsea", "rocket", "coffee", "astronaut", "chelsea"]
    for i, name in enumerate(names):
        Image.fromarray(photo(name, seed=i, size=(40 + 3 * i, 36 + 2 * i))).save(root / f"im{i}.png")
    return root


def reference(module: nn.Module, folder: Path, layers: list[str]) -> dict[str, np.ndarray]:
    """A plain forward pass over the images in sorted order, with hand-written hooks."""
    paths = sorted(folder.glob("*.png"))
    x = torch.stack([TF(Image.open(p).convert("RGB")) for p in paths])
    return {k: v[0].numpy() for k, v in reference_outputs(module, x, layers).items()}


def expected_values(ref: dict[str, np.ndarray], dtype: str) -> tuple[dict[str, int], dict[str, int]]:
    nonfinite = {k: int(np.count_nonzero(~np.isfinite(v))) for k, v in ref.items()}
    with np.errstate(over="ignore"):  # the overflow is what is counted
        stored = {k: v.astype(dtype) for k, v in ref.items()}
    overflow = {k: int(np.count_nonzero(np.isfinite(ref[k]) & ~np.isfinite(stored[k]))) for k in ref}
    return nonfinite, overflow


# -- item 4 / 8: NaN/inf and float16 overflow are counted, warned about, recorded --------------------
def test_nonfinite_and_overflow_are_counted_and_recorded(small_dir: Path, tmp_path: Path, caplog) -> None:
    module = Odd()
    model = lt.from_module(module, transform=TF, name="odd")
    with caplog.at_level(logging.WARNING, logger="layertap"):
        run = lt.extract(model, small_dir, ["log", "big"], tmp_path / "r", dtype="float16", workers=0, batch_size=3)
    nonfinite, overflow = expected_values(reference(Odd(), small_dir, ["log", "big"]), "float16")
    assert nonfinite["log"] > 0 and overflow["big"] > 0  # the fixture does what it is meant to
    values = run.manifest["values"]
    assert values["nonfinite"] == nonfinite and values["overflow"] == overflow
    for layer in ("log", "big"):  # what is stored agrees: every non-finite stored value is accounted for
        assert np.count_nonzero(~np.isfinite(run[layer][:])) == nonfinite[layer] + overflow[layer]
    text = caplog.text
    assert f"layer big: {overflow['big']} values overflowed to inf in float16 storage" in text
    assert f"layer log: {nonfinite['log']} NaN/inf values in the model's output" in text
    assert not (tmp_path / "r" / "values.jsonl").exists()


def test_value_counts_survive_a_resume(small_dir: Path, tmp_path: Path) -> None:
    # A crash after some chunks were committed (chunks of 2 rows, batches of 3): the resumed run's
    # counts must cover the rows of both attempts, each once.
    module = Odd(fail_after=6)
    model = lt.from_module(module, transform=TF, name="odd")
    kw = {"dtype": "float16", "workers": 0, "batch_size": 3, "chunk_rows": 4}  # the cursor ends mid-batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        lt.extract(model, small_dir, ["log", "big"], tmp_path / "r", **kw)
    progress = json.loads((tmp_path / "r" / "progress.json").read_text())
    assert 0 < progress["rows"] < 7
    module.fail_after = None
    run = lt.extract(model, small_dir, ["log", "big"], tmp_path / "r", **kw)
    nonfinite, overflow = expected_values(reference(Odd(), small_dir, ["log", "big"]), "float16")
    assert run.manifest["values"]["nonfinite"] == nonfinite
    assert run.manifest["values"]["overflow"] == overflow


def test_pca_on_nan_activations_is_one_line_and_leaves_nothing(small_dir: Path, tmp_path: Path, capsys) -> None:
    run = lt.extract(lt.from_module(Odd(), transform=TF, name="odd"), small_dir, ["log"], tmp_path / "r", workers=0)
    out = tmp_path / "pca"
    for _ in range(2):  # the same command twice: the same clear error, not "already holds a run"
        assert main(["process", str(run.path), "--out", str(out), "--pca", "2"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "LinAlgError" not in err and len(err.strip().splitlines()) == 1, err
        assert "layer log: cannot fit PCA: the activations hold NaN/inf values" in err
        assert not out.exists()


def test_unfinished_postprocess_output_does_not_block_and_overwrite_is_spelled(
    image_dir: Path, tmp_path: Path, capsys
) -> None:
    run = lt.extract(tiny(), image_dir, ["2"], tmp_path / "r", workers=0)
    out = tmp_path / "c"
    from layertap.store.writer import DerivedRunWriter

    DerivedRunWriter(run, out, overwrite=False)  # what a kill -9 during postprocess leaves: status "running"
    centred = lt.postprocess(run, out, center=True)  # replaces it without overwrite=True
    x = run["2"][:].astype(np.float64)
    np.testing.assert_allclose(centred["2"][:], x - x.mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(lt.LayertapError, match=r"pass overwrite=True"):
        lt.postprocess(run, out, center=True)
    assert main(["process", str(run.path), "--out", str(out), "--center"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite or choose another output" in err and "overwrite=True" not in err


# -- item 9: non-UTF-8 file names in exports ---------------------------------------------------------
def test_export_non_utf8_file_names(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate([b"\xff.png", b"ok.png"]):
        Image.fromarray(photo("coffee", i, (40, 36))).save(os.fsencode(folder) + b"/" + name)
    module = nn.Sequential(nn.Conv2d(3, 2, 5, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    run = lt.extract(lt.from_module(module, transform=TF, name="t"), folder, ["2"], tmp_path / "r", workers=0)
    assert run.images == ["ok.png", os.fsdecode(b"\xff.png")]
    want = ["ok.png", "\\xff.png"]  # the undecodable byte as a \xNN escape: valid UTF-8 text
    import h5py
    import pyarrow.parquet as pq
    from scipy.io import loadmat

    with caplog.at_level(logging.WARNING, logger="layertap"):
        lt.export(run, "h5")
    assert caplog.text.count("1 file name(s) are not UTF-8 (e.g. \\xff.png): written with \\xNN escapes") == 1
    with h5py.File(run.path / "export-h5" / "activations.h5") as f:
        assert list(f["images/path"].asstr()[:]) == want
        np.testing.assert_array_equal(f["2"][:], run["2"][:])
    lt.export(run, "parquet")
    assert pq.read_table(run.path / "export-parquet" / "2.parquet").column("path").to_pylist() == want
    lt.export(run, "mat")
    assert [c[0][0] for c in loadmat(run.path / "export-mat" / "2.mat")["path"]] == want
    # images.csv keeps the exact bytes of the name
    assert b"\xff.png" in (run.path / "export-mat" / "images.csv").read_bytes()


def test_failed_export_leaves_no_partial_file(image_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from layertap.store import export as formats

    run = lt.extract(tiny(), image_dir, ["0", "2"], tmp_path / "r", workers=0)

    def half_then_full_disk(run_: lt.Run, layer: str, path: Path) -> None:
        if layer == "2":
            path.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        formats._write_npy(run_, layer, path)

    monkeypatch.setitem(formats.WRITERS, "npy", formats.Writer(".npy", half_then_full_disk))
    with pytest.raises(lt.LayertapError, match="disk full"):
        lt.export(run, "npy", tmp_path / "e")
    assert list((tmp_path / "e").iterdir()) == []


# -- item 10: bad input is one line with exit code 2 --------------------------------------------------
MODELS = '''
import torch
from torch import nn
from torchvision import transforms as T


class Grow(nn.Module):
    """Its output gets one value wider with every forward pass."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.flatten(1)[:, : self.calls]


def no_resize():
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), T.ToTensor()


def growing():
    return nn.Sequential(Grow()), T.Compose([T.Resize((8, 8)), T.ToTensor()])
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "odd_models.py"
    path.write_text(MODELS)
    return path


def _extract(images: Path | str, out: Path, *extra: str, model: str = "alexnet", layer: str = "classifier.4") -> list:
    return ["extract", "--model", model, "--weights", "random", "--layers", layer, "--images", str(images),
            "--out", str(out), "--workers", "0", "-q", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("device", "unknown device 'gpu0'; use cpu, cuda, cuda:N, mps or auto"),
        ("workers", "--workers must be 0 (decode in this process) or more, got -1"),
        ("chunk_rows", "--chunk-rows must be at least 1, got -3"),
        ("seed", "--seed must be a whole number from 0 to 18446744073709551615, got 99999999999999999999"),
        ("input_size", "--input-size must be positive, got 0x0"),
        ("tiny_input", "the model cannot run on 8x8 images"),
        ("list_encoding", "is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
        ("csv_class", "1 row(s) have an empty 'class' (line 3); give every image a class"),
        ("mixed_in_batch", "your transform must resize (and crop) every image to one fixed size"),
        ("mixed_across_batches", "your transform must resize (and crop) every image to one fixed size"),
        ("growing_layer", "per image in this batch but {n} before: its output shape changes between batches"),
    ],
)
def test_bad_input_is_one_line(case: str, message: str, small_dir: Path, model_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    custom = f"{model_file}:no_resize"
    argv = {
        "device": _extract(small_dir, out, "--device", "gpu0"),
        "workers": _extract(small_dir, out, "--workers", "-1"),
        "chunk_rows": _extract(small_dir, out, "--chunk-rows", "-3"),
        "seed": _extract(small_dir, out, "--seed", "99999999999999999999"),
        "input_size": ["layers", "alexnet", "--input-size", "0", "0"],
        "tiny_input": ["layers", "alexnet", "--input-size", "8", "8"],
        "mixed_in_batch": _extract(small_dir, out, "--batch-size", "4", model=custom, layer="2"),
        "mixed_across_batches": _extract(small_dir, out, "--batch-size", "1", model=custom, layer="2"),
        "growing_layer": _extract(small_dir, out, "--batch-size", "1", model=f"{model_file}:growing", layer="0"),
    }.get(case)
    if case in ("list_encoding", "csv_class"):
        paths = sorted(p.name for p in small_dir.glob("*.png"))
        if case == "list_encoding":
            (tmp_path / "list.txt").write_bytes(f"{small_dir / paths[0]}\n".encode() + b"caf\xe9.png\n")
            argv = _extract(tmp_path / "list.txt", out)
        else:
            rows = [f"{small_dir / p},{'cat' if k != 1 else ''}" for k, p in enumerate(paths)]
            (tmp_path / "list.csv").write_text("path,class\n" + "\n".join(rows) + "\n")
            argv = _extract(tmp_path / "list.csv", out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("layertap: error: "), err
    assert all(line.startswith("layertap: ") for line in lines), err  # nothing but one-line messages
    if case == "growing_layer":  # its width is the number of forward passes so far
        n = int(lines[-1].split("layer '0' gave ")[1].split()[0]) - 1
        message = message.format(n=n)
    assert message in lines[-1], lines[-1]
    assert not (out / "manifest.json").exists()  # no unfinished run left to block the next command


def test_csv_rows_without_class_are_refused_not_named_none(tmp_path: Path, small_dir: Path) -> None:
    paths = sorted(small_dir.glob("*.png"))
    short = tmp_path / "short.csv"  # the second row has no class cell at all (it used to become "None")
    short.write_text(f"path,class\n{paths[0]},cat\n{paths[1]}\n{paths[2]},dog\n")
    with pytest.raises(lt.LayertapError, match=r"1 row\(s\) have an empty 'class' \(line 3\)"):
        ImageSet.from_path(short)
    ok = tmp_path / "ok.csv"
    ok.write_text(f"\ufeffpath,class\n{paths[0]},cat\n{paths[1]},dog\n")  # a byte-order mark is fine
    s = ImageSet.from_path(ok)
    assert s.classes == ["cat", "dog"] and s.targets == [0, 1] and s.paths == [str(paths[0]), str(paths[1])]


# -- item 11: a FIFO named like an image ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_fifo_named_like_an_image_is_skipped(small_dir: Path, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(small_dir.glob("*.png"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    os.mkfifo(folder / "x.png")
    with caplog.at_level(logging.WARNING, logger="layertap"):
        s = ImageSet.from_path(folder)
    assert [Path(p).name for p in s.paths] == ["im0.png", "im1.png"]
    assert "skipping 1 entries that are not regular files (e.g. x.png)" in caplog.text
    with pytest.raises(OSError, match="not a regular file"):  # named in a list file: a skip record, no hang
        load_rgb(str(folder / "x.png"))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(folder / n) for n in ("im0.png", "x.png", "im1.png")) + "\n")
    module = nn.Sequential(nn.Conv2d(3, 2, 5, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    run = lt.extract(lt.from_module(module, transform=TF, name="t"), lst, ["2"], tmp_path / "r", workers=0)
    assert run.images == ["imgs/im0.png", "imgs/im1.png"]
    assert [(s["path"], s["reason"]) for s in run.skipped] == [
        ("imgs/x.png", "OSError: not a regular file (a FIFO, socket or device)")
    ]


def test_folder_scan_follows_links_in_sorted_order(tmp_path: Path) -> None:
    # two links to one folder: the first in sorted order names its images (as os.walk did); loops end
    (tmp_path / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "x.png")
    os.symlink(tmp_path / "b", tmp_path / "z_link")
    os.symlink(tmp_path / "b", tmp_path / "a_link")
    (tmp_path / "c").mkdir()
    os.symlink(tmp_path / "c", tmp_path / "c" / "loop")
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / "y.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "c" / "broken.png")  # listed: becomes a skip record
    s = ImageSet.from_path(tmp_path)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in s.paths] == ["a_link/x.png", "c/broken.png", "c/y.png"]


# -- item 12 --------------------------------------------------------------------------------------------
def test_images_up_to_twice_the_pixel_limit_decode(tmp_path: Path, monkeypatch) -> None:
    # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; the docstring promises the latter.
    Image.fromarray(photo("coffee", 0, (50, 30))).save(tmp_path / "big.png")  # 1500 px: 1.5x the limit below
    Image.fromarray(photo("coffee", 0, (50, 50))).save(tmp_path / "bomb.png")  # 2500 px: 2.5x
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    got = np.asarray(load_rgb(str(tmp_path / "big.png")))
    with pytest.warns(Image.DecompressionBombWarning):  # PIL only warns at this size
        want = np.asarray(Image.open(tmp_path / "big.png").convert("RGB"))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(str(tmp_path / "bomb.png"))


def test_finished_run_on_read_only_storage_has_nothing_to_do(
    image_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    model = tiny()
    run = lt.extract(model, image_dir, ["2"], tmp_path / "r", workers=0)
    before = run["2"][:]
    real_open = open

    def read_only_open(file, mode="r", *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kw)

    for module in (files, writer):  # every write of the store fails
        monkeypatch.setattr(module, "open", read_only_open, raising=False)
    with caplog.at_level(logging.INFO, logger="layertap"):
        again = lt.extract(model, image_dir, ["2"], tmp_path / "r", workers=0)
    assert "nothing to do" in caplog.text and again.complete
    np.testing.assert_array_equal(again["2"][:], before)
    # a different job into it is still refused, as a write error
    with pytest.raises(lt.LayertapError, match="Read-only file system"):
        lt.extract(model, image_dir, ["0"], tmp_path / "r", workers=0)


def test_ctrl_c_during_interpreter_shutdown_is_quiet(tmp_path: Path) -> None:
    # SIGINT from an atexit handler: what a Ctrl-C while Python joins threads and workers at exit does.
    code = textwrap.dedent(
        """
        import atexit, os, signal, sys, time
        from layertap.cli import main

        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))
        sys.argv = ["layertap", "export", sys.argv[1]]
        sys.exit(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "no-run")], capture_output=True, text=True, timeout=120
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("layertap: error: ") and len(lines) == 2, proc.stderr  # the command's own error
    assert lines[1] == "layertap: interrupted; run the same command again to resume"


def test_merging_shards_of_different_counts_says_so(image_dir: Path, tmp_path: Path) -> None:
    model = tiny()
    for part in ("0/2", "1/3"):
        lt.extract(model, image_dir, ["2"], tmp_path / "o", workers=0, batch_size=2, shard=part, merge=False)
    with pytest.raises(lt.LayertapError) as err:
        lt_store.merge_shards(tmp_path / "o")
    msg = str(err.value)
    assert "(2 shards expected; missing: 1; shards of different counts were mixed)" in msg, msg
    assert "shards of 2 shards" not in msg
