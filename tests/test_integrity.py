"""Never silently wrong data: job identity, chunk integrity (verify, repair, fsync order), runs read
while written, failed background writes, resumes mid-batch, empty shards, disk use, damaged metadata.

A tiny custom conv net (``tiny.py:factory``) on 32x32 images keeps every extraction well under a second.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import layertap as lt
from layertap.cli.app import main
from layertap.shards.merge import shard_runs
from layertap.store import blocks
from layertap.store import writer as storage

FACTORY = """
import torch
from torch import nn
from torchvision import transforms as T


def factory(scale=1.0):
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 6)
    )
    with torch.no_grad():
        net[0].weight.mul_(float(scale))
    return net, T.Compose([T.Resize((32, 32)), T.ToTensor()])
"""
LAYERS = ["0", "4"]
N_IMAGES = 14
CORRUPT = (5, 9)  # inside batches 4..7 and 8..11 (batch size 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        p = root / f"im{i:02d}.png"
        if i in CORRUPT:
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (28, 24, 3), dtype=np.uint8)).save(p)
    return root


def cli_main(argv: list[str]) -> int:
    """``layertap ARGV`` in this process (its log handler restored afterwards: capsys closes the stream)."""
    import logging

    logger = logging.getLogger("layertap")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    try:
        return main(argv)
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


def _model(tiny: Path, scale: float = 1.0) -> lt.LoadedModel:
    return lt.load_model(f"{tiny}:factory", "pretrained", scale=scale)


def _extract(tiny: Path, images: Path, out: Path, scale: float = 1.0, **kw) -> lt.Run:
    opts = {"batch_size": 4, "chunk_rows": 3, "workers": 0, "progress": False, **kw}
    return lt.extract(_model(tiny, scale), images, LAYERS, out, **opts)


def _content(run_dir: Path) -> tuple[dict[str, bytes], list, list]:
    run = lt.open_run(run_dir)
    arrays = {k: run[k].raw(slice(None)).tobytes() for k in run.layers}
    return arrays, run.manifest["images"]["rows"], run.manifest["images"]["skipped"]


@pytest.fixture(scope="module")
def reference(tiny: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    _extract(tiny, images, out)
    return out


def _reference_rows(tiny: Path, images: Path) -> dict[str, np.ndarray]:
    """Independent of the store: the model's layer outputs by forward hooks, one batch at a time."""
    model = _model(tiny)
    paths = sorted(images.iterdir())
    outs: dict[str, list[np.ndarray]] = {k: [] for k in LAYERS}
    mods = dict(model.module.named_modules())
    for b in range(0, len(paths), 4):
        good = [p for i, p in enumerate(paths[b : b + 4], b) if i not in CORRUPT]
        x = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in good])
        got: dict[str, torch.Tensor] = {}
        hooks = [
            mods[k].register_forward_hook(lambda m, i, o, k=k, got=got: got.__setitem__(k, o.detach())) for k in LAYERS
        ]
        with torch.no_grad():
            model.module(x)
        for h in hooks:
            h.remove()
        for k in LAYERS:
            outs[k].append(got[k].numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


class _Crash(Exception):
    """A simulated kill of the writing process."""


def _crash_after_commits(monkeypatch: pytest.MonkeyPatch, commits: int) -> None:
    """Make the run stop (like a kill) just before the cursor would pass ``commits`` chunks."""
    real = storage.write_json_atomic
    seen = []

    def cursor_then_crash(path: Path, obj: object) -> None:
        if path.name == storage.PROGRESS:
            seen.append(obj)
            if len(seen) > commits:
                raise _Crash
        real(path, obj)

    monkeypatch.setattr(storage, "write_json_atomic", cursor_then_crash)


# -- 1. job identity -------------------------------------------------------------------------------


def test_model_option_change_refused_half_finished_and_finished(
    tiny: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_commits(m, 2)
        with pytest.raises(_Crash):
            _extract(tiny, images, out, scale=1)
    assert json.loads((out / "progress.json").read_text())["rows"] == 6
    with pytest.raises(lt.LayertapError, match=r"differs in: model\.options\.scale"):
        _extract(tiny, images, out, scale=2)  # would mix rows of two models
    _extract(tiny, images, out, scale=1)  # the same options resume
    with pytest.raises(lt.LayertapError, match=r"model\.options\.scale"):
        _extract(tiny, images, out, scale=2)  # a finished run of other options is not "nothing to do"


def test_other_in_memory_weights_refused(images: Path, tmp_path: Path) -> None:
    from torchvision import transforms as T

    def net(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    tf = T.Compose([T.Resize((32, 32)), T.ToTensor()])
    a, b = lt.from_module(net(0), tf, input_size=(3, 32, 32)), lt.from_module(net(1), tf, input_size=(3, 32, 32))
    kw = {"workers": 0, "progress": False, "batch_size": 4}
    run_a = lt.extract(a, images, ["2"], tmp_path / "r", **kw)
    again = lt.extract(a, images, ["2"], tmp_path / "r", **kw)  # same weights: found complete, no error
    assert np.array_equal(again["2"][:], run_a["2"][:])
    with pytest.raises(lt.LayertapError, match=r"differs in: model\.weights\.sha256"):
        lt.extract(b, images, ["2"], tmp_path / "r", **kw)  # not model a's activations returned as b's


# -- 2. chunk integrity: detect, verify, repair, fsync order -----------------------------------------


def test_missing_short_or_corrupt_chunks_detected_and_repaired(
    tiny: Path, images: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ref = _content(reference)
    truth = _reference_rows(tiny, images)
    run = lt.open_run(out)
    for k in LAYERS:  # the store holds the model's numbers (independent forward pass)
        np.testing.assert_allclose(run[k][:], truth[k], rtol=1e-5, atol=1e-6)
    assert cli_main(["verify", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out

    z0 = out / "arrays" / "0"
    (z0 / "c.1.0.0.0").unlink()  # rows 3-5 of layer 0
    with open(z0 / "c.3.0.0.0", "r+b") as f:  # rows 9-11: short
        f.truncate(100)
    keep = out / "arrays" / "4" / "c.0.0"
    before = keep.stat().st_mtime_ns
    with pytest.raises(lt.LayertapError, match=r"chunks 1 \(missing\), 3 \(100 bytes.*rows 3-5, 9-11 are lost"):
        lt.open_run(out)
    assert cli_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rows 3-5, 9-11" in err and "im03.png" in err

    _extract(tiny, images, out)  # the same command repairs the two chunks
    assert _content(out) == ref
    assert keep.stat().st_mtime_ns == before  # an intact chunk was not rewritten
    assert lt.verify_run(out).ok

    # same size, other bytes: only the checksum recorded at commit can tell
    chunk = out / "arrays" / "4" / "c.2.0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = lt.verify_run(out)
    assert not result.ok and result.damage == {"4": {2: "checksum mismatch"}} and result.rows_lost == [6, 7, 8]
    _extract(tiny, images, out)
    assert _content(out) == ref and lt.verify_run(out).ok


def test_chunks_and_checksums_fsynced_before_the_cursor(
    tiny: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_json = storage.fsync_file, storage.write_json_atomic
    real_os_fsync = os.fsync

    def fsync_file(path: Path) -> None:
        events.append(("fsync", f"{path.parent.name}/{path.name}"))
        real_fsync(path)

    def os_fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if name.endswith(storage.CHECKSUMS):
            events.append(("fsync", storage.CHECKSUMS))
        real_os_fsync(fd)

    def write_json(path: Path, obj: object) -> None:
        if path.name == storage.PROGRESS:
            events.append(("cursor", str(obj["rows"])))  # type: ignore[index]
        real_json(path, obj)

    monkeypatch.setattr(storage, "fsync_file", fsync_file)
    monkeypatch.setattr(storage.os, "fsync", os_fsync)
    monkeypatch.setattr(storage, "write_json_atomic", write_json)
    _extract(tiny, images, tmp_path / "run")
    cursors, rows = [], "0"
    for i, e in enumerate(events):
        if e[0] == "cursor" and e[1] != rows:  # a cursor that moves (the last flush rewrites it unmoved)
            cursors.append(i)
            rows = e[1]
    assert len(cursors) == 4  # 12 rows in chunks of 3
    last = 0
    for c, i in enumerate(cursors):
        synced = {e[1] for e in events[last:i] if e[0] == "fsync"}
        assert {f"0/c.{c}.0.0.0", f"4/c.{c}.0", storage.CHECKSUMS} <= synced
        last = i


# -- 3. reading a run while it is written ------------------------------------------------------------


def test_open_run_while_written_serves_committed_rows(
    tiny: Path, images: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_commits(m, 2)
        with pytest.raises(_Crash):
            _extract(tiny, images, out)
    run, ref = lt.open_run(out), lt.open_run(reference)
    assert not run.complete
    assert run.images == ref.images[:6]  # im00-im04, im06 (im05 skipped)
    for k in LAYERS:
        assert run[k].shape == (6, *ref[k].shape[1:])
        assert np.array_equal(run[k][:], ref[k][:6])
        assert np.array_equal(run[k][-1], ref[k][5]) and np.array_equal(run[k][..., 0], ref[k][:6, ..., 0])
        with pytest.raises(IndexError):
            run[k][6]
    assert [s["index"] for s in run.skipped] == [5]


# -- 13. a failed background write ----------------------------------------------------------------------


def test_failed_background_write_commits_nothing_behind_it(
    tiny: Path, images: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    real = zarr.Array.__setitem__
    calls = []

    def flaky(self: zarr.Array, key: object, value: object) -> None:
        calls.append(key)
        if len(calls) == 3:  # chunk 1, layer 0: chunks 2 and 3 of the same batch are queued behind it
            raise OSError(errno.EIO, "Input/output error")
        real(self, key, value)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(zarr.Array, "__setitem__", flaky)
        with pytest.raises(lt.LayertapError, match="Input/output error"):
            _extract(tiny, images, out, batch_size=8, chunk_rows=2)
    cursor = json.loads((out / "progress.json").read_text())
    assert cursor["rows"] == 2 and cursor["next_image"] == 2  # nothing after the failed chunk committed
    ref = _extract(tiny, images, tmp_path / "ref8", batch_size=8, chunk_rows=2)
    _extract(tiny, images, out, batch_size=8, chunk_rows=2)
    assert _content(out) == _content(ref.path)
    assert len(lt.open_run(out).images) == N_IMAGES - len(CORRUPT)


# -- 14. killed mid-write, chunks not dividing the batch, skips inside batches ---------------------------

KILL = """
import os, sys
import layertap.store.writer as st
import zarr
mode, at = sys.argv[1], int(sys.argv[2])
if mode == "cursor":  # killed after a chunk's data, before its cursor
    real = st.write_json_atomic
    def hook(path, obj):
        if path.name == st.PROGRESS and obj["rows"] >= at:
            os._exit(9)
        real(path, obj)
    st.write_json_atomic = hook
else:  # killed between the layers of one chunk
    real_set, n = zarr.Array.__setitem__, [0]
    def hook(self, key, value):
        n[0] += 1
        if n[0] == at:
            os._exit(9)
        real_set(self, key, value)
    zarr.Array.__setitem__ = hook
from layertap.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_resume_after_kill_mid_batch_with_skips_is_byte_identical(
    tiny: Path, images: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["extract", "--model", f"{tiny}:factory", "--layers", *LAYERS, "--images", str(images)]
    args += ["--out", str(out), "--batch-size", "4", "--chunk-rows", "3", "--workers", "0", "-q"]
    # killed before the cursor reaches 6 rows (it stays at 3 rows = image 3, inside batch 0-3), then before
    # 9 rows (it stays at image 7, inside batch 4-7, past the skipped im05), then between the two layers of
    # chunk 2 (images 7, 8, 10: the skipped im09 inside)
    for mode, at in (("cursor", 6), ("cursor", 9), ("layers", 2)):
        done = subprocess.run([sys.executable, "-c", KILL, mode, str(at), *args], capture_output=True, text=True)
        assert done.returncode == 9, done.stderr
        assert not lt.open_run(out).complete
    assert json.loads((out / "progress.json").read_text())["next_image"] == 7
    assert cli_main(args) == 0
    assert _content(out) == _content(reference)
    assert lt.verify_run(out).ok


# -- 5. shards that always finish ---------------------------------------------------------------------


def test_empty_and_all_skipped_shards_complete_and_merge(
    tiny: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 images in batches of 2; images 2 and 3 (all of batch 1) undecodable
    root = tmp_path / "imgs"
    root.mkdir()
    for p in sorted(images.iterdir())[:8]:
        shutil.copy(p, root / p.name)
    for i in (2, 3):
        (root / f"im{i:02d}.png").write_bytes(b"broken")
    kw = {"batch_size": 2, "chunk_rows": 3}
    ref = _extract(tiny, root, tmp_path / "ref", shard=None, **kw)
    out = tmp_path / "sharded"
    # a Slurm array of 6 tasks on 4 batches: shards 0 and 3 are empty, shard 2 holds only batch 1
    for task in range(6):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "6")
        run = _extract(tiny, root, out, shard="auto", **kw)
    shards = {r.manifest["shard"]["index"]: r for r in shard_runs(out)}
    assert all(r.complete for r in shards.values())
    assert shards[0].layers == [] and shards[3].layers == [] and shards[2].layers == []
    assert [s["path"] for s in shards[2].skipped] == ["im02.png", "im03.png"]
    assert run.path == out and _content(out) == _content(ref.path)


# -- 6. disk use ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 9])
def test_disk_bytes_close_to_activation_bytes(
    tiny: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    good = [p for i, p in enumerate(sorted(images.iterdir())) if i not in CORRUPT]
    for p in good[:n]:
        shutil.copy(p, root / p.name)
    widest = 8 * 32 * 32 * 4
    monkeypatch.setattr(blocks, "CHUNK_BYTES", 8 * widest)  # default chunks of 8 rows: 9 = chunk + 1
    run = lt.extract(_model(tiny), root, LAYERS, tmp_path / "run", batch_size=4, workers=0, progress=False)
    act = sum(run[k].raw(slice(None)).nbytes for k in run.layers)
    files = [p for p in (run.path / "arrays").rglob("*") if p.is_file()]
    stored = sum(p.stat().st_size for p in files if p.name != "zarr.json")
    meta = sum(p.stat().st_size for p in files if p.name == "zarr.json")
    assert act <= stored <= 1.03 * act
    assert meta < 4096 * len(run.layers)


# -- 7. damaged metadata: one line, never a traceback --------------------------------------------------


def _damage(run_dir: Path, kind: str) -> None:
    m = run_dir / "manifest.json"
    if kind == "manifest-garbled":
        m.write_text('{"status": "compl')
    elif kind == "manifest-empty":
        m.write_text("")
    elif kind == "manifest-list":
        m.write_text("[1, 2]")
    elif kind == "zarr-json-deleted":
        (run_dir / "arrays" / "4" / "zarr.json").unlink()
    elif kind == "layer-dir-deleted":
        shutil.rmtree(run_dir / "arrays" / "0")


MANIFEST_KINDS = ["manifest-garbled", "manifest-empty", "manifest-list"]
ARRAY_KINDS = ["zarr-json-deleted", "layer-dir-deleted"]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = cli_main(argv)  # anything but a LayertapError would propagate here as a traceback
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("layertap: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("kind", MANIFEST_KINDS + ARRAY_KINDS)
def test_damaged_complete_run(
    kind: str, tiny: Path, images: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _damage(out, kind)
    with pytest.raises(lt.LayertapError, match="damaged"):
        lt.open_run(out)
    _one_line_error(capsys, ["export", str(out), "--format", "npy", "--out", str(tmp_path / "exp")])
    _one_line_error(capsys, ["rdm", str(out), "--layer", "4", "--out", str(tmp_path / "rdm.npy")])
    assert not (tmp_path / "exp").exists() and not (tmp_path / "rdm.npy").exists()
    assert cli_main(["verify", str(out)]) == 1
    capsys.readouterr()
    if kind in MANIFEST_KINDS:
        with pytest.raises(lt.LayertapError, match="manifest.json is damaged.*--overwrite"):
            _extract(tiny, images, out)
        _extract(tiny, images, out, overwrite=True)
    else:
        _extract(tiny, images, out)  # the same command recomputes the lost array
    assert _content(out) == _content(reference)


@pytest.mark.parametrize("kind", ["garbled", "negative", "beyond"])
def test_damaged_cursor(
    kind: str, tiny: Path, images: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_commits(m, 2)
        with pytest.raises(_Crash):
            _extract(tiny, images, out)
    p = out / "progress.json"
    cursor = json.loads(p.read_text())
    if kind == "garbled":
        p.write_text("{\x00")
    else:
        cursor["rows"] = -3 if kind == "negative" else 999
        p.write_text(json.dumps(cursor))
    with pytest.raises(lt.LayertapError, match="progress.json is damaged"):
        lt.open_run(out)
    _extract(tiny, images, out)  # starts over (with a warning) rather than trust the cursor
    assert _content(out) == _content(reference)


@pytest.mark.parametrize("kind", ["manifest-garbled", "manifest-list", "layer-dir-deleted"])
def test_damaged_shard_refuses_merge(
    kind: str, tiny: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sharded"
    for i in range(2):
        _extract(tiny, images, out, shard=(i, 2), merge=False)
    _damage(shard_runs(out)[1].path, kind)
    err = _one_line_error(capsys, ["merge", str(out)])
    assert "00001-of-00002" in err and "damaged" in err
    assert not (out / "manifest.json").exists()
