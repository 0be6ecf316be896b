"""A one-node Slurm cluster of real daemons, for the tests of `deploy/slurm/zerowire.sbatch`.

`munged` with a key and a socket of its own, then `slurmctld` and `slurmd` in the foreground (`-D`) with a
`slurm.conf` in a temporary folder: probed ports, root as the Slurm user, the node named after this host on
127.0.0.1 with CPUs enough for the tests' tasks, no cgroups (`proctrack/linuxproc`, `task/none`), no
accounting. Clients find it through `SLURM_CONF`. `stop` cancels what still runs, waits for it, and kills
every process of the cluster by PID: the daemons, and whatever else carries its `SLURM_CONF` (job steps).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ProcessReaper, free_port
from tests.integration.cluster_support import wait_for

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
PACKAGES = "slurm-wlm and munge"


def missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in BINARIES if shutil.which(name, path=path) is None]


def binary(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert found, f"{name} is not installed"
    return found


SLURM_CONF = """\
ClusterName=zwtest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    cpus: int = 8
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    reaper: ProcessReaper = field(default_factory=ProcessReaper)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` plus what Slurm's clients need to find this cluster."""
        return {**base, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 30.0) -> None:
        for folder in ("munge", "state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        socket_path = munge / "socket"
        self._spawn(
            "munged",
            [
                binary("munged"), "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                f"--pid-file={munge / 'pid'}", f"--log-file={munge / 'log'}", f"--seed-file={munge / 'seed'}",
            ],
        )  # fmt: skip
        wait_for(socket_path.exists, timeout_s, "munged's socket")
        self.conf.write_text(
            SLURM_CONF.format(
                node=self.node,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=socket_path,
                root=self.root,
                cpus=self.cpus,
            )
        )
        self._spawn("slurmctld", [binary("slurmctld"), "-D"])
        self._spawn("slurmd", [binary("slurmd"), "-D", "-N", self.node])
        wait_for(self._idle, timeout_s, f"the Slurm node {self.node} to be idle", every_s=0.3)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.reaper.spawn(
            args,
            env=self.env(dict(os.environ)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _idle(self) -> bool:
        for proc in self.reaper.procs:
            assert proc.poll() is None, f"{proc.args[0]} exited: {self.logs()}"
        out = self.run("sinfo", "--noheader", "--format=%t", check=False)
        return out.strip() == "idle"

    def run(self, command: str, *args: str, check: bool = True, timeout_s: float = 20.0) -> str:
        """A Slurm client command against this cluster; its standard output."""
        done = subprocess.run(
            [binary(command), *args],
            env=self.env(dict(os.environ)),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"{command} {' '.join(args)}: {done.stderr}"
        return done.stdout

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_ended(self, job_id: str, timeout_s: float) -> dict[str, str]:
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        return wait_for(
            lambda: s if (s := self.job_state(job_id)).get("JobState") in ended else None,
            timeout_s,
            f"job {job_id} to end",
            every_s=0.5,
        )

    def processes(self) -> list[int]:
        """Every live process that carries this cluster's SLURM_CONF (job steps and what they run)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ.split(b"\0") and state != "Z":
                found.append(int(entry.name))
        return found

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.root / "log").iterdir())
        )

    def stop(self) -> None:
        """Cancel what still runs (its steps get SIGTERM), then kill the daemons and anything left by PID."""
        try:
            if self.conf.exists() and all(p.poll() is None for p in self.reaper.procs):
                self.run("scancel", "--user=root", check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).strip():
                    time.sleep(0.3)
        finally:
            self.reaper.kill_all()
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
