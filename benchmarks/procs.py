"""A node's process table from /proc (Linux): descendants, CPU time, liveness.

Used by ``benchmarks.agent``'s probes to find what a job left on a node (the
processes below an sshd listener) and to count the client's CPU over all threads.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
Proc = Tuple[str, float, int]  # command line (arguments joined by spaces), CPU s, parent


def _stat(pid: int) -> Optional[List[str]]:
    """The fields of /proc/pid/stat after the command name (so field 0 is the state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def processes() -> Dict[int, Proc]:
    """Every process: its command line, CPU seconds (user + system) and parent pid."""
    found: Dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is None:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry)] = (command, (int(fields[11]) + int(fields[12])) / TICK, int(fields[1]))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system time of these processes (every thread's), those still there."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def start_time(pid: int) -> Optional[int]:
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


def alive(pid: int, started: Optional[int]) -> bool:
    """Still running (not a zombie) and the same process, not a reused pid."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == started


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def job_processes(sshd_pid: int) -> Dict[int, Optional[int]]:
    """The job's processes below an sshd listener (agent, workers, shells; not sshd's
    own per-connection processes, which wait for TCP to notice): pid -> start time."""
    return {
        pid: start_time(pid) for pid in descendants(sshd_pid) if not command(pid).startswith("sshd")
    }
