"""One worker as the pool sees it: starting it, reading its replies, reporting its end.

Owns: ``open_worker`` (have the host's agent fork a worker, read its ``Hello``, send
``Init``; bounded, leaving no process behind when it fails) and
``WorkerLink``: the channel, the worker's counters and round-trip pings, what is not
about a task (output, logs, module fetches, pongs; files sent back, handed to
``returned.Returned``), and the reader loop; while that loop waits for data, the
channel hands each chunk to ``_take_now``, which handles it in the same loop pass and
leaves the loop only what must wait (a result behind output, a backlog). The reader
owns its end: whatever stops it (EOF, a bad frame, cancellation, a bug), it reports the
link lost exactly once, synchronously, so the pool can forget the worker in one step.
A worker's results wait behind its output (``OutputRouter.pending``), and reading
a worker whose output is not all written pauses while the output writer is backlogged
(its agent then stops reading it: flow control); workers that print nothing read on. Must not import: asyncssh or subprocess
(it sees only the ``Transport``/``Channel`` protocols), or the task table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Tuple

from .._errors import ProtocolError, WorkerStartupError
from .._forward import describe, find_source
from .._logs import logger
from .._output import OutputRouter
from .._stats import Counters, WorkerStats
from .._transports.base import Channel
from .._wire import messages as msgs
from .._wire import protocol as proto
from .channel import NUDGE, WorkerChannel
from .returned import Returned
from .session import read_hello
from .versions import same_python

if TYPE_CHECKING:
    from .session import HostSession
    from .supervisor import Supervisor

STARTUP_TIMEOUT = 60.0  # bootstrap + Hello, per worker (includes shipping the bundle)
_nonces = itertools.count(1)
log = logger("sshexec.pool")


class Replies(Protocol):
    """Where a link's reader delivers what is about tasks, and its end."""

    output: OutputRouter
    gate: OutputGate

    def on_reply(self, link: WorkerLink, message: proto.Message) -> None: ...

    def after_replies(self, link: WorkerLink) -> None: ...

    def on_lost(self, link: WorkerLink, reason: str) -> None: ...


