"""The node agent: one process per host, started by stage 1 over the host's one channel.

Owns: the agent's loop (one thread, ``poll``: a parent that is safe to fork, and no
FD_SETSIZE limit; each descriptor registered once and changed only when what is wanted of
it changes), the channel to the client (commands in; what the workers wrote, as ``Data``
frames, many to one write), its workers through ``children.Children`` (forked from this
pristine parent, which has imported the worker code once; fresh interpreters where fork
is missing or ``SSHEXEC_AGENT_START=spawn``; a worker is read only while the client has
acknowledged all but ``WINDOW`` of its bytes, ``Ack``; its tasks' limits and ``Kill``s
checked by ``limits.Limits`` when due, each pass), handing ``Store`` pieces and
``Forget`` to the blob store (``store.BlobStore``; a blob it cannot keep is reported,
``StoreFailed``), staged files to ``staging.Staging`` (the workers' directories, entered
to fork each one), and the end: when the
channel closes, the client has said nothing for ``silence_deadline`` seconds (a silent
partition), it sends ``Shutdown``, or the agent gets SIGTERM or SIGHUP, every worker and
everything a worker started (the agent is their child subreaper on Linux) gets SIGTERM,
then SIGKILL, and the agent exits, even when every pipe is gone: kill first, log last.
Its own writes to the client prove nothing of the client (sshd takes them whether or not
the client is there). It sends a ``Beat`` every ``beat_interval`` (from ``Configure``) on
its own clock, so an idle but healthy agent is never silent to the client.
Must not import: any client module, asyncio; and it must never start a thread.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Dict, List

from .._wire import protocol as proto
from . import reaper
from .children import Children
from .fdio import Reader
from .spawn import may_fork
from .staging import STAGE_COMMANDS, Staging
from .store import BlobStore

DEFAULT_SILENCE = 30.0  # seconds, until Configure says otherwise
READ_SIZE = 1 << 20
IOV_LIMIT = 512  # frames per writev, under every system's IOV_MAX
OUT_HIGH_WATER = 16 << 20  # bytes queued for the client beyond which workers are not read
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


class Agent:
    def __init__(self, frames_in: int, frames_out: int, stage1: bytes, bundle: bytes) -> None:
        self.frames_in, self.frames_out = frames_in, frames_out
        self.decoder = proto.FrameDecoder(proto.CHUNK + HEAD_ROOM)
        self.reader = Reader(READ_SIZE)  # one buffer for every read: one thread
        self.out: List[proto.Buffer] = []  # frames for the client, in order
        self.out_bytes = 0
        self.poller = select.poll()
        self.watched: Dict[int, int] = {}  # fd -> the events it is registered for
        self.silence = DEFAULT_SILENCE
        self.heard = time.monotonic()
        self.beat_every = 0.0  # seconds between Beats, from Configure (0: none)
        self.next_beat = 0.0
        self.ending = ""  # why the agent is ending, once it is
        self.ended_at = 0.0
        self.killed = False  # ending: SIGKILL has followed SIGTERM
        self.stop_signal = 0  # a signal that asks the agent to end (SIGTERM, SIGHUP)
        self.blobs = BlobStore()
        self.staging = Staging(self._send)  # files=: the workers' directories, the cache
        self.children = Children(
            self._send,
            self._watch,
            self.reader,
            self.blobs.path,
            None if may_fork() else (stage1, bundle),
        )
        self._wake_r, self._wake_w = os.pipe()  # a signal (SIGCHLD) wakes the poll
        _nonblocking(self._wake_r)
        _nonblocking(self._wake_w)
        _nonblocking(self.frames_out)

    # ---- the loop ---------------------------------------------------------------------

    def serve(self, hello: proto.Hello) -> None:
        self.children.subreaper = reaper.become_subreaper()
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._stop)
        signal.set_wakeup_fd(self._wake_w)
        self._watch(self._wake_r, select.POLLIN)
        self._watch(self.frames_in, select.POLLIN)
        self._send(hello)
        self._watch(self.frames_out, select.POLLOUT)  # the first pass writes it
        try:
            while not self.ending or self.children.by_slot:
                self._step()
                if self.ending and time.monotonic() - self.ended_at > ENDING_LIMIT:
                    break  # a worker whose stdout never closes: report what is known
        finally:
            self.finish()
            self._flush(block=True)
            self.blobs.close()
            self.staging.close()

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
            else:
                self.children.ready(fd)
        if self.stop_signal:
            self._end(f"the agent got signal {_signal_name(self.stop_signal)}")
        limits = self.children.limits
        if not self.ending and limits.next_check <= time.monotonic():
            limits.check(time.monotonic())  # a task past its time or memory, or killed
        if woken or self.ending:
            self.children.reap()
        if self.children.exited:
            self.children.report_exits()
        if self.ending:
            self._escalate()
        self._beat()
        if self.out:  # everything read in this pass goes out in one write
            self._flush(block=False)
        self._watch(self.frames_out, select.POLLOUT if self.out else 0)
        if (self.out_bytes < OUT_HIGH_WATER) != self.children.reading:
            self.children.read_all(not self.children.reading)
        if not self.ending and time.monotonic() - self.heard > self.silence:
            self._end(f"the client said nothing for {self.silence:g} s")

    def _timeout(self) -> int:
        """Milliseconds until the next thing the loop must do without being woken."""
        if self.ending:
            due = self.ended_at + (ENDING_LIMIT if self.killed else TERM_GRACE)
        else:
            due = self.heard + self.silence
            if self.beat_every > 0:
                due = min(due, self.next_beat)
        due = min(due, self.children.due())
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
            self.children.feed(message.slot, message.data)
        elif isinstance(message, proto.Ping):
            self._send(proto.Pong(message.nonce))
        elif isinstance(message, proto.Spawn):
            if not self.ending:
                failed = self.staging.before_spawn(message.slot)  # its directory, if any
                if failed:
                    self._send(proto.SpawnFailed(message.slot, failed))
                else:
                    self.children.spawn(message.slot)
                self.staging.after_spawn()
        elif isinstance(message, proto.CloseInput):
            self.children.close_input(message.slot)
        elif isinstance(message, proto.Signal):
            self.children.signal(message.slot, message.signum)
        elif isinstance(message, proto.Kill):
            self.children.limits.kill(message.slot, message.task_id)
        elif isinstance(message, proto.Ack):
            self.children.ack(message.slot, message.count)
        elif isinstance(message, proto.Store):
            self._store(message)
        elif isinstance(message, proto.Forget):
            self.blobs.forget(message.key)
        elif isinstance(message, proto.Configure):
            self.silence = message.silence_deadline
            # every frame from the client is at most a CHUNK of data (Store and Data
            # come in pieces); its max_frame may be less, never more
            self.decoder.max_frame = min(message.max_frame, proto.CHUNK) + HEAD_ROOM
            self.beat_every = message.beat_interval
        elif isinstance(message, proto.Shutdown):
            self._end(CLIENT_DONE)
        elif isinstance(message, STAGE_COMMANDS):
            self.staging.command(message)

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

    def _store(self, message: proto.Store) -> None:
        """A piece of a blob; a blob no directory could keep is the client's to hear of
        (the tasks naming it fail with the reason), never the agent's end."""
        try:
            reason = self.blobs.put(message.key, message.size, message.data)
        except OSError as exc:  # defensive: the store reports what it expects
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            self._send(proto.StoreFailed(message.key, reason))

    def _beat(self) -> None:
        """A Beat when one is due: on the agent's own clock, whatever the client sends."""
        if self.beat_every > 0 and not self.ending:
            now = time.monotonic()
            if now >= self.next_beat:
                self._send(proto.Beat())
                self.next_beat = now + self.beat_every

    # ---- the end ----------------------------------------------------------------------

    def _end(self, why: str) -> None:
        """Stop taking commands and end every worker (TERM now, KILL after TERM_GRACE; the
        loop reports their exits). Kill first, log last: stderr may be gone."""
        if self.ending:
            return
        self.ending, self.ended_at = why, time.monotonic()
        self._watch(self.frames_in, 0)
        self.children.signal_all(signal.SIGTERM)
        self.children.ignore_window()  # nobody will acknowledge: read to the end, to see it
        count = len(self.children.by_slot)
        if count or why != CLIENT_DONE:
            _log(f"sshexec agent: {why}; ending its {count} workers")

    def _escalate(self) -> None:
        if not self.killed and time.monotonic() - self.ended_at > TERM_GRACE:
            self.killed = True
            self.children.signal_all(signal.SIGKILL)

    def finish(self) -> None:
        """On the way out, however it came: nothing this agent started outlives it."""
        self.children.signal_all(signal.SIGKILL)
        self.children.reap()


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
