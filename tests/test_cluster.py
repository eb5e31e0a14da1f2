"""Shards, merge (byte-identical to an unsharded run), simulated and real Slurm job arrays, the launcher."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_class_folder, photo
from PIL import Image

import layertap as lt
import layertap.shards.merge as lt_store
from layertap.shards.slurm import write_slurm_scripts
from layertap.shards.spec import shard_from_env

ARGS = [
    "--model",
    "alexnet",
    "--weights",
    "random",
    "--seed",
    "3",
    "--layers",
    "features.5",
    "classifier.4",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--dtype",
    "bfloat16",
]


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 images in 3 classes, two of them corrupt (so shards carry skipped images)."""
    root = tmp_path_factory.mktemp("stimuli")
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    for i in range(30):
        d = root / f"class{i % 3}"
        d.mkdir(exist_ok=True)
        Image.fromarray(photo(names[i % 4], seed=i, size=(90, 70))).save(d / f"im{i:02d}.jpg", quality=90)
    (root / "class1" / "im04.jpg").write_bytes(b"")
    (root / "class2" / "im20.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def unsharded(stimuli: Path, tmp_path_factory: pytest.TempPathFactory) -> lt.Run:
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(
        [sys.executable, "-m", "layertap", "extract", *ARGS, "--images", str(stimuli), "--out", str(out), "-q"],
        check=True,
        env=_clean_env(),
    )
    return lt.open_run(out)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "LAYERTAP_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    return {**env, **extra}


def assert_same_store(merged: lt.Run, ref: lt.Run) -> None:
    assert merged.complete and merged.layers == ref.layers
    for layer in ref.layers:
        assert merged[layer].shape == ref[layer].shape
        assert merged[layer].raw(slice(None)).tobytes() == ref[layer].raw(slice(None)).tobytes(), layer
        assert merged[layer].chunk_rows == ref[layer].chunk_rows
    assert merged.manifest["images"] == ref.manifest["images"]
    assert merged.manifest["layers"] == ref.manifest["layers"]
    assert merged.manifest["spec"] == ref.manifest["spec"]
    assert merged.manifest["storage"] == ref.manifest["storage"]


def test_shard_from_environment() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (
        2,
        4,
    )
    assert shard_from_env(
        {
            "SLURM_ARRAY_TASK_ID": "4",
            "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "6",
            "SLURM_ARRAY_TASK_STEP": "2",
        }
    ) == (2, 4)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}) is None
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert shard_from_env({"LAYERTAP_SHARD": "3/8", "RANK": "1", "WORLD_SIZE": "2"}) == (3, 8)
    with pytest.raises(lt.LayertapError, match="i/n"):
        shard_from_env({"LAYERTAP_SHARD": "3-8"})


def test_shards_are_batch_aligned_and_cover(stimuli: Path) -> None:
    s = lt.ImageSet.from_path(stimuli)
    parts = [s.shard(i, 4, align=4) for i in range(4)]
    assert sum((p.paths for p in parts), []) == s.paths
    assert all(p.selection["shard_offset"] % 4 == 0 for p in parts)


