"""The node agent: one process per host, started by stage 1 over the host's one channel.

Owns: the agent's loop (one thread, ``select``: a parent that is safe to fork), asking
``spawn.start_worker`` for workers (forked from this pristine parent, which has imported
the worker code once; fresh interpreters where fork is missing or
``SSHEXEC_AGENT_START=spawn``), relaying each worker's stdin, stdout and stderr over the
channel as ``Data`` frames (never decoding them; what several workers wrote goes out in
one write), reaping workers and reporting each exit status or signal exactly
(``Exited``, after the last byte of that worker's stdout), signals on request, the blob
store (``Store``: a map's function or an initializer, in a private directory its workers
read), and liveness: when the channel closes, or the client has said nothing for
``silence_deadline`` seconds (a silent partition), every worker's process group is
killed and the agent exits. Must not import: any client module, asyncio; and it must
never start a thread.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from .._wire import protocol as proto
from . import reaper
from .fdio import Reader
from .spawn import close, kill_group, kill_left_group, start_worker

DEFAULT_SILENCE = 30.0  # seconds, until Configure says otherwise
READ_SIZE = 1 << 20
PIPE_SIZE = 1 << 20  # Linux's default pipe-max-size, allowed to every user
IOV_LIMIT = 512  # frames per writev, under every system's IOV_MAX
OUT_HIGH_WATER = 16 << 20  # bytes queued for the client beyond which workers are not read
LINGER = 0.5  # seconds a reaped worker's pipes may stay open (a process that escaped has them)
LINGER_READS = 16  # reads of a reaped worker's pipe at most, after LINGER
TERM_GRACE = 1.0  # seconds between SIGTERM and SIGKILL when the agent ends its workers
ENDING_LIMIT = 10.0  # seconds an ending agent waits for its workers' last output
BLOB_PREFIX = "sshexec-blobs-"
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


class Agent:
    def __init__(self, frames_in: int, frames_out: int, stage1: bytes, bundle: bytes) -> None:
        self.frames_in, self.frames_out = frames_in, frames_out
        self.stage1, self.bundle = stage1, bundle  # to spawn fresh interpreters
        self.decoder = proto.FrameDecoder()
        self.reader = Reader(READ_SIZE)  # one buffer for every read: one thread
        self.out: List[proto.Buffer] = []  # frames for the client, in order
        self.out_bytes = 0
        self.children: Dict[int, Child] = {}  # slot -> child, until Exited is sent
        self.running: Dict[int, Child] = {}  # pid -> child, until reaped
        self.exited: List[Child] = []  # reaped; Exited follows their output's end
        self.streams: Dict[int, Tuple[Child, int]] = {}  # fd -> its child, 0 (stdin), 1 or 2
        self.poller = select.poll()
        self.watched: Dict[int, int] = {}  # fd -> the events it is registered for
        self.reading = True  # workers' outputs are watched (under OUT_HIGH_WATER)
        self.silence = DEFAULT_SILENCE
        self.heard = time.monotonic()
        self.ending = ""  # why the agent is ending, once it is
        self.ended_at = 0.0
        self.killed = False  # ending: SIGKILL has followed SIGTERM
        self.stop_signal = 0  # a signal that asks the agent to end (SIGTERM, SIGHUP)
        self.subreaper = False  # orphaned descendants of workers come to the agent
        self.blob_dir = _blob_dir()
        self.spawn_only = not hasattr(os, "fork") or os.environ.get("SSHEXEC_AGENT_START") == (
            "spawn"
        )
        self._wake_r, self._wake_w = os.pipe()  # a signal (SIGCHLD) wakes the poll
        _nonblocking(self._wake_r)
        _nonblocking(self._wake_w)
        _nonblocking(self.frames_out)

    # ---- the loop ---------------------------------------------------------------------

    def serve(self, hello: proto.Hello) -> None:
        self.subreaper = reaper.become_subreaper()
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._stop)
        signal.set_wakeup_fd(self._wake_w)
        self._watch(self._wake_r, select.POLLIN)
        self._watch(self.frames_in, select.POLLIN)
        self._send(hello)
        self._watch(self.frames_out, select.POLLOUT)  # the first pass writes it
        try:
            while not self.ending or self.children:
                self._step()
                if self.ending and time.monotonic() - self.ended_at > ENDING_LIMIT:
                    break  # a worker whose stdout never closes: report what is known
        finally:
            self.finish()
            self._flush(block=True)
            shutil.rmtree(self.blob_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: object) -> None:
        self.stop_signal = signum  # acted on by the loop, never inside a handler

    def _step(self) -> None:
        try:
            events = self.poller.poll(self._timeout())
        except InterruptedError:
            events = []
        woken = False
        for fd, _ in events:
            if fd == self._wake_r:
                _drain(fd)
                woken = True
            elif fd == self.frames_in:
                self._read_client()
            elif fd in self.streams:  # else closed in this pass (a worker's end, CloseInput)
                child, stream = self.streams[fd]
                if stream:
                    self._read_output(child, stream)
                else:
                    self._write_input(child)
        if self.stop_signal:
            self._end(f"the agent got signal {_signal_name(self.stop_signal)}")
        if woken or self.ending:
            self._reap()
        if self.exited:
            self._report_exits()
        if self.ending:
            self._escalate()
        if self.out:  # everything read in this pass goes out in one write
            self._flush(block=False)
        self._watch(self.frames_out, select.POLLOUT if self.out else 0)
        if (self.out_bytes < OUT_HIGH_WATER) != self.reading:
            self._read_workers(not self.reading)
        if not self.ending and time.monotonic() - self.heard > self.silence:
            self._end(f"the client said nothing for {self.silence:g} s")

    def _timeout(self) -> int:
        """Milliseconds until the next thing the loop must do without being woken."""
        if self.ending:
            due = self.ended_at + (ENDING_LIMIT if self.killed else TERM_GRACE)
        else:
            due = self.heard + self.silence
        for child in self.exited:
            due = min(due, child.reaped_at + LINGER)
        return max(0, int((due - time.monotonic()) * 1000) + 1)

    def _watch(self, fd: int, events: int) -> None:
        """Poll ``fd`` for ``events`` from now on (0: not at all). Registered once and changed
        only when what is wanted changes, not rebuilt every pass."""
        if self.watched.get(fd, 0) == events:
            return
        if not events:
            del self.watched[fd]
            self.poller.unregister(fd)
            return
        if fd in self.watched:
            self.poller.modify(fd, events)
        else:
            self.poller.register(fd, events)
        self.watched[fd] = events

    # ---- the client's side ------------------------------------------------------------

    def _read_client(self) -> None:
        try:
            chunk = self.reader.read(self.frames_in)
        except BlockingIOError:
            return
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
                self._write_input(child)  # now, not a pass later
        elif isinstance(message, proto.Ping):
            self._send(proto.Pong(message.nonce))
        elif isinstance(message, proto.Spawn):
            self._spawn(message.slot)
        elif isinstance(message, proto.CloseInput):
            child = self.children.get(message.slot)
            if child is not None:
                child.close_input = True
                self._write_input(child)
        elif isinstance(message, proto.Signal):
            child = self.children.get(message.slot)
            if child is not None and child.status is None:
                kill_group(child.pid, message.signum)
        elif isinstance(message, proto.Store):
            self._store(message.key, message.data)
        elif isinstance(message, proto.Configure):
            self.silence = message.silence_deadline
            self.decoder.max_frame = message.max_frame
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
            if not self.out or not block or time.monotonic() > deadline:
                return
            _wait_writable(self.frames_out, 0.1)

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

    def _store(self, key: bytes, data: proto.Tail) -> None:
        path = os.path.join(self.blob_dir, key.hex())
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as f:
            for piece in proto.tail_pieces(data):
                f.write(piece)
        os.replace(temporary, path)

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
                in_r, out_w, err_w, self.blob_dir, self.stage1 if self.spawn_only else None
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
        self.children[slot] = self.running[pid] = child
        self.streams.update({in_w: (child, 0), out_r: (child, 1), err_r: (child, 2)})
        if self.reading:
            self._watch(out_r, select.POLLIN)
            self._watch(err_r, select.POLLIN)
        self._send(proto.Spawned(slot, pid))
        if self.spawn_only:  # a fresh interpreter: it reads stage 1 and the bundle first
            header = len(self.bundle).to_bytes(8, "big")
            child.pending += [memoryview(self.stage1), memoryview(header + self.bundle)]
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
            self._watch(child.stdin, select.POLLOUT if child.pending else 0)

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
            self._send(proto.Data(child.slot, stream, data))
            return True
        self._close(child, stream)
        return False

    def _close(self, child: Child, stream: int) -> None:
        fd = (child.stdin, child.stdout, child.stderr)[stream]
        if fd is None:
            return
        self._watch(fd, 0)
        self.streams.pop(fd, None)
        close(fd)
        if stream == 0:
            child.stdin, child.pending = None, []
        elif stream == 1:
            child.stdout = None
        else:
            child.stderr = None

    def _read_workers(self, on: bool) -> None:
        """Watch every worker's output again, or no longer (the client is not keeping up:
        unregistered, since a closed pipe would wake the poll for nothing)."""
        self.reading = on
        for child in self.children.values():
            for fd in (child.stdout, child.stderr):
                if fd is not None:
                    self._watch(fd, select.POLLIN if on else 0)

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
            child = self.running.pop(pid, None)
            if child is None:
                continue  # a worker's orphan, adopted by this subreaper: reaped, nothing more
            if os.WIFSIGNALED(status):
                child.status = (0, os.WTERMSIG(status))
            else:
                child.status = (os.WEXITSTATUS(status), 0)
            child.reaped_at = time.monotonic()
            self.exited.append(child)
            self._bury(child)

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

    def _report_exits(self) -> None:
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
            del self.children[child.slot]
            assert child.status is not None
            self._send(proto.Exited(child.slot, *child.status))

    # ---- the end ----------------------------------------------------------------------

    def _end(self, why: str) -> None:
        """Stop taking commands and end every worker (TERM now, KILL after TERM_GRACE; the
        loop reports their exits). Kill first, log last: stderr may be gone."""
        if self.ending:
            return
        self.ending, self.ended_at = why, time.monotonic()
        self._watch(self.frames_in, 0)
        self._signal_all(signal.SIGTERM)
        if self.children or why != CLIENT_DONE:
            _log(f"sshexec agent: {why}; ending its {len(self.children)} workers")

    def _escalate(self) -> None:
        if not self.killed and time.monotonic() - self.ended_at > TERM_GRACE:
            self.killed = True
            self._signal_all(signal.SIGKILL)

    def _signal_all(self, signum: int) -> None:
        for child in self.running.values():
            kill_group(child.pid, signum)
        if self.running or reaper.children(os.getpid()) != []:  # else nothing can be left
            reaper.sweep(signum, ancestors=[os.getpid()], groups=list(self.running))

    def finish(self) -> None:
        """On the way out, however it came: nothing this agent started outlives it."""
        self._signal_all(signal.SIGKILL)
        self._reap()


def _log(text: str) -> None:
    """A line on the agent's stderr, which is gone when the client was killed: never raises."""
    try:
        os.write(2, text.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _wait_writable(fd: int, seconds: float) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll(int(seconds * 1000))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def _blob_dir() -> str:
    """A private directory for blobs; those of agents that died without cleaning up
    (killed) are removed."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    for name in os.listdir(base):
        if name.startswith(BLOB_PREFIX):
            pid = name[len(BLOB_PREFIX) :].split("-", 1)[0]
            path = os.path.join(base, name)
            try:
                if os.stat(path).st_uid == os.getuid() and pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
    return tempfile.mkdtemp(prefix=f"{BLOB_PREFIX}{os.getpid()}-", dir=base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def main(stage1: bytes, bundle: bytes) -> None:
    """Stage 1's last step on the node: fds 0 and 1 are the channel to the client."""
    from . import worker  # imported once here: every forked worker has it already

    frames_in, frames_out = worker._claim_stdio()
    agent = Agent(frames_in, frames_out, stage1, bundle)
    hello = worker.Worker(frames_in, frames_out).hello()
    try:
        agent.serve(hello)
    except BaseException as exc:  # a bug of ours: the workers must not outlive the agent
        try:
            agent.finish()
        finally:
            _log(f"sshexec agent failed: {type(exc).__name__}: {exc}")
            os._exit(1)
    os._exit(0)
