"""Movies and stimulus arrays as stimuli: frame selection and timestamps, activations against a
reference (frames decoded here with PyAV + the plain model + a hand hook), video models on clips,
resume, shards + merge, stimulus arrays (.npy / .h5), bad input."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import layertap as lt
from layertap.errors import LayertapError

av = pytest.importorskip("av")  # the 'video' extra; CI installs it through 'test' -> 'all'


def frame_image(k: int, w: int = 64, h: int = 48) -> np.ndarray:
    """Frame k: its index in the red channel, 7k in green, a block that moves with k."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = k % 256
    img[..., 1] = (7 * k) % 256
    img[..., 2] = 255 - k % 256
    x = (4 * k) % (w - 8)
    img[8:24, x : x + 8] = 255
    return img


def write_video(
    path: Path, n: int, fps: int = 10, size: tuple[int, int] = (64, 48), codec: str = "ffv1", pts_ms=None, gop=8
) -> Path:
    """Encode n frames with PyAV: ffv1 + bgr0 is lossless RGB; ``pts_ms`` gives a variable frame rate."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = w, h
        s.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        s.codec_context.gop_size = gop
        if pts_ms is not None:
            s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        for k in range(n):
            f = av.VideoFrame.from_ndarray(frame_image(k, w, h), format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[k], Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    mixed = root / "mixed"
    mixed.mkdir()
    return {
        "lossless": write_video(root / "lossless.mkv", 30),  # 10 fps, 3 s, keyframe every 8 frames
        "vfr": write_video(root / "vfr.mkv", 10, pts_ms=[0, 100, 150, 400, 410, 700, 1000, 1010, 1500, 2000], gop=4),
        "a": write_video(mixed / "a.mp4", 14, codec="libx264", gop=5),  # lossy h264, 64x48
        "b": write_video(mixed / "b.mp4", 9, fps=8, size=(80, 60), codec="libx264", gop=6),  # another size and rate
        "mixed": mixed,
    }


def decode_all(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame (RGB) and its time in seconds from the first, decoded start to end without seeking."""
    with av.open(str(path)) as c:
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
        tb = c.streams.video[0].time_base
    frames.sort(key=lambda x: x[0])
    return [f for _, f in frames], [float((p - frames[0][0]) * tb) for p, _ in frames]


def hooked(module: torch.nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """The plain model with a forward hook written here."""
    out: dict[str, torch.Tensor] = {}
    mods = dict(module.named_modules())
    handles = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach().clone())) for n in layers
    ]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return out


def frame_values(batch_images: torch.Tensor) -> list[int]:
    return [int(round(float(v) * 255)) for v in batch_images[:, 0, 0, 0]]


# -- frame selection and timestamps ------------------------------------------------------------