def test_simulated_job_array_merges_byte_identical(stimuli: Path, unsharded: lt.Run, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for task in (3, 1, 0):  # out of order, and the last one is missing at first
        env = _clean_env(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="4")
        subprocess.run(
            [sys.executable, "-m", "layertap", "extract", *ARGS, "--images", str(stimuli), "--out", str(out), "-q"],
            check=True,
            env=env,
        )
    assert not (out / "manifest.json").exists(), "merged before every shard was done"
    proc = subprocess.run(
        [sys.executable, "-m", "layertap", "merge", str(out)], capture_output=True, text=True, env=_clean_env()
    )
    assert proc.returncode == 1 and "(4 shards expected; missing: 2)" in proc.stderr
    env = _clean_env(SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="4")
    subprocess.run(
        [sys.executable, "-m", "layertap", "extract", *ARGS, "--images", str(stimuli), "--out", str(out), "-q"],
        check=True,
        env=env,
    )  # the last shard merges
    merged = lt.open_run(out)
    assert_same_store(merged, unsharded)
    assert {s["path"] for s in merged.skipped} == {"class1/im04.jpg", "class2/im20.jpg"}
    # the unsharded command finds the merged run complete: nothing is recomputed
    again = subprocess.run(
        [sys.executable, "-m", "layertap", "extract", *ARGS, "--images", str(stimuli), "--out", str(out)],
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    assert again.returncode == 0 and f"nothing to do: {out} is complete (28 images" in again.stderr
    assert "stored" not in again.stderr


def test_cancelled_shard_resumes_and_merge_waits(
    stimuli: Path, unsharded: lt.Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    kw = {"weights": "random", "seed": 3, "batch_size": 4, "workers": 0, "dtype": "bfloat16"}
    layers = ["features.5", "classifier.4"]
    for i in (0, 2):
        lt.extract("alexnet", stimuli, layers, out, shard=(i, 3), **kw)
    with pytest.raises(lt.LayertapError, match="missing: 1"):
        lt_store.merge_shards(out)

    def cancelled(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # scancel / Ctrl-C at the very end of the shard

    with monkeypatch.context() as m:
        m.setattr(lt_store.RunWriter, "finish", cancelled)
        with pytest.raises(KeyboardInterrupt):
            lt.extract("alexnet", stimuli, layers, out, shard=(1, 3), **kw)
    with pytest.raises(lt.LayertapError, match="unfinished: 1"):
        lt_store.merge_shards(out)
    run = lt.extract("alexnet", stimuli, layers, out, shard="1/3", **kw)  # resubmitted: resumes, then merges
    assert_same_store(run, unsharded)


def test_launcher_one_process_per_device(stimuli: Path, unsharded: lt.Run, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "layertap",
            "launch",
            "--devices",
            "cpu",
            "cpu",
            "--",
            *ARGS,
            "--images",
            str(stimuli),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert_same_store(lt.open_run(out), unsharded)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000-of-00002", "00001-of-00002"]


def test_slurm_scripts(tmp_path: Path) -> None:
    paths = write_slurm_scripts(
        ["--model", "alexnet", "--layers", "fc", "--out", str(tmp_path / "o")],
        tmp_path / "o",
        8,
        gpus_per_task=1,
        partition="gpu",
        setup="module load cuda",
    )
    extract = paths["extract.sbatch"].read_text()
    assert "#SBATCH --array=0-7" in extract and "#SBATCH --gres=gpu:1" in extract and "--partition=gpu" in extract
    assert "module load cuda" in extract and "-m layertap extract --model alexnet" in extract
    assert "--dependency=afterok" in paths["submit.sh"].read_text()
    assert f"layertap merge {(tmp_path / 'o').resolve()}" in paths["merge.sbatch"].read_text()


@pytest.mark.slow
def test_real_slurm_job_array_and_merge_job(stimuli: Path, unsharded: lt.Run, tmp_path: Path) -> None:
    import slurm_cluster

    slurm_cluster.ensure_installed()
    cluster = slurm_cluster.SlurmCluster(tmp_path / "slurm").start()
    try:
        out = tmp_path / "run"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "layertap",
                "slurm",
                "--shards",
                "4",
                "--cpus-per-task",
                "1",
                "--mem",
                "1G",
                "--time",
                "00:20:00",
                "--submit",
                "--",
                *ARGS,
                "--images",  # relative paths, as a user types them: the scripts must not depend on them
                os.path.relpath(stimuli, tmp_path),
                "--out",
                "run",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**_clean_env(), "SLURM_CONF": cluster.env["SLURM_CONF"]},
        )
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert "submitted extraction array" in proc.stdout
        cluster.wait_idle(timeout=900)
        logs = "\n".join(p.read_text() for p in sorted((out / "slurm" / "logs").glob("*.out")))
        assert (out / "manifest.json").exists(), f"merge job did not produce the run:\n{logs}\n{cluster.logs()}"
        assert_same_store(lt.open_run(out), unsharded)
        assert len(list((out / "slurm" / "logs").glob("extract-*_*.out"))) == 4
        for log in (out / "slurm" / "logs").glob("extract-*_*.out"):  # each task says what it stored
            assert "layertap: stored features.5 " in log.read_text() and " rows in all" in log.read_text()
        assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    finally:
        cluster.stop()
        shutil.rmtree(tmp_path / "slurm", ignore_errors=True)


TINY_NET = """
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x).relu()).flatten(1))


def build():
    return Tiny()
"""


def test_slurm_scripts_resolve_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Relative --images/--out/--weights/--model file.py:factory are written as absolute paths, so the
    array task's command works from any directory (Slurm starts it elsewhere); its log says what it stored."""
    import torch

    from layertap.cli import app as cli

    project, elsewhere = tmp_path.resolve() / "project", tmp_path / "elsewhere"
    make_class_folder(project / "imgs", per_class=2, classes=("a", "b"))
    (project / "net.py").write_text(TINY_NET)
    torch.manual_seed(0)
    module = lt.load_model(str(project / "net.py") + ":build", weights="random").module
    torch.save(module.state_dict(), project / "w.pt")
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    args = ["--model", "net.py:build", "--weights", "w.pt", "--layers", "conv", "fc", "--images", "imgs"]
    assert cli.main(["slurm", "--shards", "2", "--", *args, "--out=acts", "--batch-size", "2", "--workers", "0"]) == 0
    capsys.readouterr()

    script = (project / "acts" / "slurm" / "extract.sbatch").read_text()
    for path in (f"{project}/net.py:build", f"{project}/w.pt", f"{project}/imgs", f"--out={project}/acts"):
        assert f" {path} " in script, path
    assert f"#SBATCH --chdir={project}\n" in script
    command = next(line for line in script.splitlines() if line.startswith("exec "))
    env = _clean_env(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="2")
    proc = subprocess.run(["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    logs = [proc.stderr]
    # task 1 in this process (faster), from the other directory too: the command's arguments after 'layertap'
    monkeypatch.chdir(elsewhere)
    for key, value in {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"}.items():
        monkeypatch.setenv(key, value)
    logger = logging.getLogger("layertap")
    for name in ("handlers", "propagate", "level"):  # main() installs its own log handler
        monkeypatch.setattr(logger, name, copy.copy(getattr(logger, name)))
    assert cli.main(shlex.split(command)[4:]) == 0
    logs.append(capsys.readouterr().err)
    for task, log in enumerate(logs):  # each task's log says what it stored
        shard = project / "acts" / "shards" / f"{task:05d}-of-00002"
        assert f"stored conv 2x4x28x28, fc 2x3 in {shard}: 2 images in " in log, log
        assert ", 0 skipped, 2 rows in all" in log
    merge = (project / "acts" / "slurm" / "merge.sbatch").read_text()
    assert f"layertap merge {project / 'acts'}\n" in merge
    merged = lt_store.merge_shards(project / "acts")
    kw = {"weights": project / "w.pt", "batch_size": 2, "workers": 0, "progress": False, "shard": None}
    direct = lt.extract(f"{project}/net.py:build", project / "imgs", ["conv", "fc"], tmp_path / "direct", **kw)
    assert merged.images == direct.images and len(direct.images) == 4
    for layer in ("conv", "fc"):
        assert merged[layer][:].tobytes() == direct[layer][:].tobytes(), layer


def test_slurm_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from layertap.cli.app import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["slurm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--cpus-per-task", "4"), ("--mem", "16G"), ("--time", "04:00:00")):
        assert re.search(rf"{option} \S+\s.*?\(default: {default}\)", text), option


def test_absolute_paths_of_every_path_option(tmp_path: Path) -> None:
    from layertap.shards.slurm import absolute_paths

    tmp_path = tmp_path.resolve()  # what the paths resolve to, symlinks followed
    for name in ("imgs", "hfmodel", "acts"):
        (tmp_path / name).mkdir()
    for name in ("list.txt", "net.py", "w.pt", "config.json"):
        (tmp_path / name).write_text("")
    args = ["-i", "list.txt", "-o", "acts", "--model", "custom:net.py:build", "--model_path", "w.pt", "--option"]
    args += ["config=config.json", "--option", "transform=validation", "--weights=random", "--layers", "w.pt"]
    assert absolute_paths(args, tmp_path) == [
        "-i", f"{tmp_path}/list.txt", "-o", f"{tmp_path}/acts", "--model", f"custom:{tmp_path}/net.py:build",
        "--model_path", f"{tmp_path}/w.pt", "--option", f"config={tmp_path}/config.json",
        "--option", "transform=validation", "--weights=random", "--layers", "w.pt",
    ]  # fmt: skip
    assert absolute_paths(["--model", "hf:hfmodel", "--weights", "IMAGENET1K_V1"], tmp_path) == [
        "--model", f"hf:{tmp_path}/hfmodel", "--weights", "IMAGENET1K_V1",
    ]  # fmt: skip
    assert absolute_paths(["--model", "alexnet", "--images=/data/x", "--out=../o"], tmp_path) == [
        "--model", "alexnet", "--images=/data/x", f"--out={tmp_path.parent}/o",
    ]  # fmt: skip
