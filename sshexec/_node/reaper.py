"""What the agent does about the processes its workers leave behind.

Owns: making the agent a child subreaper (Linux: a worker's orphaned descendants become
the agent's children, not init's, so the agent reaps them and can end them), reading the
node's process table (``/proc``) and ``sweep``: signalling every process that belongs to
a worker (its process group or session, and everything descending from those) or to the
agent (everything descending from it). Where ``/proc`` or ``prctl`` is missing each is a
no-op and a worker's process group is all the agent ends. Must not import: any client
module, asyncio; never start a thread.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Iterable, List, Optional, Set, Tuple

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
SWEEP_ROUNDS = 20  # a sweep repeats while it finds processes (a fork racing the kill)

Table = Dict[int, Tuple[int, int, int]]  # pid -> (parent, process group, session)


def become_subreaper() -> bool:
    """Orphaned descendants come to this process (Linux 3.4+); False where that is not so."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError, ImportError):
        return False


def children(pid: int) -> Optional[List[int]]:
    """The direct children of ``pid`` (Linux), None where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return None


def stat_fields(pid: int) -> Optional[List[bytes]]:
    """``/proc/<pid>/stat`` after the command name (state, parent, group, session, ...;
    the start time is index 19); None when the process is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def table() -> Table:
    """Every live process the node lets us read; empty without ``/proc``."""
    found: Table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        fields = stat_fields(int(name))
        if fields is not None and fields[0] not in (b"Z", b"X"):  # a zombie holds nothing
            found[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return found


def belonging(processes: Table, ancestors: Iterable[int], groups: Iterable[int]) -> Set[int]:
    """Processes descending from ``ancestors`` (not those themselves), or in a process group
    or session named by ``groups`` (a worker's pid), with all their descendants."""
    kin = set(groups)
    below: Dict[int, List[int]] = {}
    for pid, (parent, _, _) in processes.items():
        below.setdefault(parent, []).append(pid)
    found = {pid for pid, (_, group, session) in processes.items() if {group, session} & kin}
    todo = list(found) + list(ancestors)
    while todo:
        for pid in below.get(todo.pop(), ()):
            if pid not in found:
                found.add(pid)
                todo.append(pid)
    found.discard(os.getpid())
    return found


def sweep(signum: int, ancestors: Iterable[int] = (), groups: Iterable[int] = ()) -> int:
    """Signal what ``belonging`` finds, again while a round finds something new (bounded);
    how many processes were signalled."""
    ancestors, groups = list(ancestors), list(groups)
    signalled: Set[int] = set()
    for _ in range(SWEEP_ROUNDS):
        fresh = belonging(table(), ancestors, groups) - signalled
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        signalled |= fresh
    return len(signalled)


def end_family() -> None:
    """End everything descending from this process (a child a task moved into a session
    of its own too, while it is still our child) and its process group, this process
    last: for a worker whose agent may be gone. Swept twice a moment apart, so a child
    a task was starting during the first sweep is caught by the second; the group goes
    with this process, which never waits on anything here (no helper, no stop)."""
    import signal
    import time

    me = os.getpid()
    for _ in range(2):
        sweep(signal.SIGKILL, ancestors=[me], groups=[me])
        time.sleep(0.01)
