"""Frames of a movie into a model: layertap vs the decoding library alone + a bare forward.

    .venv/bin/python bench/video.py [--repeat 2] [--seconds 60]

Writes a 1-minute 1280x720 30 fps H.264 movie into bench/.work/ (once, with PyAV's bundled
libx264), then, at 2 frames per second (120 frames), for ResNet-50 (random weights) ``avgpool``:

* ``decode (PyAV)``: PyAV alone, decoding the movie start to end and converting the sampled
  frames to RGB (what any pipeline must pay);
* ``decode (torchcodec)``: torchcodec's ``get_frames_played_at`` for the same times, when
  torchcodec (and the system FFmpeg it needs) can be imported; else reported as unavailable;
* ``PyAV + bare forward``: the same decoding, the weights' transform, batches of 32 through the
  plain model in ``inference_mode``, in one process (the hand-written baseline);
* ``layertap``: ``lt.extract(model, open_stimuli(movie, fps=2), ["avgpool"], out, batch_size=32)``
  (probing, decoding in a worker process, forward, writing the Zarr store and manifest).

Frames/s = sampled frames ÷ wall time; the ratio is layertap ÷ (PyAV + bare forward). Rounds are
interleaved and the best of ``--repeat`` counts (the machine is shared and noisy). Prints the CPU
model and its flags beside the numbers; paste the table into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

WORK = Path(__file__).resolve().parent / ".work"
FPS_SAMPLED = 2
BATCH = 32


def make_movie(path: Path, seconds: int, fps: int = 30, size: tuple[int, int] = (1280, 720)) -> Path:
    """A synthetic movie with motion and texture (moving gradients, a travelling block, grain)."""
    import av

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    grain = rng.integers(0, 6, size=(8, h, w, 1), dtype=np.uint8)  # film-like grain; ~5 Mbit/s like a 720p movie
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for k in range(seconds * fps):
            t = k / fps
            img = np.empty((h, w, 3), np.uint8)
            img[..., 0] = (127 + 120 * np.sin(xx / 90 + t)).astype(np.uint8)
            img[..., 1] = (127 + 120 * np.sin(yy / 60 - 1.3 * t)).astype(np.uint8)
            img[..., 2] = (127 + 120 * np.sin((xx + yy) / 150 + 0.7 * t)).astype(np.uint8)
            x0 = int((k * 9) % (w - 200))
            img[200:400, x0 : x0 + 200] = (255, 255, 255)
            img += grain[k % 8]
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)
    return path


def sample_times(duration: float) -> list[Fraction]:
    step = Fraction(1, FPS_SAMPLED)
    return [k * step for k in range(int(duration * FPS_SAMPLED + 1e-9))]


def pyav_frames(path: Path):  # noqa: ANN201 - yields RGB arrays
    """PyAV alone: decode start to end, yield the frame shown at each sample time as RGB."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        targets = iter(sample_times(float(stream.duration * stream.time_base)))
        target = next(targets)
        prev = None
        for frame in c.decode(stream):
            t = frame.time
            while target is not None and t > target + 1e-9 and prev is not None:
                yield prev.to_ndarray(format="rgb24")
                target = next(targets, None)
            if target is None:
                return
            prev = frame
        while target is not None and prev is not None:
            yield prev.to_ndarray(format="rgb24")
            target = next(targets, None)


def run_decode_pyav(path: Path) -> int:
    return sum(1 for _ in pyav_frames(path))


def run_decode_torchcodec(path: Path) -> int | None:
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception:  # noqa: BLE001 - not installed, or no system FFmpeg libraries
        return None
    dec = VideoDecoder(str(path), seek_mode="exact")
    times = [float(t) for t in sample_times(dec.metadata.duration_seconds)]
    n = 0
    for lo in range(0, len(times), BATCH):
        n += dec.get_frames_played_at(seconds=times[lo : lo + BATCH]).data.shape[0]
    return n


