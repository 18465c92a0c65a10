"""The agent's workers: each one's process, its pipes and its end.

Owns: ``Children``, the table of the agent's workers (by slot, by pid until reaped),
starting one (``spawn.start_worker``), writing its stdin, relaying what it writes to its
stdout and stderr as ``Data`` (never decoded; read only while the client has acknowledged
all but ``WINDOW`` of a worker's bytes, ``Ack``), reaping it, stopping it for its task (``stop``, when ``limits.Limits`` says so),
ending what it left running
(``_bury``: its process group at once, with ``/proc`` its session and their descendants)
and reporting ``Exited`` exactly, after the last byte of its stdout (at once when its
pipes close, else after ``LINGER``: a process that escaped the kill holds them). The agent
owns the poll and the channel; it lends ``send`` and ``watch``. Must not import: any
client module, asyncio; never start a thread.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from .._wire import protocol as proto
from . import limits, reaper
from .fdio import Reader
from .spawn import close, kill_group, kill_left_group, start_worker

PIPE_SIZE = 1 << 20  # Linux's default pipe-max-size, allowed to every user
LINGER = 0.5  # seconds a reaped worker's pipes may stay open (a process that escaped has them)
LINGER_READS = 16  # reads of a reaped worker's pipe at most, after LINGER


def _widen(fd: int) -> None:
    """A bigger pipe (Linux): a big result crosses in fewer reads, writes and frames."""
    if not sys.platform.startswith("linux"):
        return
    import fcntl

    try:  # F_SETPIPE_SZ is in fcntl from Python 3.10; nodes may run 3.9
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe-max-size: the default pipe works


class Child:
    """One worker process and the agent's ends of its pipes."""

    def __init__(self, slot: int, pid: int, stdin: int, stdout: int, stderr: int) -> None:
        self.slot, self.pid = slot, pid
        self.stdin: Optional[int] = stdin
        self.stdout: Optional[int] = stdout
        self.stderr: Optional[int] = stderr
        self.pending: List[memoryview] = []  # bytes for its stdin not yet written
        self.close_input = False  # CloseInput arrived: close stdin once pending is written
        self.status: Optional[Tuple[int, int]] = None  # (exit status, signal) once reaped
        self.reaped_at = 0.0
        self.unacked = 0  # bytes of its stdout and stderr sent and not acknowledged (Ack)
        self.stopped = False  # killed for its task (limits): Stopped was sent

    def wants_output(self) -> bool:
        """Its stdout and stderr may be read: the client has taken all but a window."""
        return self.unacked < proto.WINDOW


