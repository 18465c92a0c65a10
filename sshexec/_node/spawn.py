"""How a worker process comes to be on a node, and how it is ended.

Owns: ``start_worker`` (``fork`` from the agent, which has the worker code imported
already, the child moving its pipes onto fds 0-2, closing every other descriptor and
taking a session of its own; or, to spawn, ``posix_spawn`` of a fresh interpreter that
reads stage 1 and the bundle on its stdin, in a session of its own too), ``kill_group``,
``kill_left_group`` and descriptor helpers. Must not import:
any client module, asyncio; never start a thread.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
from typing import Optional

# the agent's own handlers, which a forked worker must not keep
AGENT_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP)


def may_fork() -> bool:
    """Whether the agent forks (its workers, its helpers): not where fork is missing or
    ``SSHEXEC_AGENT_START=spawn`` asks for fresh interpreters."""
    return hasattr(os, "fork") and os.environ.get("SSHEXEC_AGENT_START") != "spawn"


def start_worker(
    stdin: int,
    stdout: int,
    stderr: int,
    blob_dir: str,
    stage1: Optional[bytes],
    board: Optional[mmap.mmap] = None,
    board_file: str = "",
) -> int:
    """A new worker on these pipe ends, in a session of its own; its pid. ``stage1``: spawn
            a fresh interpreter running it (the caller then writes stage 1 and the bundle to its
            stdin first). ``board``: the page a forked worker notes its task on (``limits``); a
    spawned one maps ``board_file`` instead.
        Either way the caller is its only reaper (no ``subprocess.Popen`` whose
            clean-up could reap it first, its exit then unreported)."""
    if stage1 is not None:
        return _spawn(stdin, stdout, stderr, blob_dir, len(stage1), board_file)
    pid = os.fork()
    if pid == 0:  # the child: becomes a worker, never returns
        try:
            _become_worker(stdin, stdout, stderr, blob_dir, board)
        finally:
            os._exit(70)
    return pid


def _spawn(stdin: int, stdout: int, stderr: int, blob_dir: str, n: int, board: str) -> int:
    loader = (
        f"import os;b=b'';exec('while len(b)<{n}:b+=os.read(0,{n}-len(b)) or os._exit(4)');exec(b)"
    )
    argv = [sys.executable, "-c", loader]
    env = {**os.environ, "SSHEXEC_ROLE": "worker", "SSHEXEC_BLOBS": blob_dir}
    if board:
        env["SSHEXEC_BOARD"] = board  # limits.BOARD_ENV: the page it shares with the agent
    moves = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate((stdin, stdout, stderr))]
    restored = [getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, n)]
    try:
        return os.posix_spawn(
            sys.executable, argv, env, file_actions=moves, setsid=True, setsigdef=restored
        )
    except NotImplementedError:  # no POSIX_SPAWN_SETSID here: a process group will do
        return os.posix_spawn(
            sys.executable, argv, env, file_actions=moves, setpgroup=0, setsigdef=restored
        )


def _become_worker(
    stdin: int, stdout: int, stderr: int, blob_dir: str, board: Optional[mmap.mmap]
) -> None:
    try:  # its own session and group: a kill reaches the task's subprocesses too, and the
        os.setsid()  # agent tells what a worker left behind by its session
    except OSError:
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    signal.set_wakeup_fd(-1)
    for signum in AGENT_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
        os.dup2(fd, target)
    _close_from(3)  # the agent's channel and every other worker's pipes
    from . import worker

    worker.main(blob_dir, board)


def _close_from(low: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(low, 4096))
    for fd in fds:
        if fd >= low:
            close(fd)


def kill_group(pid: int, signum: int) -> None:
    """Signal a live (unreaped) worker's process group, or the worker alone if it has not
    made its group yet (just forked)."""
    try:
        os.killpg(pid, signum)
    except OSError:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def kill_left_group(pid: int) -> bool:
    """SIGKILL what is left of a reaped worker's process group (never the pid alone: it may
    be another process's by now); whether the group still had members."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        return False
    return True


def close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
