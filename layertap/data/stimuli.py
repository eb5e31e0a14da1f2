"""One entry point for every kind of stimulus: image folders/lists, videos, stimulus arrays.

:func:`open_stimuli` looks at the path and returns the matching :class:`~layertap.data.images.ImageSet`:
an image folder or list (:meth:`ImageSet.from_path`), a video / folder of videos / .txt list of
videos (:class:`~layertap.data.video.VideoSet`), or an .npy / HDF5 array (:class:`~layertap.data.arrays.ArraySet`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from layertap.data.arrays import ArraySet, split_array_path
from layertap.data.images import IMAGE_EXTENSIONS, ImageSet
from layertap.data.video import VIDEO_EXTENSIONS, VideoSet, is_video_path
from layertap.errors import LayertapError, option_name, option_spelling


def is_video_model(model: Any) -> bool:
    """Whether a loaded model takes clips.

    Args:
        model: a :class:`~layertap.models.LoadedModel` (or anything with an ``input_size``), or None.

    Returns:
        True when its ``input_size`` is (C, T, H, W).

    Example:
        >>> from layertap.models import load_model
        >>> is_video_model(load_model("resnet18", "random"))
        False
    """
    return model is not None and len(getattr(model, "input_size", ())) == 4


def _is_video_input(path: Path) -> bool:
    if path.is_file():
        if is_video_path(path):
            return True
        if path.suffix.lower() == ".txt":  # a list of videos rather than of images?
            with open(path, encoding="utf-8", errors="replace") as f:  # not UTF-8: ImageSet says so in one line
                first = next((ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")), "")
            return first.lower().endswith(VIDEO_EXTENSIONS)
        return False
    if path.is_dir():
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
        fps, every, times, clip_len, clip_stride: video sampling (see :mod:`layertap.data.video`);
            ``clip_len`` defaults to the video model's own clip length.
        ids: row ids for a stimulus array (see :func:`layertap.data.arrays.read_ids`).

    Returns:
        An :class:`~layertap.data.images.ImageSet` (a :class:`~layertap.data.video.VideoSet` or
        :class:`~layertap.data.arrays.ArraySet` for videos and arrays).

    Raises:
        LayertapError: a missing path, or options that do not fit the stimuli or the model.

    Example:
        >>> frames = open_stimuli("movie.mp4", model=load_model("resnet18"), fps=2)  # doctest: +SKIP
        >>> frames.row_fields(0)  # the frame shown at 0 s  # doctest: +SKIP
    """
    video_opts = {
        "--fps": fps,
        "--every": every,
        "--times": times,
        "--clip-len": clip_len,
        "--clip-stride": clip_stride,
    }
    given = [k for k, v in video_opts.items() if v is not None]

    if split_array_path(images) is not None:
        if given:
            raise LayertapError(f"{', '.join(given)} apply to videos, not to a stimulus array")
        if is_video_model(model):
            raise LayertapError("a video model needs videos (clips of frames), not an array of images")
        return ArraySet.from_path(images, ids=ids)
    if ids is not None:
        raise LayertapError(f"{option_name('ids')} names the rows of a stimulus array (.npy / .h5); image lists carry their own paths")
    path = Path(images)
    if path.exists() and _is_video_input(path):
        video_model = is_video_model(model)
        if video_model and clip_len is None:
            clip_len = int(model.input_size[1])
        return VideoSet.from_path(
            path, fps=fps, every=every, times=times, clip_len=clip_len, clip_stride=clip_stride, clip_mode=video_model
        )
    if given:
        raise LayertapError(f"{', '.join(given)} apply to videos; {images} holds no videos")
    if is_video_model(model):
        raise LayertapError(f"{model.name} is a video model: give it videos ({option_spelling('images', 'movie.mp4')}), not images")
    return ImageSet.from_path(images, things=things)
