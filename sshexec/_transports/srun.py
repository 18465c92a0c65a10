"""``SrunTransport``: the agent on one node of a Slurm allocation, started as a job step.

A channel is one ``srun --overlap -N1 -n1 -w <node> -u`` process running the bootstrap,
then the node's agent, as a step of the current allocation: srun's stdin and stdout are
the byte pipe (``-u``: the task's output is not held until a newline; it is a raw pty, so
every byte value passes), its stderr is srun's own messages and then the agent's. No sshd
is involved; ``--overlap`` lets the step share the CPUs the job's other steps hold.

Owns: ``SrunChannel`` (a ``CommandChannel``: srun's own error before the agent's first
byte, a node outside the allocation, a step refused or not started within
``connect_timeout`` (``--immediate``), becomes a ``WorkerStartupError`` naming the node
and srun's words; a step that ends later, cancelled or its node failed, is a lost host
named the same way) and ``SrunTransport`` (which job: ``Host(options={"jobid": ...})``,
else ``SLURM_JOB_ID``; extra srun words: ``options={"srun_args": [...]}``). Ending
srun ends the step: closing its stdin lets the agent end its workers and exit; a
SIGTERM makes srun kill the step at once (``kill``). Must not import: asyncssh, the
pool, or know about tasks, Futures or message contents.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
from typing import Any, List, Mapping, Optional

from .. import _bootstrap
from .._errors import WorkerStartupError
from .base import Channel, StderrSink
from .command import CommandChannel
from .local import launch

JOB_ENV = "SLURM_JOB_ID"
OPTIONS = ("jobid", "srun_args")  # what Host(options=...) may hold for transport="srun"
_OWN_ERRORS = ("srun: error:", "srun: fatal:", "srun: Job step creation", "srun: Unable")
_STEP_ENDED = re.compile(r"^slurmstepd\S*: error: \*\*\* (.+?) \*\*\*")  # CANCELLED, ...


def srun_errors(said: str) -> List[str]:
    """srun's own error lines in its stderr, not those about a task's exit status, and
    slurmstepd's word on why the step ended (``STEP 8.1 ON node2 CANCELLED AT ...``)."""
    found = []
    for raw in said.splitlines():
        line = raw.strip()
        ended = _STEP_ENDED.match(line)
        if ended:
            found.append(ended.group(1))
        elif line.startswith(_OWN_ERRORS) and ": task " not in line:
            found.append(line)
    return found


class SrunChannel(CommandChannel):
    """The ``srun`` process running the agent on one node."""

    def __init__(
        self, proc: subprocess.Popen[bytes], on_stderr: StderrSink, transport: SrunTransport
    ) -> None:
        super().__init__(proc, on_stderr)
        self.transport = transport

    def startup_failure(self, status: Optional[int], said: str) -> Optional[WorkerStartupError]:
        """srun could not start the step: its own error lines, before any output."""
        errors = srun_errors(said)
        if not status or not errors:
            return None  # the step ran: its exit status and stderr are the bootstrap's
        node, job = self.transport.hostname, self.transport.job_id()
        return WorkerStartupError(
            self.transport.host,
            "srun",
            f"srun could not start a step on {node} in job {job}: {'; '.join(errors[-3:])}",
            f"Check that {node} is one of the allocation's nodes (`squeue -j {job} -o %N`) "
            "and that the job still runs.",
        )

    async def exit_reason(self, timeout: float) -> str:
        how = await super().exit_reason(timeout)
        errors = srun_errors(self.stderr_tail())
        node = self.transport.hostname
        if errors:
            return f"the Slurm step on {node} ended ({how}): {errors[-1]}"
        return f"the Slurm step on {node} ended ({how})" if how != "still running" else how

    def kill(self) -> None:
        """srun kills the step at once on SIGTERM (its agent and every worker)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


class SrunTransport:
    """The agent on one node of a Slurm allocation, as a job step. Loop thread only.

    ``options`` (``Host(options=...)``): ``jobid``, the allocation to run in (default
    ``SLURM_JOB_ID``, set inside ``salloc``, ``sbatch`` and ``srun``); ``srun_args``,
    more words for srun before the command (e.g. ``["--mem=0"]``).

    Raises:
        ValueError: At construction, an option srun does not take, a user or a port.
    """

    kind = "srun"

    def __init__(
        self,
        host: str,
        hostname: str,
        *,
        python: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        connect_timeout: float = 10.0,
        options: Optional[Mapping[str, Any]] = None,
        username: Optional[str] = None,
        port: Optional[int] = None,
        srun: str = "srun",
        **ssh_settings: Any,  # known_hosts, keepalive_interval, ...: no SSH here
    ) -> None:
        if username is not None or port is not None:
            raise ValueError(
                f"host {host}: transport='srun' runs as the job's user on the node: "
                "a user or port does not apply"
            )
        options = dict(options or {})
        unknown = sorted(k for k in options if k not in OPTIONS)
        if unknown:
            raise ValueError(
                f"host {host}: options {', '.join(map(repr, unknown))} do not apply to "
                f"transport='srun' (it takes {', '.join(OPTIONS)})"
            )
        extra = options.get("srun_args", [])
        if isinstance(extra, str) or not all(isinstance(w, str) for w in extra):
            raise ValueError(f"host {host}: srun_args must be a list of str, got {extra!r}")
        self.host, self.hostname, self.python = host, hostname, python
        self.env, self.cwd = dict(env or {}), cwd
        self.connect_timeout, self.srun = connect_timeout, srun
        self.jobid: Optional[str] = None if options.get("jobid") is None else str(options["jobid"])
        self.extra: List[str] = list(extra)
        self._closed = False

    def __repr__(self) -> str:
        return f"SrunTransport({self.host!r})"

    def job_id(self) -> Optional[str]:
        return self.jobid or os.environ.get(JOB_ENV) or None

    async def connect(self) -> None:
        """Check that srun is on PATH and that there is an allocation to run in."""
        if shutil.which(self.srun) is None:
            raise WorkerStartupError(
                self.host,
                "connect",
                f"no {self.srun!r} on PATH for transport='srun'",
                "Run the client on a node of the Slurm cluster (a login node, or inside "
                "salloc/sbatch), or load the module that provides srun.",
            )
        if self.job_id() is None:
            raise WorkerStartupError(
                self.host,
                "allocation",
                f"no Slurm allocation found ({JOB_ENV} is not set): transport='srun' "
                "starts the agent as a step of the current job",
                "Run the client inside an allocation (salloc, sbatch), or name the job: "
                "Host(..., options={'jobid': 1234}).",
            )

    def argv(self) -> List[str]:
        return [
            self.srun,
            "--overlap",  # share the CPUs other steps of the job (and our own) hold
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={self.hostname}",
            "--unbuffered",  # no holding output until a newline: a raw pty
            f"--immediate={max(1, math.ceil(self.connect_timeout))}",
            "--job-name=sshexec",
            f"--jobid={self.job_id()}",
            *self.extra,
            "--",
            "/bin/sh",
            "-c",
            _bootstrap.remote_script(self.python, self.env, self.cwd),
        ]

    async def open_channel(self, on_stderr: StderrSink) -> Channel:
        if self._closed:
            raise WorkerStartupError(self.host, "session", "the transport is closed")
        await self.connect()
        return await launch(self.argv(), self.host, lambda p: SrunChannel(p, on_stderr, self))

    async def aclose(self) -> None:
        self._closed = True
