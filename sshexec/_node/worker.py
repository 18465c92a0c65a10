"""The remote main loop: one worker interpreter serving tasks over stdin/stdout frames.

Owns: stdio hygiene (frames travel on private copies of fds 0 and 1; fd 1 is
pointed at stderr so ``print()`` cannot corrupt them), running calls, and
packing results and errors. Every helper that must run on a node lives here.
Must not import: any sshexec module outside ``_wire`` and ``_node``, asyncio, or anything
beyond the stdlib, cloudpickle and msgpack (this file is shipped to nodes).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import os
import queue
import select
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Deque, Optional, Tuple

import cloudpickle
import msgpack

from .._wire import calls, carried
from .._wire import protocol as proto
from . import limits, reaper
from .fdio import Reader
from .lookups import Lookups
from .namespaces import Namespaces
from .remote_io import ClientFinder, FrameLogHandler, _write_all, frame_stream
from .returns import Returns, Seen

RESULT_OVERHEAD = 64  # msgpack envelope around a Done payload, generously
EOF_GRACE_SECONDS = 2.0  # a task still running this long after the host vanished is abandoned
FETCH_TIMEOUT = 60.0  # seconds to wait for the host to answer a Fetch
WATCH_AFTER = 0.005  # seconds a task runs before the watcher reads commands for it
WATCH_EVERY = 0.05  # seconds between the watcher's looks at a long task's state


def _claim_stdio() -> Tuple[int, int]:
    frames_in, frames_out = os.dup(0), os.dup(1)  # private fds for frames
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return frames_in, frames_out


def _cpu_count() -> int:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        return len(getaffinity(0))
    return os.cpu_count() or 1


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


class Worker:
    """Serves commands read from ``frames_in``, writing replies to ``frames_out``.

    The main thread reads its own commands whenever it has none queued, so a call reaches
    its function with no hand-off between threads. While a task runs, the watcher thread
    (``watch``) reads on its behalf once the task is ``WATCH_AFTER`` old, so ``Revoke``,
    ``Ping`` and the stream's end are still heard during long tasks; whoever reads holds
    ``read_lock``. ``max_frame`` limits commands and results until ``Init`` brings the
    host's limit."""

    def __init__(
        self,
        frames_in: int,
        frames_out: int,
        eof_grace: float = EOF_GRACE_SECONDS,
        max_frame: int = proto.DEFAULT_MAX_FRAME,
    ):
        self.frames_in, self.frames_out, self.eof_grace = frames_in, frames_out, eof_grace
        self.worker_id = "?"
        self.hostname = os.uname().nodename  # socket.gethostname() without importing socket
        # Commands read and not served yet (None: the stream ended); a Revoke takes its Run
        # out. Under claim_lock (taken after read_lock, never before it).
        self.pending: Deque[Optional[proto.Message]] = collections.deque()
        self.claim_lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.decoder = proto.FrameDecoder(max_frame)  # the commands' limit until Init
        self.reader = Reader()
        self.max_frame = max_frame  # the results' limit; initialize() takes Init's
        self.sources: queue.SimpleQueue[Optional[proto.Source]] = queue.SimpleQueue()
        self.fetch_lock = threading.Lock()
        self.is_reading = True  # False once the command stream ended or broke
        self.is_serving = True  # False once serve() returned
        self.exit_on_eof = False  # watch(): the process ends a grace after the stream
        self.task_since = 0.0  # when the main thread started its current task (0: idle)
        self.busy = threading.Event()  # set when a task starts: the watcher sleeps until it
        self.lookups = Lookups(None, self.fetch)  # main() names the agent's blob store
        self.on_lost: Optional[Callable[[], None]] = None  # main(): the process ends
        self.told_to_stop = False  # Shutdown came (not EOF alone, not a broken pipe)
        self.namespaces = Namespaces(self.lookups.script)
        self.returns: Optional[Returns] = None  # return_files: sent back after each task
        # the page the agent reads (limits.py): the running task's id, start and limits
        self.board = memoryview(bytearray(32)).cast("d")  # main(): the agent's shared one
        self.limits = (0.0, 0.0)  # seconds, bytes of the Runs that follow (Limits)

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

    def hello(self) -> proto.Hello:
        return proto.Hello(
            protocol=proto.PROTOCOL_VERSION,
            python="%d.%d.%d" % sys.version_info[:3],
            cloudpickle=cloudpickle.__version__,
            msgpack="%d.%d.%d" % msgpack.version[:3],
            pid=os.getpid(),
            hostname=self.hostname,
            cpus=_cpu_count(),
            executable=sys.executable,
        )

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

    def serve(self) -> None:
        """Main thread: answer Init and Run in order until Shutdown or EOF."""
        try:
            self.send(self.hello())
            while True:
                message = self.next_command()
                if message is None:
                    return
                if isinstance(message, proto.Shutdown):
                    self.told_to_stop = True  # an orderly end: the agent ends what is left
                    return
                reply: proto.Message
                self.task_since = time.monotonic()
                if not self.busy.is_set():
                    self.busy.set()  # wakes the watcher (once per idle spell, not per task)
                if isinstance(message, proto.Run):
                    reply = self._run_noted(message)
                elif isinstance(message, proto.Limits):  # in order: for the Runs after it
                    self.task_since = 0.0
                    self.limits = (message.seconds, float(message.memory))
                    continue
                elif isinstance(message, proto.Init):
                    reply = self.initialize(message)
                else:
                    self.task_since = 0.0
                    say(f"sshexec worker: unexpected {type(message).__name__}")
                    continue
                self._flush_output()
                self.send(reply)
                self.task_since = 0.0
                if isinstance(reply, proto.Failed) and reply.task_id == proto.INIT_TASK_ID:
                    return  # as ProcessPoolExecutor: a worker whose initializer failed serves nothing
        finally:
            self.is_serving = False
            self.busy.set()  # the watcher ends too

    def _run_noted(self, message: proto.Run) -> proto.Done | proto.Failed:
        """``run``, its task noted on the board for the agent: id written last, cleared
        first (the agent reads the id before and after the rest)."""
        task_id, board = message.task_id, self.board
        board[2], board[3] = self.limits
        board[1] = self.task_since
        board[0] = task_id
        try:
            return self.run(task_id, message.payload, message.buffers)
        finally:
            board[0] = 0.0

    def initialize(self, init: proto.Init) -> proto.Message:
        self.worker_id = init.worker_id
        self.lookups.where = "host %s (hostname %s, Python %d.%d.%d)" % (
            init.worker_id.rsplit("#", 1)[0],
            self.hostname,
            *sys.version_info[:3],
        )
        if init.python and init.python.split(".")[:2] != [str(v) for v in sys.version_info[:2]]:
            self.lookups.find = self.lookups.find_in_script  # calls pickled for another Python
        self.max_frame = init.max_frame
        root = logging.getLogger()
        root.addHandler(FrameLogHandler(self))
        root.setLevel(init.log_level)
        if init.forward_modules:
            sys.meta_path.append(ClientFinder(self))
            # after the bundle's own finder, before any other: see ClientFinder
            sys.meta_path.insert(min(1, len(sys.meta_path)), ClientFinder(self, "sshexec."))
        if not init.initializer:
            return proto.Ready()
        try:
            data = init.initializer
            if data[:1] == calls.STORED_CALL:  # stored once per host by the agent
                data = self.lookups.blob(bytes(data[1 : 1 + calls.KEY_SIZE]))
            carried.take()
            initializer, initargs = calls.unpickle(data, (), self.lookups.find)
            watched = self.namespaces.adopt((initializer, *initargs), carried.take())
            try:
                initializer(*initargs)
            finally:
                self.namespaces.keep(watched)
        except BaseException as exc:  # reported to the host, which retires this worker
            return self.failure(proto.INIT_TASK_ID, exc, proto.STAGE_INIT)
        return proto.Ready()

    def run(
        self, task_id: int, payload: proto.Tail, buffers: bytes = b""
    ) -> proto.Done | proto.Failed:
        """One call: its reply, with the time spent on it (unpickle, call, pickle)."""
        started = time.perf_counter()
        before = self.returns.look() if self.returns is not None else None
        reply = self._run(task_id, payload, buffers, started)
        if before is not None:
            reply = self._send_back(task_id, before, reply, started)
        return reply

    def _send_back(
        self, task_id: int, before: Seen, reply: proto.Done | proto.Failed, started: float
    ) -> proto.Done | proto.Failed:
        """The files the task wrote go back before its reply; one that cannot fails it."""
        assert self.returns is not None
        piece = max(1024, min(proto.CHUNK, self.max_frame - 4096))
        error = self.returns.send_back(task_id, before, self.send, piece)
        if error is None or isinstance(reply, proto.Failed):
            return reply
        failed = self.failure(task_id, error, proto.STAGE_RESULT)
        return dataclasses.replace(failed, seconds=time.perf_counter() - started)

    def _run(
        self, task_id: int, payload: proto.Tail, buffers: bytes, started: float
    ) -> proto.Done | proto.Failed:
        stage = proto.STAGE_CALL
        try:
            lookups = self.lookups
            carried.take()
            fn, args, kwargs = calls.load_call(
                payload, buffers, lookups.stored_function, lookups.find, lookups.shared_object
            )
            del payload
            watched = self.namespaces.adopt((fn, *args), carried.take())
            stage = proto.STAGE_RUN
            try:
                result = fn(*args, **kwargs)
            finally:
                if watched:
                    self.namespaces.keep(watched)
            del fn, args, kwargs
            stage = proto.STAGE_RESULT
            # big buffers sent from where they lie; a plain scalar by the standard pickler
            outcome = calls.dumps(result, copy=False, plain=type(result) in calls.PLAIN_TYPES)
            del result
            pieces, sizes = outcome
            size = calls.size(outcome)
            if size > self.max_frame - RESULT_OVERHEAD - len(sizes):
                raise ValueError(
                    f"the pickled result is {size} bytes, over max_frame={self.max_frame}; "
                    "return less data per task or raise max_frame"
                )
            return proto.Done(task_id, pieces, time.perf_counter() - started, sizes)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too, as ProcessPoolExecutor
            failed = self.failure(task_id, exc, stage)
            return dataclasses.replace(failed, seconds=time.perf_counter() - started)

    def failure(self, task_id: int, exc: BaseException, stage: str) -> proto.Failed:
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        origin = f"host {self.worker_id.rsplit('#', 1)[0]} (hostname {self.hostname}), "
        origin += f"pid {os.getpid()}, worker {self.worker_id}\n"
        try:
            blob = calls.serialize(exc)
        except BaseException:  # unpicklable attributes: the host gets a RemoteError instead
            blob = b""
        try:
            message = str(exc)
        except BaseException:
            message = f"<str() of {type(exc).__name__} failed>"
        return proto.Failed(task_id, _type_name(exc), message, origin + stack, blob, stage)

    @staticmethod
    def _flush_output() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a task closed or broke it; nothing to save
                pass


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