class Children:
    """Every worker of one agent. The agent's thread only."""

    def __init__(
        self,
        send: Callable[[proto.Message], None],
        watch: Callable[[int, int], None],
        reader: Reader,
        blob_dir: str,
        boot: Optional[Tuple[bytes, bytes]],
    ) -> None:
        self.send, self.watch, self.reader = send, watch, reader
        self.blob_dir = blob_dir
        self.boot = boot  # (stage 1, bundle): spawn fresh interpreters, which read them
        self.by_slot: Dict[int, Child] = {}  # until Exited is sent
        self.running: Dict[int, Child] = {}  # pid -> child, until reaped
        self.exited: List[Child] = []  # reaped; Exited follows their output's end
        self.streams: Dict[int, Tuple[Child, int]] = {}  # fd -> its child, 0 (stdin), 1 or 2
        self.reading = True  # their outputs are watched (the client keeps up)
        self.windowed = True  # each worker is read only within its window (until the end)
        self.subreaper = False  # orphaned descendants of workers come to the agent
        self.limits = limits.Limits(self.stop, time.monotonic)  # task limits and kills
        self.limits.adopted = self._adopted

    def ready(self, fd: int) -> None:
        """``fd`` polled ready; nothing if it closed earlier in this pass."""
        entry = self.streams.get(fd)
        if entry is not None:
            child, stream = entry
            if stream:
                self._read_output(child, stream)
            else:
                self._write_input(child)

    def due(self) -> float:
        """When the loop must look again without being woken (a linger's end, a look at
        the tasks' limits), or inf."""
        linger = min((c.reaped_at + LINGER for c in self.exited), default=float("inf"))
        return min(linger, self.limits.due())

    def feed(self, slot: int, data: proto.Tail) -> None:
        child = self.by_slot.get(slot)
        if child is not None and child.stdin is not None and not child.close_input:
            child.pending.append(memoryview(bytes(data)))  # type: ignore[arg-type]
            self._write_input(child)  # now, not a pass later

    def close_input(self, slot: int) -> None:
        child = self.by_slot.get(slot)
        if child is not None:
            child.close_input = True
            self._write_input(child)

    def ack(self, slot: int, count: int) -> None:
        """The client took ``count`` more bytes of this worker's output."""
        child = self.by_slot.get(slot)
        if child is not None:
            was = self._may_read(child)
            child.unacked = max(0, child.unacked - count)
            if not was and self._may_read(child):
                self._watch_output(child, True)

    def ignore_window(self) -> None:
        """The agent is ending: what the workers still write is read to its end, whoever
        acknowledges it (so each worker's end is seen)."""
        self.windowed = False
        self.read_all(self.reading)

    def _may_read(self, child: Child) -> bool:
        return self.reading and (child.wants_output() or not self.windowed)

    def _watch_output(self, child: Child, on: bool) -> None:
        for fd in (child.stdout, child.stderr):
            if fd is not None:
                self.watch(fd, select.POLLIN if on else 0)

    def signal(self, slot: int, signum: int) -> None:
        child = self.by_slot.get(slot)
        if child is not None and child.status is None:
            kill_group(child.pid, signum)

    def spawn(self, slot: int) -> None:
        if slot in self.by_slot:
            return
        pipes: List[int] = []
        try:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            pipes = [in_r, in_w, out_r, out_w, err_r, err_w]
            board, board_file = limits.file_board() if self.boot else (limits.new_board(), "")
            pid = start_worker(
                in_r,
                out_w,
                err_w,
                self.blob_dir,
                self.boot[0] if self.boot else None,
                board,
                board_file,
            )
        except OSError as exc:
            for fd in pipes:
                close(fd)
            self.send(proto.SpawnFailed(slot, f"{type(exc).__name__}: {exc}"))
            return
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        _widen(out_r)
        _widen(in_w)
        limits.rank_for_oom(pid)
        self.limits.add(slot, pid, board, board_file)
        child = Child(slot, pid, in_w, out_r, err_r)
        self.by_slot[slot] = self.running[pid] = child
        self.streams.update({in_w: (child, 0), out_r: (child, 1), err_r: (child, 2)})
        if self._may_read(child):
            self._watch_output(child, True)
        self.send(proto.Spawned(slot, pid))
        if self.boot:  # a fresh interpreter: it reads stage 1 and the bundle first
            stage1, bundle = self.boot
            header = len(bundle).to_bytes(8, "big")
            child.pending += [memoryview(stage1), memoryview(header + bundle)]
            self._write_input(child)

    def _write_input(self, child: Child) -> None:
        if child.stdin is None:
            return
        while child.pending:
            try:
                written = os.write(child.stdin, child.pending[0])
            except BlockingIOError:
                break
            except OSError:  # the worker is gone: its exit is reported by the reaper
                child.pending = []
                break
            head = child.pending[0][written:]
            if head:
                child.pending[0] = head
                break
            child.pending.pop(0)
        if child.close_input and not child.pending:
            self._close(child, 0)
        else:
            self.watch(child.stdin, select.POLLOUT if child.pending else 0)

    def _read_output(self, child: Child, stream: int) -> bool:
        """One read of a worker's stdout (1) or stderr (2), relayed; False once nothing
        more is there now."""
        fd = child.stdout if stream == 1 else child.stderr
        if fd is None:
            return False
        try:
            data = self.reader.read(fd)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if data:
            child.unacked += len(data)
            self.send(proto.Data(child.slot, stream, data))
            if child.status is None and not self._may_read(child):
                self._watch_output(child, False)  # until the client acknowledges (ack)
                return False
            return True
        self._close(child, stream)
        return False

    def _close(self, child: Child, stream: int) -> None:
        fd = (child.stdin, child.stdout, child.stderr)[stream]
        if fd is None:
            return
        self.watch(fd, 0)
        self.streams.pop(fd, None)
        close(fd)
        if stream == 0:
            child.stdin, child.pending = None, []
        elif stream == 1:
            child.stdout = None
        else:
            child.stderr = None

    def read_all(self, on: bool) -> None:
        """Watch every worker's output again, or no longer (the client is not keeping up:
        unregistered, since a closed pipe would wake the poll for nothing)."""
        self.reading = on
        for child in self.by_slot.values():
            self._watch_output(child, self._may_read(child))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            child = self.running.pop(pid, None)
            if child is None:
                continue  # a worker's orphan, adopted by this subreaper: reaped, nothing more
            if os.WIFSIGNALED(status):
                child.status = (0, os.WTERMSIG(status))
            else:
                child.status = (os.WEXITSTATUS(status), 0)
            child.reaped_at = time.monotonic()
            self.limits.remove(child.slot)
            self.exited.append(child)
            self._bury(child)

    def stop(self, slot: int, task_id: int, why: str, detail: str) -> None:
        """``limits`` says the task this worker runs must end: ``Stopped`` first (before
        its ``Exited``), then its process group and every process descending from it
        (taken before the kill: its children are re-parented after); the reaper buries
        what is left of its session."""
        child = self.by_slot.get(slot)
        if child is None or child.status is not None or child.stopped:
            return
        child.stopped = True
        self.send(proto.Stopped(slot, task_id, why, detail))
        tree = limits.descendants(child.pid)
        kill_group(child.pid, signal.SIGKILL)
        for pid in tree[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _adopted(self) -> List[int]:
        """The agent's children that are no worker: orphans of workers' processes."""
        if not self.subreaper:
            return []
        return [p for p in reaper.children(os.getpid()) or () if p not in self.running]

    def _bury(self, child: Child) -> None:
        """A worker was reaped: what it left running goes too, before anything else (its
        process group, and with ``/proc`` its session and their descendants, which this
        agent adopted when they were orphaned)."""
        had_group = kill_left_group(child.pid)
        if not self.subreaper:
            return
        adopted = reaper.children(os.getpid())
        if had_group or adopted is None or any(p not in self.running for p in adopted):
            reaper.sweep(signal.SIGKILL, groups=[child.pid])

    def report_exits(self) -> None:
        """Exited, after the last byte of the worker's stdout: at once when its pipes
        closed, or after LINGER (a process that escaped the kill holds them), what is in
        them then relayed first."""
        now = time.monotonic()
        for child in list(self.exited):
            lingering = child.stdout is not None or child.stderr is not None
            if lingering and now - child.reaped_at < LINGER:
                continue
            for stream in (1, 2):
                for _ in range(LINGER_READS):
                    if not self._read_output(child, stream):
                        break
                self._close(child, stream)
            self._close(child, 0)
            self.exited.remove(child)
            del self.by_slot[child.slot]
            assert child.status is not None
            self.send(proto.Exited(child.slot, *child.status))

    def signal_all(self, signum: int) -> None:
        """Every worker's process group, and every process that belongs to a worker or
        descends from the agent (Linux)."""
        for child in self.running.values():
            kill_group(child.pid, signum)
        if self.running or reaper.children(os.getpid()) != []:  # else nothing can be left
            reaper.sweep(signum, ancestors=[os.getpid()], groups=list(self.running))
