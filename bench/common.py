"""Shared by bench/run.py, bench/memory.py and every contender (both venvs: no layertap import here).

A contender is ``python bench/contenders/NAME.py SPEC.json``. The spec (written by run.py) names
the architecture, the weights file, the images, the layers and the settings; the contender prints
one line ``BENCH_RESULT {json}`` on stdout (anything else it prints is ignored).

Timing protocol, the same for every contender: load the model (not timed), run the contender's
whole pipeline once on the first batch of images into a scratch folder (warm-up, not timed), then
time the whole pipeline on all images: loader start-up, decoding, forward, writing to disk.
Peak RSS: the contender process's own peak is ``getrusage(RUSAGE_SELF).ru_maxrss`` (run.py starts
contenders through a small launcher process, because Linux carries ru_maxrss across exec: a child
exec'd straight from a big parent would report the parent's peak). DataLoader workers are sampled
from /proc every 0.2 s: the largest peak RSS (VmHWM) among this process's children, and the largest
*private* memory of one (Private_Clean + Private_Dirty from smaps_rollup: what the worker does not
share copy-on-write with the main process). RUSAGE_CHILDREN cannot be used because ``import torch``
itself runs a short child process that inherits the importer's peak. The memory a contender uses is
reported as main peak RSS + worker peak private memory (per worker; layertap's default is one).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
#: run.py starts each contender as ``python -c LAUNCHER python contender.py spec.json`` (see above)
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def load_spec() -> dict[str, Any]:
    """The spec named on the command line; sets torch's threads and starts the worker RSS sampler."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} SPEC.json")
    return load_spec_file(sys.argv[1])


def load_spec_file(path: str) -> dict[str, Any]:
    spec = json.loads(Path(path).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    WORKERS.start()
    return spec


class ChildPeakRSS:
    """Largest VmHWM (peak RSS) among this process's child processes, sampled in a daemon thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_kb = 0
        self.private_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and os.path.isdir("/proc"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> tuple[float, float]:
        """Stop sampling; (largest child peak RSS, largest child private memory) in MB."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()
        return self.peak_kb * 1024 / 1e6, self.private_kb * 1024 / 1e6

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        me = str(os.getpid())
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = f.read().rsplit(")", 1)[1].split()[1]
                if ppid != me:
                    continue
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                            break
                private = 0
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith(("Private_Clean:", "Private_Dirty:")):
                            private += int(line.split()[1])
                self.private_kb = max(self.private_kb, private)
            except (OSError, IndexError, ValueError):
                continue


WORKERS = ChildPeakRSS()


def list_images(folder: str) -> list[str]:
    """Sorted image paths of a flat folder (layertap's and thingsvision's order for such a folder)."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return [os.path.join(folder, f) for f in names]


def make_transform(arch: str):  # noqa: ANN201
    """The preprocessing layertap uses for a torchvision architecture with random/file weights:
    its default weights' transform (resize, center crop 224, ImageNet normalisation), from PIL."""
    import torchvision.models as tvm

    return tvm.get_model_weights(arch).DEFAULT.transforms()


def build_model(arch: str, weights: str):  # noqa: ANN201
    """The torchvision architecture with the benchmark's saved (random) weights, in eval mode."""
    import torch
    import torchvision.models as tvm

    model = tvm.get_model(arch, weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def save_random_weights(arch: str, path: str | os.PathLike[str], seed: int = 0) -> str:
    """torch.save a seeded, untrained torchvision model's state_dict (once; cached by path)."""
    path = Path(path)
    if not path.is_file():
        import torch
        import torchvision.models as tvm

        torch.manual_seed(seed)
        model = tvm.get_model(arch, weights=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.rename(path)
    return str(path)


def uses_channels_last(model) -> bool:  # noqa: ANN001
    """layertap's rule on CPU: channels_last for any model with a Conv2d (ViT's patch embedding too)."""
    from torch import nn

    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class PILImages:
    """A torch Dataset: decode with PIL (RGB) and apply the transform; layertap decodes the same way
    (for RGB JPEGs without EXIF orientation the pixels are identical)."""

    def __init__(self, paths: list[str], transform) -> None:  # noqa: ANN001
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):  # noqa: ANN204
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def pil_loader(paths: list[str], spec: dict):  # noqa: ANN201
    """The hand-written pipelines' DataLoader: PIL decode + the job's transform, the job's batch and workers."""
    import torch

    return torch.utils.data.DataLoader(
        PILImages(paths, make_transform(spec["arch"])),
        batch_size=spec["batch_size"],
        shuffle=False,
        num_workers=spec["workers"],
    )


def peak_rss_mb() -> dict[str, float]:
    """Peak RSS in MB of this process, and peak RSS / private memory of its largest child (worker)."""
    scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6
    rss, private = WORKERS.stop()
    return {"rss_main_mb": round(own, 1), "rss_workers_mb": round(rss, 1), "private_workers_mb": round(private, 1)}


def save_check(out: str | os.PathLike[str], arrays: dict[str, Any]) -> dict[str, str]:
    """Write the first rows of each layer as read back from what the contender stored (numpy)."""
    import numpy as np

    folder = Path(out) / "check"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for layer, arr in arrays.items():
        p = folder / f"{layer}.npy"
        np.save(p, np.ascontiguousarray(np.asarray(arr, dtype=np.float32)))
        paths[layer] = str(p)
    return paths


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def emit(spec: dict[str, Any], seconds: float | None, **extra: Any) -> None:
    n = len(spec["images"])
    result = {
        "contender": spec["contender"],
        "n_images": n,
        "seconds": None if seconds is None else round(seconds, 3),
        "img_per_s": None if not seconds else round(n / seconds, 2),
        **peak_rss_mb(),
        **extra,
    }
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def skip(spec: dict[str, Any], reason: str) -> None:
    emit(spec, None, skipped=reason)