def main(blob_dir: Optional[str] = None, board: Optional[mmap.mmap] = None) -> None:
    """A worker's life, in the process the agent forked (or spawned) for it: fds 0 and 1
    are its frame pipes, ``blob_dir`` is where the agent keeps this host's blobs,
    ``board`` the page it shares with the agent (forked; a spawned worker maps a file)."""
    frames_in, frames_out = _claim_stdio()
    worker = Worker(frames_in, frames_out)
    if board is None and os.environ.get(limits.BOARD_ENV):  # spawned: by file name
        board = limits.open_board(os.environ.pop(limits.BOARD_ENV))
    if board is not None:
        worker.board = memoryview(board).cast("d")
    worker.lookups.blob_dir = blob_dir
    worker.returns = Returns.from_environ()
    worker.on_lost = end_process  # a write to the frame channel that raises
    sys.stdout, sys.stderr = frame_stream(worker, 1), frame_stream(worker, 2)
    threading.Thread(target=worker.watch, name="sshexec-watch", daemon=True).start()
    try:
        worker.serve()
        worker._flush_output()
    except BaseException as exc:  # the frame channel broke, or worse: the process ends anyway
        say(f"sshexec worker {worker.worker_id}: ended by {type(exc).__name__}: {exc}")
    end_process(worker.told_to_stop)
