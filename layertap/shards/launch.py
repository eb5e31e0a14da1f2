"""Launching a sharded extraction on this machine: one process per device, each a shard, then the merge."""

from __future__ import annotations

import os
import subprocess
import sys

from layertap.errors import JobFailedError
from layertap.shards.merge import merge_shards


def layertap_command() -> list[str]:
    """The command that runs this layertap (this Python, ``-m layertap``), for child processes and batch jobs.

    Returns:
        The argv prefix.

    Example:
        >>> layertap_command()[1:]
        ['-m', 'layertap']
    """
    return [sys.executable, "-m", "layertap"]


def launch(extract_args: list[str], devices: list[str], out: str | os.PathLike[str]) -> int:
    """One extraction process per device on this machine, each a shard; merge when all succeed.

    Args:
        extract_args: ``layertap extract`` arguments (the same for every shard; ``--out`` among them).
        devices: one device per process, e.g. ``["cuda:0", "cuda:1"]``.
        out: the run the shards merge into (the ``--out`` of ``extract_args``).

    Returns:
        The exit code: 0 when every shard succeeded and the merge is done.

    Raises:
        LayertapError: a shard failed (running the same launch again resumes it).

    Example:
        >>> launch(["--model", "resnet18", "--images", "imgs", "--out", "acts"], ["cuda:0", "cuda:1"], "acts")  # doctest: +SKIP
        0
    """
    n = len(devices)
    procs = []
    for i, dev in enumerate(devices):
        env = {**os.environ, "LAYERTAP_SHARD": f"{i}/{n}", "LAYERTAP_DEVICE": dev}
        procs.append(subprocess.Popen([*layertap_command(), "extract", *extract_args, "--no-merge", "-q"], env=env))
    codes = [p.wait() for p in procs]
    failed = [f"{i} ({devices[i]}): exit {c}" for i, c in enumerate(codes) if c != 0]
    if failed:
        raise JobFailedError(
            f"shard(s) failed: {'; '.join(failed)}; run the same launch again to resume them")
    merge_shards(out)
    return 0
