"""Slurm: sbatch scripts for a sharded extraction (a job array of shards, then a merge job).

Each array task runs ``layertap extract ... --no-merge`` and finds its shard in ``SLURM_ARRAY_TASK_ID``
(:func:`layertap.shards.spec.shard_from_env`); the merge job runs ``layertap merge``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from layertap.errors import LayertapError
from layertap.shards.launch import layertap_command

#: extract options whose value is always a path, and those whose value is a path when it exists
_PATH_OPTIONS = ("--images", "--in_path", "-i", "--out", "--out_path", "-o")
_MAYBE_PATH_OPTIONS = ("--weights", "--model_path", "--model-path", "--option", "--times", "--ids")
_MODEL_OPTIONS = ("--model", "--model_name", "-m")
_CUSTOM_MODEL = re.compile(r"^(?P<prefix>(custom:)?)(?P<file>.+\.py):(?P<factory>[A-Za-z_]\w*)$")


def _absolute(value: str, option: str, base: Path) -> str:
    """``value`` of ``option`` with any relative path in it made absolute against ``base``."""

    def resolve(path: str) -> str:
        return str((base / Path(path).expanduser()).resolve())

    if option in _PATH_OPTIONS:
        return resolve(value)
    if option in _MODEL_OPTIONS:
        m = _CUSTOM_MODEL.match(value)
        if m:  # your own model file: path/to/net.py:factory
            return f"{m['prefix']}{resolve(m['file'])}:{m['factory']}"
        src, sep, rest = value.partition(":")
        if sep and src == "hf" and (base / rest).exists():  # a local Hugging Face model folder
            return f"hf:{resolve(rest)}"
        return value
    if option == "--option":  # KEY=VALUE: the value may be a file (a config, a list)
        key, sep, v = value.partition("=")
        return f"{key}={resolve(v)}" if sep and v and (base / v).exists() and not Path(v).is_absolute() else value
    if value not in ("pretrained", "random") and (base / value).exists():  # --weights FILE (else an id)
        return resolve(value)
    return value


def absolute_paths(extract_args: list[str], base: str | os.PathLike[str] | None = None) -> list[str]:
    """``layertap extract`` arguments with every relative path made absolute (against ``base``, default
    the current directory): --images, --out, --weights/--model_path FILE, --model file.py:factory or
    hf:DIR, and --option, --times and --ids values that name existing files. Batch jobs start in another directory.

    Args:
        extract_args: the arguments, as given after ``layertap slurm ... --``.
        base: the directory relative paths are relative to.

    Returns:
        The same arguments, paths absolute (``--opt=value`` forms included).

    Example:
        >>> absolute_paths(["--images", "imgs", "--layers", "fc"], base="/proj")
        ['--images', '/proj/imgs', '--layers', 'fc']
    """
    root = Path(base or os.getcwd())
    out: list[str] = []
    pending: str | None = None  # the option whose value comes next
    for arg in extract_args:
        if pending is not None:
            out.append(_absolute(arg, pending, root))
            pending = None
            continue
        name, eq, value = arg.partition("=")
        options = (*_PATH_OPTIONS, *_MAYBE_PATH_OPTIONS, *_MODEL_OPTIONS)
        if eq and name in options and name.startswith("--"):
            out.append(f"{name}={_absolute(value, name, root)}")
        else:
            out.append(arg)
            pending = arg if arg in options else None
    return out


def write_slurm_scripts(
    extract_args: list[str],
    out: str | os.PathLike[str],
    shards: int,
    *,
    script_dir: str | os.PathLike[str] | None = None,
    cpus_per_task: int = 4,
    mem: str = "16G",
    time: str = "04:00:00",
    partition: str | None = None,
    account: str | None = None,
    gpus_per_task: int = 0,
    setup: str | None = None,
    job_name: str = "layertap",
) -> dict[str, Path]:
    """Write ``extract.sbatch`` (a job array of ``shards`` tasks), ``merge.sbatch`` and ``submit.sh``.

    ``submit.sh`` submits the array and a merge job that runs once every task has succeeded
    (``--dependency=afterok``). Edit the scripts freely; each task resumes if resubmitted.
    Relative paths in ``extract_args`` are made absolute now (:func:`absolute_paths`), and the jobs
    run in the current directory (``--chdir``), because Slurm starts them where ``submit.sh`` is.

    Args:
        extract_args: ``layertap extract`` arguments (``--out`` among them).
        out: the run the shards merge into.
        shards: array tasks (one shard each).
        script_dir: where the scripts go (default ``out/slurm``; logs in its ``logs/``).
        cpus_per_task: ``--cpus-per-task`` of each extraction task.
        mem: ``--mem`` of each job.
        time: ``--time`` of each job.
        partition: ``--partition``, if any.
        account: ``--account``, if any.
        gpus_per_task: GPUs per extraction task (``--gres=gpu:N``; 0: none).
        setup: a shell line run first in every job (e.g. ``module load cuda``).
        job_name: prefix of the job names.

    Returns:
        ``{"extract.sbatch": path, "merge.sbatch": path, "submit.sh": path}``.

    Raises:
        LayertapError: ``shards`` < 1.

    Example:
        >>> paths = write_slurm_scripts(["--model", "resnet18", "--images", "imgs", "--out", "acts"], "acts", 8)  # doctest: +SKIP
        >>> paths["submit.sh"]  # doctest: +SKIP
        PosixPath('acts/slurm/submit.sh')
    """
    if shards < 1:
        raise LayertapError("--shards must be at least 1")
    extract_args = absolute_paths(extract_args)
    dest = Path(script_dir) if script_dir else Path(out) / "slurm"
    (dest / "logs").mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    exe = " ".join(shlex.quote(c) for c in layertap_command())
    common = [f"#SBATCH --time={time}", f"#SBATCH --mem={mem}", f"#SBATCH --chdir={os.getcwd()}"]
    if partition:
        common.append(f"#SBATCH --partition={partition}")
    if account:
        common.append(f"#SBATCH --account={account}")
    prelude = ["set -euo pipefail", *([setup] if setup else [])]
    # No -q: each task's log then says what it stored (images, rows, seconds); no progress bar off a terminal.
    extract_cmd = f"{exe} extract {' '.join(shlex.quote(a) for a in extract_args)} --no-merge"
    extract = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}-extract",
        f"#SBATCH --array=0-{shards - 1}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        *([f"#SBATCH --gres=gpu:{gpus_per_task}"] if gpus_per_task else []),
        *common,
        f"#SBATCH --output={dest}/logs/extract-%A_%a.out",
        "# Each array task extracts its own slice (from SLURM_ARRAY_TASK_ID) into OUT/shards/; a task that",
        "# fails or is cancelled resumes where it stopped when resubmitted (sbatch --array=<ids> extract.sbatch).",
        *prelude,
        f"exec {extract_cmd}",
    ]
    merge = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}-merge",
        "#SBATCH --cpus-per-task=1",
        *common,
        f"#SBATCH --output={dest}/logs/merge-%j.out",
        *prelude,
        f"exec {exe} merge {shlex.quote(str(Path(out).resolve()))}",
    ]
    submit = [
        "#!/bin/bash",
        "# Submit the extraction array, then the merge job that waits for every task to succeed.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(dest))}",
        "array=$(sbatch --parsable extract.sbatch)",
        "array=${array%%;*}",
        'merge=$(sbatch --parsable --dependency=afterok:"$array" merge.sbatch)',
        'echo "submitted extraction array $array and merge job ${merge%%;*}"',
    ]
    paths = {}
    for name, lines in (("extract.sbatch", extract), ("merge.sbatch", merge), ("submit.sh", submit)):
        path = dest / name
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        paths[name] = path
    return paths
