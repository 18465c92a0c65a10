"""One worker's byte streams as the pool sees them, multiplexed over its host's session.

Owns: ``WorkerChannel``, what a ``WorkerLink`` reads and writes: one worker's stdin (sent
as ``Data`` through the session) and stdout (what the session's reader hands it, taken
in order), its stderr lines, its exit status as the agent reported it, and the count of
its bytes taken, acknowledged through the session (``Ack``, every ``ACK_EVERY``) so the
agent reads that worker on; and ``Pace``, what the session asks of the output's consumer
before it acknowledges stderr. Must not import: asyncssh or subprocess, or the session
beyond the methods it lends (``send``, ``send_data``, ``drain``, ``ack``).
"""

from __future__ import annotations

import asyncio
import collections
import signal
from typing import TYPE_CHECKING, Callable, Deque, Final, Optional, Protocol

from .._transports.base import StderrSink, StderrTail
from .._wire import protocol as proto

if TYPE_CHECKING:
    from .session import HostSession

ACK_EVERY = proto.WINDOW // 4  # bytes of a worker taken before they are acknowledged
NUDGE: Final = b"\0nudge"  # read() returns this very object when nudge() asked it to


class Pace(Protocol):
    """The consumer of workers' output (the output router, through the pool's gate)."""

    @property
    def is_backlogged(self) -> bool: ...

    async def drained(self) -> None:
        """Until it is no longer backlogged."""


class WorkerChannel:
    """One forked worker's byte streams, multiplexed over its host's session."""

    def __init__(self, session: HostSession, slot: int, on_stderr: StderrSink) -> None:
        self.session, self.slot = session, slot
        self.pid: Optional[int] = None
        self.stderr = StderrTail(on_stderr)
        self._chunks: Deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._ended = asyncio.Event()  # Exited arrived, or the session was lost
        self._how = ""  # how it ended, once it has
        self._closed = False
        self._taken = 0  # bytes of its stdout the reader took, not acknowledged yet
        self._stderr = 0  # bytes of its stderr given to the output router, likewise
        self._discarding = False  # killed: what it still sends is dropped and acknowledged
        self._sink: Optional[Callable[[bytes], bool]] = None  # push_to(): takes stdout now
        self._nudged = False
        self.on_stopped: Optional[Callable[[proto.Stopped], None]] = None  # the pool's

    # ---- fed by the session -------------------------------------------------------------

    def data(self, stream: int, data: bytes) -> None:
        if self._discarding:  # so the agent reads on to its end and reports its exit
            if stream == 2:
                self.stderr.feed(data)
            self._taken += len(data)
            self.acknowledge()
            return
        if stream == 1:
            if self._sink is not None and not self._chunks and self._sink(data):
                self._took(len(data))  # handled in this pass, by the link itself
                return
            self._chunks.append(data)
            self._readable.set()
        else:
            self.stderr.feed(data)  # to the output router: acknowledged as it keeps up
            self._stderr += len(data)
            if self._stderr >= ACK_EVERY:
                self.session.ack(self)

    def stopped(self, message: proto.Stopped) -> None:
        """The agent killed this worker for its task (limits, kill): before its end."""
        if self.on_stopped is not None:
            self.on_stopped(message)

    def kill_task(self, task_id: int) -> None:
        """Ask the agent to end ``task_id`` if (or once) this worker runs it."""
        self.session.send(proto.Kill(self.slot, task_id))

    def acknowledge(self, stderr: bool = True) -> None:
        """Tell the agent what was taken (of stdout; and of stderr, unless the output
        router is behind): it may read that much more of this worker."""
        count = self._taken + (self._stderr if stderr else 0)
        self._taken = 0
        if stderr:
            self._stderr = 0
        if count and not self._ended.is_set():
            self.session.send(proto.Ack(self.slot, count))

    def ended(self, how: str) -> None:
        if not self._ended.is_set():
            self._how = how
            self.stderr.close()
            self._ended.set()
            self._readable.set()

    # ---- the Channel protocol -----------------------------------------------------------

    def push_to(self, sink: Callable[[bytes], bool]) -> None:
        """Hand each stdout chunk to ``sink`` as it arrives, while nothing is queued;
        what ``sink`` refuses (False) is queued for ``read`` instead."""
        self._sink = sink

    def nudge(self) -> None:
        """Make a waiting ``read`` return ``NUDGE`` (the sink left work for the reader)."""
        self._nudged = True
        self._readable.set()

    async def read(self) -> bytes:
        while not self._chunks:
            if self._nudged:
                self._nudged = False
                return NUDGE
            if self._ended.is_set():
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._took(len(chunk))
        return chunk

    def _took(self, size: int) -> None:
        self._taken += size  # the reader paces itself (WorkerLink): no router wait
        if self._taken >= ACK_EVERY:
            self.acknowledge(stderr=False)

    def write(self, data: proto.Buffer) -> None:
        if not self._ended.is_set():
            self.session.send_data(self.slot, data)

    async def drain(self) -> None:
        await self.session.drain()

    def backlog(self) -> int:
        return 0  # its bytes wait in the session's pipe, judged there

    async def exit_reason(self, timeout: float) -> str:
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except asyncio.TimeoutError:
            return "still running"
        return self._how

    def stderr_tail(self) -> str:
        return self.stderr.text()

    def kill(self) -> None:
        if not self._ended.is_set():
            self.session.send(proto.Signal(self.slot, int(signal.SIGKILL)))
            self._discarding = True  # its output is nobody's any more: let it all through
            self._taken += sum(map(len, self._chunks))
            self._chunks.clear()
            self.acknowledge()

    async def aclose(self, grace: float) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ended.is_set():
            return
        self.session.send(proto.CloseInput(self.slot))  # it exits after its EOF grace
        if await self.exit_reason(grace) == "still running":
            self.kill()
            await self.exit_reason(2.0)
