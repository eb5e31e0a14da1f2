"""Movies as stimuli: frames of a video for image models, clips of frames for video models.

A :class:`VideoSet` is an :class:`~layertap.data.images.ImageSet` whose rows are frames (image models)
or clips of ``clip_len`` frames (video models) of one or more videos. Every frame is found by its
*presentation timestamp*: the videos are demuxed once (packets only, nothing decoded) to list
each frame's timestamp, so sampling at ``fps=F`` or at given times is exact for variable frame
rate videos too, and the row list (hence resume, shards and merge) is fixed before extraction.

Decoding (PyAV, which bundles FFmpeg in its wheel) runs in the DataLoader workers one batch at a
time: seek to the keyframe before the batch's first frame, decode forward to its last, keep the
frames the batch needs. A movie is never held in memory; at most one batch of frames (plus the
decoder's own buffers) is.

Frame selection (each gives a "frame grid", the frames sampled from the video in time order):

* ``every=N``: frames 0, N, 2N, ... (by presentation order);
* ``fps=F``: the frame *shown* at t = 0, 1/F, 2/F, ... seconds (from the first frame) up to
  the end of the video: a frame repeats when F exceeds the video's own rate;
* ``times``: a table of times (seconds), each the frame shown at that time (image models) or
  the start of a clip (video models); rows in the table's order, with an optional ``video``
  column (for several videos) and ``id`` column.

Image models get one row per grid frame; video models one row per clip of ``clip_len``
consecutive grid frames, starting every ``clip_stride`` grid frames (an incomplete clip at the
end is dropped). Frames past the end of a video and unreadable videos are recorded skips.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from layertap._optional import require
from layertap.data.images import ImageSet
from layertap.errors import LayertapError, option_name

log = logging.getLogger("layertap")

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".ogv", ".wmv", ".flv")
#: a batch whose next frame is at most this many frames ahead decodes on instead of seeking
_SEEK_GAP = 64


def _av() -> Any:
    return require("av", "video")


def is_video_path(path: str | os.PathLike[str]) -> bool:
    """Whether a path names a video file (by its extension).

    Args:
        path: the path.

    Returns:
        True for the extensions in ``VIDEO_EXTENSIONS`` (.mp4, .mkv, .mov, ...), any case.

    Example:
        >>> is_video_path("movie.MP4"), is_video_path("frame.png")
        (True, False)
    """
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


@dataclass
class VideoInfo:
    """What demuxing one video found: each frame's presentation time, in display order.

    ``pts[i]`` is frame i's timestamp in ``time_base`` units; ``times[i]`` the same in seconds from the first frame
    (exact fractions); ``end`` when the last frame stops being shown. ``error`` is why the video cannot be used
    (then it has no frames).

    Example:
        >>> info = VideoInfo("clip.mp4", pts=[0, 1, 2, 3], time_base=Fraction(1, 2), end=Fraction(2))
        >>> info.times[-1]
        Fraction(3, 2)
    """

    path: str
    pts: list[int] = field(default_factory=list)
    time_base: Fraction = Fraction(1)
    end: Fraction = Fraction(0)
    width: int = 0
    height: int = 0
    codec: str = ""
    error: str | None = None

    @property
    def n_frames(self) -> int:
        return len(self.pts)

    @cached_property
    def times(self) -> list[Fraction]:
        p0 = self.pts[0] if self.pts else 0
        return [(p - p0) * self.time_base for p in self.pts]

    @cached_property
    def index_of(self) -> dict[int, int]:
        """Frame index by timestamp (what a decoded frame's ``pts`` says it is)."""
        return {p: k for k, p in enumerate(self.pts)}

    def summary(self) -> dict[str, Any]:
        """For the manifest: frames, duration, mean rate, size, codec (or the error)."""
        if self.error:
            return {"error": self.error}
        return {
            "frames": self.n_frames,
            "duration_s": float(self.end),
            "mean_fps": round(self.n_frames / float(self.end), 6) if self.end else None,
            "width": self.width,
            "height": self.height,
            "codec": self.codec,
        }


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Demux a video (no decoding) and list its frames' presentation timestamps.

    A file that cannot be opened, has no video stream or no frames gives a VideoInfo with ``error`` set; a file
    that becomes unreadable part-way keeps the frames before that point.

    Args:
        path: the video file.

    Returns:
        Its frames' timestamps, size, codec (or the error).

    Example:
        >>> probe("movie.mp4").summary()["frames"]  # doctest: +SKIP
        1440
    """
    av = _av()
    info = VideoInfo(path=str(path))
    if not os.path.isfile(path):  # a missing file, a folder, or a FIFO (opening it would wait forever)
        info.error = "not found" if not os.path.exists(path) else "not a regular file"
        return info
    try:
        container = av.open(str(path))
    except Exception as err:  # noqa: BLE001 - any open failure means "not a readable video"
        info.error = f"cannot open video: {_reason(err)}"
        return info
    with container:
        if not container.streams.video:
            info.error = "no video stream in the file"
            return info
        stream = container.streams.video[0]
        info.time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 90000)
        info.width, info.height = stream.codec_context.width, stream.codec_context.height
        info.codec = stream.codec_context.name
        stamps: list[tuple[int, int]] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream flush packet
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    continue
                stamps.append((ts, packet.duration or 0))
        except Exception as err:  # noqa: BLE001 - a damaged tail: keep the frames before it
            log.warning("%s: stops being readable after %d frames (%s)", path, len(stamps), _reason(err))
        if not stamps:
            info.error = "the video has no frames"
            return info
        stamps.sort()
        info.pts = [ts for ts, _ in stamps]
        last_dur: float = stamps[-1][1]
        if not last_dur:  # no packet duration: the mean frame interval
            last_dur = (info.pts[-1] - info.pts[0]) / max(1, len(info.pts) - 1) if len(info.pts) > 1 else 1
        info.end = Fraction(info.pts[-1] - info.pts[0]) * info.time_base + Fraction(last_dur) * info.time_base
    return info


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def _as_fraction(value: float | str | Fraction) -> Fraction:
    return value if isinstance(value, Fraction) else Fraction(str(value))


def shown_at(times: Sequence[Fraction], t: Fraction, end: Fraction) -> int | None:
    """Index of the frame shown at time ``t`` (the last frame starting at or before it).

    Args:
        times: the frames' start times (seconds from the first frame, ascending).
        t: the time.
        end: when the last frame stops being shown.

    Returns:
        The frame index, or None when ``t`` is before the first frame or at/after the end of the video.

    Example:
        >>> times = [Fraction(0), Fraction(1, 2), Fraction(1), Fraction(3, 2)]
        >>> shown_at(times, Fraction(3, 4), end=Fraction(2)), shown_at(times, Fraction(2), end=Fraction(2))
        (1, None)
    """
    if t < 0 or t >= end:
        return None

    return bisect.bisect_right(times, t) - 1


def frame_grid(info: VideoInfo, fps: float | None = None, every: int | None = None) -> list[tuple[int, Fraction]]:
    """The sampled frames of a video as (frame index, sample time).

    Args:
        info: the probed video.
        fps: sample the frame shown at each multiple of 1/``fps`` seconds.
        every: take every ``every``-th frame (not with ``fps``). Default: every frame.

    Returns:
        (frame index, time it was sampled at) pairs, in time order.

    Example:
        >>> info = VideoInfo("clip.mp4", pts=[0, 1, 2, 3], time_base=Fraction(1, 2), end=Fraction(2))
        >>> frame_grid(info, fps=1)
        [(0, Fraction(0, 1)), (2, Fraction(1, 1))]
    """
    times = info.times
    if fps is not None:
        step = 1 / _as_fraction(fps)
        out = []
        k = 0
        while k * step < info.end:
            out.append((shown_at(times, k * step, info.end), k * step))
            k += 1
        return [(i, t) for i, t in out if i is not None]
    n = every or 1
    return [(i, times[i]) for i in range(0, info.n_frames, n)]


def read_times(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A times table: when to sample videos.

    Args:
        path: a .tsv/.csv with a ``time`` (or ``onset``/``start``) column in seconds and optional ``video`` and
            ``id`` columns, or a .txt with one time per line.

    Returns:
        One dict per row (``time``, ``video``, ``id``; None where the table has no such column), in table order.

    Raises:
        LayertapError: a missing or empty file, no time column, or a time that cannot be read.

    Example:
        >>> read_times("onsets.tsv")[0]  # doctest: +SKIP
        {'time': Fraction(3, 2), 'video': 'run1.mp4', 'id': 'face_01'}
    """
    p = Path(path)
    if not p.is_file():
        raise LayertapError(f"times file not found: {p}")
    rows: list[dict[str, Any]] = []
    if p.suffix.lower() in (".tsv", ".csv"):
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            cols = {c.lower().strip(): c for c in reader.fieldnames or []}
            tcol = next((cols[c] for c in ("time", "onset", "start", "seconds", "t") if c in cols), None)
            if tcol is None:
                raise LayertapError(f"{p} has no 'time' column (columns: {', '.join(cols.values())})")
            vcol = next((cols[c] for c in ("video", "movie", "file", "path") if c in cols), None)
            icol = next((cols[c] for c in ("id", "name", "stimulus") if c in cols), None)
            for line, r in enumerate(reader, start=2):
                rows.append(
                    {
                        "time": _parse_time(r[tcol], p, line),
                        "video": (r[vcol] or "").strip() or None if vcol else None,
                        "id": (r[icol] or "").strip() if icol else None,
                    }
                )
    else:
        with open(p, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip() and not text.lstrip().startswith("#"):
                    rows.append({"time": _parse_time(text.strip(), p, line), "video": None, "id": None})
    if not rows:
        raise LayertapError(f"the times file {p} is empty")
    return rows


def _parse_time(text: str, path: Path, line: int) -> Fraction:
    try:
        t = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise LayertapError(f"{path} line {line}: '{text}' is not a time in seconds") from None
    if t < 0:
        raise LayertapError(f"{path} line {line}: negative time {text}")
    return t


def find_videos(path: str | os.PathLike[str]) -> tuple[list[str], str]:
    """The videos at ``path``.

    Args:
        path: a video file, a folder of videos (sorted relative paths, subfolders included) or a .txt list.

    Returns:
        (absolute paths, root).

    Raises:
        LayertapError: nothing there, or no videos.

    Example:
        >>> find_videos("movies/")  # doctest: +SKIP
        (['/data/movies/a.mp4', '/data/movies/b.mp4'], '/data/movies')
    """
    p = Path(path)
    if not p.exists():
        raise LayertapError(f"video path not found: {p}")
    if p.is_file() and is_video_path(p):
        return [str(p.resolve())], str(p.resolve().parent)
    if p.is_file():
        base = p.resolve().parent
        with open(p, encoding="utf-8") as f:
            entries = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if not entries:
            raise LayertapError(f"the video list {p} is empty")
        return [str((base / e).resolve()) for e in entries], str(base)
    root = p.resolve()
    found = sorted(
        q.relative_to(root).as_posix()
        for q in root.rglob("*")
        if q.is_file() and is_video_path(q) and not any(part.startswith(".") for part in q.relative_to(root).parts)
    )
    if not found:
        raise LayertapError(f"no videos in {root} (looked for {', '.join(VIDEO_EXTENSIONS)})")
    return [str(root / r) for r in found], str(root)


@dataclass
class VideoSet(ImageSet):
    """Rows that are frames (``clip_len`` 1, image models) or clips of frames (video models).

    ``paths[i]`` is row i's video; ``frames[i]`` its frame indices (None: a recorded skip, with ``reasons[i]``);
    ``sample_times[i]`` the time it was sampled at (fps/times sampling). ``clip_mode`` rows go to a video model's
    transform as (T, C, H, W) uint8 tensors; otherwise each row is one RGB ``PIL.Image``.

    Example:
        >>> frames = open_stimuli("movie.mp4", model=load_model("resnet18"), fps=2)  # doctest: +SKIP
        >>> len(frames), frames.row_fields(0)  # doctest: +SKIP
    """

    frames: list[tuple[int, ...] | None] = field(default_factory=list)
    sample_times: list[float | None] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    ids: list[str | None] | None = None
    clip_mode: bool = False
    infos: dict[str, VideoInfo] = field(default_factory=dict)

    @classmethod
    def from_path(  # type: ignore[override]
        cls,
        path: str | os.PathLike[str],
        *,
        fps: float | None = None,
        every: int | None = None,
        times: str | os.PathLike[str] | None = None,
        clip_len: int | None = None,
        clip_stride: int | None = None,
        clip_mode: bool = False,
    ) -> VideoSet:
        """Sample a video, a folder of videos or a .txt list of videos (see the module doc).

        Args:
            path: the video(s).
            fps: sample the frame shown every 1/fps seconds.
            every: sample every N-th frame (default: every frame).
            times: a times table (see :func:`read_times`): sample at these times instead.
            clip_len: frames per clip (video models; default 1 for image models).
            clip_stride: grid frames between clip starts (default ``clip_len``).
            clip_mode: rows feed a video model (uint8 clips) rather than an image model.
        Returns:
            the VideoSet, rows in video order then time order (or the times table's order).
        """
        if fps is not None and every is not None:
            raise LayertapError(f"give {option_name('fps')} or {option_name('every')}, not both")
        if fps is not None and not 0 < fps < float("inf"):
            raise LayertapError(f"{option_name('fps')} must be a positive number of frames per second, got {fps}")
        if every is not None and every < 1:
            raise LayertapError(f"{option_name('every')} must be at least 1, got {every}")
        T = 1 if clip_len is None else clip_len
        if T < 1 or (clip_stride is not None and clip_stride < 1):
            raise LayertapError(f"{option_name('clip_len')} and {option_name('clip_stride')} must be at least 1")
        if T > 1 and not clip_mode:
            raise LayertapError(f"{option_name('clip_len')} needs a video model (e.g. r3d_18); image models take single frames")
        stride = clip_stride or T
        paths, root = find_videos(path)
        infos: dict[str, VideoInfo] = {}
        for p in paths:
            if p not in infos:
                infos[p] = probe(p)
        rows_v: list[str] = []
        rows_f: list[tuple[int, ...] | None] = []
        rows_t: list[float | None] = []
        rows_r: list[str | None] = []
        rows_id: list[str | None] = []

        def add(video: str, frames: tuple[int, ...] | None, t: Fraction | None, reason: str | None, id_=None) -> None:
            rows_v.append(video)
            rows_f.append(frames)
            rows_t.append(None if t is None else float(t))
            rows_r.append(reason)
            rows_id.append(id_)

        sampled_times = fps is not None
        if times is not None:
            sampled_times = True
            table = read_times(times)
            by_name = {Path(p).name: p for p in paths} | {os.path.relpath(p, root): p for p in paths}
            for row in table:
                if row["video"] is None:
                    if len(paths) > 1:
                        raise LayertapError(f"{times}: several videos, so the table needs a 'video' column")
                    video = paths[0]
                else:
                    found = by_name.get(row["video"]) or by_name.get(Path(row["video"]).name)
                    if found is None:
                        raise LayertapError(f"{times}: video '{row['video']}' is not among the videos in {path}")
                    video = found
                info = infos[video]
                frames, reason = _frames_from(info, row["time"], T, fps, every)
                add(video, frames, row["time"], reason, row["id"])
        else:
            for video in paths:
                info = infos[video]
                if info.error:
                    add(video, None, None, info.error)
                    continue
                grid = frame_grid(info, fps, every)
                starts = range(0, len(grid) - T + 1, stride)
                if not starts:
                    add(video, None, None, f"shorter than one clip ({len(grid)} sampled frames < clip length {T})")
                    continue
                for s in starts:
                    add(video, tuple(i for i, _ in grid[s : s + T]), grid[s][1] if fps else None, None)
                dropped = len(grid) - (starts[-1] + T)
                if dropped and T > 1:
                    log.info("%s: the last %d sampled frames do not fill a clip and are left out", video, dropped)
        ids = rows_id if any(i is not None for i in rows_id) else None
        selection = {
            "video": {
                "decoder": decoder_description(),
                "sampling": {"fps": fps, "every": every, "times": str(Path(times).resolve()) if times else None},
                "clip_len": T if clip_mode else None,
                "clip_stride": stride if clip_mode else None,
                "videos": {os.path.relpath(p, root): infos[p].summary() for p in infos},
            }
        }
        return cls(
            paths=rows_v,
            root=root,
            layout="video-clips" if clip_mode else "video-frames",
            selection=selection,
            frames=rows_f,
            sample_times=rows_t if sampled_times else [None] * len(rows_v),
            reasons=rows_r,
            ids=ids,
            clip_mode=clip_mode,
            infos=infos,
        )

    def _take(self, idx: Sequence[int], **selection: Any) -> VideoSet:
        idx = list(idx)
        base = super()._take(idx, **selection)
        return replace(
            base,
            frames=[self.frames[i] for i in idx],
            sample_times=[self.sample_times[i] for i in idx],
            reasons=[self.reasons[i] for i in idx],
            ids=None if self.ids is None else [self.ids[i] for i in idx],
        )

    def fingerprint(self) -> str:
        """A hash of the rows (videos, frames, sample times, ids): resuming needs the same rows."""
        h = hashlib.sha256(json.dumps([self.paths, self.frames, self.sample_times, self.ids]).encode())
        return h.hexdigest()[:16]

    def row_fields(self, i: int) -> dict[str, Any]:
        """Row i's manifest fields beyond ``path`` (the video): frame index and presentation time
        (seconds from the first frame), and for clips first/last frame and start/end time."""
        out: dict[str, Any] = {}
        if self.ids is not None:
            out["id"] = self.ids[i]
        frames = self.frames[i]
        if self.sample_times[i] is not None:
            out["sample_time"] = self.sample_times[i]
        if frames is None:
            return out
        info = self.infos[self.paths[i]]
        times = info.times
        out["frame"] = frames[0]
        out["time"] = float(times[frames[0]])
        if self.clip_mode:
            last = frames[-1]
            out["frames"] = [frames[0], last]
            out["start"] = float(times[frames[0]])
            out["end"] = float(times[last + 1] if last + 1 < info.n_frames else info.end)
        return out

    def row_batches(self, transform: Callable[[Any], torch.Tensor]) -> torch.utils.data.Dataset:
        """Per batch of rows, per video, the needed frames decoded in one forward pass (see
        :meth:`ImageSet.iter_batches`: batch k always holds the same rows)."""
        return _DecodedVideo(self, transform)


def _frames_from(
    info: VideoInfo, t: Fraction, T: int, fps: float | None, every: int | None
) -> tuple[tuple[int, ...] | None, str | None]:
    """The T frames of a row sampled at time t (the frame shown then, then the next T-1 of the
    grid), or None and the reason."""
    if info.error:
        return None, info.error
    times = info.times
    if fps is not None:
        step = 1 / _as_fraction(fps)
        picks = [shown_at(times, t + k * step, info.end) for k in range(T)]
    else:
        first = shown_at(times, t, info.end)
        picks = [None if first is None else first + k * (every or 1) for k in range(T)]
        picks = [p if p is not None and p < info.n_frames else None for p in picks]
    if any(p is None for p in picks):
        what = "time" if T == 1 else "clip"
        return None, f"{what} at {float(t):g} s is past the end of the video ({float(info.end):g} s)"
    return tuple(picks), None  # type: ignore[arg-type]


def decoder_description() -> str:
    """The decoder, as manifests record it (PyAV and its libavcodec version).

    Returns:
        One line, e.g. ``PyAV 12.3.0 (libavcodec 61.3.100), frames converted to rgb24 by FFmpeg's swscale``.

    Example:
        >>> decoder_description().startswith("PyAV")
        True
    """
    try:
        import av

        ver = ".".join(map(str, av.library_versions.get("libavcodec", ())))
        return f"PyAV {av.__version__} (libavcodec {ver}), frames converted to rgb24 by FFmpeg's swscale"
    except ImportError:
        return "PyAV (not installed)"


@dataclass
class _Decoder:
    """An open video positioned somewhere: the next batch of the same video decodes on from it."""

    path: str
    container: Any
    frames: Iterator[Any]
    next: int = -1  # the frame index the decoder will produce next (-1: not known yet)


class _DecodedVideo(torch.utils.data.Dataset):
    """Decodes one batch of rows per item: per video, the needed frames in one forward pass."""

    def __init__(self, videos: VideoSet, transform: Callable[[Any], torch.Tensor]):
        self.v = videos
        self.transform = transform
        self._dec: _Decoder | None = None

    def __len__(self) -> int:
        return len(self.v)

    def __getitem__(self, rows: list[int]) -> list[tuple[int, torch.Tensor | None, str | None]]:
        results: dict[int, tuple[int, torch.Tensor | None, str | None]] = {}
        by_video: dict[str, list[int]] = {}
        for i in rows:
            if self.v.frames[i] is None:
                results[i] = (i, None, self.v.reasons[i] or "no frames")
            else:
                by_video.setdefault(self.v.paths[i], []).append(i)
        for path, idx in by_video.items():
            self._decode_rows(path, idx, results)
        return [results[i] for i in rows]

    def _decode_rows(self, path: str, rows: list[int], results: dict[int, Any]) -> None:
        """Decode the frames of ``rows`` (all of video ``path``) in one pass, building each row
        as soon as its last frame is there and dropping frames no later row needs."""
        pending: dict[int, tuple[int, ...]] = {i: self.v.frames[i] for i in rows}  # type: ignore[misc]
        wanted = sorted({f for fr in pending.values() for f in fr})
        kept: dict[int, np.ndarray] = {}
        reason = "frame not found when decoding (the video ends earlier than its index says, or is damaged)"
        try:
            for index, frame in self._frames(path, self.v.infos[path], wanted):
                kept[index] = frame
                for i in [i for i, fr in pending.items() if max(fr) == index]:
                    results[i] = self._row(i, [kept[f] for f in pending.pop(i)])
                low = min((min(fr) for fr in pending.values()), default=None)
                for f in [f for f in kept if low is None or f < low]:
                    del kept[f]
        except Exception as err:  # noqa: BLE001 - a damaged stream: its remaining rows become skips
            self._close()
            reason = f"cannot decode {Path(path).name}: {_reason(err)}"
        for i in pending:
            results[i] = (i, None, reason)

    def _row(self, i: int, frames: list[np.ndarray]) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            if self.v.clip_mode:
                if len({f.shape for f in frames}) > 1:
                    return i, None, "the frames of this clip differ in size (the video changes resolution)"
                clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
                return i, self.transform(clip), None

            return i, self.transform(Image.fromarray(frames[0], "RGB")), None
        except Exception as err:  # noqa: BLE001 - a transform failure is this row's skip reason
            return i, None, _reason(err)

    def _close(self) -> None:
        if self._dec is not None:
            try:
                self._dec.container.close()
            except Exception:  # noqa: BLE001 - closing a broken container: nothing left to do
                pass
            self._dec = None

    def _start(self, path: str, info: VideoInfo, first: int) -> None:
        """Open ``path`` and seek to the keyframe at or before frame ``first``."""
        self._close()
        container = _av().open(path)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if first > 0:
            container.seek(info.pts[first], stream=stream, backward=True, any_frame=False)
        self._dec = _Decoder(path, container, iter(container.decode(stream)))

    def _frames(self, path: str, info: VideoInfo, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame index, RGB array) for the sorted, distinct frames ``wanted``, decoding
        forward (from the nearest keyframe, or on from where the previous batch stopped)."""
        index_of = info.index_of
        dec = self._dec
        reuse = dec is not None and dec.path == path and 0 <= dec.next <= wanted[0] <= dec.next + _SEEK_GAP
        if not reuse:
            self._start(path, info, wanted[0])
        checked = reuse or wanted[0] == 0
        todo = iter(wanted)
        target = next(todo)
        while True:
            assert self._dec is not None
            frame = next(self._dec.frames, None)
            if frame is None:  # end of the stream
                self._close()
                return
            k = index_of.get(frame.pts if frame.pts is not None else frame.dts)
            if k is None:
                continue
            if not checked:
                checked = True
                if k > target:  # the seek landed past the frame (imprecise index): start over
                    self._start(path, info, 0)
                    continue
            self._dec.next = k + 1
            if k < target:
                continue
            if k > target:  # the wanted frame never came: the caller records the rest as skips
                return
            yield k, frame.to_ndarray(format="rgb24")
            following = next(todo, None)
            if following is None:
                return
            target = following
