"""The node agent: one process per host, started by stage 1 over the host's one channel.

Owns: the agent's loop (one thread, ``select``: a parent that is safe to fork), asking
``spawn.start_worker`` for workers (forked from this pristine parent, which has imported
the worker code once; fresh interpreters where fork is missing or
``SSHEXEC_AGENT_START=spawn``), relaying each worker's stdin, stdout and stderr over the
channel as ``Data`` frames (never decoding them; what several workers wrote goes out in
one write; a worker is read only while the client has acknowledged all but ``WINDOW``
of its bytes, ``Ack``), reaping workers and reporting each exit status or signal exactly
(``Exited``, after the last byte of that worker's stdout), signals on request, handing
``Store`` pieces and ``Forget`` to the blob store (``store``; a blob it cannot keep is
reported, ``StoreFailed``), and liveness: when the channel closes, or the client has
said nothing for ``silence_deadline`` seconds (a silent partition), every worker's
process group is killed and the agent exits. Must not import: any client module, asyncio; and it must
never start a thread.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

from .._wire import protocol as proto
from .fdio import Reader
from .spawn import close, kill_group, start_worker
from .store import BlobStore

DEFAULT_SILENCE = 30.0  # seconds, until Configure says otherwise
READ_SIZE = 1 << 20
PIPE_SIZE = 1 << 20  # Linux's default pipe-max-size, allowed to every user
IOV_LIMIT = 512  # frames per writev, under every system's IOV_MAX
OUT_HIGH_WATER = 16 << 20  # bytes queued for the client beyond which workers are not read
STDERR_LINGER = 0.5  # seconds an exited worker's stderr may stay open (a task's child has it)
TERM_GRACE = 1.0  # seconds between SIGTERM and SIGKILL when the agent ends its workers
ENDING_LIMIT = 10.0  # seconds an ending agent waits for its workers' last output
HEAD_ROOM = 1 << 16  # bytes a frame from the client may carry beyond a CHUNK of data
CLIENT_DONE = "the client is done"


def _nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _write_many(fd: int, pieces: List[proto.Buffer]) -> int:
    if len(pieces) == 1:
        return os.write(fd, pieces[0])
    if hasattr(os, "writev"):
        return os.writev(fd, pieces)
    return os.write(fd, b"".join(pieces))


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

    def wants_output(self) -> bool:
        """Its stdout and stderr may be read: the client has taken all but a window."""
        return self.unacked < proto.WINDOW


class Agent:
    def __init__(self, frames_in: int, frames_out: int, stage1: bytes, bundle: bytes) -> None:
        self.frames_in, self.frames_out = frames_in, frames_out
        self.stage1, self.bundle = stage1, bundle  # to spawn fresh interpreters
        self.decoder = proto.FrameDecoder(proto.CHUNK + HEAD_ROOM)
        self.reader = Reader(READ_SIZE)  # one buffer for every read: one thread
        self.out: List[proto.Buffer] = []  # frames for the client, in order
        self.out_bytes = 0
        self.children: Dict[int, Child] = {}  # slot -> child, until Exited is sent
        self.silence = DEFAULT_SILENCE
        self.heard = time.monotonic()
        self.ending = ""  # why the agent is ending, once it is
        self.ended_at = 0.0
        self.blobs = BlobStore()
        self.spawn_only = not hasattr(os, "fork") or os.environ.get("SSHEXEC_AGENT_START") == (
            "spawn"
        )
        self._wake_r, self._wake_w = os.pipe()  # SIGCHLD wakes the select
        _nonblocking(self._wake_r)
        _nonblocking(self._wake_w)
        _nonblocking(self.frames_out)

    # ---- the loop ---------------------------------------------------------------------

    def serve(self, hello: proto.Hello) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w)
        self._send(hello)
        try:
            while not self.ending or self.children:
                self._step()
                if self.ending and time.monotonic() - self.ended_at > ENDING_LIMIT:
                    break  # a worker whose stdout never closes: report what is known
        finally:
            self._flush(block=True)
            self.blobs.close()

    def _step(self) -> None:
        readers = [self._wake_r]
        if not self.ending:
            readers.append(self.frames_in)
        if self.out_bytes < OUT_HIGH_WATER:
            for child in self.children.values():
                if self._may_read(child):
                    readers += [fd for fd in (child.stdout, child.stderr) if fd is not None]
        writers = [c.stdin for c in self.children.values() if c.pending and c.stdin is not None]
        if self.out:
            writers.append(self.frames_out)
        timeout = max(0.0, self.heard + self.silence - time.monotonic())
        if any(c.status is not None for c in self.children.values()):
            timeout = min(timeout, 0.05)  # an exited worker's stderr may linger
        if self.ending:
            timeout = min(timeout, 0.1)
        try:
            readable, _, _ = select.select(readers, writers, [], timeout)
        except InterruptedError:
            readable = []
        if self._wake_r in readable:
            _drain(self._wake_r)
        if self.frames_in in readable:
            self._read_client()
        for child in list(self.children.values()):
            self._pump(child, readable)
        self._reap()
        self._report_exits()
        if self.out:  # everything read in this pass goes out in one write
            self._flush(block=False)
        if not self.ending and time.monotonic() - self.heard > self.silence:
            self._end(f"the client said nothing for {self.silence:g} s")

    # ---- the client's side ------------------------------------------------------------

    def _read_client(self) -> None:
        try:
            chunk = self.reader.read(self.frames_in)
        except OSError:
            chunk = b""
        if not chunk:
            self._end("the channel to the client closed")
            return
        self.heard = time.monotonic()
        try:
            self.decoder.feed(chunk)
            for message in self.decoder.messages():
                self._command(message)
        except proto.FrameError as exc:
            self._end(f"the client sent an invalid frame: {exc}")

    def _command(self, message: proto.Message) -> None:
        if isinstance(message, proto.Data):
            child = self.children.get(message.slot)
            if child is not None and child.stdin is not None and not child.close_input:
                child.pending.append(memoryview(bytes(message.data)))  # type: ignore[arg-type]
        elif isinstance(message, proto.Ping):
            self._send(proto.Pong(message.nonce))
        elif isinstance(message, proto.Spawn):
            self._spawn(message.slot)
        elif isinstance(message, proto.CloseInput):
            child = self.children.get(message.slot)
            if child is not None:
                child.close_input = True
        elif isinstance(message, proto.Signal):
            child = self.children.get(message.slot)
            if child is not None and child.status is None:
                kill_group(child.pid, message.signum)
        elif isinstance(message, proto.Ack):
            child = self.children.get(message.slot)
            if child is not None:
                child.unacked = max(0, child.unacked - message.count)
        elif isinstance(message, proto.Store):
            self._store(message)
        elif isinstance(message, proto.Forget):
            self.blobs.forget(message.key)
        elif isinstance(message, proto.Configure):
            self.silence = message.silence_deadline
            # every frame from the client is at most a CHUNK of data (Store and Data
            # come in pieces); its max_frame may be less, never more
            self.decoder.max_frame = min(message.max_frame, proto.CHUNK) + HEAD_ROOM
        elif isinstance(message, proto.Shutdown):
            self._end(CLIENT_DONE)

    def _send(self, message: proto.Message) -> None:
        frame = proto.encode(message)
        self.out.append(frame)
        self.out_bytes += len(frame)

    def _flush(self, block: bool) -> None:
        """Write what is queued for the client, many frames to one write (``writev``: no
        joined copy; a partly written frame stays a view, so a big result is not copied
        again after every short write)."""
        deadline = time.monotonic() + 5.0
        while self.out:
            try:
                written = _write_many(self.frames_out, self.out[:IOV_LIMIT])
            except BlockingIOError:
                written = 0
            except OSError:  # the channel is gone: nobody to tell
                self.out, self.out_bytes = [], 0
                self._end("the channel to the client broke")
                return
            self._written(written)
            if not self.out or not block:
                return
            if time.monotonic() > deadline:
                return
            select.select([], [self.frames_out], [], 0.1)

    def _written(self, count: int) -> None:
        self.out_bytes -= count
        done = 0
        for piece in self.out:
            size = len(piece)
            if count < size:
                break
            count -= size
            done += 1
        del self.out[:done]
        if count:
            self.out[0] = memoryview(self.out[0])[count:]

    def _store(self, message: proto.Store) -> None:
        """A piece of a blob; a blob no directory could keep is the client's to hear of
        (the tasks naming it fail with the reason), never the agent's end."""
        try:
            reason = self.blobs.put(message.key, message.size, message.data)
        except OSError as exc:  # defensive: the store reports what it expects
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            self._send(proto.StoreFailed(message.key, reason))

    def _may_read(self, child: Child) -> bool:
        """Read this worker now: the client keeps up with it (or is gone: then what is
        left is read and dropped, so the worker's end is seen)."""
        return child.wants_output() or bool(self.ending)

    # ---- workers ----------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        if self.ending or slot in self.children:
            return
        pipes: List[int] = []
        try:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            pipes = [in_r, in_w, out_r, out_w, err_r, err_w]
            pid = start_worker(
                in_r, out_w, err_w, self.blobs.path, self.stage1 if self.spawn_only else None
            )
        except OSError as exc:
            for fd in pipes:
                close(fd)
            self._send(proto.SpawnFailed(slot, f"{type(exc).__name__}: {exc}"))
            return
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for fd in (in_w, out_r, err_r):
            _nonblocking(fd)
        _widen(out_r)
        _widen(in_w)
        child = Child(slot, pid, in_w, out_r, err_r)
        self.children[slot] = child
        if self.spawn_only:  # a fresh interpreter: it reads stage 1 and the bundle first
            header = len(self.bundle).to_bytes(8, "big")
            child.pending += [memoryview(self.stage1), memoryview(header + self.bundle)]
        self._send(proto.Spawned(slot, pid))

    def _pump(self, child: Child, readable: List[int]) -> None:
        if child.stdin is not None and child.pending:  # just queued: try now, not a pass later
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
        if child.close_input and not child.pending and child.stdin is not None:
            close(child.stdin)
            child.stdin = None
        for stream in (1, 2):
            fd = child.stdout if stream == 1 else child.stderr
            if fd is None or fd not in readable:
                continue
            try:
                data = self.reader.read(fd)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                child.unacked += len(data)
                self._send(proto.Data(child.slot, stream, data))
                continue
            close(fd)
            if stream == 1:
                child.stdout = None
            else:
                child.stderr = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            for child in self.children.values():
                if child.pid == pid:
                    if os.WIFSIGNALED(status):
                        child.status = (0, os.WTERMSIG(status))
                    else:
                        child.status = (os.WEXITSTATUS(status), 0)
                    child.reaped_at = time.monotonic()

    def _report_exits(self) -> None:
        now = time.monotonic()
        for slot, child in list(self.children.items()):
            if child.status is None or child.stdout is not None:
                continue  # not reaped, or the last of its frames is still to come
            if child.stderr is not None:
                if now - child.reaped_at < STDERR_LINGER:
                    continue
                close(child.stderr)
                child.stderr = None
            if child.stdin is not None:
                close(child.stdin)
            del self.children[slot]
            self._send(proto.Exited(slot, *child.status))

    def _end(self, why: str) -> None:
        """Stop taking commands; end every worker (TERM, then KILL), report, and exit."""
        if self.ending:
            return
        self.ending, self.ended_at = why, time.monotonic()
        if self.children or why != CLIENT_DONE:
            print(f"sshexec agent: {why}; ending its {len(self.children)} workers", file=sys.stderr)
        for child in self.children.values():
            if child.status is None:
                kill_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        while any(c.status is None for c in self.children.values()):
            if time.monotonic() > deadline:
                for child in self.children.values():
                    if child.status is None:
                        kill_group(child.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
            time.sleep(0.01)
            self._reap()
            if time.monotonic() > deadline:
                break


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def main(stage1: bytes, bundle: bytes) -> None:
    """Stage 1's last step on the node: fds 0 and 1 are the channel to the client."""
    from . import worker  # imported once here: every forked worker has it already

    frames_in, frames_out = worker._claim_stdio()
    agent = Agent(frames_in, frames_out, stage1, bundle)
    hello = worker.Worker(frames_in, frames_out).hello()
    try:
        agent.serve(hello)
    except BaseException as exc:  # a bug of ours: the workers must not outlive the agent
        print(f"sshexec agent failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        agent._end("the agent failed")
    os._exit(0)
