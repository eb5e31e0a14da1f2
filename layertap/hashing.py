"""Content fingerprints recorded in manifests (weights files, response files)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, as hex, read in 1 MiB blocks (memory stays small for any file size).

    Args:
        path: the file.

    Returns:
        The 64-character hex digest.

    Example:
        >>> file_sha256("weights.pt")  # doctest: +SKIP
        'e3b0c442...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
