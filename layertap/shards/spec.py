"""Which shard a process extracts: ``--shard i/n``, ``LAYERTAP_SHARD``, a Slurm job array task, a torchrun rank.

A sharded extraction writes ``OUT/shards/<i>-of-<n>/`` (each an ordinary, resumable run) and is merged into
``OUT`` by :func:`layertap.shards.merge.merge_shards`, byte-identical to an unsharded run.
"""

from __future__ import annotations

import os
from pathlib import Path

from layertap.errors import LayertapError, option_name
from layertap.store.files import SHARDS


def parse_shard(text: str) -> tuple[int, int]:
    """Parse a shard written ``i/n`` (0-based ``i``: the i-th of ``n`` shards).

    Args:
        text: e.g. ``"0/4"``.

    Returns:
        ``(i, n)``.

    Raises:
        LayertapError: not of that form, or ``i`` not in ``0..n-1``.

    Example:
        >>> parse_shard("1/4")
        (1, 4)
    """
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise LayertapError(f"{option_name('shard')} must look like i/n (0-based), e.g. 0/4; got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise LayertapError(f"{option_name('shard')} {text}: i must be in 0..n-1")
    return i, n


def shard_from_env(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """The shard this process should take: ``LAYERTAP_SHARD``, a Slurm job array task, or a torchrun rank.

    Slurm: index = (SLURM_ARRAY_TASK_ID - MIN) / STEP, count = SLURM_ARRAY_TASK_COUNT (or
    (MAX - MIN) / STEP + 1). torchrun: RANK of WORLD_SIZE. A single task means no sharding.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        ``(index, count)``, or None when this process is not one of several.

    Example:
        >>> shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"})
        (3, 4)
        >>> shard_from_env({}) is None
        True
    """
    env = dict(os.environ if env is None else env)
    if env.get("LAYERTAP_SHARD"):
        return parse_shard(env["LAYERTAP_SHARD"])
    if "SLURM_ARRAY_TASK_ID" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            count = (int(env.get("SLURM_ARRAY_TASK_MAX", task)) - lo) // step + 1
        index = (task - lo) // step
        return (index, count) if count > 1 else None
    if int(env.get("WORLD_SIZE", 1)) > 1 and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return None


def resolve_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """The shard asked for, checked.

    Args:
        shard: None (not sharded), ``"auto"`` (from the environment: :func:`shard_from_env`), ``"i/n"`` or ``(i, n)``.

    Returns:
        ``(index, count)`` or None.

    Example:
        >>> resolve_shard((0, 2)), resolve_shard(None)
        ((0, 2), None)
    """
    if shard is None:
        return None
    if shard == "auto":
        return shard_from_env()
    if isinstance(shard, str):
        return parse_shard(shard)
    i, n = shard
    return parse_shard(f"{i}/{n}")


def shard_device() -> str:
    """Device for a shard process: ``LAYERTAP_DEVICE``, else cuda:LOCAL_RANK under torchrun, else auto.

    Returns:
        A device name for :func:`layertap.extract` (``"auto"`` lets it choose).

    Example:
        >>> shard_device()  # doctest: +SKIP
        'cuda:1'
    """
    if os.environ.get("LAYERTAP_DEVICE"):
        return os.environ["LAYERTAP_DEVICE"]
    import torch

    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return "auto"


def shard_dir(out: str | os.PathLike[str], index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` of the run ``out`` is written.

    Args:
        out: the run the shards merge into.
        index: the shard (0-based).
        count: the number of shards.

    Returns:
        ``out/shards/<index>-of-<count>`` (zero-padded, so that the names sort in shard order).

    Example:
        >>> shard_dir("acts", 1, 4).as_posix()
        'acts/shards/00001-of-00004'
    """
    return Path(out) / SHARDS / f"{index:05d}-of-{count:05d}"
