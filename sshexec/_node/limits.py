"""Task limits on the node: time, memory of the worker's whole process tree, and kills.

Owns: each worker's *board* (a page of memory shared by the agent and the worker it
forked, or a small file a spawned worker maps and unlinks: the worker writes the id, start and limits of the task it runs, a few stores and
no system call per task; the agent reads it), ``Limits``, which the agent's loop asks to
``check`` at ``due()``: a task past its time, a tree past its memory (resident set of the
worker and every process descending from it, from ``/proc``, but those an earlier task
left running: started before this task, ``started_before``), or a task the client asked
to ``kill`` is stopped through the callback the agent lends (``Children.stop``: the
``Stopped`` report, then the process tree killed). The agent reads the boards every
``IDLE_EVERY``, every ``FAST_EVERY`` while a task with a memory limit runs, and at a
time limit's exact deadline once it has seen the task start. Without ``/proc`` (not
Linux) memory is not measured. Must not import: any client module, asyncio; never start
a thread.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

from .._wire.messages import STOP_KILLED, STOP_MEMORY, STOP_TIMEOUT
from . import reaper

# a board: task id (0: idle), its start (time.monotonic()), seconds, memory; as doubles
TASK, STARTED, SECONDS, MEMORY = 0, 1, 2, 3
BOARD_SIZE = 32
BOARD_ENV = "SSHEXEC_BOARD"  # a spawned worker's board, by file name
IDLE_EVERY = 0.1  # seconds between looks at the boards (a task's start is seen this late)
FAST_EVERY = 0.02  # seconds between measurements of a tree whose task has a memory limit
DOOMED_FOR = 10.0  # seconds a kill waits for its task to start (else it was revoked or done)
OOM_BIAS = 500  # a worker's oom_score_adj over the agent's
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TICK = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
EARLIER = 2 * TICK  # a process started this long before a task is not the task's

Stop = Callable[[int, int, str, str], None]  # slot, task id, why (STOP_*), detail


def new_board() -> mmap.mmap:
    """A zeroed shared page: a forked worker writes it, the agent reads it."""
    return mmap.mmap(-1, BOARD_SIZE)


def file_board() -> Tuple[Optional[mmap.mmap], str]:
    """A board for a spawned worker, which inherits no memory: a small file it maps by
    name (``BOARD_ENV``) and unlinks; (None, "") where none can be made."""
    try:
        fd, path = tempfile.mkstemp(prefix="sshexec-board-")
    except OSError:
        return None, ""
    try:
        os.ftruncate(fd, BOARD_SIZE)
        return mmap.mmap(fd, BOARD_SIZE), path
    except OSError:
        forget_file(path)
        return None, ""
    finally:
        os.close(fd)


def open_board(path: str) -> Optional[mmap.mmap]:
    """The worker's side of ``file_board``: mapped, then unlinked (nothing is left)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, BOARD_SIZE)
    except OSError:
        return None
    finally:
        os.close(fd)
        forget_file(path)


