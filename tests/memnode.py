"""An in-memory transport for the pool-core model test: a simulated agent and workers
speaking the real protocols over ``Channel`` objects, driven step by step by the test.

``MemTransport.open_channel`` gives the pipe to a ``SimAgent``: it answers the handshake
with the start marker and its ``Hello``, and speaks the agent protocol (``Spawn`` ->
``Spawned`` and a new ``SimWorker``; ``Data`` relayed both ways; ``CloseInput``,
``Signal`` and ``Shutdown`` end workers with an ``Exited`` that tells how; ``Ping`` ->
``Pong``; ``Kill`` stops the task now or when it starts, ``Stopped`` before the
``Exited``, as a task past its time limit is when the test says ``time_out``). A ``SimWorker`` sends its ``Hello``, answers ``Init`` with ``Ready``, ``Ping``
with ``Pong``; it holds ``Run`` commands until the test says ``finish`` (a result computed
by really running the call, or the exception it raised), answers ``Revoke`` at once or
late, and can die idle or busy, or hang. The transport can be told to fail the next
starts (the session, or a spawn). Everything here runs on the executor's loop thread
(the test schedules its steps there), so it needs no locks. It also records what the
pool must never do: send work to a worker it has forgotten.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import cloudpickle

from sshexec._errors import WorkerStartupError
from sshexec._wire import calls
from sshexec._wire import messages as msgs
from sshexec._wire import protocol as proto

_pids = itertools.count(1000)


class SimWorker:
    def __init__(self, agent: SimAgent, slot: int, pid: int) -> None:
        self.agent, self.slot, self.node = agent, slot, agent.node
        self.pid = pid
        self.worker_id = ""
        self.inbox: List[Tuple[int, Any, bytes]] = []  # Runs in arrival order
        self.held_revokes: List[int] = []
        self.is_alive = True
        self.is_hung = False
        self.slow_revokes = False
        self.limits = (0.0, 0)  # of the Runs that follow (Limits)
        self.limited: Dict[int, Tuple[float, int]] = {}  # task id -> its limits
        self.doomed: List[int] = []  # Kill for a task it has not started: stopped then
        self.decoder = proto.FrameDecoder()
        hello = proto.Hello(
            proto.PROTOCOL_VERSION,
            agent.transport.python,
            cloudpickle.__version__,
            "1.0.0",
            self.pid,
            f"sim-{agent.host}",
            2,
            "/sim/python",
        )
        self._say(proto.encode(hello))

    def receive(self, data: bytes) -> None:
        self.decoder.feed(data)
        for message in self.decoder.messages():
            self._on_command(message)

    def _on_command(self, message: proto.Message) -> None:
        if isinstance(message, proto.Init):
            self.worker_id = message.worker_id
            self._say(proto.encode(proto.Ready()))
        elif isinstance(message, proto.Run):
            if self.worker_id not in self.node.known_workers():
                self.node.violations.append(
                    f"Run {message.task_id} sent to forgotten {self.worker_id}"
                )
            if self.agent.transport.python != self.node.client_python:
                task = self.node.task_of(message.task_id)
                if task is not None and task.bound is not None and task.other is None:
                    self.node.violations.append(f"bound task {message.task_id} on {self.worker_id}")
            self.inbox.append((message.task_id, message.payload, message.buffers))
            if self.limits[0]:
                self.limited[message.task_id] = self.limits
        elif isinstance(message, proto.Limits):
            self.limits = (message.seconds, message.memory)
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
            self.die(0, 0)

    # ---- what the test makes it do ----------------------------------------------------

    def finish(self) -> bool:
        """Answer the oldest task; False when there is none (or it hangs, or is dead)."""
        if not self.inbox or self.is_hung or not self.is_alive:
            return False
        if self.inbox[0][0] in self.doomed:  # the agent sees it start: killed
            return self.stop(msgs.STOP_KILLED)
        task_id, payload, buffers = self.inbox.pop(0)
        try:
            fn, args, kwargs = calls.load_call(payload, buffers, self.agent.function)
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

    def time_out(self) -> bool:
        """Its running task passes its time limit, if it has one: the agent stops it."""
        if not self.inbox or not self.is_alive or self.inbox[0][0] not in self.limited:
            return False
        return self.stop("timeout")

    def kill(self, task_id: int) -> None:
        """The agent's Kill: now if it runs the task, else once it starts it."""
        if self.inbox and self.inbox[0][0] == task_id:
            self.stop(msgs.STOP_KILLED)
        else:
            self.doomed.append(task_id)

    def stop(self, why: str) -> bool:
        """What the agent does to a worker for its task: Stopped, then the kill."""
        if not self.is_alive or not self.inbox:
            return False
        self.agent._say(proto.Stopped(self.slot, self.inbox[0][0], why, "simulated"))
        self.die()
        return True

    def answer_revokes(self) -> None:
        for task_id in self.held_revokes:
            self._say(proto.encode(proto.Revoked(task_id)))
        self.held_revokes = []

    def die(self, status: int = 0, signum: int = int(signal.SIGKILL)) -> None:
        if self.is_alive:
            self.is_alive = False
            self.inbox = []
            self.agent.exited(self, status, signum)

    def _say(self, data: bytes) -> None:
        if self.is_alive:
            self.agent.relay(self.slot, data)