def test_frame_selection_every_fps_times_exact(videos: dict[str, Path], tmp_path: Path) -> None:
    from torchvision.transforms import ToTensor

    from layertap.data.video import VideoSet, probe

    info = probe(videos["lossless"])
    assert info.n_frames == 30 and info.end == 3 and info.times[:3] == [0, Fraction(1, 10), Fraction(1, 5)]

    every = VideoSet.from_path(videos["lossless"], every=4)
    assert [f[0] for f in every.frames] == list(range(0, 30, 4))
    fps = VideoSet.from_path(videos["lossless"], fps=3)  # t = k/3: frame shown = floor(10 k / 3)
    assert [f[0] for f in fps.frames] == [int(10 * k / 3 + 1e-9) for k in range(9)]
    assert [fps.row_fields(i)["time"] for i in range(3)] == [0.0, 0.3, 0.6]
    assert fps.row_fields(1)["sample_time"] == pytest.approx(1 / 3)

    times = tmp_path / "times.tsv"
    times.write_text("time\tid\n2.95\tlast\n0.05\tfirst\n1.0\tone\n3.0\tpast\n")
    at = VideoSet.from_path(videos["lossless"], times=times)
    assert at.frames == [(29,), (0,), (10,), None] and at.ids == ["last", "first", "one", "past"]
    assert "past the end" in at.reasons[3]
    several = tmp_path / "several.csv"
    several.write_text("video,time\nb.mp4,0.5\na.mp4,0.5\nc.mp4,0\n")
    with pytest.raises(LayertapError, match="'c.mp4' is not among the videos"):
        VideoSet.from_path(videos["mixed"], times=several)
    several.write_text("video,time\nb.mp4,0.5\na.mp4,0.5\n")
    both = VideoSet.from_path(videos["mixed"], times=several)  # b at 8 fps, a at 10 fps
    assert [Path(p).name for p in both.paths] == ["b.mp4", "a.mp4"] and both.frames == [(4,), (5,)]
    clips = VideoSet.from_path(videos["lossless"], times=times, every=2, clip_len=3, clip_mode=True)
    assert clips.frames == [None, (0, 2, 4), (10, 12, 14), None]  # a clip from 2.95 s runs past the end
    assert clips.row_fields(2) == {"id": "one", "sample_time": 1.0, "frame": 10, "time": 1.0,
                                   "frames": [10, 14], "start": 1.0, "end": 1.5}  # fmt: skip
    clips = VideoSet.from_path(videos["lossless"], fps=5, clip_len=4, clip_stride=2, clip_mode=True)
    assert clips.frames == [tuple(range(2 * s, 2 * s + 8, 2)) for s in range(0, 12, 2)]  # grid 0, 2, ... 28

    # Decoding: the pixels are the frame index (lossless codec), whatever the batch and seek pattern.
    for vs in (every, fps, at):
        got = {}
        for batch in vs.iter_batches(ToTensor(), 3, workers=1):
            if batch.indices:
                got.update(zip(batch.indices, frame_values(batch.images), strict=True))
            assert not batch.failed or (vs is at and [i for i, _ in batch.failed] == [3])
        assert got == {i: fr[0] for i, fr in enumerate(vs.frames) if fr is not None}


def test_variable_frame_rate_uses_presentation_timestamps(videos: dict[str, Path]) -> None:
    from torchvision.transforms import ToTensor

    from layertap.data.video import VideoSet, probe

    info = probe(videos["vfr"])
    assert [float(t) for t in info.times] == [0, 0.1, 0.15, 0.4, 0.41, 0.7, 1.0, 1.01, 1.5, 2.0]
    vs = VideoSet.from_path(videos["vfr"], fps=4)  # the frame on screen at 0, .25, .5, ... 2.0
    assert [f[0] for f in vs.frames] == [0, 2, 4, 5, 6, 7, 8, 8, 9]
    got = [v for b in vs.iter_batches(ToTensor(), 4, workers=0) for v in frame_values(b.images)]
    assert got == [0, 2, 4, 5, 6, 7, 8, 8, 9]


# -- activations against a reference -----------------------------------------------------------


def test_video_frames_match_plain_model(videos: dict[str, Path], tmp_path: Path) -> None:
    """A folder of two lossy videos of different sizes and rates, every 3rd frame: each row is the
    plain model on the frame decoded here (no seeking), transformed by the model's own transform."""
    model = lt.load_model("resnet18", "random")
    run = lt.extract(
        model, videos["mixed"], ["layer3", "avgpool"], tmp_path / "run", batch_size=4, workers=1, progress=False
    )
    from layertap.data.stimuli import open_stimuli

    vs = open_stimuli(videos["mixed"], model=model, every=3)
    assert [f[0] for f in vs.frames] == [0, 3, 6, 9, 12, 0, 3, 6]
    rows = run.manifest["images"]["rows"]
    assert len(rows) == 14 + 9  # default: every frame
    assert [(r["path"], r["frame"]) for r in rows[12:16]] == [("a.mp4", 12), ("a.mp4", 13), ("b.mp4", 0), ("b.mp4", 1)]
    assert rows[15]["time"] == 0.125 and rows[3]["time"] == 0.3
    frames = {v: decode_all(videos[v])[0] for v in ("a", "b")}
    x = torch.stack([model.transform(Image.fromarray(frames[r["path"][0]][r["frame"]])) for r in rows])
    ref = hooked(model.module, x, ["layer3", "avgpool"])
    for layer in ("layer3", "avgpool"):
        np.testing.assert_allclose(run[layer][:], ref[layer].numpy(), rtol=1e-4, atol=1e-4)
    assert run.manifest["images"]["selection"]["video"]["videos"]["b.mp4"]["width"] == 80


