"""The remote main loop: one worker interpreter serving tasks over stdin/stdout frames.

Owns: stdio hygiene (frames travel on private copies of fds 0 and 1; fd 1 is
pointed at stderr so ``print()`` cannot corrupt them), serving commands in order
(``Init``, ``Limits``, ``Run``, ``Shutdown``; reading them and the watcher thread are
``commands.Commands``', this class's base), running calls with their task noted on the
agent's board, and packing results and errors.
Must not import: any sshexec module outside ``_wire`` and ``_node``, asyncio, or anything
beyond the stdlib, cloudpickle and msgpack (this file is shipped to nodes).
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import sys
import threading
import time
import traceback
from typing import Optional, Tuple

import cloudpickle
import msgpack

from .._wire import calls, carried
from .._wire import protocol as proto
from . import limits
from .commands import EOF_GRACE_SECONDS, Commands, end_process, say
from .lookups import Lookups
from .namespaces import Namespaces
from .remote_io import ClientFinder, FrameLogHandler, frame_stream
from .returns import Returns, Seen

RESULT_OVERHEAD = 64  # msgpack envelope around a Done payload, generously


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


class Worker(Commands):
    """Serves commands read from ``frames_in`` (``Commands``: the main thread reads its
    own whenever it has none queued; the watcher thread reads for it during a task),
    writing replies to ``frames_out``. ``max_frame`` limits commands and results until
    ``Init`` brings the host's limit."""

    def __init__(
        self,
        frames_in: int,
        frames_out: int,
        eof_grace: float = EOF_GRACE_SECONDS,
        max_frame: int = proto.DEFAULT_MAX_FRAME,
    ):
        super().__init__(frames_in, frames_out, eof_grace, max_frame)
        self.hostname = os.uname().nodename  # socket.gethostname() without importing socket
        self.max_frame = max_frame  # the results' limit; initialize() takes Init's
        self.lookups = Lookups(None, self.fetch)  # main() names the agent's blob store
        self.told_to_stop = False  # Shutdown came (not EOF alone, not a broken pipe)
        self.namespaces = Namespaces(self.lookups.script)
        self.returns: Optional[Returns] = None  # return_files: sent back after each task
        # the page the agent reads (limits.py): the running task's id, start and limits
        self.board = memoryview(bytearray(32)).cast("d")  # main(): the agent's shared one
        self.limits = (0.0, 0.0)  # seconds, bytes of the Runs that follow (Limits)

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
