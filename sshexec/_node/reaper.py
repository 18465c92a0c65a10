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
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] not in (b"Z", b"X"):  # a zombie holds nothing: only its reaper counts
                found[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]))
        except (OSError, ValueError, IndexError):
            continue
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


def _state(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return b""


def end_family() -> None:
    """End this process and everything descending from it, with no race against its own
    threads: a helper is forked, this process stops itself (every thread at once: no task
    can start another child meanwhile), and the helper, out of its group, kills what
    descends from it (by ancestry, which a child that moved to a session of its own still
    shows), its process group, and it. For a worker whose agent is gone. Returns only if
    the helper could not do that (then the caller sweeps as well as it can)."""
    import signal
    import time
    import warnings

    me = os.getpid()
    try:
        with warnings.catch_warnings():  # 3.12+: fork in a threaded process; the helper
            warnings.simplefilter("ignore")  # only reads /proc and sends signals
            helper = os.fork()
    except OSError:
        helper = -1
    if helper == 0:
        try:
            os.setsid()  # out of the group it kills
            deadline = time.monotonic() + 1.0
            while _state(me) not in (b"T", b"t", b"") and time.monotonic() < deadline:
                time.sleep(0.002)
            sweep(signal.SIGKILL, ancestors=[me], groups=[me])
            for kill in (os.killpg, os.kill):
                try:
                    kill(me, signal.SIGKILL)
                except OSError:
                    pass
        finally:
            os._exit(0)
    if helper > 0:
        os.kill(me, signal.SIGSTOP)  # the helper ends us while we stand still
    sweep(signal.SIGKILL, ancestors=[me], groups=[me])