@dataclass(eq=False)
class WorkerLink:
    worker_id: str
    host: Supervisor
    channel: Channel
    hello: proto.Hello
    decoder: proto.FrameDecoder
    session: HostSession  # the agent it runs under
    is_alive: bool = True  # until the reader has reported its end
    is_closing: bool = False  # we asked it to stop (or killed it): its end is not a loss
    end_reason: str = ""  # why we ended it, when we did
    init_failed: bool = False
    reader: Optional[asyncio.Task[None]] = None
    counters: Counters = field(default_factory=Counters)
    pings: Dict[int, float] = field(default_factory=dict)  # nonce -> loop time sent
    task_time: Optional[float] = None  # moving mean of Done.seconds (adaptive prefetch)
    pinged_at: float = 0.0  # loop time of the latest ping_if_due() ping
    _parked: bool = False  # the reader task waits for data: _take_now may handle it
    _held: Optional[proto.Message] = None  # a result _take_now left for the task
    _failure: Optional[BaseException] = None  # what _take_now met, for the task to raise
    _nudge: Callable[[], None] = lambda: None  # wakes the task waiting in channel.read()
    returned: Optional[Returned] = None  # return_files: where the files it sends back go
    limits: Optional[Tuple[float, int]] = None  # of the Runs sent to it now (Limits)

    @property
    def pid(self) -> int:
        return self.hello.pid

    @property
    def same_python(self) -> bool:
        """It runs the client's Python version: it may take tasks that carry code."""
        return same_python(self.hello.python)

    def start(self, replies: Replies) -> None:
        self.reader = asyncio.get_running_loop().create_task(self._read_replies(replies))

    def expect_end(self, reason: str) -> None:
        """We are ending this worker (shutdown, retirement, kill): its end is no loss."""
        if not self.is_closing:
            self.is_closing, self.end_reason = True, reason

    async def _read_replies(self, replies: Replies) -> None:
        reason = ""
        output, channel = replies.output, self.channel
        if isinstance(channel, WorkerChannel):  # replies handled where they arrive
            self._nudge = channel.nudge
            channel.push_to(lambda chunk: self._take_now(replies, chunk))
        try:
            while True:
                await self._handle(replies)
                replies.after_replies(self)
                if output.is_backlogged and output.pending(self.worker_id):
                    await replies.gate.written(None)  # a worker that prints nothing reads on
                self._parked = True
                try:
                    chunk = await channel.read()
                finally:
                    self._parked = False
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                if chunk is NUDGE:
                    continue
                if not chunk:
                    self.decoder.end()
                    break
                self.counters.bytes_received += len(chunk)
                self.decoder.feed(chunk)
        except proto.FrameError as exc:
            error = ProtocolError(f"worker {self.worker_id} sent an invalid frame: {exc}")
            log.error("%s; closing that worker", error)
            reason = str(error)
        except asyncio.CancelledError:
            reason = self.end_reason or "its reader was cancelled at shutdown"
            raise
        except BaseException as exc:  # a bug of ours: still report the link, never hang it
            log.exception("reading from worker=%s failed; closing that worker", self.worker_id)
            reason = f"sshexec could not read its replies ({type(exc).__name__}: {exc})"
        finally:
            self.is_alive = False
            try:
                replies.on_lost(self, reason)
            except BaseException:  # nothing may stop the report of the others
                log.exception("handling the loss of worker=%s failed", self.worker_id)

    async def _handle(self, replies: Replies) -> None:
        """Every message decoded so far; a result waits until its worker's output is
        written (its prints first, then its result)."""
        output = replies.output
        held, self._held = self._held, None
        if held is not None:
            await replies.gate.written(self.worker_id)
            replies.on_reply(self, held)
        for message in self.decoder.messages():
            if self._on_side_message(message, output):
                continue
            if isinstance(message, (proto.Done, proto.Failed)) and output.pending(self.worker_id):
                await replies.gate.written(self.worker_id)
            replies.on_reply(self, message)

    def _take_now(self, replies: Replies, chunk: bytes) -> bool:
        """The session's reader hands a chunk over in its own loop pass: handled here and
        now (no hop to this link's task) while that task waits for data; False when it
        cannot be (the task is busy or must wait for output to be written): queued then.
        What needs waiting (a result behind output, a backlog) or failed goes to the
        task, which the channel nudges."""
        output = replies.output
        if not self._parked or self._held is not None or self._failure is not None:
            return False
        if output.is_backlogged and output.pending(self.worker_id):
            return False
        try:
            self.counters.bytes_received += len(chunk)
            self.decoder.feed(chunk)
            for message in self.decoder.messages():
                if self._on_side_message(message, output):
                    continue
                if isinstance(message, (proto.Done, proto.Failed)) and output.pending(
                    self.worker_id
                ):
                    self._held = message
                    self._nudge()
                    return True
                replies.on_reply(self, message)
            replies.after_replies(self)
            if output.is_backlogged and output.pending(self.worker_id):
                self._nudge()  # the task waits there
        except BaseException as exc:  # a bad frame or a bug of ours: the task reports it
            self._failure = exc
            self._nudge()
        return True

    def _on_side_message(self, message: proto.Message, output: OutputRouter) -> bool:
        """Handle what is not about a task's outcome (output, logs, module fetches,
        pings); False for anything else."""
        if isinstance(message, proto.Output):
            output.output(self.worker_id, message)
        elif isinstance(message, proto.Log):
            output.record(self.worker_id, message)
        elif isinstance(message, proto.Fetch):
            forward = self.host.pool.starts.forward_modules
            self.send(proto.encode(_source(message.name, self.worker_id, forward)))
        elif isinstance(message, proto.Pong):
            sent = self.pings.pop(message.nonce, None)
            if sent is not None:
                self.counters.rtt_seconds = asyncio.get_running_loop().time() - sent
        elif isinstance(message, msgs.FileBack):
            if self.returned is not None:
                self.returned.take(self.worker_id, self.host.name, message)
        else:
            return False
        return True

    def send(self, *pieces: proto.Buffer) -> None:
        """Write buffers back to back (a big tail stays its own buffer, never joined)."""
        for data in pieces:
            self.counters.bytes_sent += len(data)
            self.channel.write(data)

    def note_task_time(self, seconds: float) -> None:
        mean = seconds if self.task_time is None else self.task_time
        self.task_time = mean + (seconds - mean) * 0.2

    def ping_if_due(self, every: float) -> None:
        """Measure the round trip again if none is under way and the last is ``every`` s old."""
        now = asyncio.get_running_loop().time()
        if not self.pings and now - self.pinged_at > every:
            self.pinged_at = now
            self.ping()

    def ping(self) -> None:
        nonce = next(_nonces)
        self.pings[nonce] = asyncio.get_running_loop().time()
        self.send(proto.encode(proto.Ping(nonce)))

    def snapshot(self) -> WorkerStats:
        c = self.counters
        return WorkerStats(
            self.worker_id,
            self.host.name,
            self.pid,
            self.is_alive,
            c.tasks_done,
            c.tasks_failed,
            c.tasks_retried,
            c.busy_seconds,
            c.bytes_sent,
            c.bytes_received,
            c.rtt_seconds,
        )


