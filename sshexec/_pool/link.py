"""Workers, hosts and tasks as the pool sees them: starting one worker, settling a Future.

Owns: ``Task``, ``HostState`` and ``WorkerLink`` records; ``open_worker``: open a
channel, run the bootstrap handshake, read and check ``Hello``, send ``Init``
(bounded, leaving no process behind when it fails); ``settle`` and ``fail``: how a
reply or a loss ends a task's Future. Must not import: asyncssh or subprocess (it
sees only the ``Transport``/``Channel`` protocols).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Set, Tuple, Union

from .._errors import ResultDecodeError, WorkerStartupError, rebuild
from .._forward import describe, find_source
from .._mapresults import MapItem
from .._output import OutputRouter
from .._stats import Counters, HostStats, Stats, WorkerStats, median_rtt
from .._transports.base import Channel, Transport, handshake
from .._wire import calls
from .._wire import protocol as proto

STARTUP_TIMEOUT = 60.0  # bootstrap + Hello, per worker (includes shipping the bundle)
KEEP_GONE_WORKERS = 32  # per host: stats of this many ended workers are kept
_nonces = itertools.count(1)
log = logging.getLogger("sshexec.pool")


TaskFuture = Union["Future[Any]", MapItem]  # a submit's Future, or a map item's slot


class Task:
    """One submitted call until its Future is settled. Slotted, with no list until a
    loss: thousands wait at once in a big ``map``, and every container object each one
    holds is more work for the client's garbage collector."""

    __slots__ = ("buffers", "future", "group", "is_started", "losses", "payload", "size", "task_id")

    def __init__(
        self,
        task_id: int,
        payload: calls.Payload,
        size: int,
        future: TaskFuture,
        group: Optional[str] = None,
    ) -> None:
        self.task_id, self.future = task_id, future
        self.payload, self.buffers = payload  # pickle stream + out-of-band buffers, sizes
        self.size = size  # bytes of payload, as calls.size() gave the submitter
        self.group = group  # run only on this host (run_on_hosts)
        self.is_started = False
        self.losses: Tuple[Tuple[str, str], ...] = ()  # (worker_id, how it died)