def run_bare(path: Path, model: torch.nn.Module, transform, kept: list[torch.Tensor]) -> int:  # noqa: ANN001
    """PyAV + the weights' transform + batches through the plain model; avgpool by a hook (into ``kept``)."""
    from PIL import Image

    kept.clear()
    model.avgpool.register_forward_hook(lambda m, i, o: kept.append(o.flatten(1).clone()))
    batch: list[torch.Tensor] = []
    n = 0

    def flush() -> None:
        with torch.inference_mode():
            model(torch.stack(batch))
        batch.clear()

    for rgb in pyav_frames(path):
        batch.append(transform(Image.fromarray(rgb)))
        n += 1
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    model.avgpool._forward_hooks.clear()
    return n


def run_layertap(path: Path, model, out: Path, kept: list[np.ndarray]) -> int:  # noqa: ANN001
    import layertap as lt

    shutil.rmtree(out, ignore_errors=True)
    frames = lt.open_stimuli(path, model=model, fps=FPS_SAMPLED)
    run = lt.extract(model, frames, ["avgpool"], out, batch_size=BATCH, progress=False)
    kept[:] = [run["avgpool"][:].reshape(run["avgpool"].shape[0], -1)]
    return run["avgpool"].shape[0]


def cpu_line() -> str:
    model, flags = platform.processor() or "?", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "fma", "f16c", "sse4_2")
    simd = " ".join(f for f in wanted if f in flags.split())
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{n} cores, {model}; SIMD flags: {simd or '?'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best counts")
    ap.add_argument("--seconds", type=int, default=60, help="length of the generated movie")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    t0 = time.perf_counter()
    movie = make_movie(WORK / f"movie_{args.seconds}s_720p.mp4", args.seconds)
    print(f"movie: {movie} ({movie.stat().st_size / 1e6:.1f} MB, made/found in {time.perf_counter() - t0:.0f} s)")

    import av

    import layertap as lt

    model = lt.load_model("resnet50", "random")
    bare_out: list[torch.Tensor] = []
    lt_out: list[np.ndarray] = []
    bare = lt.load_model("resnet50", "random").module.eval()
    with torch.inference_mode():  # warm both up (allocator, kernels): not timed
        bare(torch.zeros(2, 3, 224, 224))
        model.module(torch.zeros(2, 3, 224, 224))
    contenders = {
        "decode (PyAV)": lambda: run_decode_pyav(movie),
        "decode (torchcodec)": lambda: run_decode_torchcodec(movie),
        "PyAV + bare forward": lambda: run_bare(movie, bare, model.transform, bare_out),
        "layertap": lambda: run_layertap(movie, model, Path(tempfile.mkdtemp()) / "run", lt_out),
    }
    best: dict[str, tuple[float, int | None]] = {}
    for r in range(args.repeat):
        for name, fn in contenders.items():
            t = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t
            print(f"round {r + 1}: {name:<22} {'-' if n is None else n} frames in {dt:.1f} s", flush=True)
            if n is not None and (name not in best or dt < best[name][0]):
                best[name] = (dt, n)
            elif n is None:
                best.setdefault(name, (float("nan"), None))
    print(f"\nmachine: {cpu_line()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, PyAV {av.__version__}, "
        f"torch threads {torch.get_num_threads()}, batch {BATCH}, {FPS_SAMPLED} fps sampled, best of {args.repeat}"
    )
    print("\n| contender | frames | s | frames/s |\n|---|---:|---:|---:|")
    for name, (dt, n) in best.items():
        if n is None:
            print(f"| {name} | – | – | unavailable (not importable here) |")
        else:
            print(f"| {name} | {n} | {dt:.1f} | {n / dt:.1f} |")
    if "layertap" in best and best["PyAV + bare forward"][1]:
        lt_fps = best["layertap"][1] / best["layertap"][0]
        base = best["PyAV + bare forward"][1] / best["PyAV + bare forward"][0]
        print(f"\nlayertap ÷ (PyAV + bare forward) = {lt_fps / base:.2f}")
        ref = torch.cat(bare_out).numpy()
        diff = float(np.abs(lt_out[0] - ref).max() / np.abs(ref).max())
        print(f"layertap's stored avgpool vs the bare forward's (same frames): max rel. difference {diff:.1e}")


if __name__ == "__main__":
    sys.exit(main())
