"""An in-memory transport for the pool-core model test: simulated workers speaking the
real protocol over ``Channel`` objects, driven step by step by the test.

A ``SimWorker`` answers the handshake with the start marker and a ``Hello``, ``Init``
with ``Ready``, ``Ping`` with ``Pong``; it holds ``Run`` commands until the test says
``finish`` (a result computed by really running the call, or the exception it raised),
answers ``Revoke`` at once or late, and can die idle or busy (EOF, an exit status), or
hang. ``MemTransport`` can be told to fail the next starts. Everything here runs on the
executor's loop thread (the test schedules its steps there), so it needs no locks.
It also records what the pool must never do: send work to a worker it has forgotten.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable, List, Optional, Tuple

import cloudpickle

from sshexec._errors import WorkerStartupError
from sshexec._wire import calls
from sshexec._wire import protocol as proto

_pids = itertools.count(1000)


class SimWorker:
    def __init__(self, node: MemNode, host: str) -> None:
        self.node, self.host = node, host
        self.pid = next(_pids)
        self.worker_id = ""
        self.inbox: List[Tuple[int, Any, bytes]] = []  # Runs in arrival order
        self.held_revokes: List[int] = []
        self.is_alive = True
        self.is_hung = False
        self.slow_revokes = False
        self.exit = "exit status 0"
        self.channel: Optional[MemChannel] = None
        self.decoder = proto.FrameDecoder()
        self.started = False

    # ---- what the pool sends ------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if not self.started:  # stage 1: answer the handshake, then Hello
            self.started = True
            hello = proto.Hello(
                proto.PROTOCOL_VERSION,
                "3.11.7",
                cloudpickle.__version__,
                "1.0.0",
                self.pid,
                f"sim-{self.host}",
                2,
                "/sim/python",
            )
            self._say(proto.START_MARKER + b"H" + proto.encode(hello))
            return
        self.decoder.feed(data)
        for message in self.decoder.messages():
            self._on_command(message)

    def _on_command(self, message: proto.Message) -> None:
        if isinstance(message, proto.Init):
            self.worker_id = message.worker_id
            self._say(proto.encode(proto.Ready()))
        elif isinstance(message, proto.Run):
            if not self.is_alive:
                return
            if self.worker_id not in self.node.known_workers():
                self.node.violations.append(
                    f"Run {message.task_id} sent to forgotten {self.worker_id}"
                )
            self.inbox.append((message.task_id, message.payload, message.buffers))
        elif isinstance(message, proto.Revoke):
            queued = [t for t, _, _ in self.inbox[1:]]
            if message.task_id in queued:
                self.inbox = [r for r in self.inbox if r[0] != message.task_id]
                if self.slow_revokes:
                    self.held_revokes.append(message.task_id)
                else:
                    self._say(proto.encode(proto.Revoked(message.task_id)))
        elif isinstance(message, proto.Ping):
            self._say(proto.encode(proto.Pong(message.nonce)))
        elif isinstance(message, proto.Shutdown):
            self.node.drain_one(self)  # finishes what it holds, then exits
            self.die("exit status 0")

    # ---- what the test makes it do ----------------------------------------------------

    def finish(self) -> bool:
        """Answer the oldest task; False when there is none (or it hangs, or is dead)."""
        if not self.inbox or self.is_hung or not self.is_alive:
            return False
        task_id, payload, buffers = self.inbox.pop(0)
        try:
            fn, args, kwargs = calls.load_call(payload, buffers)
            result = fn(*args, **kwargs)
        except Exception as exc:
            reply: proto.Message = proto.Failed(
                task_id,
                type(exc).__name__,
                str(exc),
                f"sim {self.worker_id}\n",
                cloudpickle.dumps(exc),
                proto.STAGE_RUN,
            )
        else:
            pieces, sizes = calls.dumps(result, copy=True)
            reply = proto.Done(task_id, b"".join(bytes(p) for p in pieces), buffers=sizes)
        self._say(proto.encode(reply))
        return True

    def answer_revokes(self) -> None:
        for task_id in self.held_revokes:
            self._say(proto.encode(proto.Revoked(task_id)))
        self.held_revokes = []

    def die(self, how: str = "killed by signal SIGKILL") -> None:
        if self.is_alive:
            self.is_alive, self.exit = False, how
            self.inbox = []
            if self.channel is not None:
                self.channel.push(b"")

    def _say(self, data: bytes) -> None:
        if self.is_alive and self.channel is not None:
            self.channel.push(data)


class MemChannel:
    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker
        worker.channel = self
        self.pid: Optional[int] = None
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._eof = False

    def push(self, data: bytes) -> None:
        if not self._eof:
            self._eof = not data
            self._chunks.put_nowait(data)

    async def read(self) -> bytes:
        if self._eof and self._chunks.empty():
            return b""
        return await self._chunks.get()

    def write(self, data: Any) -> None:
        if self.worker.is_alive:
            self.worker.receive(bytes(data))

    async def drain(self) -> None:
        pass

    async def aclose(self, grace: float) -> None:
        self.worker.die("exit status 0")  # its stdin closed: a real worker exits

    async def exit_reason(self, timeout: float) -> str:
        return self.worker.exit if not self.worker.is_alive else "still running"

    def stderr_tail(self) -> str:
        return ""

    def kill(self) -> None:
        self.worker.die("killed by signal SIGKILL")


class MemTransport:
    kind = "memory"

    def __init__(self, node: MemNode, host: str) -> None:
        self.node, self.host = node, host
        self.fail_next = 0  # the next starts that fail
        self.fail_stage = "bootstrap"

    async def connect(self) -> None:
        pass

    async def open_channel(self, on_stderr: Callable[[bytes], None]) -> MemChannel:
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next -= 1
            raise WorkerStartupError(self.host, self.fail_stage, "the simulated start failed")
        worker = SimWorker(self.node, self.host)
        self.node.workers.append(worker)
        return MemChannel(worker)

    async def aclose(self) -> None:
        pass


class MemNode:
    """The simulated hosts, their workers, and what the pool did wrong."""

    def __init__(self, hosts: int) -> None:
        self.transports = [MemTransport(self, f"sim{i}") for i in range(hosts)]
        self.workers: List[SimWorker] = []
        self.violations: List[str] = []
        self.known_workers: Callable[[], Any] = lambda: ()
        self.draining = False  # the test is ending: answer everything at once

    def live(self) -> List[SimWorker]:
        return [w for w in self.workers if w.is_alive and w.worker_id]

    def drain_one(self, worker: SimWorker) -> None:
        worker.is_hung = False
        while worker.finish():
            pass

    def drain(self) -> None:
        for worker in self.live():
            worker.answer_revokes()
            self.drain_one(worker)