class SimAgent:
    """What the host's agent does, over one MemChannel."""

    def __init__(self, node: MemNode, transport: MemTransport) -> None:
        self.node, self.transport, self.host = node, transport, transport.host
        self.channel = MemChannel(self)
        self.workers: Dict[int, SimWorker] = {}
        self.blobs: Dict[bytes, bytes] = {}
        self.decoder = proto.FrameDecoder()
        self.started = False
        self.is_alive = True

    def receive(self, data: bytes) -> None:
        if not self.started:  # stage 1: answer the handshake, then the agent's Hello
            self.started = True
            hello = proto.Hello(
                proto.PROTOCOL_VERSION,
                self.transport.python,
                cloudpickle.__version__,
                "1.0.0",
                999,
                f"sim-{self.host}",
                2,
                "/sim/python",
            )
            self.channel.push(proto.START_MARKER + b"H" + proto.encode(hello))
            return
        self.decoder.feed(data)
        for message in self.decoder.messages():
            self._on_command(message)

    def _on_command(self, message: proto.Message) -> None:
        worker: Optional[SimWorker]
        if isinstance(message, proto.Spawn):
            if self.transport.fail_next and self.transport.fail_stage == "spawn":
                self.transport.fail_next -= 1
                self._say(proto.SpawnFailed(message.slot, "the simulated fork failed"))
                return
            pid = next(_pids)
            self._say(proto.Spawned(message.slot, pid))
            worker = SimWorker(self, message.slot, pid)
            self.workers[message.slot] = worker
            self.node.workers.append(worker)
        elif isinstance(message, proto.Data):
            worker = self.workers.get(message.slot)
            if worker is not None and worker.is_alive:
                worker.receive(bytes(message.data))  # type: ignore[arg-type]
        elif isinstance(message, proto.CloseInput):
            worker = self.workers.get(message.slot)
            if worker is not None:
                worker.die(0, 0)  # its stdin closed: a real worker exits
        elif isinstance(message, proto.Signal):
            worker = self.workers.get(message.slot)
            if worker is not None:
                worker.die(0, message.signum)
        elif isinstance(message, proto.Kill):
            worker = self.workers.get(message.slot)
            if worker is not None:
                worker.kill(message.task_id)
        elif isinstance(message, proto.Store):  # in pieces: a piece after a whole one restarts
            held = self.blobs.get(message.key, b"")
            if len(held) >= message.size:
                held = b""
            self.blobs[message.key] = held + bytes(message.data)  # type: ignore[arg-type]
        elif isinstance(message, proto.Forget):
            self.blobs.pop(message.key, None)
        elif isinstance(message, proto.Ping):
            self._say(proto.Pong(message.nonce))
        elif isinstance(message, proto.Shutdown):
            self.end()

    def function(self, key: bytes) -> Any:
        return cloudpickle.loads(self.blobs[key])

    def relay(self, slot: int, data: bytes) -> None:
        self._say(proto.Data(slot, 1, data))

    def exited(self, worker: SimWorker, status: int, signum: int) -> None:
        if self.workers.pop(worker.slot, None) is not None:
            self._say(proto.Exited(worker.slot, status, signum))

    def _say(self, message: proto.Message) -> None:
        if self.is_alive:
            self.channel.push(proto.encode(message))

    def end(self) -> None:
        for worker in list(self.workers.values()):
            worker.die(0, int(signal.SIGTERM))
        if self.is_alive:
            self.is_alive = False
            self.channel.push(b"")


class MemChannel:
    def __init__(self, agent: SimAgent) -> None:
        self.agent = agent
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
        if self.agent.is_alive:
            self.agent.receive(bytes(data))

    async def drain(self) -> None:
        pass

    def backlog(self) -> int:
        return 0

    async def aclose(self, grace: float) -> None:
        self.agent.end()  # its stdin closed: the agent ends its workers and exits

    async def exit_reason(self, timeout: float) -> str:
        return "exit status 0" if not self.agent.is_alive else "still running"

    def stderr_tail(self) -> str:
        return ""

    def kill(self) -> None:
        self.agent.end()


class MemTransport:
    kind = "memory"

    def __init__(self, node: MemNode, host: str, python: str) -> None:
        self.node, self.host, self.python = node, host, python  # the Python its Hellos name
        self.fail_next = 0  # the next starts that fail
        self.fail_stage = "spawn"  # "spawn": the agent cannot fork; "connect": no session

    async def connect(self) -> None:
        pass

    async def open_channel(self, on_stderr: Callable[[bytes], None]) -> MemChannel:
        await asyncio.sleep(0)
        if self.fail_next and self.fail_stage == "connect":
            self.fail_next -= 1
            raise WorkerStartupError(self.host, "connect", "the simulated host is unreachable")
        agent = SimAgent(self.node, self)
        self.node.agents.append(agent)
        return agent.channel

    async def aclose(self) -> None:
        pass


class MemNode:
    """The simulated hosts, their agents and workers, and what the pool did wrong."""

    def __init__(self, pythons: List[str]) -> None:
        self.transports = [MemTransport(self, f"sim{i}", v) for i, v in enumerate(pythons)]
        self.agents: List[SimAgent] = []
        self.workers: List[SimWorker] = []
        self.violations: List[str] = []
        self.known_workers: Callable[[], Any] = lambda: ()
        self.task_of: Callable[[int], Any] = lambda task_id: None
        self.client_python = "%d.%d.%d" % sys.version_info[:3]

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
