"""The process table, read from /proc: sshexec workers and whether processes still live.
Shared by the test suite's leak checks and the soak benchmark."""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

WORKER_SIGNATURE = b"os._exit(4)');exec(b)"  # the bootstrap loader on every worker's command line


def worker_pids(ancestor: Optional[int] = None) -> List[int]:
    """Live sshexec worker processes (local, or started by an sshd), optionally only the
    descendants of ``ancestor``, so that concurrent test runs do not see each other's."""
    parents: Dict[int, int] = {}
    workers = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        if WORKER_SIGNATURE in cmdline and fields[0] != b"Z":
            workers.append(int(entry))
    if ancestor is None:
        return workers

    def descends(pid: int) -> bool:
        for _ in range(64):
            pid = parents.get(pid, 0)
            if pid == ancestor:
                return True
            if pid <= 1:
                return False
        return False

    return [pid for pid in workers if descends(pid)]


def wait_no_workers(timeout: float = 8.0, ancestor: Optional[int] = None) -> List[int]:
    deadline = time.monotonic() + timeout
    while (pids := worker_pids(ancestor)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_gone(pids: List[int], timeout: float = 10.0) -> List[int]:
    """Wait up to ``timeout`` for these processes to end; the ones still alive."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def agents_and_workers(ancestor: int) -> Dict[int, List[int]]:
    """The sshexec processes below ``ancestor`` (an sshd listener, say), as agent pid ->
    its workers' pids: an agent is a bootstrapped process whose parent is not one (sshd's
    session is), a worker one whose parent is an agent."""
    found = set(worker_pids(ancestor))
    tree: Dict[int, List[int]] = {pid: [] for pid in found if parent_of(pid) not in found}
    for pid in found:
        parent = parent_of(pid)
        if parent in tree:
            tree[parent].append(pid)
    return tree
