"""A throw-away single-node Slurm cluster on localhost (Debian's slurmctld/slurmd + munge) for tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "munged")
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def ensure_installed() -> None:
    """Install Slurm from Debian's packages when missing (root only), else skip with the reason."""
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "Slurm is not installed and installing it needs root and apt-get (packages: " + " ".join(PACKAGES) + ")"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True, timeout=600
    )


def _start_munge() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return  # a munged is already answering
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    for d in ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", _which("munged") or "munged"], check=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


class SlurmCluster:
    """slurmctld + slurmd with their state under ``root``; ``env`` points clients at it."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 8000) -> None:
        self.root = root
        self.host = socket.gethostname()
        for d in ("state", "spool", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        conf = root / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=layertaptest",
                    f"SlurmctldHost={self.host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/backfill",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    "SlurmctldPort=16917",
                    "SlurmdPort=16918",
                    f"NodeName={self.host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
                    "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )
        self.env = {**os.environ, "SLURM_CONF": str(conf)}

    def start(self) -> SlurmCluster:
        _start_munge()
        subprocess.run([_which("slurmctld"), "-c"], check=True, env=self.env)
        subprocess.run([_which("slurmd")], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout
            if "idle" in out or "mixed" in out:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm node did not come up: {self.logs()}")

    def wait_idle(self, timeout: float = 600) -> None:
        """Wait until no job is pending or running."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            q = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=self.env)
            if q.returncode == 0 and not q.stdout.strip():
                return
            time.sleep(1)
        raise TimeoutError(f"jobs still queued after {timeout} s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))

    def stop(self) -> None:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            p = self.root / pid_file
            if p.exists():
                try:
                    os.kill(int(p.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
