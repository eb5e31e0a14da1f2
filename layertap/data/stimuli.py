"""One entry point for every kind of stimulus: image folders/lists, videos, stimulus arrays.

:func:`open_stimuli` looks at the path and returns the matching :class:`~layertap.data.ImageSet`:
an image folder or list (:meth:`ImageSet.from_path`), a video / folder of videos / .txt list of
videos (:class:`~layertap.video.VideoSet`), or an .npy / HDF5 array (:class:`~layertap.arrays.ArraySet`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from layertap.data.images import ImageSet
from layertap.errors import LayertapError


def is_video_model(model: Any) -> bool:
    """Whether a loaded model takes clips (its ``input_size`` is (C, T, H, W))."""
    return model is not None and len(getattr(model, "input_size", ())) == 4


def _is_video_input(path: Path) -> bool:
    from layertap.data.video import VIDEO_EXTENSIONS, is_video_path

    if path.is_file():
        if is_video_path(path):
            return True
        if path.suffix.lower() == ".txt":  # a list of videos rather than of images?
            with open(path, encoding="utf-8", errors="replace") as f:  # not UTF-8: ImageSet says so in one line
                first = next((ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")), "")
            return first.lower().endswith(VIDEO_EXTENSIONS)
        return False
    if path.is_dir():
        from layertap.data.images import IMAGE_EXTENSIONS

        videos = False
        for q in path.rglob("*"):  # an image folder answers at its first image
            name = q.name.lower()
            if name.endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                return False
            videos = videos or name.endswith(VIDEO_EXTENSIONS)
        return videos
    return False


def open_stimuli(
    images: str | os.PathLike[str],
    *,
    things: bool = False,
    model: Any = None,
    fps: float | None = None,
    every: int | None = None,
    times: str | os.PathLike[str] | None = None,
    clip_len: int | None = None,
    clip_stride: int | None = None,
    ids: str | os.PathLike[str] | None = None,
) -> ImageSet:
    """The stimulus set at ``images``: images, videos or a stimulus array.

    Args:
        images: image folder / .txt / .csv list, a video / folder of videos / .txt list of
            videos, ``stimuli.npy`` or ``stimuli.h5:dataset``.
        things: require THINGS layout (image folders only).
        model: the loaded model; a video model (input (C, T, H, W)) gets clips of frames.
        fps, every, times, clip_len, clip_stride: video sampling (see :mod:`layertap.video`);
            ``clip_len`` defaults to the video model's own clip length.
        ids: row ids for a stimulus array (see :func:`layertap.arrays.read_ids`).
    Returns:
        an ImageSet (a VideoSet or ArraySet for videos and arrays).
    """
    video_opts = {
        "--fps": fps,
        "--every": every,
        "--times": times,
        "--clip-len": clip_len,
        "--clip-stride": clip_stride,
    }
    given = [k for k, v in video_opts.items() if v is not None]
    from layertap.data.arrays import ArraySet, split_array_path

    if split_array_path(images) is not None:
        if given:
            raise LayertapError(f"{', '.join(given)} apply to videos, not to a stimulus array")
        if is_video_model(model):
            raise LayertapError("a video model needs videos (clips of frames), not an array of images")
        return ArraySet.from_path(images, ids=ids)
    if ids is not None:
        raise LayertapError("--ids names the rows of a stimulus array (.npy / .h5); image lists carry their own paths")
    path = Path(images)
    if path.exists() and _is_video_input(path):
        from layertap.data.video import VideoSet

        video_model = is_video_model(model)
        if video_model and clip_len is None:
            clip_len = int(model.input_size[1])
        return VideoSet.from_path(
            path, fps=fps, every=every, times=times, clip_len=clip_len, clip_stride=clip_stride, clip_mode=video_model
        )
    if given:
        raise LayertapError(f"{', '.join(given)} apply to videos; {images} holds no videos")
    if is_video_model(model):
        raise LayertapError(f"{model.name} is a video model: give it videos (--images movie.mp4), not images")
    return ImageSet.from_path(images, things=things)