@dataclass
class HostState:
    transport: Transport
    workers: Optional[int]  # planned worker count; None until the first Hello tells cores
    python: str = "python3"
    next_index: int = 0
    starting: int = 0
    failures: int = 0
    error: Optional[str] = None  # set when the host is given up
    last_error: Optional[str] = None  # why the latest start failed
    down_since: Optional[float] = None  # loop time of the first failed reconnect, while down
    links: Set[WorkerLink] = field(default_factory=set)
    ended: Counters = field(default_factory=Counters)  # totals of workers that are gone
    gone: Deque[WorkerStats] = field(
        default_factory=lambda: collections.deque(maxlen=KEEP_GONE_WORKERS)
    )

    @property
    def name(self) -> str:
        return self.transport.host

    @property
    def is_usable(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class WorkerLink:
    worker_id: str
    host: HostState
    channel: Channel
    hello: proto.Hello
    is_alive: bool = True
    is_closing: bool = False  # we asked it to stop: its EOF is not a loss
    init_failed: bool = False
    reader: Optional[asyncio.Task[None]] = None
    counters: Counters = field(default_factory=Counters)
    pings: Dict[int, float] = field(default_factory=dict)  # nonce -> loop time sent
    task_time: Optional[float] = None  # moving mean of Done.seconds (adaptive prefetch)
    pinged_at: float = 0.0  # loop time of the latest ping_if_due() ping

    @property
    def pid(self) -> int:
        return self.hello.pid

    def on_side_message(self, message: proto.Message, output: OutputRouter) -> bool:
        """Handle what is not about a task's outcome (output, logs, module fetches,
        pings); False for anything else."""
        if isinstance(message, proto.Output):
            output.output(self.worker_id, message)
        elif isinstance(message, proto.Log):
            output.record(self.worker_id, message)
        elif isinstance(message, proto.Fetch):
            source = find_source(message.name)
            log.debug("module for worker=%s %s", self.worker_id, describe(source))
            self.send(proto.encode(source))
        elif isinstance(message, proto.Pong):
            sent = self.pings.pop(message.nonce, None)
            if sent is not None:
                self.counters.rtt_seconds = asyncio.get_running_loop().time() - sent
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

    def retire_counters(self) -> None:
        """The worker is gone: its numbers move into the host's totals."""
        self.host.ended.add(self.counters)
        self.host.gone.append(self.snapshot())


async def ping_all(links: List[WorkerLink], timeout: float) -> None:
    """Ping every link and wait up to ``timeout`` for the answers (round-trip times)."""
    for link in links:
        link.ping()
    deadline = asyncio.get_running_loop().time() + timeout
    while any(link.pings and link.is_alive for link in links):
        if asyncio.get_running_loop().time() >= deadline:
            return
        await asyncio.sleep(0.002)


def snapshot(hosts: List[HostState]) -> Stats:
    """Every host's and worker's numbers now (loop thread)."""
    host_stats: Dict[str, HostStats] = {}
    worker_stats: Dict[str, WorkerStats] = {}
    for host in hosts:
        total = Counters()
        total.add(host.ended)
        live = sorted(host.links, key=lambda link: link.worker_id)
        for link in live:
            total.add(link.counters)
        for ended in host.gone:
            worker_stats[ended.worker_id] = ended
        for link in live:
            worker_stats[link.worker_id] = link.snapshot()
        host_stats[host.name] = HostStats(
            host.name,
            len(live),
            total.tasks_done,
            total.tasks_failed,
            total.tasks_retried,
            total.busy_seconds,
            total.bytes_sent,
            total.bytes_received,
            median_rtt(link.counters.rtt_seconds for link in live),
            host.error,
        )
    return Stats(host_stats, worker_stats)


def settle(task: Task, reply: proto.Done | proto.Failed, worker_id: str) -> None:
    """End the task's Future with the worker's result or the rebuilt exception."""
    if isinstance(reply, proto.Failed):
        task.future.set_exception(rebuild(reply, worker_id))
        return
    try:
        result = calls.loads(reply.payload, reply.buffers)
    except BaseException as exc:  # e.g. its class is not importable here; even SystemExit
        error = ResultDecodeError(
            f"task {task.task_id}: the result from worker {worker_id} cannot be "
            f"unpickled on this host: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        task.future.set_exception(error)
    else:
        task.future.set_result(result)


def fail(future: TaskFuture, exc: BaseException) -> None:
    """Fail a Future the pool gives up on, unless it is done or was cancelled."""
    if future.done():
        return
    if not future.running() and not future.set_running_or_notify_cancel():
        return  # cancelled by the user
    future.set_exception(exc)


async def open_worker(
    host: HostState, worker_id: str, init: proto.Init, output: OutputRouter
) -> Tuple[Channel, proto.Hello, proto.FrameDecoder]:
    """Start one worker on ``host`` up to its ``Init`` (``init`` with the worker's id
    filled in here); raises WorkerStartupError."""
    channel: Optional[Channel] = None
    try:
        channel = await host.transport.open_channel(
            lambda line: output.stderr_line(worker_id, line)
        )
        decoder = proto.FrameDecoder(init.max_frame)
        hello = await asyncio.wait_for(_read_hello(channel, host, decoder), STARTUP_TIMEOUT)
        channel.pid = hello.pid
        channel.write(proto.encode(dataclasses.replace(init, worker_id=worker_id)))
    except asyncio.TimeoutError as exc:
        if channel is not None:
            await channel.aclose(0.1)
        raise WorkerStartupError(
            host.name, "bootstrap", f"no Hello from the worker within {STARTUP_TIMEOUT:g} s"
        ) from exc
    except BaseException:
        if channel is not None:
            await channel.aclose(0.1)
        raise
    return channel, hello, decoder


async def _read_hello(
    channel: Channel, host: HostState, decoder: proto.FrameDecoder
) -> proto.Hello:
    decoder.feed(await handshake(channel, host.name, host.python))
    while True:
        try:
            message = next(decoder.messages(), None)
        except proto.FrameError as exc:
            raise WorkerStartupError(host.name, "bootstrap", f"garbled first frame: {exc}") from exc
        if message is not None:
            break
        chunk = await channel.read()
        if not chunk:
            how = await channel.exit_reason(2.0)
            tail = channel.stderr_tail()
            raise WorkerStartupError(
                host.name,
                "bootstrap",
                f"the worker ended before saying Hello ({how})"
                + (f"; stderr: {tail[-600:]}" if tail else ""),
            )
        decoder.feed(chunk)
    if not isinstance(message, proto.Hello):
        raise WorkerStartupError(
            host.name, "bootstrap", f"expected Hello, got {type(message).__name__}"
        )
    if message.protocol != proto.PROTOCOL_VERSION:
        raise WorkerStartupError(
            host.name,
            "version",
            f"worker speaks protocol {message.protocol}, this client {proto.PROTOCOL_VERSION}",
            "Clear ~/.cache/sshexec on the node.",
        )
    return message
