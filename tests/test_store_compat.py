"""The store across versions and at its edges: runs written before chunk checksums still open,
verify, resume, repair and export; re-running a finished run reads no chunk (verify reads them and
records what it finds for the re-run to repair); the last commit never writes a stale cursor.

The runs in tests/data/old_runs were written by layertap as of commit 5c07f40 (see make_old_runs.py there).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import layertap as lt
from layertap.store import chunks, verify
from layertap.store import writer as storage

OLD = Path(__file__).parent / "data" / "old_runs"
EXAMPLES = Path(__file__).parents[1] / "examples" / "images" / "textures"
# what made the old runs (the same job for the new code: it must find them, not redo them)
KW = {"dtype": "float16", "chunk_rows": 2, "batch_size": 2, "workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def imgs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    for name in ("grass", "gravel", "brick"):
        shutil.copy(EXAMPLES / f"{name}.jpg", root)
    return root


@pytest.fixture(scope="module")
def model() -> lt.LoadedModel:
    return lt.load_model("resnet18", "random", seed=0)


def _extract(model: lt.LoadedModel, imgs: Path, out: Path) -> lt.Run:
    return lt.extract(model, imgs, ["avgpool"], out, **KW)


def _old_runs(tmp_path: Path, imgs: Path) -> Path:
    """A copy of the old runs, their image fingerprint moved to where the images are now."""
    dst = tmp_path / "old"
    shutil.copytree(OLD, dst)
    for name in ("complete", "unfinished"):
        m = json.loads((dst / name / "manifest.json").read_text())
        m["spec"]["images"] = lt.ImageSet.from_path(imgs).fingerprint()
        (dst / name / "manifest.json").write_text(json.dumps(m))
    return dst


def _hooked_avgpool(model: lt.LoadedModel, imgs: Path) -> np.ndarray:
    """The avgpool output by a plain forward with a hook (independent of the store)."""
    got: list[torch.Tensor] = []
    handle = model.module.avgpool.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    try:
        x = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in sorted(imgs.iterdir())])
        with torch.no_grad():
            model.module.eval()(x)
    finally:
        handle.remove()
    return got[0].numpy()


def test_runs_written_before_checksums_open_verify_resume_and_export(
    model: lt.LoadedModel, imgs: Path, tmp_path: Path
) -> None:
    old = _old_runs(tmp_path, imgs)

    # An all-zero chunk was never written as a file then (zarr's default): not damage.
    zero = lt.open_run(old / "zero")
    assert np.array_equal(zero["zero"][:], np.zeros((4, 3), np.float32))
    assert np.array_equal(zero["ones"][:], np.ones((4, 3), np.float32))
    assert lt.verify_run(old / "zero").ok

    done = lt.open_run(old / "complete")
    ref = done["avgpool"][:]
    np.testing.assert_allclose(ref, _hooked_avgpool(model, imgs), rtol=2e-3, atol=2e-3)
    assert lt.verify_run(old / "complete").ok
    chunk = old / "complete" / "arrays" / "avgpool" / "c" / "1" / "0" / "0" / "0"
    before = chunk.stat().st_mtime_ns
    again = _extract(model, imgs, old / "complete")  # the same job: nothing to do
    assert again.manifest == done.manifest and chunk.stat().st_mtime_ns == before
    files = lt.export(done, "npy", tmp_path / "exp")
    assert np.array_equal(np.load(next(f for f in files if f.suffix == ".npy")), ref)

    # Unfinished (cursor at 2 of 3 images, no image list in its manifest yet): verify, then resume.
    result = lt.verify_run(old / "unfinished")
    assert result.ok and "unfinished, 2 rows" in result.summary
    resumed = _extract(model, imgs, old / "unfinished")
    assert resumed["avgpool"].raw(slice(None)).tobytes() == done["avgpool"].raw(slice(None)).tobytes()
    assert lt.verify_run(old / "unfinished").ok


def test_finished_run_rerun_reads_no_chunk_and_verify_finds_what_it_repairs(
    model: lt.LoadedModel, imgs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    run = _extract(model, imgs, out)
    good = run["avgpool"].raw(slice(None)).tobytes()

    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("a finished run's chunks were read")

    with monkeypatch.context() as m:  # 'nothing to do' checks presence and size only
        for name in ("__getitem__", "raw", "iter_chunks"):
            m.setattr(lt.LayerArray, name, no_read)
        for module in (storage, verify):  # where chunks are checksummed: writing and verifying
            m.setattr(module, "chunk_crc", no_read)
        _extract(model, imgs, out)

    chunk = next((out / "arrays" / "avgpool").glob("c.1.*"))  # same size, one byte changed
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = lt.verify_run(out)
    assert result.damage == {"avgpool": {1: "checksum mismatch"}} and result.rows_lost == [2]
    assert (out / storage.DAMAGED).is_file()
    with pytest.raises(lt.LayertapError, match="chunk 1 \\(checksum mismatch\\).*rows 2 are lost"):
        lt.open_run(out)  # verify's finding holds for every later open, until repaired

    repaired = _extract(model, imgs, out)  # the same command recomputes chunk 1
    assert repaired["avgpool"].raw(slice(None)).tobytes() == good
    assert not (out / storage.DAMAGED).exists() and lt.verify_run(out).ok


def test_last_commit_waits_for_the_chunk_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows are images 0, 10-16 (1-9 skipped), chunks of 4, one add() of 8 rows: both chunks go to the
    # writer thread, the second is held there until the main thread waits for it.
    gate = threading.Event()
    real_write, real_wait = storage.RunWriter._write_chunk, storage.RunWriter._wait

    def write_chunk(self: storage.RunWriter, buffers: dict, r0: int, n: int) -> None:
        if r0 == 4:
            gate.wait(10)
        real_write(self, buffers, r0, n)

    def wait(self: storage.RunWriter, keep: int = 0) -> None:
        if keep == 0:
            gate.set()
        real_wait(self, keep)

    monkeypatch.setattr(storage.RunWriter, "_write_chunk", write_chunk)
    monkeypatch.setattr(storage.RunWriter, "_wait", wait)
    with storage.RunWriter(tmp_path / "run", {"n_images": 17}) as w:
        w.begin({"layertap": "run"})
        w.create_layers({"a": {"shape": [2]}}, 17, "float32", 4)
        for i in range(1, 10):
            w.skip(i, "undecodable")
        images = [0, *range(10, 17)]
        w.add({"a": np.arange(16, dtype=np.float32).reshape(8, 2)}, images)
        w.finish(17)
        # What a kill before complete() leaves: the cursor must say 8 rows reach image 17, not an
        # older position (resuming from 13 would append images 13-16 a second time).
        cursor = json.loads((tmp_path / "run" / storage.PROGRESS).read_text())
        assert (cursor["rows"], cursor["next_image"]) == (8, 17)
        assert sorted(i for i, _ in cursor["skipped"]) == list(range(1, 10))


def test_checksum_line_torn_by_a_kill_does_not_hide_the_next(tmp_path: Path) -> None:
    out = tmp_path / "run"
    block = np.arange(8, dtype=np.float32).reshape(4, 2)
    with storage.RunWriter(out, {"n_images": 8}) as w:
        w.begin({"layertap": "run"})
        w.create_layers({"a": {"shape": [2]}}, 8, "float32", 4)
        w.add({"a": block}, [0, 1, 2, 3])
        w._wait()
        with open(out / storage.CHECKSUMS, "a") as f:  # what a kill in the middle of an append leaves
            f.write("a\t1\t4\t12")
        w.add({"a": block + 8}, [4, 5, 6, 7])
        w.finish(8)
    sums = chunks.read_checksums(out)
    assert sums[("a", 1)] == (4, chunks.chunk_crc(block + 8))
    assert sums[("a", 0)] == (4, chunks.chunk_crc(block))


def test_set_valued_option_gives_one_identity(tmp_path: Path) -> None:
    factory = tmp_path / "factory.py"
    factory.write_text(
        "from torch import nn\n"
        "from torchvision import transforms as T\n\n\n"
        "def factory(tags=()):\n"
        "    return nn.Sequential(nn.Conv2d(3, 2, 3)), T.Compose([T.Resize((8, 8)), T.ToTensor()])\n"
    )
    a, b = {1, 9}, {9, 1}  # equal sets whose iteration order differs (9 collides with 1)
    assert a == b and repr(a) != repr(b)
    prov = [lt.load_model(f"{factory}:factory", "pretrained", tags=t).provenance for t in (a, b)]
    assert prov[0]["options"] == prov[1]["options"] == {"tags": [1, 9]}


# -- the typed manifest: schema version, one reader, one writer ----------------------------------------
def test_manifest_carries_schema_version_and_round_trips(model: lt.LoadedModel, imgs: Path, tmp_path: Path) -> None:
    from layertap.store.manifest import SCHEMA_VERSION, Manifest, read_manifest

    run = _extract(model, imgs, tmp_path / "run")
    on_disk = json.loads((run.path / "manifest.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION == 1
    m = read_manifest(run.path)
    assert isinstance(run.manifest, Manifest) and m == run.manifest
    assert m.to_dict() == on_disk and json.loads(m.to_json()) == on_disk  # nothing lost or added
    assert Manifest.from_dict(on_disk).to_dict() == on_disk
    # typed access and the JSON-style access users and tests have agree
    assert m.layers["avgpool"]["shape"] == on_disk["layers"]["avgpool"]["shape"] == [512, 1, 1]
    assert m.images is not None and m.images["rows"] == run.manifest["images"]["rows"]
    assert m.complete and m.spec == on_disk["spec"] and m.model == on_disk["model"]
    assert m.storage == {"format": "zarr", "chunk_rows": 2, "compression": None}
    assert dict(m) == on_disk and set(m) == set(on_disk) and m.get("no such key", 7) == 7
    # a key this schema does not name survives a read and a write (a newer minor tool's note, a user's own)
    on_disk["notes"] = {"by": "hand"}
    (run.path / "manifest.json").write_text(json.dumps(on_disk))
    assert lt.open_run(run.path).manifest.extra == {"notes": {"by": "hand"}}
    assert lt.open_run(run.path).manifest.to_dict() == on_disk


def test_old_manifest_without_schema_version_reads_as_schema_0(imgs: Path, tmp_path: Path) -> None:
    from layertap.store.manifest import SCHEMA_VERSION, read_manifest

    old = _old_runs(tmp_path, imgs)
    raw = json.loads((old / "complete" / "manifest.json").read_text())
    assert "schema_version" not in raw  # written before the field existed
    m = read_manifest(old / "complete")
    assert m.schema_version == SCHEMA_VERSION and m.to_dict() == {"schema_version": SCHEMA_VERSION, **raw}


def test_newer_schema_version_is_one_line_upgrade_error(imgs: Path, tmp_path: Path, capsys) -> None:
    from layertap.cli import main

    old = _old_runs(tmp_path, imgs)
    path = old / "complete" / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(lt.LayertapError) as err:
        lt.open_run(old / "complete")
    msg = str(err.value)
    assert "\n" not in msg and "manifest schema 99" in msg and "upgrade layertap" in msg, msg
    assert main(["verify", str(old / "complete")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "upgrade layertap" in lines[0], lines