def test_video_model_clips_match_plain_model(videos: dict[str, Path], tmp_path: Path) -> None:
    """r3d_18 (random weights) on clips of 4 frames every 3 frames, with its own video transform;
    5-D outputs pooled over time or over (T, H, W) on the device."""
    assert "torchvision:r3d_18" in lt.list_models("torchvision")
    model = lt.load_model("r3d_18", "random")
    assert model.input_size == (3, 16, 112, 112)
    shapes = {i.name: i.shape for i in lt.list_layers(model, (3, 4, 112, 112))}  # clips in, not images
    assert shapes["layer4"] == (512, 1, 7, 7) and shapes["avgpool"] == (512, 1, 1, 1)
    from layertap.data.stimuli import open_stimuli

    clips = open_stimuli(videos["lossless"], model=model, clip_len=4, clip_stride=9)
    run = lt.extract(
        model,
        clips,
        ["layer2", "layer4", "avgpool"],
        tmp_path / "run",
        reduce={"layer2": "time", "layer4": "avg"},
        batch_size=2,
        workers=1,
        progress=False,
    )
    rows = run.manifest["images"]["rows"]
    assert [r["frames"] for r in rows] == [[0, 3], [9, 12], [18, 21]]  # the clip at 27 would be incomplete
    assert [(r["start"], r["end"]) for r in rows] == [(0.0, 0.4), (0.9, 1.3), (1.8, 2.2)]
    frames, _ = decode_all(videos["lossless"])
    x = torch.stack(
        [
            model.transform(torch.from_numpy(np.stack(frames[a : b + 1])).permute(0, 3, 1, 2))
            for a, b in (r["frames"] for r in rows)
        ]
    )
    assert x.shape == (3, 3, 4, 112, 112)
    ref = hooked(model.module, x, ["layer2", "layer4", "avgpool"])
    np.testing.assert_allclose(run["layer2"][:], ref["layer2"].mean(dim=2).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run["layer4"][:], ref["layer4"].mean(dim=(2, 3, 4)).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run["avgpool"][:], ref["avgpool"].numpy(), rtol=1e-4, atol=1e-4)
    assert run.manifest["layers"]["layer2"]["reduce"] == "time"


def test_reducers_on_5d_outputs() -> None:
    t = torch.randn(2, 3, 4, 5, 6)
    from layertap.extraction.reducers import parse_reducer as R  # noqa: N812

    assert torch.equal(R("avg")(t), t.mean(dim=(2, 3, 4)))
    assert torch.equal(R("max")(t), t.amax(dim=(2, 3, 4)))
    assert torch.equal(R("time")(t), t.mean(dim=2))
    assert torch.equal(R("time:max")(t), t.amax(dim=2))
    pooled = R("avg:2")(t)
    assert pooled.shape == (2, 3, 4, 2, 2)
    torch.testing.assert_close(pooled[:, :, 1, 0, 0], t[:, :, 1, :3, :3].mean(dim=(2, 3)))  # 5 -> [0:3], 6 -> [0:3]
    assert torch.equal(R("time")(t[:, :, 0]), t[:, :, 0])  # a 4-D map has no time axis: left alone


# -- resume and shards -------------------------------------------------------------------------


def _bytes(run: lt.Run) -> dict[str, bytes]:
    return {k: run[k].raw(slice(None)).tobytes() for k in run.layers}


