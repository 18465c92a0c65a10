"""One actor as the loop sees it: its state and its calls, in order, on its link.

Owns: ``Call`` (one call of an actor: its constructor's, a method's, or its close) and
``Actor``: the calls made while it has no live process (``queued``) and those sent to it
(``sent``, replied to in that order, as its worker runs them one at a time), encoding
each for its worker's Python (``send``: a call carrying code by value cannot reach a
worker of another version), a method's answer to its Future (``answer``), failing calls
(``fail``), and what ``actors()`` lists. Its life (starting, death, restart, close) is
``actors.ActorHub``'s. Loop thread only. Must not import: subprocess or asyncssh, or the
task table.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Sequence, Tuple

from .._encode import Encoded
from .._ending import ERROR, RESULT, Ender, notify_cancelled
from .._errors import ActorDiedError, PythonVersionError, rebuild
from .._stats import ActorInfo
from .._wire import calls as wire_calls
from .._wire import protocol as proto
from .link import WorkerLink

if TYPE_CHECKING:
    from .._output import OutputRouter
    from .actors import ActorHub
    from .link import OutputGate
    from .supervisor import Supervisor

CREATE, CALL, CLOSE = range(3)
STARTING, ALIVE, DYING, CLOSED, DEAD = "starting", "alive", "dying", "closed", "dead"


class Call:
    __slots__ = ("call_id", "encoded", "future", "kind")

    def __init__(
        self, call_id: int, future: Optional[Future[Any]], encoded: Encoded, kind: int = CALL
    ) -> None:
        self.call_id, self.future, self.encoded, self.kind = call_id, future, encoded, kind


class Actor:
    """One actor: its calls in order, its link while it has a live process."""

    def __init__(
        self,
        hub: ActorHub,
        actor_id: int,
        name: str,
        encoded: Tuple[Encoded, Encoded],
        host: Optional[str],
        restarts: int,
        memory: int,
    ) -> None:
        self.hub, self.actor_id, self.name = hub, actor_id, name
        self.wanted, self.restarts_left = host, restarts
        # the constructor's call: kept only while a restart may need it (it may hold a
        # 500 MB argument), and the close call
        self.create: Optional[Encoded] = encoded[0]
        self.end_call = encoded[1]
        self.memory = memory  # bytes its process tree may use (0: no limit)
        self.output: OutputRouter = hub.output  # the link's Replies: output, gate, below
        self.gate: OutputGate = hub.gate
        self.ender: Ender = hub.ender
        self.state = STARTING
        self.where: Optional[Supervisor] = None
        self.link: Optional[WorkerLink] = None
        self.queued: Deque[Call] = collections.deque()  # made while it had no live process
        self.sent: Deque[Call] = collections.deque()  # sent to its process, in order
        self.calls_served = 0
        self.restarts = 0
        self.is_closing = False  # close() asked: no restart, and CLOSED when it ends
        self.stop_reason = ""  # the agent's word when it killed it (a memory limit)
        self.error: Optional[ActorDiedError] = None  # why it is DEAD
        self.ended = asyncio.Event()

    # the Replies its link delivers to
    def on_reply(self, link: WorkerLink, message: proto.Message) -> None:
        self.hub.on_reply(self, link, message)

    def after_replies(self, link: WorkerLink) -> None:
        pass

    def on_lost(self, link: WorkerLink, reason: str) -> None:
        self.hub.on_lost(self, link, reason)

    def info(self) -> ActorInfo:
        link = self.link
        return ActorInfo(
            self.actor_id,
            self.name,
            self.where.name if self.where is not None else None,
            self.state,
            self.calls_served,
            link.pid if link is not None else None,
            self.restarts,
        )

    def is_busy(self) -> bool:
        """Method calls of it are under way or waiting (or its process is starting)."""
        if self.ended.is_set():
            return False
        if self.state in (STARTING, DYING):
            return True
        return any(call.kind == CALL for call in (*self.sent, *self.queued))

    # ---- its calls --------------------------------------------------------------------

    def send(self, calls: Sequence[Call]) -> str:
        """Send these calls to its process, in order (a cancelled one is dropped); "" or,
        when its constructor's call cannot reach that worker's Python, why (the calls
        behind it are queued again, to fail with the actor)."""
        link = self.link
        assert link is not None
        messages: List[proto.Message] = []
        for index, call in enumerate(calls):
            future = call.future
            if future is not None and not future.set_running_or_notify_cancel():
                continue  # cancelled before it was sent
            encoded = call.encoded
            if link.same_python or (encoded.other is None and encoded.bound is None):
                (payload, buffers), blobs = encoded.payload, encoded.blobs
            elif encoded.other is not None:
                (payload, buffers), blobs = encoded.other
            else:
                error = PythonVersionError(
                    f"{encoded.bound} exists only as code, which only this client's Python "
                    f"version can load; actor {self.name} runs on {link.host.name}, Python "
                    f"{link.hello.python}. Define it at module level."
                )
                if call.kind == CREATE:
                    self.queued.extendleft(reversed(calls[index + 1 :]))
                    return str(error)
                self.fail([call], error)
                continue
            for blob in blobs:
                link.session.store(*blob)
            self.sent.append(call)
            messages.append(proto.Run(call.call_id, payload, buffers))
        if messages:
            link.send(*proto.frame_pieces(messages))
        return ""

    def answer(self, call: Call, reply: proto.Done | proto.Failed) -> None:
        """A method call's reply: its Future's outcome."""
        link = self.link
        assert link is not None and call.future is not None
        self.calls_served += 1
        link.host.actor_calls += 1
        if isinstance(reply, proto.Failed):
            self.ender.end(call.future, ERROR, rebuild(reply, link.worker_id))
            return
        try:
            result = wire_calls.loads(reply.payload, reply.buffers)
        except BaseException as exc:  # its class is not importable here, say
            self.ender.end(call.future, ERROR, exc)
        else:
            self.ender.end(call.future, RESULT, result)

    def fail(self, calls: Sequence[Call], error: BaseException) -> None:
        for call in calls:
            future = call.future
            if future is None:
                continue
            if future.done():
                notify_cancelled(future)
                continue
            if not future.running() and not future.set_running_or_notify_cancel():
                continue
            self.ender.end(future, ERROR, error)
