"""How a worker process comes to be on a node, and how it is ended.

Owns: ``start_worker`` (``fork`` from the agent, which has the worker code imported
already, the child moving its pipes onto fds 0-2, closing every other descriptor and
taking a process group of its own; or, to spawn, a fresh interpreter that reads stage 1
and the bundle on its stdin), ``kill_group`` and descriptor helpers. Must not import:
any client module, asyncio; never start a thread.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional


def start_worker(
    stdin: int, stdout: int, stderr: int, blob_dir: str, stage1: Optional[bytes]
) -> int:
    """A new worker on these pipe ends; its pid. ``stage1``: spawn a fresh interpreter
    running it (the caller then writes stage 1 and the bundle to its stdin first)."""
    if stage1 is not None:
        import subprocess  # only here: a forking agent never needs it

        n = len(stage1)
        loader = (
            f"import os;b=b'';exec('while len(b)<{n}:b+=os.read(0,{n}-len(b)) "
            "or os._exit(4)');exec(b)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", loader],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            env={**os.environ, "SSHEXEC_ROLE": "worker", "SSHEXEC_BLOBS": blob_dir},
        )
        return proc.pid
    pid = os.fork()
    if pid == 0:  # the child: becomes a worker, never returns
        try:
            _become_worker(stdin, stdout, stderr, blob_dir)
        finally:
            os._exit(70)
    try:
        os.setpgid(pid, pid)  # also done by the child: whichever runs first
    except OSError:
        pass
    return pid


def _become_worker(stdin: int, stdout: int, stderr: int, blob_dir: str) -> None:
    try:
        os.setpgid(0, 0)  # its own group: a kill reaches the task's subprocesses too
    except OSError:
        pass
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
        os.dup2(fd, target)
    _close_from(3)  # the agent's channel and every other worker's pipes
    from . import worker

    worker.main(blob_dir)


def _close_from(low: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(low, 4096))
    for fd in fds:
        if fd >= low:
            close(fd)


def kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
