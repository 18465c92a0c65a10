"""Workers, hosts and tasks as the pool sees them: starting one worker, settling a Future.

Owns: ``Task``, ``HostState`` and ``WorkerLink`` records; ``open_worker``: open a
channel, run the bootstrap handshake, read and check ``Hello``, send ``Init``
(bounded, leaving no process behind when it fails); ``settle`` and ``fail``: how a
reply or a loss ends a task's Future. Must not import: asyncssh or subprocess (it
sees only the ``Transport``/``Channel`` protocols).
"""

from __future__ import annotations

import asyncio
import pickle
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Set, Tuple

from . import _protocol as proto
from ._errors import ResultDecodeError, WorkerStartupError, rebuild
from ._transport import Channel, Transport, handshake

STARTUP_TIMEOUT = 60.0  # bootstrap + Hello, per worker (includes shipping the bundle)
OutputSink = Callable[[str, bytes], None]


@dataclass
class Task:
    task_id: int
    payload: bytes
    future: Future[Any]
    is_started: bool = False
    losses: List[Tuple[str, str]] = field(default_factory=list)  # (worker_id, how it died)


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

    @property
    def pid(self) -> int:
        return self.hello.pid


def settle(task: Task, reply: proto.Done | proto.Failed, worker_id: str) -> None:
    """End the task's Future with the worker's result or the rebuilt exception."""
    if isinstance(reply, proto.Failed):
        task.future.set_exception(rebuild(reply, worker_id))
        return
    try:
        result = pickle.loads(reply.payload)
    except BaseException as exc:  # e.g. its class is not importable here; even SystemExit
        error = ResultDecodeError(
            f"task {task.task_id}: the result from worker {worker_id} cannot be "
            f"unpickled on this host: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        task.future.set_exception(error)
    else:
        task.future.set_result(result)


def fail(future: Future[Any], exc: BaseException) -> None:
    """Fail a Future the pool gives up on, unless it is done or was cancelled."""
    if future.done():
        return
    if not future.running() and not future.set_running_or_notify_cancel():
        return  # cancelled by the user
    future.set_exception(exc)


async def open_worker(
    host: HostState, worker_id: str, initializer: bytes, max_frame: int, output: OutputSink
) -> Tuple[Channel, proto.Hello, proto.FrameDecoder]:
    """Start one worker on ``host`` up to its ``Init``; raises WorkerStartupError."""
    channel: Optional[Channel] = None
    try:
        channel = await host.transport.open_channel(lambda line: output(worker_id, line))
        decoder = proto.FrameDecoder(max_frame)
        hello = await asyncio.wait_for(_read_hello(channel, host, decoder), STARTUP_TIMEOUT)
        channel.pid = hello.pid
        channel.write(proto.encode(proto.Init(worker_id, initializer, max_frame)))
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
