"""The files of a run directory and how they are written: atomically, fsynced, one-line errors.

Layout of a run directory::

    manifest.json        what was run (model, weights, transform, layers, images, options) + status
    progress.json        the resume cursor: rows committed and the image position they reach
    arrays/<layer>/      one Zarr array per layer, rows = images in manifest order
    checksums.tsv        CRC-32 of each chunk, appended when it is committed
    damaged.json         chunks that verify found damaged (until the extract command repairs them)
    shards/<i>-of-<n>/   the shard runs of a sharded extraction (each an ordinary run), merged into the run
    .lock                locked (fcntl.lockf) by the process writing the run
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from layertap.errors import LayertapError, StorageError

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = "arrays"
LOCK = ".lock"
CHECKSUMS = "checksums.tsv"
#: chunks that ``verify`` found damaged (checksum mismatch): opening refuses them, re-running repairs them
DAMAGED = "damaged.json"
#: where a sharded extraction writes its shard runs, under the run it merges into
SHARDS = "shards"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (new or renamed files) survive a power loss.

    Args:
        path: the directory (file systems that cannot fsync a directory are let be).

    Example:
        >>> fsync_dir(Path("."))
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. a file system that cannot open directories: nothing more can be done
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # directories that cannot be fsynced
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the content of file ``path`` survive a power loss (fsync it).

    Args:
        path: the file (written and closed by zarr or another writer).

    Example:
        >>> fsync_file(Path("run/arrays/fc/c.0.0"))  # doctest: +SKIP
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new file, never half (the
    file is fsynced before the rename; see :func:`write_json_atomic` for the directory too).

    Args:
        path: the file to replace (``path.tmp`` is written first).
        text: its new content (UTF-8).

    Example:
        >>> write_text_atomic(Path("run/notes.txt"), "hello\\n")  # doctest: +SKIP
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers (and a resumed run) see the old or the new file, never half,
    also after a power loss (the file and then its directory entry are fsynced).

    Args:
        path: the file to replace.
        obj: a JSON-able object (written indented).

    Example:
        >>> write_json_atomic(Path("run/progress.json"), {"rows": 0})  # doctest: +SKIP
    """
    write_text_atomic(path, json.dumps(obj, indent=1))
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    """Read a JSON file (UTF-8).

    Args:
        path: the file.

    Returns:
        Its value; errors (missing, undecodable) are raised as they are.

    Example:
        >>> read_json(Path("run/progress.json"))  # doctest: +SKIP
        {'rows': 4, 'next_image': 4, 'skipped': []}
    """
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_run_json(path: Path, fix: str) -> dict[str, Any]:
    """Read a run's JSON file (manifest or cursor); a damaged one is one error that says ``fix``.

    Args:
        path: the file.
        fix: what the user can do about it, appended to the message.

    Returns:
        The JSON object.

    Raises:
        LayertapError: unreadable, not JSON, or not a JSON object (one line, ending with ``fix``).

    Example:
        >>> read_run_json(Path("run/progress.json"), "re-run the extract command")  # doctest: +SKIP
        {'rows': 4, 'next_image': 4, 'skipped': []}
    """
    try:
        obj = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = str(err).splitlines()[0][:80] if str(err) else type(err).__name__
        raise StorageError(f"{path} is damaged ({reason}); {fix}") from None
    if not isinstance(obj, dict):
        raise StorageError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object); {fix}")
    return obj


def disk_error(err: OSError, where: Path) -> LayertapError:
    """Turn an OS write failure into a one-line error that says the run can be resumed.

    Args:
        err: the failure.
        where: the file or directory being written.

    Returns:
        The error to raise (``raise disk_error(err, path) from None``).

    Example:
        >>> import errno
        >>> str(disk_error(OSError(errno.ENOSPC, "No space left"), Path("run")))[:30]
        'disk full while writing run: f'
    """
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageError(
            f"disk full while writing {where}: free space and run the same command again to resume "
            "(everything written so far is kept)")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return StorageError(f"cannot write to {where} ({err.strerror}): choose a writable --out")
    return StorageError(f"cannot write {where}: {err.strerror or err}")