def forget_file(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def view(board: mmap.mmap) -> memoryview[float]:
    return memoryview(board).cast("d")


def descendants(pid: int) -> List[int]:
    """``pid`` and every process descending from it (Linux); ``[pid]`` elsewhere."""
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for thread in threads:  # a child belongs to the thread that forked it
            try:
                with open(f"/proc/{parent}/task/{thread}/children", "rb") as f:
                    kids = [int(p) for p in f.read().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def started_before(pid: int, moment: float) -> bool:
    """``pid`` started before ``moment`` (``time.monotonic()``): ``/proc``'s start time,
    counted from boot, is the monotonic clock or runs ahead of it by the time suspended,
    so a process is never taken as older than it is (False when unknown)."""
    fields = reaper.stat_fields(pid)
    return fields is not None and int(fields[19]) * TICK < moment


def resident(pids: List[int]) -> int:
    """Bytes of resident memory of these processes (0 for those gone or unreadable)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def rank_for_oom(pid: int) -> None:
    """Make the kernel's OOM killer pick this worker (and what it starts, which inherits
    the score) before the agent: its ``oom_score_adj`` is the agent's plus ``OOM_BIAS``
    (raising it needs no privilege). Linux; nothing elsewhere."""
    try:
        with open("/proc/self/oom_score_adj", "rb") as f:
            mine = int(f.read())
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(1000, mine + OOM_BIAS)))
    except (OSError, ValueError):
        pass


def size_text(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


class Limits:
    """The boards of one agent's workers. The agent's thread only."""

    def __init__(self, stop: Stop, clock: Callable[[], float]) -> None:
        self.stop, self.clock = stop, clock
        self.boards: Dict[int, Tuple[int, memoryview[float]]] = {}  # slot -> (worker pid, board)
        self.doomed: Dict[int, Dict[int, float]] = {}  # slot -> task id -> when asked
        self.files: Dict[int, str] = {}  # slot -> a spawned worker's board file
        self.next_check = float("inf")
        self.adopted: Callable[[], List[int]] = lambda: []  # the agent's orphans (set by Children)

    def add(self, slot: int, pid: int, board: Optional[mmap.mmap], path: str = "") -> None:
        if board is not None:
            self.boards[slot] = (pid, view(board))
        if path:
            self.files[slot] = path  # unlinked by the worker once mapped, else at its end
        self.next_check = min(self.next_check, self.clock() + IDLE_EVERY)

    def remove(self, slot: int) -> None:
        entry = self.boards.pop(slot, None)
        if entry is not None:
            entry[1].release()
        self.doomed.pop(slot, None)
        path = self.files.pop(slot, None)
        if path:
            forget_file(path)
        if not self.boards and not self.doomed:
            self.next_check = float("inf")

    def due(self) -> float:
        return self.next_check

    def kill(self, slot: int, task_id: int) -> None:
        """Stop ``task_id`` on that worker now if it runs it, or once it starts it."""
        if slot not in self.boards:  # stopped already, or no board could be made
            self.stop(slot, task_id, STOP_KILLED, "killed by kill()")
            return
        self.doomed.setdefault(slot, {})[task_id] = self.clock()
        self.next_check = self.clock()

    def check(self, now: float) -> None:
        """Stop what is past its limits; set when to look next."""
        soon = now + IDLE_EVERY
        for slot, (pid, board) in list(self.boards.items()):
            self._expire(slot, now)
            if self.doomed.get(slot):  # a kill waits for its task to start: look often
                soon = min(soon, now + FAST_EVERY)
            task = board[TASK]
            started, seconds, memory = board[STARTED], board[SECONDS], board[MEMORY]
            if not task or board[TASK] != task:  # idle, or it moved on while we read
                continue
            task_id = int(task)
            doomed = self.doomed.get(slot)
            if doomed and task_id in doomed:
                self._stop(slot, task_id, STOP_KILLED, "killed by kill()")
                continue
            if seconds:
                deadline = started + seconds
                if now >= deadline:
                    why = f"ran {now - started:.2f} s, over its limit of {seconds:g} s"
                    self._stop(slot, task_id, STOP_TIMEOUT, why)
                    continue
                soon = min(soon, deadline)
            if memory:
                others = descendants(pid)[1:] + self._orphans(pid)
                tree = [pid] + [p for p in others if not started_before(p, started - EARLIER)]
                used = resident(tree)
                if used > memory:
                    why = (
                        f"{size_text(used)} resident in {len(tree)} processes, over its "
                        f"limit of {size_text(memory)}"
                    )
                    self._stop(slot, task_id, STOP_MEMORY, why)
                    continue
                soon = min(soon, now + FAST_EVERY)
        self.next_check = soon if self.boards or self.doomed else float("inf")

    def _stop(self, slot: int, task_id: int, why: str, detail: str) -> None:
        self.remove(slot)  # stopped once: its board is not read again
        self.stop(slot, task_id, why, detail)

    def _expire(self, slot: int, now: float) -> None:
        doomed = self.doomed.get(slot)
        if doomed:
            for task_id in [t for t, at in doomed.items() if now - at > DOOMED_FOR]:
                del doomed[task_id]

    def _orphans(self, pid: int) -> List[int]:
        """Processes of this worker's session that were orphaned to the agent, with theirs."""
        found: List[int] = []
        for orphan in self.adopted():
            fields = reaper.stat_fields(orphan)
            if fields is not None and pid in (int(fields[2]), int(fields[3])):
                found += descendants(orphan)
        return found
