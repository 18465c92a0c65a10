"""A real Slurm cluster for the tests, on this one machine: a munged of its own (own key,
own socket), one slurmctld and three ``slurmd -N nodeK`` (node1 and node2 with 2 CPUs,
node3 with 1, whatever the machine has: ``SlurmdParameters=config_overrides``), all
started as children of the test run from a private directory and stopped at the end.

Clients find it through ``SLURM_CONF`` (``Cluster.env``). Every node has this machine's
hostname, so a process tells its node by ``SLURMD_NODENAME``, never by hostname.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REQUIRE_ENV = "SSHEXEC_REQUIRE_SLURM"  # set by .ci/run: a missing Slurm fails, not skips
NODES = {"node1": 2, "node2": 2, "node3": 1}  # CPUs each: grants differ per node
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd", "srun", "sinfo")


def missing() -> List[str]:
    """The programs this needs that are not installed."""
    found = []
    for name in DAEMONS:
        if shutil.which(name) is None and not os.path.exists(f"/usr/sbin/{name}"):
            found.append(name)
    return found


def program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Cluster:
    root: Path
    procs: Dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def start(self, timeout: float = 60.0) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged checks the directories on its socket's path
        self._start_munge()
        self._write_config()
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in [n for n in self.env if n.startswith(("SLURM_", "SALLOC_", "SBATCH_"))]:
            if name != "SLURM_CONF":  # an allocation around the test run is not this one's
                del self.env[name]
        self._spawn("slurmctld", [program("slurmctld"), "-D", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(node, [program("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self.wait_idle(timeout)
        return self

    def _spawn(self, name: str, argv: List[str]) -> None:
        with open(self.root / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )

    def _start_munge(self) -> None:
        directory = self.root / "munge"
        directory.mkdir(mode=0o700, exist_ok=True)
        key = directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                program("munged"),
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={directory / 'munged.pid'}",
                f"--log-file={directory / 'munged.log'}",
                f"--seed-file={directory / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self.log('munged')}")
            time.sleep(0.05)

    def _write_config(self) -> None:
        user = getpass.getuser()
        control, *ports = free_ports(1 + len(NODES))
        here = socket.gethostname()
        nodes = "".join(
            f"NodeName={name} NodeHostname={here} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={cpus} State=UNKNOWN\n"
            for (name, cpus), port in zip(NODES.items(), ports)
        )
        self.conf.write_text(
            f"ClusterName=sshexec\nSlurmctldHost={here}(127.0.0.1)\nSlurmctldPort={control}\n"
            f"SlurmUser={user}\nSlurmdUser={user}\n"
            f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.socket}\n"
            f"StateSaveLocation={self.root / 'state'}\nSlurmdSpoolDir={self.root / 'spool-%n'}\n"
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}\n"
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}\n"
            f"SlurmdLogFile={self.root / 'slurmd-%n.log'}\n"
            "SlurmctldDebug=info\nSlurmdDebug=info\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\nMpiDefault=none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "SlurmdParameters=config_overrides\nReturnToService=2\n"
            "SchedulerType=sched/builtin\nKillWait=2\nInactiveLimit=0\nMinJobAge=2\n"
            "SlurmdTimeout=30\nMessageTimeout=10\n"
            f"{nodes}"
            f"PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        (self.root / "cgroup.conf").write_text("IgnoreSystemd=yes\n")
        (self.root / "state").mkdir(exist_ok=True)

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        said = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited at start: {self.log(name)}")
            found = self.run("sinfo", "-h", "-N", "-o", "%N %t")
            said = found.stdout + found.stderr
            states = dict(line.split() for line in found.stdout.splitlines() if line.strip())
            if states and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm nodes not idle within {timeout} s: {said}\n{self.logs()}")

    def steps(self, job: Optional[str] = None) -> List[str]:
        """``jobid.stepid`` of every step running (``squeue --steps``), of ``job`` only."""
        argv = ["squeue", "--steps", "-h", "-o", "%i"]
        found = self.run(*argv, *(["-j", job] if job else []))
        return [line.strip() for line in found.stdout.splitlines() if line.strip()]

    def log(self, name: str) -> str:
        parts = []
        for path in (self.root / f"{name}.out", self.root / f"{name}.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--user", getpass.getuser(), timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
