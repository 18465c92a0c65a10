"""A worker's command stream: commands read off its frame pipe, replies written to it.

Owns: ``Commands``, the base of ``worker.Worker``: the frames in and out (private copies
of fds 0 and 1), the commands read and not served yet (``pending``; a ``Revoke`` takes
its ``Run`` out at once, a ``Ping`` is answered where it is read), who reads
(``read_lock``: the main thread whenever it has nothing queued, ``next_command``, so a
call reaches its function with no hand-off between threads; the watcher thread while a
task runs, ``watch``, once the task is ``WATCH_AFTER`` old), module sources asked of the
host (``fetch``), and the stream's end (every waiter released; with ``exit_on_eof``
the process ends after a grace, ``end_process``). Running calls is ``worker``'s. Must
not import: any sshexec module outside ``_wire`` and ``_node``, asyncio, or anything
beyond the stdlib (this file is shipped to nodes).
"""

from __future__ import annotations

import collections
import os
import queue
import select
import signal
import sys
import threading
import time
from typing import Callable, Deque, Optional

from .._wire import protocol as proto
from . import reaper
from .fdio import Reader
from .remote_io import _write_all

EOF_GRACE_SECONDS = 2.0  # a task still running this long after the host vanished is abandoned
FETCH_TIMEOUT = 60.0  # seconds to wait for the host to answer a Fetch
WATCH_AFTER = 0.005  # seconds a task runs before the watcher reads commands for it
WATCH_EVERY = 0.05  # seconds between the watcher's looks at a long task's state