NOT_FORWARDED = (
    "the client does not forward modules or its script (SSHPoolExecutor(forward_modules=False))"
)


def _source(name: str, worker_id: str, forward: bool) -> proto.Source:
    """What to answer a worker's ``Fetch``. With ``forward_modules=False`` it is "not
    forwarded", whatever the name, with no lookup at all (no import, no file read): the
    worker was told not to ask, and a node that asks anyway is not to be trusted."""
    if not forward:
        log.debug("module %s for worker=%s: not forwarded (forward_modules=False)", name, worker_id)
        return proto.Source(name, "missing", "", "", False, NOT_FORWARDED)
    try:
        source = find_source(name)
    except BaseException as exc:  # an import hook or finder of the user's raised
        log.warning("looking up module %s for worker=%s failed: %r", name, worker_id, exc)
        return proto.Source(name, "missing", "", "", False, f"the client's lookup failed: {exc!r}")
    log.debug("module for worker=%s %s", worker_id, describe(source))
    return source


class OutputGate:
    """Where readers wait for the output writer thread: set as the router's ``wake``, it
    wakes every waiting reader (on the loop thread) after the writer's next progress."""

    def __init__(self, output: OutputRouter) -> None:
        loop = asyncio.get_running_loop()
        self.output = output
        self._waiters: List[asyncio.Future[None]] = []

        def wake() -> None:  # on the writer thread
            loop.call_soon_threadsafe(self._wake_all)

        output.wake = wake

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def is_backlogged(self) -> bool:
        return self.output.is_backlogged

    async def drained(self) -> None:
        """Until the output backlog is below the high-water mark (a session's ``Pace``)."""
        await self.written(None)

    async def written(self, worker_id: Optional[str]) -> None:
        """Until ``worker_id``'s output is written (None: until the backlog is below the
        high-water mark)."""
        output = self.output

        def done() -> bool:
            return not output.pending(worker_id) if worker_id else not output.is_backlogged

        while not done():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            output.want_wake()
            if done():
                break
            await waiter


async def ping_all(links: List[WorkerLink], timeout: float) -> None:
    """Ping every link and wait up to ``timeout`` for the answers (round-trip times)."""
    for link in links:
        link.ping()
    deadline = asyncio.get_running_loop().time() + timeout
    while any(link.pings and link.is_alive for link in links):
        if asyncio.get_running_loop().time() >= deadline:
            return
        await asyncio.sleep(0.002)


async def open_worker(
    session: HostSession,
    worker_id: str,
    init: proto.Init,
    output: OutputRouter,
    init_blob: Optional[Tuple[bytes, bytes]] = None,
) -> Tuple[Channel, proto.Hello, proto.FrameDecoder]:
    """Start one worker (the host's agent forks it) up to its ``Init`` (``init`` with the
    worker's id filled in here; ``init_blob``, the initializer ``Init`` names, is stored
    on the host first); raises WorkerStartupError."""
    channel: Optional[Channel] = None
    try:
        channel = await session.spawn(lambda line: output.stderr_line(worker_id, line))
        decoder = proto.FrameDecoder(init.max_frame)
        hello = await asyncio.wait_for(
            read_hello(channel, session.host, decoder, "worker"), STARTUP_TIMEOUT
        )
        if init_blob is not None:
            session.store(*init_blob)
        channel.write(proto.encode(dataclasses.replace(init, worker_id=worker_id)))
    except asyncio.TimeoutError as exc:
        if channel is not None:
            await channel.aclose(0.1)
        raise WorkerStartupError(
            session.host, "bootstrap", f"no Hello from the worker within {STARTUP_TIMEOUT:g} s"
        ) from exc
    except BaseException:
        if channel is not None:
            await channel.aclose(0.1)
        raise
    return channel, hello, decoder
