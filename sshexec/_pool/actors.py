"""Actors on the loop thread: each one a worker process of its own, on its own link.

An actor is a worker forked by its host's agent beside the pool's workers but outside
its supervisor's planned count (it takes no pool slot), driven through a
``WorkerLink`` of its own that the task table and the scheduler never see. Its object
is built by a first call (``_node.actors.create``) and its methods are ordinary
``Run``/``Done`` calls on that link: the worker runs them one at a time in the order
sent and replies in that order, so framing, flow control, output, pings, limits and
death detection are the workers'. What differs is the end: a lost actor link fails
its pending calls with ``ActorDiedError`` (never resent: an actor's state makes replay
unsafe) and, with restarts left, builds a fresh object from the constructor call (on
the same host while its agent lives, else on another).

Owns: ``ActorHub`` (one per pool): placing actors, starting and ending their workers,
the replies that change an actor's life (its constructor's, its close's), deaths and
restarts, ending every actor at shutdown, and ``infos()`` for ``actors()``; each actor's
state and calls are ``actor.Actor``'s. Loop thread only. Must not import: subprocess or
asyncssh, the task table or the scheduler.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .._encode import Encoded
from .._ending import Ender
from .._errors import ActorDiedError, WorkerStartupError, rebuild
from .._logs import logger
from .._stats import ActorInfo
from .._wire import protocol as proto
from .actor import ALIVE, CLOSE, CLOSED, CREATE, DEAD, DYING, STARTING, Actor, Call
from .blobs import HostBlobs
from .link import WorkerLink, open_worker

if TYPE_CHECKING:
    from .._output import OutputRouter
    from .link import OutputGate
    from .supervisor import Supervisor

log = logger("sshexec.actors")

DEATH_REASON_WAIT = 2.0  # seconds to learn how an actor's process ended


class ActorHub:
    """Every actor of one pool."""

    def __init__(
        self,
        pool: Any,  # the Pool (hosts, starts, spawn): typed loosely to avoid the cycle
        ender: Ender,
        shutdown_grace: float,
    ) -> None:
        self.pool, self.ender, self.shutdown_grace = pool, ender, shutdown_grace
        self.output: OutputRouter = pool.output
        self.gate: OutputGate = pool.gate
        self.actors: Dict[int, Actor] = {}
        self.is_closing = False
        self._ids = itertools.count(1)  # call ids on actors' links

    # ---- from the client's threads (each through call_soon_threadsafe) ------------------

    def create(
        self,
        actor_id: int,
        name: str,
        encoded: Tuple[Encoded, Encoded],
        host: Optional[str],
        restarts: int,
        memory: int,
    ) -> None:
        """``encoded``: the constructor's call and the close call (``_node.actors``)."""
        actor = Actor(self, actor_id, name, encoded, host, restarts, memory)
        self.actors[actor_id] = actor
        self.pool.spawn(self._start(actor))

    def call(self, actor_id: int, future: Future[Any], encoded: Encoded) -> None:
        actor = self.actors.get(actor_id)
        if actor is None:
            return
        call = Call(next(self._ids), future, encoded)
        if actor.state in (CLOSED, DEAD):
            actor.fail([call], self._gone(actor))
        elif actor.link is not None and actor.state != DYING:
            self._send(actor, [call])
        else:
            actor.queued.append(call)

    def close(self, actor_id: int) -> None:
        """End the actor once the calls made before have run: its ``close()`` first."""
        actor = self.actors.get(actor_id)
        if actor is None or actor.is_closing:
            return
        actor.is_closing = True
        if actor.state in (CLOSED, DEAD):
            return
        call = Call(next(self._ids), None, actor.end_call, CLOSE)
        if actor.link is not None and actor.state != DYING:
            self._send(actor, [call])
        else:
            actor.queued.append(call)

    def in_flight(self) -> Iterator[Tuple[HostBlobs, Tuple[Tuple[bytes, bytes], ...]]]:
        """Each call sent to an actor and not answered: its host's blobs and those the
        call names (both pickles': the pool's blob sweeps keep them meanwhile)."""
        for actor in self.actors.values():
            link = actor.link
            if link is not None:
                for call in actor.sent:
                    other = call.encoded.other[1] if call.encoded.other is not None else ()
                    yield link.session.blobs, (*call.encoded.blobs, *other)

    def infos(self) -> List[ActorInfo]:
        return [actor.info() for actor in self.actors.values()]

    async def wait_ended(self, actor_id: int) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None:
            await actor.ended.wait()

    # ---- starting ---------------------------------------------------------------------

    def _place(self, actor: Actor) -> Optional[Supervisor]:
        """The host asked for; else the old one while its agent lives; else the usable
        host (with a live agent, if any has one) with the fewest actors per worker."""
        hosts: List[Supervisor] = [h for h in self.pool.hosts if h.is_usable]
        if actor.wanted is not None:
            return next((h for h in hosts if h.name == actor.wanted), None)
        old = actor.where
        if old is not None and old.is_usable and old.session is not None and old.session.is_alive:
            return old
        live = [h for h in hosts if h.session is not None and h.session.is_alive] or hosts
        if not live:
            return None
        load = collections.Counter(
            a.where.name for a in self.actors.values() if a.where is not None and a.link
        )
        return min(live, key=lambda h: (load[h.name] / max(h.workers or 1, 1), load[h.name]))

    async def _start(self, actor: Actor) -> None:
        if actor.is_closing and all(call.kind == CLOSE for call in actor.queued):
            self._ended(actor, ActorDiedError("-", actor.name, "it was closed"))
            return  # closed before it ever ran a call: nothing to build
        host = self._place(actor)
        if host is None:
            wanted = f"host {actor.wanted}" if actor.wanted else "any host"
            self._ended(actor, ActorDiedError(actor.wanted or "-", actor.name, f"{wanted} is gone"))
            return
        actor.where = host
        worker_id = f"{host.name}#actor{actor.actor_id}"
        if actor.restarts:
            worker_id += f".{actor.restarts}"
        try:
            session = await host.agent()
            assert session.hello is not None
            start = self.pool.starts.for_python(session.hello.python)
            if start is None:
                raise WorkerStartupError(
                    host.name, "initializer", "the initializer exists only as code"
                )
            channel, hello, decoder = await open_worker(
                session, worker_id, start[0], self.output, start[1]
            )
        except Exception as exc:  # WorkerStartupError, mostly: the actor cannot be
            error = ActorDiedError(host.name, actor.name, f"its process could not start: {exc}")
            error.__cause__ = exc
            self._ended(actor, error)
            return
        link = WorkerLink(worker_id, host, channel, hello, decoder, session)
        host.actor_links.add(link)
        actor.link = link
        if hasattr(channel, "on_stopped"):  # the agent killed it for a limit
            channel.on_stopped = lambda message: _stopped(actor, message)
        link.start(actor)
        log.info(
            "actor started actor=%s class=%s worker=%s pid=%d",
            actor.actor_id,
            actor.name,
            worker_id,
            link.pid,
        )
        assert actor.create is not None
        first: List[Call] = [Call(next(self._ids), None, actor.create, CREATE)]
        if actor.restarts_left == 0:
            actor.create = None  # no restart will need it: its arguments are the node's now
        queued, actor.queued = list(actor.queued), collections.deque()
        if actor.memory:
            link.send(proto.encode(proto.Limits(0.0, actor.memory)))
        self._send(actor, first + queued)

    # ---- calls and replies ------------------------------------------------------------

    def _send(self, actor: Actor, calls: Sequence[Call]) -> None:
        link = actor.link
        assert link is not None
        why = actor.send(calls)
        if why:  # its constructor cannot run there: the calls behind it fail with it
            self._kill(actor, link, f"its constructor cannot reach it: {why}")

    def on_reply(self, actor: Actor, link: WorkerLink, message: proto.Message) -> None:
        if not isinstance(message, (proto.Done, proto.Failed)) or actor.link is not link:
            return
        if not actor.sent or actor.sent[0].call_id != message.task_id:
            if message.task_id != proto.INIT_TASK_ID or not isinstance(message, proto.Failed):
                log.warning(
                    "actor=%s: reply to an unknown call %d", actor.actor_id, message.task_id
                )
                return
            self._kill(actor, link, f"the pool's initializer failed there: {message.message}")
            return
        call = actor.sent.popleft()
        if call.kind == CREATE:
            if isinstance(message, proto.Failed):
                cause = rebuild(message, link.worker_id)
                how = f"its __init__ raised {message.type_name}: {message.message}"
                actor.restarts_left = 0  # it would raise again
                self._kill(actor, link, how, cause)
            elif actor.state == STARTING:
                actor.state = ALIVE
            return
        if call.kind == CLOSE:
            if isinstance(message, proto.Failed):
                log.warning(
                    "actor %s: close() raised %s: %s",
                    actor.name,
                    message.type_name,
                    message.message,
                )
            link.expect_end("closed")
            link.send(proto.encode(proto.Shutdown()))
            self.pool.spawn(link.channel.aclose(self.shutdown_grace))
            return
        actor.answer(call, message)

    # ---- ends -------------------------------------------------------------------------

    def _kill(
        self, actor: Actor, link: WorkerLink, how: str, cause: Optional[BaseException] = None
    ) -> None:
        """It cannot serve (its constructor failed): it is dead, its process ended."""
        error = ActorDiedError(link.host.name, actor.name, how)
        error.__cause__ = cause
        actor.restarts_left = 0
        actor.link = None
        link.expect_end("dead")
        link.channel.kill()
        self._ended(actor, error, list(actor.sent))

    def on_lost(self, actor: Actor, link: WorkerLink, reason: str) -> None:
        """Its link's reader ended (synchronously, before any await)."""
        self.output.close(link.worker_id)
        link.host.actor_links.discard(link)
        link.host.ended.add(link.counters)
        if actor.link is not link:
            return
        actor.link = None
        doomed, actor.sent = list(actor.sent), collections.deque()
        if link.is_closing and actor.is_closing and not doomed:
            actor.state, actor.create = CLOSED, None
            actor.ended.set()
            log.info("actor closed actor=%s class=%s", actor.actor_id, actor.name)
            return
        actor.state = DYING
        self.pool.spawn(self._after_death(actor, link, reason, doomed))

    async def _after_death(
        self, actor: Actor, link: WorkerLink, reason: str, doomed: List[Call]
    ) -> None:
        how = reason or link.end_reason
        try:
            if not how:
                how = await link.channel.exit_reason(DEATH_REASON_WAIT)
            if actor.stop_reason:
                how = f"{actor.stop_reason} ({how})"
            tail = link.channel.stderr_tail().splitlines()
            if tail and not link.is_closing:
                how += f" (last stderr: {tail[-1][:200]})"
        finally:  # even when shutdown cancels this: the pending calls end
            error = ActorDiedError(link.host.name, actor.name, f"pid {link.pid}, {how}")
            restart = actor.restarts_left > 0 and not actor.is_closing and not self.is_closing
            log.warning(
                "actor died actor=%s class=%s pending=%d%s: %s",
                actor.actor_id,
                actor.name,
                len(doomed),
                " (restarting)" if restart else "",
                how,
            )
            if restart:
                actor.fail(doomed, error)
                actor.restarts_left -= 1
                actor.restarts += 1
                actor.state = STARTING
                self.pool.spawn(self._start(actor))
            else:
                self._ended(actor, error, doomed)
        await link.channel.aclose(0.5)

    def _ended(self, actor: Actor, error: ActorDiedError, doomed: Sequence[Call] = ()) -> None:
        """No process and none to come: every call made so far and later fails."""
        actor.state = CLOSED if actor.is_closing else DEAD
        actor.create = None
        actor.error = error
        queued, actor.queued = list(actor.queued), collections.deque()
        actor.sent = collections.deque()
        actor.fail([*doomed, *queued], error)
        actor.ended.set()

    def _gone(self, actor: Actor) -> BaseException:
        if actor.error is not None:
            return actor.error
        where = actor.where.name if actor.where is not None else "-"
        return ActorDiedError(where, actor.name, "it was closed")

    # ---- shutdown ---------------------------------------------------------------------

    def terminate(self, reason: str = "killed by kill_workers()") -> None:
        """Kill every actor's process now; pending calls fail."""
        self.is_closing = True
        for actor in self.actors.values():
            actor.is_closing = True
            link = actor.link
            if link is not None:
                link.expect_end(reason)
                link.channel.kill()

    async def aclose(self, grace: Optional[float]) -> None:
        """Shutdown: each actor ends after the method calls made before (waited for as
        running tasks are: ``grace`` s at most, when given), then its ``close()`` gets
        ``shutdown_grace`` s; what is still alive then is killed."""
        self.is_closing = True
        live = [a for a in self.actors.values() if not a.ended.is_set()]
        for actor in live:
            self.close(actor.actor_id)
        if not live:
            return
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        while any(a.is_busy() for a in live) and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.02)  # only while shutting down, with calls under way
        waits = [asyncio.ensure_future(a.ended.wait()) for a in live]
        _, pending = await asyncio.wait(waits, timeout=self.shutdown_grace)
        if pending:
            log.warning("shutdown: %d actors did not end in time; killing them", len(pending))
            self.terminate("killed at shutdown")
            _, pending = await asyncio.wait(pending, timeout=self.shutdown_grace + 2.0)
        for waiter in pending:
            waiter.cancel()
        for actor in live:  # what did not end even so
            if not actor.ended.is_set():
                self._ended(actor, ActorDiedError("-", actor.name, "the executor shut down"))


def _stopped(actor: Actor, message: proto.Stopped) -> None:
    actor.stop_reason = f"killed on its host past its {message.why} limit: {message.detail}"