class Commands:
    """A worker's commands in and replies out. ``max_frame`` limits commands until
    ``Init`` brings the host's limit."""

    def __init__(
        self,
        frames_in: int,
        frames_out: int,
        eof_grace: float = EOF_GRACE_SECONDS,
        max_frame: int = proto.DEFAULT_MAX_FRAME,
    ):
        self.frames_in, self.frames_out, self.eof_grace = frames_in, frames_out, eof_grace
        self.worker_id = "?"
        # Commands read and not served yet (None: the stream ended); a Revoke takes its Run
        # out. Under claim_lock (taken after read_lock, never before it).
        self.pending: Deque[Optional[proto.Message]] = collections.deque()
        self.claim_lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.decoder = proto.FrameDecoder(max_frame)  # the commands' limit until Init
        self.reader = Reader()
        self.sources: queue.SimpleQueue[Optional[proto.Source]] = queue.SimpleQueue()
        self.fetch_lock = threading.Lock()
        self.is_reading = True  # False once the command stream ended or broke
        self.is_serving = True  # False once serve() returned
        self.exit_on_eof = False  # watch(): the process ends a grace after the stream
        self.task_since = 0.0  # when the main thread started its current task (0: idle)
        self.busy = threading.Event()  # set when a task starts: the watcher sleeps until it
        self.on_lost: Optional[Callable[[], None]] = None  # main(): the process ends

    def send(self, message: proto.Message) -> None:
        pieces = proto.frame_pieces([message])  # a big result is written from where it lies
        try:
            with self.write_lock:  # the watcher answers Revoke and Ping while a task runs
                for piece in pieces:
                    _write_all(self.frames_out, piece)
        except OSError:  # the frame channel is gone: nothing more can be reported
            if self.on_lost is not None:
                self.on_lost()
            raise

    # ---- reading commands (whoever holds read_lock) -------------------------------------

    def _read(self, timeout: Optional[float]) -> bool:
        """Read what has arrived and take its commands: wait for it (``timeout`` None),
        up to ``timeout`` seconds, or not at all (0). True when something was read or the
        stream ended. Call with ``read_lock`` held."""
        if not self.is_reading:
            return False
        problem = ""
        try:
            if timeout is not None and not _readable(self.frames_in, timeout):
                return False
            chunk = self.reader.read(self.frames_in)
            if not chunk:
                self.decoder.end()
                self._stream_ended("")
                return True
            self.decoder.feed(chunk)
            for message in self.decoder.messages():
                self._take(message)
        except (OSError, proto.FrameError) as exc:
            problem = f"command stream broken: {exc}"
        if problem:
            self._stream_ended(problem)
        return True

    def _take(self, message: proto.Message) -> None:
        if isinstance(message, proto.Init):
            # the host's limit, from the very next frame: it may send calls up to its
            # max_frame, over the default or under it
            try:
                self.decoder.max_frame = message.max_frame
            except ValueError as exc:
                raise proto.FrameError(f"Init: {exc}") from exc
        if isinstance(message, proto.Revoke):
            self.revoke(message.task_id)
        elif isinstance(message, proto.Ping):
            self.send(proto.Pong(message.nonce))
        elif isinstance(message, proto.Source):
            self.sources.put(message)
        else:
            with self.claim_lock:
                self.pending.append(message)

    def _stream_ended(self, problem: str) -> None:
        """On every way out, first of all: nobody may wait for a command any more."""
        self.is_reading = False
        self.busy.set()
        self.sources.put(None)
        with self.claim_lock:
            self.pending.append(None)
        if self.exit_on_eof:
            self._end_soon()
        if problem:
            say(f"sshexec worker {self.worker_id}: {problem}")

    def next_command(self) -> Optional[proto.Message]:
        """Main thread: the next command, read here when none is queued (None: the end)."""
        while True:
            with self.claim_lock:
                if self.pending:
                    return self.pending.popleft()
            with self.read_lock:  # the watcher may have queued one while we waited for it
                with self.claim_lock:
                    if self.pending:
                        return self.pending.popleft()
                self._read(None if self.is_reading else 0)

    def watch(self, exit_on_eof: bool = True) -> None:
        """Watcher thread: once a task has run ``WATCH_AFTER``, read for the main thread
        as commands arrive (``Revoke`` and ``Ping`` answered at once, ``Run`` queued), and
        notice the stream's end at once (``POLLHUP``) while any task runs; at that end,
        give the main thread a short grace (``exit_on_eof``), then end the process, so a
        vanished host leaves no orphan. Asleep while the worker is idle (its main thread
        reads then) and during a task's first ``WATCH_AFTER``: a stream of short tasks
        wakes it at most once per ``WATCH_AFTER``, never once per task."""
        self.exit_on_eof = exit_on_eof
        ends, commands = select.poll(), select.poll()
        ends.register(self.frames_in, 0)  # POLLHUP and POLLERR only
        commands.register(self.frames_in, select.POLLIN)
        while self.is_reading and self.is_serving:
            since = self.task_since
            if not since:  # idle: the main thread reads, and sees the end itself
                self.busy.clear()  # then look again: a task may have started meanwhile
                if not self.task_since and self.is_reading and self.is_serving:
                    self.busy.wait()  # an idle worker never wakes (many idle pools, one node)
                continue
            young = since + WATCH_AFTER - time.monotonic()
            if young > 0:  # its first WATCH_AFTER: only the stream's end wakes us
                events = ends.poll(young * 1000)
            else:
                events = commands.poll(WATCH_EVERY * 1000)
            if any(flags & select.POLLNVAL for _, flags in events):
                return  # the descriptor is closed: this worker is being torn down
            if not events:
                continue
            if self.read_lock.acquire(timeout=WATCH_EVERY):
                try:
                    while self._read(0):
                        pass
                finally:
                    self.read_lock.release()

    def _end_soon(self) -> None:
        """The command stream ended: the process ends after the grace, even mid-task
        (a timer thread: this one may be stuck in a log write nobody reads)."""
        timer = threading.Timer(self.eof_grace, end_process)
        timer.name, timer.daemon = "sshexec-eof-grace", True
        timer.start()

    def fetch(self, name: str) -> Optional[proto.Source]:
        """Any thread: ask the host for a module's source; None if it cannot answer. The
        caller reads the answer itself unless another thread is reading (it queues it)."""
        with self.fetch_lock:
            if not self.is_reading:
                return None
            self.send(proto.Fetch(name))
            deadline = time.monotonic() + FETCH_TIMEOUT
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    reply = self.sources.get_nowait()
                except queue.Empty:  # read on, or let whoever reads now queue it
                    wait = min(remaining, WATCH_EVERY)
                    if self.read_lock.acquire(timeout=wait):
                        try:
                            self._read(wait)
                        finally:
                            self.read_lock.release()
                    continue
                if reply is None:
                    self.sources.put(None)  # the stream ended: every later fetch fails too
                    return None
                if reply.name == name:
                    return reply

    def revoke(self, task_id: int) -> None:
        """Give a queued task back at once; one already started runs on."""
        with self.claim_lock:
            for message in self.pending:
                if isinstance(message, proto.Run) and message.task_id == task_id:
                    self.pending.remove(message)
                    break
            else:
                return
        self.send(proto.Revoked(task_id))


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def say(text: str) -> None:
    """A line on stderr, which may be gone (the agent killed): never raises."""
    try:
        print(text, file=sys.stderr, flush=True)
    except Exception:  # nobody left to tell
        pass


def end_process(orderly: bool = False) -> None:
    """End this worker process now, from any thread. Unless the client said ``Shutdown``
    (``orderly``: the agent reaps us and ends what is left), the end is the stream's (EOF,
    a broken pipe) and the agent may be gone with it, even if it is still our parent for a
    moment (a killed agent's pipes close before its children are re-parented): so nobody
    else may end what the tasks started, and everything descending from this worker (a
    child a task moved into a session of its own too) and its process group go with it."""
    if not orderly:
        reaper.end_family()
        try:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # this process too
        except OSError:
            pass
    os._exit(0)  # skip atexit hooks and non-daemon threads a task may have left behind