def test_video_resume_and_shards_are_byte_identical(
    videos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layertap.data.stimuli import open_stimuli
    from layertap.store.writer import RunWriter

    model = lt.load_model("resnet18", "random")
    frames = open_stimuli(videos["lossless"], model=model, fps=3)
    kw = dict(batch_size=2, workers=0, chunk_rows=2, progress=False)  # workers=1: the other tests
    ref = lt.extract(model, frames, ["layer4", "avgpool"], tmp_path / "ref", **kw)
    assert len(ref.images) == 9

    calls = {"n": 0}
    add = RunWriter.add

    def failing_add(self, *a, **k):  # noqa: ANN001, ANN202 - an interruption after two batches
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return add(self, *a, **k)

    monkeypatch.setattr(RunWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        lt.extract(model, frames, ["layer4", "avgpool"], tmp_path / "resumed", **kw)
    monkeypatch.setattr(RunWriter, "add", add)
    assert not lt.open_run(tmp_path / "resumed").complete
    resumed = lt.extract(model, frames, ["layer4", "avgpool"], tmp_path / "resumed", **kw)
    assert resumed.manifest["images"]["rows"] == ref.manifest["images"]["rows"]
    assert _bytes(resumed) == _bytes(ref)

    for i in range(2):  # 9 rows in batches of 2: shard 0 takes rows 0-3, shard 1 rows 4-8
        lt.extract(model, frames, ["layer4", "avgpool"], tmp_path / "sharded", shard=(i, 2), **kw)
    assert lt.open_run(tmp_path / "sharded" / "shards" / "00001-of-00002").manifest["shard"]["offset"] == 4
    merged = lt.open_run(tmp_path / "sharded")
    assert merged.complete and merged.manifest["spec"] == ref.manifest["spec"]
    assert merged.manifest["images"]["rows"] == ref.manifest["images"]["rows"]
    assert _bytes(merged) == _bytes(ref)
    # A different sampling is a different job: refused, not mixed into the finished run.
    with pytest.raises(LayertapError, match="different run"):
        lt.extract(model, open_stimuli(videos["lossless"], model=model, fps=4), ["avgpool"], tmp_path / "ref", **kw)


# -- stimulus arrays ---------------------------------------------------------------------------


def test_stimulus_arrays_npy_and_h5_match_plain_model(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 40, 52, 3), dtype=np.uint8)
    np.save(tmp_path / "stim.npy", images)
    floats = images.astype(np.float32) / 255
    with h5py.File(tmp_path / "stim.h5", "w") as f:
        f.create_dataset("stimuli/gray", data=floats[..., 0])
        f.create_dataset("stimuli/rgb", data=floats)
    (tmp_path / "ids.csv").write_text("id,class\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(7)))
    model = lt.load_model("alexnet", "random")
    ref = hooked(model.module, torch.stack([model.transform(Image.fromarray(a)) for a in images]), ["features.10"])

    run = lt.extract(model, tmp_path / "stim.npy", ["features.10"], tmp_path / "npy", batch_size=3, progress=False)
    np.testing.assert_allclose(run["features.10"][:], ref["features.10"].numpy(), rtol=1e-4, atol=1e-4)
    assert [r["index"] for r in run.manifest["images"]["rows"]] == list(range(7))

    from layertap.data.stimuli import open_stimuli

    h5 = open_stimuli(f"{tmp_path / 'stim.h5'}:stimuli/rgb", ids=tmp_path / "ids.csv")
    run = lt.extract(model, h5, ["features.10"], tmp_path / "h5", batch_size=3, workers=1, progress=False)
    np.testing.assert_allclose(run["features.10"][:], ref["features.10"].numpy(), rtol=1e-4, atol=1e-4)
    rows = run.manifest["images"]["rows"]
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(7)] and run.classes == ["a", "b"]
    assert list(run.targets) == [i % 2 for i in range(7)]

    gray = open_stimuli(f"{tmp_path / 'stim.h5'}:stimuli/gray")
    run = lt.extract(model, gray, ["features.10"], tmp_path / "gray", batch_size=4, workers=0, progress=False)
    x = torch.stack([model.transform(Image.fromarray(a[..., 0]).convert("RGB")) for a in images])
    np.testing.assert_allclose(
        run["features.10"][:], hooked(model.module, x, ["features.10"])["features.10"].numpy(), rtol=1e-4, atol=1e-4
    )

    with pytest.raises(LayertapError, match="holds 2 datasets"):
        open_stimuli(tmp_path / "stim.h5")
    np.save(tmp_path / "bad.npy", np.zeros((3, 4), np.uint8))
    with pytest.raises(LayertapError, match="expected \\(N, H, W, C\\)"):
        open_stimuli(tmp_path / "bad.npy")
    (tmp_path / "few.txt").write_text("a\nb\n")
    with pytest.raises(LayertapError, match="2 ids but the array holds 7"):
        open_stimuli(tmp_path / "stim.npy", ids=tmp_path / "few.txt")
    bad = floats.copy()
    bad[2] *= 3  # out of [0, 1]: that image is a recorded skip
    np.save(tmp_path / "range.npy", bad)
    run = lt.extract(model, tmp_path / "range.npy", ["features.10"], tmp_path / "range", batch_size=4, progress=False)
    assert run["features.10"].shape[0] == 6 and run.skipped[0]["index"] == 2 and "[0, 1]" in run.skipped[0]["reason"]


# -- bad input ---------------------------------------------------------------------------------


def test_bad_videos_are_recorded_skips_or_clear_errors(videos: dict[str, Path], tmp_path: Path) -> None:
    from layertap.data.stimuli import open_stimuli
    from layertap.data.video import VideoSet

    folder = tmp_path / "bad"
    folder.mkdir()
    write_video(folder / "good.mkv", 6)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = videos["a"].read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: unreadable
    model = lt.load_model("resnet18", "random")
    run = lt.extract(model, folder, ["avgpool"], tmp_path / "run", batch_size=4, progress=False)
    assert [r["path"] for r in run.manifest["images"]["rows"]] == ["good.mkv"] * 6
    skipped = {s["path"]: s["reason"] for s in run.skipped}
    assert set(skipped) == {"empty.mp4", "noise.mp4", "truncated.mp4"}
    assert all(r for r in skipped.values())
    with pytest.raises(LayertapError, match="cannot decode"):
        lt.extract(model, folder, ["avgpool"], tmp_path / "fail", on_error="fail", progress=False)

    # A video cut in the middle of its frame data (mkv keeps its index up front): the frames
    # before the cut are stored, the rest recorded as skips; nothing hangs.
    whole = write_video(tmp_path / "cut.mkv", 30).read_bytes()
    (tmp_path / "cutdir").mkdir()
    (tmp_path / "cutdir" / "cut.mkv").write_bytes(whole[: len(whole) * 2 // 3])
    cut = lt.extract(model, tmp_path / "cutdir", ["avgpool"], tmp_path / "cutrun", batch_size=8, progress=False)
    assert 0 < cut["avgpool"].shape[0] < 30

    listed = tmp_path / "videos.txt"  # a list naming a missing video and a FIFO: skips, no waiting on the pipe
    os.mkfifo(tmp_path / "pipe.mp4")
    listed.write_text(f"{folder / 'good.mkv'}\nmissing.mp4\npipe.mp4\n")
    vs = VideoSet.from_path(listed, every=2)
    assert vs.frames == [(0,), (2,), (4,), None, None] and vs.reasons[3:] == ["not found", "not a regular file"]

    for bad in ({"fps": 0}, {"fps": float("inf")}, {"every": 0}, {"clip_len": 0, "clip_mode": True}):
        with pytest.raises(LayertapError, match="must be"):
            VideoSet.from_path(videos["lossless"], **bad)
    with pytest.raises(LayertapError, match="not both"):
        VideoSet.from_path(videos["lossless"], fps=2, every=3)
    with pytest.raises(LayertapError, match="needs a video model"):
        open_stimuli(videos["lossless"], model=model, clip_len=4)
    with pytest.raises(LayertapError, match="holds no videos"):
        open_stimuli(tmp_path / "run", fps=2)
    with pytest.raises(LayertapError, match="is a video model"):
        open_stimuli(tmp_path / "cutrun", model=lt.load_model("r3d_18", "random"))
    times = tmp_path / "t.tsv"
    times.write_text("time\nabc\n")
    with pytest.raises(LayertapError, match="line 2: 'abc' is not a time"):
        VideoSet.from_path(videos["lossless"], times=times)


def test_cli_video_frames(videos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from layertap.cli.app import main

    times = tmp_path / "times.tsv"
    times.write_text("time\n0.5\n1.25\n")
    out = tmp_path / "cli"
    code = main(
        [
            "extract", "--model", "resnet18", "--weights", "random", "--layers", "avgpool", "--images",
            str(videos["lossless"]), "--times", str(times), "--out", str(out), "-q",
        ]
    )  # fmt: skip
    assert code == 0
    rows = json.loads((out / "manifest.json").read_text())["images"]["rows"]
    assert [(r["frame"], r["time"], r["sample_time"]) for r in rows] == [(5, 0.5, 0.5), (12, 1.2, 1.25)]
    code = main(
        [
            "extract", "--model", "resnet18", "--weights", "random", "--layers", "avgpool", "--images",
            str(videos["lossless"]), "--clip-len", "4", "--out", str(tmp_path / "x"), "-q",
        ]
    )  # fmt: skip
    assert code == 2 and "needs a video model" in capsys.readouterr().err


_KILL_SCRIPT = """
import sys, time
import torch
import torchvision.transforms as T
import layertap as lt

class Slow(torch.nn.Module):  # sleeps per batch so that the test can kill it mid-run
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        time.sleep(float(sys.argv[3]))
        return self.pool(self.conv(x)).flatten(1)

torch.manual_seed(0)
model = lt.from_module(Slow(), transform=T.ToTensor(), name="slow", input_size=(3, 48, 64))
frames = lt.open_stimuli(sys.argv[1], model=model)
lt.extract(model, frames, ["conv", "pool"], sys.argv[2], batch_size=2, chunk_rows=2, workers=1, progress=False)
"""


def test_video_resume_after_real_kill_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL (no cleanup at all, a DataLoader worker left behind) mid-run, then the same command again:
    the finished run equals an uninterrupted one byte for byte."""
    import runpy
    import signal
    import subprocess
    import sys
    import time

    video = write_video(tmp_path / "movie.mkv", 40, gop=6)
    script = tmp_path / "job.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def job(out: str, sleep: float) -> subprocess.Popen:
        cmd = [sys.executable, str(script), str(video), str(tmp_path / out), str(sleep)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    killed = job("run", 0.15)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and killed.poll() is None:
        try:
            done = len(lt.open_run(tmp_path / "run").images)
        except (LayertapError, OSError, ValueError, KeyError):
            done = 0
        if done >= 6:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the job ended before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(30)
    partial = lt.open_run(tmp_path / "run")
    assert not partial.complete and 6 <= len(partial.images) < 40
    # the uninterrupted reference: the same script, run in this process
    monkeypatch.setattr(sys, "argv", [str(script), str(video), str(tmp_path / "ref"), "0"])
    runpy.run_path(str(script), run_name="__main__")
    again = job("run", 0.0)
    assert again.wait(120) == 0, again.stderr.read()
    a, b = lt.open_run(tmp_path / "run"), lt.open_run(tmp_path / "ref")
    assert a.complete and a.manifest["images"]["rows"] == b.manifest["images"]["rows"]
    assert _bytes(a) == _bytes(b)


def test_frame_rows_have_unique_names_and_export_locates_them(videos: dict[str, Path], tmp_path: Path) -> None:
    """Rows of one video shared its file name (`run.images` was ['a.mp4', 'a.mp4', ...], images.csv had
    no frame or time): each row now has a name and images.csv says which frame of which video it is."""
    import csv

    import torchvision.transforms as T

    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    tf = T.Compose([T.Resize((48, 64)), T.ToTensor()])
    model = lt.from_module(tiny, transform=tf, name="tiny", input_size=(3, 48, 64))
    kw = dict(workers=0, progress=False, batch_size=4)
    run = lt.extract(model, lt.open_stimuli(videos["mixed"], model=model, every=5), ["0"], tmp_path / "v", **kw)
    n = {v: len(decode_all(videos[v])[0]) for v in ("a", "b")}
    expected = [(v, k) for v in ("a", "b") for k in range(0, n[v], 5)]
    assert run.images == [f"{v}.mp4#{k}" for v, k in expected]
    lt.export(run, "npy")
    with open(run.path / "export-npy" / "images.csv", newline="") as f:
        table = list(csv.DictReader(f))
    times = {v: decode_all(videos[v])[1] for v in ("a", "b")}
    assert [(r["path"], int(r["frame"])) for r in table] == [(f"{v}.mp4", k) for v, k in expected]
    np.testing.assert_allclose([float(r["time"]) for r in table], [times[v][k] for v, k in expected], atol=1e-9)

    # ids from a --times table name the rows; array rows keep their own names (file[index])
    tsv = tmp_path / "t.tsv"
    tsv.write_text("time\tid\n0.0\tfirst\n0.5\tmiddle\n")
    named = lt.extract(model, lt.open_stimuli(videos["lossless"], model=model, times=tsv), ["0"], tmp_path / "t", **kw)
    assert named.images == ["first", "middle"]
    np.save(tmp_path / "s.npy", np.stack([frame_image(k) for k in range(3)]))
    arr = lt.extract(model, lt.open_stimuli(tmp_path / "s.npy", model=model), ["0"], tmp_path / "a", **kw)
    assert arr.images == ["s.npy[0]", "s.npy[1]", "s.npy[2]"]
