"""Beyond one process: shards from Slurm job arrays / torchrun / ``--shard``, sbatch scripts, a launcher.

A sharded extraction writes ``OUT/shards/<i>-of-<n>/`` (each an ordinary, resumable run) and is
merged into ``OUT`` by :func:`layertap.storage.merge_shards`, byte-identical to an unsharded run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from layertap.errors import LayertapError

SHARDS = "shards"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0-based i) -> (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise LayertapError(f"--shard must look like i/n (0-based), e.g. 0/4; got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise LayertapError(f"--shard {text}: i must be in 0..n-1")
    return i, n


def shard_from_env(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """The shard this process should take: ``LAYERTAP_SHARD``, a Slurm job array task, or a torchrun rank.

    Slurm: index = (SLURM_ARRAY_TASK_ID - MIN) / STEP, count = SLURM_ARRAY_TASK_COUNT (or
    (MAX - MIN) / STEP + 1). torchrun: RANK of WORLD_SIZE. A single task means no sharding.
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
    if shard is None:
        return None
    if shard == "auto":
        return shard_from_env()
    if isinstance(shard, str):
        return parse_shard(shard)
    i, n = shard
    return parse_shard(f"{i}/{n}")


def shard_device() -> str:
    """Device for a shard process: ``LAYERTAP_DEVICE``, else cuda:LOCAL_RANK under torchrun, else auto."""
    if os.environ.get("LAYERTAP_DEVICE"):
        return os.environ["LAYERTAP_DEVICE"]
    import torch

    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return "auto"


def shard_dir(out: str | os.PathLike[str], index: int, count: int) -> Path:
    return Path(out) / SHARDS / f"{index:05d}-of-{count:05d}"


def _layertap_command() -> list[str]:
    return [sys.executable, "-m", "layertap"]


#: extract options whose value is always a path, and those whose value is a path when it exists
_PATH_OPTIONS = ("--images", "--in_path", "-i", "--out", "--out_path", "-o")
_MAYBE_PATH_OPTIONS = ("--weights", "--model_path", "--model-path", "--option")
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
    hf:DIR, and --option values that name existing files. Batch jobs start in another directory.

    Args:
        extract_args: the arguments, as given after ``layertap slurm ... --``.
        base: the directory relative paths are relative to.

    Returns:
        The same arguments, paths absolute (``--opt=value`` forms included).
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
    """
    if shards < 1:
        raise LayertapError("--shards must be at least 1")
    extract_args = absolute_paths(extract_args)
    dest = Path(script_dir) if script_dir else Path(out) / "slurm"
    (dest / "logs").mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    exe = " ".join(shlex.quote(c) for c in _layertap_command())
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


def launch(extract_args: list[str], devices: list[str], out: str | os.PathLike[str]) -> int:
    """One extraction process per device on this machine, each a shard; merge when all succeed.

    Returns the exit code: 0 when every shard succeeded and the merge is done.
    """
    from layertap.store.run import merge_shards

    n = len(devices)
    procs = []
    for i, dev in enumerate(devices):
        env = {**os.environ, "LAYERTAP_SHARD": f"{i}/{n}", "LAYERTAP_DEVICE": dev}
        procs.append(subprocess.Popen([*_layertap_command(), "extract", *extract_args, "--no-merge", "-q"], env=env))
    codes = [p.wait() for p in procs]
    failed = [f"{i} ({devices[i]}): exit {c}" for i, c in enumerate(codes) if c != 0]
    if failed:
        raise LayertapError(
            f"shard(s) failed: {'; '.join(failed)}; run the same launch again to resume them", exit_code=1
        )
    merge_shards(out)
    return 0
