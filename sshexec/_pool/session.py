"""The client end of a host's agent: one byte pipe per host, one ``Channel`` per worker.

Owns: ``HostSession``: opening the pipe (the transport runs the bootstrap command), the
handshake (shell chatter, the bundle), the agent's ``Hello`` and ``Configure``; the
reader that hands each worker's bytes to its ``WorkerChannel`` (in the pipe's own
callback where the pipe can push, ``push_to``: no hop to a task); every worker's writes
coalesced into one pipe write per loop pass (the dispatcher's in the pass that placed
them: ``hold``/``release``); spawning and signalling workers; blobs
stored once per host (``store``, kept in ``blobs``: see ``blobs.HostBlobs``); the
acknowledgements (``Ack``) that let the agent read a worker on: sent as the link reader
takes its stdout and the output router its stderr (held while the router is backlogged,
``Pace``), so a worker that outprints the client waits, with at most a ``WINDOW`` of
its bytes on the way or in the client's memory; liveness (a ``Ping`` every
``keepalive_interval``, by which the agent judges the client; the agent ``Beat``s on its
own clock as often, every byte received counts as hearing from it, and so do our own
writes to it while they still drain (a big upload over a slow link); the session is lost
when the agent has been silent for three intervals, as the agent quits when the client
is); and its end, which ends every worker channel with the
reason. Each worker's streams are a ``channel.WorkerChannel``; the agent's answers about
staged files go to ``files`` (``staging.StageReplies``), which hears of the loss too.
Must not import: asyncssh or subprocess (it sees the ``Transport`` protocol only).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from typing import Dict, List, Optional, Set

from .._errors import WorkerStartupError
from .._logs import logger
from .._transports.base import Channel, StderrSink, Transport, describe_exit, handshake
from .._wire import protocol as proto
from .blobs import HostBlobs
from .channel import Pace, WorkerChannel
from .staging import STAGE_REPLIES, StageReplies

log = logger("sshexec.pool")

SMALL = 1 << 16  # pieces under this size are joined into one write
MISSED_BEATS = 3  # keepalive intervals of silence that end a session, on both ends
_nonces = itertools.count(1)


class HostSession:
    """The agent on one host. Loop thread only."""

    def __init__(
        self,
        transport: Transport,
        python: str,
        on_stderr: StderrSink,
        max_frame: int,
        keepalive_interval: float,
        pace: Optional[Pace] = None,
    ) -> None:
        self.transport, self.python = transport, python
        self.host = transport.host
        self.on_stderr = on_stderr
        self.max_frame, self.keepalive_interval = max_frame, keepalive_interval
        self.hello: Optional[proto.Hello] = None
        self.is_alive = False
        self.lost_reason = ""
        self.pace = pace
        self.piece = min(proto.CHUNK, max_frame)  # data per Data or Store frame, at most
        self.blobs = HostBlobs(self.send, self.piece)
        self.files = StageReplies(self.host)  # the agent's answers about staged files
        self._pipe: Optional[Channel] = None
        self._decoder = proto.FrameDecoder(max_frame + 4096)
        self._channels: Dict[int, WorkerChannel] = {}
        self._spawning: Dict[int, asyncio.Future[int]] = {}
        self._slots = itertools.count(1)
        self._unacked: Set[WorkerChannel] = set()  # acknowledgements held for the router
        self._acking: Optional[asyncio.Task[None]] = None
        self._out: List[proto.Buffer] = []
        self._flush_due = False
        self._held = False  # hold(): the dispatcher writes once it has placed everything
        self._failure: Optional[BaseException] = None  # what handling the agent's bytes met
        self._pushed: Optional[asyncio.Future[None]] = None  # _read waits on it when pushed
        self._heard = 0.0
        self._bytes_written = 0  # handed to the pipe; minus its backlog: taken by the host
        self._tasks: List[asyncio.Task[None]] = []

    async def open(self) -> proto.Hello:
        """Start the agent (the bootstrap) and read its Hello; raises WorkerStartupError."""
        loop = asyncio.get_running_loop()
        pipe = await self.transport.open_channel(self.on_stderr)
        self._pipe = pipe
        try:
            self._decoder.feed(await handshake(pipe, self.host, self.python))
            hello = await read_hello(pipe, self.host, self._decoder, "agent")
        except BaseException:
            await pipe.aclose(0.1)
            raise
        self.hello, self.is_alive, self._heard = hello, True, loop.time()
        interval = self.keepalive_interval
        self.send(proto.Configure(self.max_frame, MISSED_BEATS * interval, interval))
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._keep_alive())]
        return hello

    # ---- workers ------------------------------------------------------------------------

    async def spawn(self, on_stderr: StderrSink) -> WorkerChannel:
        """A new worker (forked by the agent): its channel once it runs."""
        if not self.is_alive:
            raise WorkerStartupError(self.host, "connect", self.lost_reason or "no agent")
        slot = next(self._slots)
        channel = WorkerChannel(self, slot, on_stderr)
        self._channels[slot] = channel
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._spawning[slot] = started
        self.send(proto.Spawn(slot))
        try:
            channel.pid = await started
        except BaseException:
            self._channels.pop(slot, None)
            raise
        finally:
            self._spawning.pop(slot, None)
        return channel

    def store(self, key: bytes, data: bytes) -> bool:
        """Make ``data`` available to this host's workers under ``key``, in pieces;
        False when it already was (then ``len(data)`` bytes did not travel again)."""
        return self.blobs.store(key, data)

    @property
    def bytes_saved(self) -> int:
        return self.blobs.bytes_saved

    @property
    def bytes_stored(self) -> int:
        return self.blobs.bytes_stored

    # ---- flow control -------------------------------------------------------------------

    def ack(self, channel: WorkerChannel) -> None:
        """The output router took a quarter window of ``channel``'s stderr: acknowledge
        it, unless the router is backlogged (then once it has caught up)."""
        pace = self.pace
        if pace is None or not pace.is_backlogged:
            channel.acknowledge()
            return
        self._unacked.add(channel)
        if self._acking is None:
            self._acking = asyncio.get_running_loop().create_task(self._ack_when_drained(pace))

    async def _ack_when_drained(self, pace: Pace) -> None:
        try:
            await pace.drained()
        finally:
            self._acking = None
        channels, self._unacked = self._unacked, set()
        for channel in channels:
            channel.acknowledge()

    # ---- writing --------------------------------------------------------------------------

    def send(self, message: proto.Message) -> None:
        head, tail = proto.encode_parts(message)
        self._out.append(head)
        self._out.extend(tail)
        self._flush_soon()

    def send_data(self, slot: int, data: proto.Buffer) -> None:
        piece = self.piece
        if len(data) <= piece:
            self.send(proto.Data(slot, 0, (data,)))
            return
        view = memoryview(data)
        for at in range(0, len(view), piece):
            self.send(proto.Data(slot, 0, (view[at : at + piece],)))

    def _flush_soon(self) -> None:
        if not self._flush_due and not self._held:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def hold(self) -> None:
        """Until ``release``: what is sent waits, to go out in one write then."""
        self._held = True

    def release(self) -> None:
        """Write what was sent while held now, in this loop pass (a round trip's call
        leaves in the pass that placed it, not in the next)."""
        self._held = False
        self._flush()  # a flush already scheduled finds nothing left

    def _flush(self) -> None:
        """Everything queued in this loop pass, small pieces joined: one write for the
        frames of every worker, big tails written where they lie."""
        self._flush_due = False
        out, self._out = self._out, []
        if self._pipe is None or not out:
            return
        small: List[proto.Buffer] = []
        written = 0
        for piece in out:
            size = len(piece)
            written += size
            if size < SMALL:
                small.append(piece)
                continue
            if small:
                self._pipe.write(b"".join(small))
                small = []
            self._pipe.write(piece)
        if small:
            self._pipe.write(b"".join(small) if len(small) > 1 else small[0])
        self._bytes_written += written

    async def drain(self) -> None:
        if self._pipe is not None:
            await self._pipe.drain()

    # ---- reading --------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._pipe is not None
        pipe, reason = self._pipe, ""
        push_to = getattr(pipe, "push_to", None)
        try:
            for message in self._decoder.messages():  # what came with the Hello
                self._on_message(message)
            if push_to is not None:  # each chunk handled in the pipe's own callback
                done = self._pushed = asyncio.get_running_loop().create_future()
                push_to(self._take).add_done_callback(lambda _: _settle(done))
                await done
                if self._failure is not None:
                    raise self._failure
            else:
                while True:
                    chunk = await pipe.read()
                    if not chunk:
                        break
                    self._take(chunk)
                    if self._failure is not None:
                        raise self._failure
        except proto.FrameError as exc:
            reason = f"the agent on {self.host} sent an invalid frame: {exc}"
            log.error("%s", reason)
        except asyncio.CancelledError:
            reason = "the session was closed"
            raise
        except BaseException as exc:  # a bug of ours: still end every worker channel
            log.exception("reading from the agent on host=%s failed", self.host)
            reason = f"sshexec could not read from the agent ({type(exc).__name__}: {exc})"
        finally:
            stop = getattr(pipe, "stop_pushing", None)
            if stop is not None:
                stop()
            if not reason:
                how = await pipe.exit_reason(1.0)
                reason = f"the connection to {self.host} was lost (agent: {how})"
            self._lost(reason)

    def _take(self, chunk: bytes) -> None:
        """What the agent sent, handled at once (the pipe's callback, or the read loop);
        what fails here is raised by ``_read``."""
        if self._failure is not None:
            return
        try:
            self._heard = asyncio.get_running_loop().time()
            self._decoder.feed(chunk)
            for message in self._decoder.messages():
                self._on_message(message)
        except BaseException as exc:
            self._failure = exc
            if self._pushed is not None:
                _settle(self._pushed)

    def _on_message(self, message: proto.Message) -> None:
        if isinstance(message, proto.Data):
            channel = self._channels.get(message.slot)
            if channel is not None:
                channel.data(message.stream, bytes(message.data))  # type: ignore[arg-type]
        elif isinstance(message, proto.Exited):
            channel = self._channels.pop(message.slot, None)
            if channel is not None:
                channel.ended(describe_exit(message.status, _signal_name(message.signum)))
        elif isinstance(message, proto.Stopped):
            channel = self._channels.get(message.slot)
            if channel is not None:
                channel.stopped(message)
        elif isinstance(message, proto.Spawned):
            started = self._spawning.get(message.slot)
            if started is not None and not started.done():
                started.set_result(message.pid)
        elif isinstance(message, proto.SpawnFailed):
            started = self._spawning.get(message.slot)
            if started is not None and not started.done():
                started.set_exception(
                    WorkerStartupError(
                        self.host, "spawn", f"the agent could not start a worker: {message.reason}"
                    )
                )
        elif isinstance(message, proto.StoreFailed):
            log.warning("the agent on host=%s could not keep a blob: %s", self.host, message.reason)
            self.blobs.store_failed(message.key, message.reason)
        elif isinstance(message, (proto.Beat, proto.Pong)):
            pass  # its arrival is the point (self._heard)
        elif isinstance(message, STAGE_REPLIES):
            self.files.on_message(message)
        else:
            log.warning(
                "unexpected %s from the agent on host=%s", type(message).__name__, self.host
            )

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.keepalive_interval
        waiting, taken = 0, 0  # our bytes held back at the last look, and those taken by then
        while self.is_alive:
            await asyncio.sleep(interval)
            now = loop.time()
            backlog = self._pipe.backlog() if self._pipe is not None else 0
            # bytes that had to wait (the SSH window, a full pipe) moved on since: the host
            # takes them, so it is there. Bytes that never waited prove nothing (a socket
            # or sshd takes a ping whether or not the host is still there).
            if waiting and self._bytes_written - backlog > taken:
                self._heard = max(self._heard, now)
            waiting, taken = backlog, self._bytes_written - backlog
            silent = now - self._heard
            if silent > MISSED_BEATS * interval:
                reason = f"the agent on {self.host} has said nothing for {silent:.0f} s"
                log.warning("%s; giving its workers up", reason)
                self._lost(reason)
                if self._pipe is not None:
                    self._pipe.kill()
                return
            self.send(proto.Ping(next(_nonces)))

    def _lost(self, reason: str) -> None:
        if not self.is_alive and not self._channels and not self._spawning:
            return
        self.is_alive, self.lost_reason = False, self.lost_reason or reason
        self.files.lost(self.lost_reason)
        for started in self._spawning.values():
            if not started.done():
                started.set_exception(WorkerStartupError(self.host, "connect", reason))
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.ended(reason)

    async def aclose(self, grace: float) -> None:
        """End the agent: it ends what workers it still has, then exits. Bounded."""
        if self._pipe is None:
            return
        if self.is_alive:
            self.send(proto.Shutdown())
            self._flush()
        await self._pipe.aclose(grace)
        self._lost("the session was closed")
        tasks = self._tasks + ([self._acking] if self._acking is not None else [])
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


def _signal_name(signum: int) -> Optional[str]:
    if not signum:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


async def read_hello(
    channel: Channel, host: str, decoder: proto.FrameDecoder, who: str
) -> proto.Hello:
    """The first message on a channel, which must be the ``Hello`` of ``who`` (the agent,
    or a worker it forked) in this client's protocol; raises WorkerStartupError."""
    while True:
        try:
            message = next(decoder.messages(), None)
        except proto.FrameError as exc:
            raise WorkerStartupError(host, "bootstrap", f"garbled first frame: {exc}") from exc
        if message is not None:
            break
        chunk = await channel.read()
        if not chunk:
            how = await channel.exit_reason(2.0)
            tail = channel.stderr_tail()
            raise WorkerStartupError(
                host,
                "bootstrap",
                f"the {who} ended before saying Hello ({how})"
                + (f"; stderr: {tail[-600:]}" if tail else ""),
            )
        decoder.feed(chunk)
    if not isinstance(message, proto.Hello):
        raise WorkerStartupError(host, "bootstrap", f"expected Hello, got {type(message).__name__}")
    if message.protocol != proto.PROTOCOL_VERSION:
        raise WorkerStartupError(
            host,
            "version",
            f"the {who} speaks protocol {message.protocol}, this client {proto.PROTOCOL_VERSION}",
            "Clear ~/.cache/sshexec on the node.",
        )
    return message


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
