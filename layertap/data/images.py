"""Images: the ordered image set (:class:`ImageSet`), decoding to RGB, and the batch loader.

An :class:`ImageSet` knows paths, targets and class names, never models. Its order is
deterministic (sorted relative paths); subsets and shards keep that order. The loader decodes in
DataLoader worker processes; an image that cannot be decoded becomes a *skipped* record with its
reason, never an exception in the middle of a run (unless ``on_error="fail"``).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from layertap.errors import LayertapError, option_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
THINGS_TSV = "things_concepts.tsv"
#: background that transparent pixels are composited onto (stimuli are shown on white)
ALPHA_BACKGROUND = (255, 255, 255)
ORIENTATION = 0x0112  # the EXIF tag

log = logging.getLogger("layertap")


#: the set's own class (VideoSet, ArraySet), kept by methods that select rows
_Set = TypeVar("_Set", bound="ImageSet")


@dataclass
class ImageSet:
    """An ordered list of images with optional targets (class indices) and class names.

    Attributes:
        paths: absolute image paths, in the set's (deterministic) order.
        root: where they were found (manifests record paths relative to it).
        targets: class index per image (``targets[i]`` indexes ``classes``), or None.
        classes: class names (sorted class folder names), or None.
        layout: ``"flat"``, ``"class_folders"``, ``"things"``, ``"list"``, ... (how the set was found).
        concepts: class folder name -> THINGS concept word, when a ``things_concepts.tsv`` was found.
        selection: how the set was cut (fraction, seed, shard), recorded in the manifest.

    Example:
        >>> images = ImageSet(paths=["/img/a.jpg", "/img/b.jpg", "/img/c.jpg"])  # or ImageSet.from_path(folder)
        >>> half = images.shard(1, 2)
        >>> half.paths, half.selection
        (['/img/b.jpg', '/img/c.jpg'], {'shard': [1, 2], 'shard_offset': 1})
    """

    paths: list[str]
    root: str | None = None
    targets: list[int] | None = None
    classes: list[str] | None = None
    layout: str = "flat"
    concepts: dict[str, str] | None = None
    selection: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, things: bool = False) -> ImageSet:
        """A folder (flat or class subfolders, THINGS recognised) or a .txt/.csv file list."""
        p = Path(path)
        if not p.exists():
            raise LayertapError(f"image path not found: {p}")
        if p.is_file():
            if things:
                raise LayertapError(f"{option_name('things')} needs an image folder (images/<concept>/<image>.jpg), not a file list")
            return cls.from_file_list(p)
        return cls.from_folder(p, things=things)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], *, things: bool = False) -> ImageSet:
        root = Path(folder).resolve()
        found, special = _scan_images(root)
        if special:
            # A FIFO, socket or device named like an image would block (or never end) the decoder.
            log.warning(
                "skipping %d entries that are not regular files (e.g. %s)",
                len(special),
                Path(special[0]).relative_to(root).as_posix(),
            )
        if not found:
            raise LayertapError(
                f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in it and its subfolders)"
            )
        rel = sorted(p.relative_to(root).as_posix() for p in found)
        paths = [str(root / r) for r in rel]
        if all("/" in r for r in rel):
            # Every image sits in a subfolder: the first path component is its class.
            class_of = [r.split("/", 1)[0] for r in rel]
            classes = sorted(set(class_of))
            index = {c: i for i, c in enumerate(classes)}
            concepts = _find_things_concepts(root, classes, required=things)
            return cls(
                paths=paths,
                root=str(root),
                targets=[index[c] for c in class_of],
                classes=classes,
                layout="things" if concepts is not None else "classes",
                concepts=concepts,
            )
        if things:
            raise LayertapError(
                f"{option_name('things')} expects images/<concept>/<image>.jpg, but {root} has images at its top level"
            )
        return cls(paths=paths, root=str(root))

    @classmethod
    def from_file_list(cls, list_file: str | os.PathLike[str]) -> ImageSet:
        """A ``.txt`` (one path per line) or ``.csv`` (a ``path`` column, optional ``class``/``label``
        /``target`` column). Relative paths are relative to the list file's folder; order is kept."""
        lf = Path(list_file).resolve()
        base = lf.parent
        labels: list[str] | None = None
        text = _read_utf8(lf)
        if lf.suffix.lower() in (".csv", ".tsv"):
            reader = csv.DictReader(
                io.StringIO(text, newline=""), delimiter="\t" if lf.suffix.lower() == ".tsv" else ","
            )
            cols = {c.lower().strip(): c for c in reader.fieldnames or []}
            pcol = next((cols[c] for c in ("path", "file", "filename", "image") if c in cols), None)
            if pcol is None:
                raise LayertapError(f"{lf} has no 'path' column (columns: {', '.join(cols.values())})")
            lcol = next((cols[c] for c in ("class", "label", "target", "category") if c in cols), None)
            rows = list(reader)
            entries = [(r[pcol] or "").strip() for r in rows]
            if lcol is not None:
                # A short row gives None, an empty cell "": neither is a class (it used to become "None").
                labels = [(r[lcol] or "").strip() for r in rows]
                unlabeled = [i + 2 for i, label in enumerate(labels) if not label]  # +2: header, 1-based
                if unlabeled:
                    rows_text = ", ".join(map(str, unlabeled[:5])) + (", ..." if len(unlabeled) > 5 else "")
                    raise LayertapError(
                        f"{lf}: {len(unlabeled)} row(s) have an empty '{lcol}' (line {rows_text}); give every "
                        f"image a class, or remove the '{lcol}' column to extract without classes"
                    )
        else:
            lines = io.StringIO(text, newline=None)  # universal newlines, as open() in text mode
            entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not entries:
            raise LayertapError(f"the image list {lf} is empty")
        paths = [str((base / e).resolve()) if not os.path.isabs(e) else e for e in entries]
        if labels is None:
            return cls(paths=paths, root=str(base), layout="list")
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
        return cls(paths=paths, root=str(base), targets=[index[c] for c in labels], classes=classes, layout="list")

    def _take(self: _Set, idx: Sequence[int], **selection: Any) -> _Set:
        return replace(
            self,
            paths=[self.paths[i] for i in idx],
            targets=None if self.targets is None else [self.targets[i] for i in idx],
            selection={**self.selection, **selection},
        )

    def subset(self: _Set, fraction: float, seed: int = 0) -> _Set:
        """A reproducible random ``fraction`` of the images, kept in the set's order."""
        if not 0 < fraction <= 1:
            raise LayertapError(f"{option_name('fraction')} must be in (0, 1], got {fraction}")
        if fraction == 1:
            return self
        n = max(1, round(len(self) * fraction))
        pick = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self._take(pick.tolist(), fraction=fraction, fraction_seed=seed)

    def shard(self: _Set, index: int, count: int, align: int = 1) -> _Set:
        """The ``index``-th of ``count`` disjoint, contiguous slices of the order (0-based).

        Slices are cut at multiples of ``align`` (the batch size), so every shard computes
        exactly the batches an unsharded run computes: merged shards are byte-identical to it.
        """
        if not 0 <= index < count:
            raise LayertapError(f"shard index must be in 0..{count - 1}, got {index}")
        blocks = -(-len(self) // align)
        lo = min(len(self), blocks * index // count * align)
        hi = min(len(self), blocks * (index + 1) // count * align)
        return self._take(range(lo, hi), shard=[index, count], shard_offset=lo)

    def relpath(self, path: str) -> str:
        if self.root and os.path.commonpath([self.root, path]) == self.root:
            return Path(path).relative_to(self.root).as_posix()
        return path

    def class_name(self, i: int) -> str | None:
        return None if self.targets is None or self.classes is None else self.classes[self.targets[i]]

    def fingerprint(self) -> str:
        """A hash of the ordered paths and targets: two runs over the same set agree on it."""
        h = hashlib.sha256(json.dumps([self.paths, self.targets]).encode())
        return h.hexdigest()[:16]

    def row_batches(self, transform: Callable[[Any], torch.Tensor]) -> torch.utils.data.Dataset | None:
        """For sets that decode their own rows (videos, arrays): a dataset whose item is a whole batch of
        row indices, decoded in one pass. None (here): each of ``paths`` is decoded on its own."""
        return None

    def iter_batches(
        self,
        transform: Callable[[Any], torch.Tensor],
        batch_size: int,
        *,
        start: int = 0,
        workers: int | None = None,
        pin_memory: bool = False,
        exif_transpose: bool = True,
        draft: int | None = None,
    ) -> Iterator[Batch]:
        """The set's batches from row ``start`` on, decoded in ``workers`` processes, in order.

        Args:
            transform: one RGB image -> input tensor.
            batch_size: rows per batch; batch k always holds the same rows (resumes see the same batches).
            start: the first row (a batch boundary when resuming).
            workers: decode processes (None: :func:`default_workers`; 0: in this process).
            pin_memory: pin the batches for faster copies to a GPU.
            exif_transpose, draft: for image files, see :func:`iter_batches` (sets that decode their own
                rows ignore them).

        Returns:
            An iterator of :class:`Batch` objects.

        Example:
            >>> batches = ImageSet(paths=["/img/a.jpg"]).iter_batches(model.transform, 64)  # doctest: +SKIP
        """
        rows = self.row_batches(transform)
        if rows is not None:
            return _loader(rows, len(self), batch_size, start, workers, pin_memory, whole_batches=True)
        return iter_batches(
            self.paths,
            transform,
            batch_size,
            start=start,
            workers=workers,
            pin_memory=pin_memory,
            exif_transpose=exif_transpose,
            draft=draft,
        )


def _read_utf8(path: Path) -> str:
    """A list file's text (UTF-8, a byte-order mark allowed), or a one-line error saying how to fix it."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LayertapError(f"cannot read the image list {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise LayertapError(
            f"the image list {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
            f"save it as UTF-8, or point {option_name('images')} at the image folder instead"
        ) from None


def _scan_images(root: Path) -> tuple[list[Path], list[str]]:
    """Image files under ``root`` (symlinks followed, hidden entries and symlink loops skipped).

    Returns (files, special): ``special`` lists entries with an image extension that exist but
    are not regular files (FIFOs, sockets, devices). A broken symlink stays in ``files``: it
    becomes a skip record with its reason rather than vanishing from the run.
    """
    found: list[Path] = []
    special: list[str] = []
    seen: set[str] = set()
    pending = [str(root)]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop (or a second link to a folder already listed)
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError as err:  # an unreadable subfolder: say so, keep the rest (as os.walk does)
            log.warning("cannot list %s: %s", folder, err.strerror or err)
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    subdirs.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    # is_file() reads the directory entry's type: no extra system call per image
                    if entry.is_file() or not os.path.exists(entry.path):
                        found.append(Path(entry.path))
                    else:
                        special.append(entry.path)
            except OSError:
                found.append(Path(entry.path))  # cannot even stat it: the decoder records why
        # depth first in sorted order (as os.walk): of two links to one folder, the first in that order names it
        pending.extend(sorted(subdirs, reverse=True))
    return found, special


def _find_things_concepts(root: Path, classes: list[str], required: bool) -> dict[str, str] | None:
    """Read THINGS' ``things_concepts.tsv`` next to, above, or in ``data/`` beside the images."""
    candidates = [
        root / THINGS_TSV,
        root.parent / THINGS_TSV,
        root.parent / "data" / THINGS_TSV,
        Path("data") / THINGS_TSV,
    ]
    tsv = next((c for c in candidates if c.is_file()), None)
    if tsv is None:
        if required:
            raise LayertapError(
                f"--things: {THINGS_TSV} not found; put it in {root}, {root.parent} or {root.parent / 'data'}"
            )
        return None
    with open(tsv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise LayertapError(f"{tsv} is empty")
    cols = {c.lower(): c for c in rows[0]}
    id_col = next((cols[c] for c in ("uniqueid", "unique id", "concept", "id") if c in cols), None)
    word_col = next((cols[c] for c in ("word", "concept name", "name") if c in cols), None)
    if id_col is None or word_col is None:
        raise LayertapError(f"{tsv}: expected 'uniqueID' and 'Word' columns, found {', '.join(rows[0])}")
    words = {r[id_col].strip(): r[word_col].strip() for r in rows}
    return {c: words.get(c, c) for c in classes}


# ---------------------------------------------------------------------------------------------
# Decoding

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not silently grey pixels


def load_rgb(path: str, exif_transpose: bool = True, draft: int | None = None) -> Image.Image:
    """Decode any supported image to 8-bit RGB.

    Grayscale and palette images are expanded; 16-bit images are scaled to 8 bits (not clipped); CMYK is converted
    by PIL; transparent pixels are composited onto white. Decompression bombs (more than twice PIL's
    ``MAX_IMAGE_PIXELS``, i.e. above ~179 megapixels by default) raise ``PIL.Image.DecompressionBombError``; smaller
    images are decoded. A path that is not a regular file (a FIFO, a socket, a device) raises ``OSError`` instead
    of blocking.

    Args:
        path: the image file.
        exif_transpose: apply the EXIF orientation (the photo as a viewer shows it).
        draft: opt-in (see :func:`draft_size`): let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale as long as both
            sides stay >= ``draft`` pixels. Faster for large photos (bench/RESULTS.md), but the pixels differ
            slightly from a full decode followed by the same resize.

    Returns:
        The RGB image.

    Example:
        >>> load_rgb("tests/data/images/cat.png").mode  # doctest: +SKIP
        'RGB'
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the worker forever
        raise OSError("not a regular file (a FIFO, socket or device)")
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that:
        # images between the two are decoded (the warning would only spam the log).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            # exif_transpose copies the whole image even when there is nothing to do: check first
            if exif_transpose and img.getexif().get(ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (the conversion rules of :func:`load_rgb`).

    Args:
        img: the decoded image, in any mode.

    Returns:
        ``img`` itself when it is RGB already, else an RGB copy.

    Example:
        >>> to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0))
        (255, 255, 255)
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255 exactly
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass
class Batch:
    """A decoded batch: ``images`` (B, C, H, W) for the dataset rows ``indices``; ``failed`` lists
    (index, reason) for images of this batch that could not be decoded.

    Example:
        >>> batch = next(iter_batches(paths, transform, batch_size=8))  # doctest: +SKIP
        >>> batch.images.shape[0] + len(batch.failed) == len(batch.indices) + len(batch.failed)  # doctest: +SKIP
    """

    images: torch.Tensor
    indices: list[int]
    failed: list[tuple[int, str]]
    #: (index, shape) of two images whose transformed tensors differ in shape (then nothing is stacked)
    mixed_shapes: list[tuple[int, tuple[int, ...]]] | None = None


def draft_size(transform: Any) -> int | None:
    """The shorter-side size a transform resizes to first (what reduced JPEG decoding may keep).

    Args:
        transform: a model's transform (torchvision ``Compose``/``Resize`` are read).

    Returns:
        The size, or None when it cannot be read off the transform (then nothing is drafted).

    Example:
        >>> from torchvision import transforms as T
        >>> draft_size(T.Compose([T.Resize(256), T.CenterCrop(224)]))
        256
    """
    size = getattr(transform, "resize_size", None)  # torchvision's weight presets
    if size is None:
        from torchvision import transforms as T

        for t in getattr(transform, "transforms", []):
            if isinstance(t, T.Resize):
                size = t.size
                break
    if size is None:
        return None
    values = [size] if isinstance(size, int) else list(size)
    return int(max(values)) if values else None


class _Decoded(torch.utils.data.Dataset):
    def __init__(
        self,
        paths: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        exif_transpose: bool,
        draft: int | None = None,
    ):
        self.paths, self.transform, self.exif_transpose, self.draft = paths, transform, exif_transpose, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_rgb(self.paths[i], self.exif_transpose, self.draft)), None
        except Exception as err:  # noqa: BLE001 - every decode failure becomes a skip record
            return i, None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, e or "unknown error") for i, t, e in items if t is None]
    if not ok:
        return Batch(images=torch.empty(0), indices=[], failed=failed)
    first = ok[0][1]
    odd = next(((i, t) for i, t in ok if t.shape != first.shape), None)
    if odd is not None:  # the main process says so in one line (raising here would print a worker traceback)
        pair = [(ok[0][0], tuple(first.shape)), (odd[0], tuple(odd[1].shape))]
        return Batch(images=torch.empty(0), indices=[], failed=failed, mixed_shapes=pair)
    images = torch.empty((len(ok), *first.shape), dtype=first.dtype)
    if torch.utils.data.get_worker_info() is not None:
        # Stack straight into shared memory: sending a batch to the main process then moves no
        # bytes, and the worker never holds the batch twice.
        images.share_memory_()
    torch.stack([t for _, t in ok], out=images)
    return Batch(images=images, indices=[i for i, _ in ok], failed=failed)


def default_workers() -> int:
    """One decode worker per spare core, at most 8 (the model wants the rest of the machine).

    Returns:
        The number of worker processes ``workers=None`` means.

    Example:
        >>> default_workers() >= 0
        True
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n - 1))


def iter_batches(
    paths: list[str],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    *,
    start: int = 0,
    workers: int | None = None,
    pin_memory: bool = False,
    exif_transpose: bool = True,
    draft: int | None = None,
) -> Iterator[Batch]:
    """Batches of ``paths[start:]``, decoded in ``workers`` processes, in order.

    Batch ``k`` always holds ``paths[start + k*batch_size : start + (k+1)*batch_size]`` (minus failures), so a
    resumed run that starts at a batch boundary sees the very same batches.

    Args:
        paths: the image files.
        transform: one RGB image -> input tensor.
        batch_size: images per batch.
        start: the first row (a batch boundary when resuming).
        workers: decode processes (None: :func:`default_workers`; 0: in this process).
        pin_memory: pin the batches for faster copies to a GPU.
        exif_transpose: apply EXIF orientation.
        draft: see :func:`load_rgb`.

    Yields:
        :class:`Batch` objects, in order.

    Example:
        >>> for batch in iter_batches(paths, model.transform, 64, workers=0):  # doctest: +SKIP
        ...     feats = model.module(batch.images)
    """
    return _loader(_Decoded(paths, transform, exif_transpose, draft), len(paths), batch_size, start, workers, pin_memory)


def _loader(
    dataset: torch.utils.data.Dataset,
    n: int,
    batch_size: int,
    start: int,
    workers: int | None,
    pin_memory: bool,
    *,
    whole_batches: bool = False,
) -> Iterator[Batch]:
    """Rows ``start:n`` of ``dataset`` in batches of ``batch_size`` row indices, decoded in ``workers`` processes,
    in order (batch k always holds the same rows). ``whole_batches``: the dataset's item is a whole batch of
    row indices (videos, arrays: one decoding pass per batch), else one row."""
    batches = [list(range(lo, min(lo + batch_size, n))) for lo in range(start, n, batch_size)]
    nw = min(default_workers() if workers is None else workers, len(batches))
    sampling: dict[str, Any] = {"batch_size": None, "sampler": batches} if whole_batches else {"batch_sampler": batches}
    loader = torch.utils.data.DataLoader(
        dataset,
        num_workers=nw,
        collate_fn=_collate,
        pin_memory=pin_memory,
        # Two batches ahead per worker absorb slow images when decoding is as costly as the model;
        # more only costs memory.
        prefetch_factor=2 if nw > 0 else None,
        **sampling,
    )
    # Forked workers share the heap copy-on-write; frozen objects are never touched by their garbage
    # collector (~70 MB less per worker). Unfrozen as soon as the workers exist: the caller's own
    # garbage stays collectable.
    gc.collect()
    gc.freeze()
    try:
        batches_iter = iter(loader)  # forks the workers
    finally:
        gc.unfreeze()
    yield from batches_iter
