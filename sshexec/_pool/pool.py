"""Loop-thread orchestration: the facade over hosts, links, the task table and shutdown.

Data flow (every step after the first runs on the executor's loop thread)::

    submit() ──Task──▶ Runtime.post ──▶ Pool.enqueue_many ──▶ TaskTable.add
                                                         └──▶ Dispatcher.now: TaskTable.place()
                                   ──Run frames, coalesced per worker──▶ WorkerLink.send
    Future.cancel() / map closed ──▶ Runtime.cancel ──▶ TaskTable.cancel: gone at once
    kill(future) ──▶ Pool.kill ──▶ stops.kill: fails now, Kill to the agent; the agent's
        Stopped (limits, kill) ──▶ stops.stopped: fails the task, its worker's end expected
    worker: Run ──▶ fn(*args) ──▶ Done | Failed
    WorkerLink._read_replies ──▶ Dispatcher.on_reply ──▶ TaskTable.finish ──▶ resolve | fail
        ──▶ Ender: a Future without callbacks ends here; one with callbacks, on the
            executor's callback thread (no user code runs on the loop thread)
                             │                     └──▶ Dispatcher.soon
                             └─ Output/Log/Fetch/Pong: handled by the link itself
    the reader ends (EOF, bad frame, any error) ──▶ Pool.on_lost, in one synchronous step:
        links, TaskTable.remove_worker (requeue | ending), Supervisor.lost ──▶ top_up
        then, bounded: how it died ──▶ ending tasks fail with WorkerLostError

Actors (``ex.actor``) are workers of their own on links the table never sees: their
calls go ``ActorHub`` ──Run──▶ their link, and their ends to the hub (``_pool.actors``);
the pool only ends them at shutdown and kills them with the rest.

Owns: the live ``WorkerLink``s by id, adopting started workers, losing them,
broken-pool detection and the shutdown escalation (``Shutdown`` frame → grace → close
channel → close connection). Every task's state is the ``TaskTable``'s, every host's
the ``Supervisor``'s; the hot path (dispatch, replies) is the ``Dispatcher``'s. Only
the loop thread touches any of it. Must not import: subprocess or asyncssh, placement
policy, or frame layout beyond ``_wire.protocol``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Coroutine, Dict, List, Optional, Sequence, Set, Tuple

from .._ending import Ender
from .._errors import BrokenPool, WorkerLostError, WorkerStartupError
from .._logs import logger
from .._output import WRITER_TIMEOUT, OutputRouter
from .._scheduler import Scheduler
from .._stats import Stats
from .._tasks import Loss, Task, TaskFuture, TaskTable
from .._transports.base import Channel, Transport
from .._wire import protocol as proto
from . import stops
from .actors import ActorHub
from .dispatch import Dispatcher
from .link import OutputGate, WorkerLink, ping_all
from .staging import Local, Staging, staging_failed
from .supervisor import Supervisor, snapshot
from .versions import Starts, bound_error, same_python

log = logger("sshexec.pool")

LOSS_REASON_WAIT = 2.0  # seconds to learn how a lost worker ended before failing its tasks


class Pool:
    """All workers of one executor. Create and use it on the loop thread only."""

    def __init__(
        self,
        hosts: Sequence[Tuple[Transport, Optional[int], str]],
        *,
        initializer: bytes,
        other_initializer: Optional[bytes] = b"",
        max_tasks_per_child: Optional[int],
        prefetch: int,
        max_retries: int,
        max_frame: int,
        shutdown_grace: float,
        reconnect_grace: float,
        output: OutputRouter,
        keepalive_interval: float = 10.0,
        forward_modules: bool = True,
        log_level: int = logging.WARNING,
        ender: Optional[Ender] = None,
        staging: Optional[Staging] = None,
    ) -> None:
        self.hosts = [Supervisor(t, n, python, self, reconnect_grace) for t, n, python in hosts]
        self.table = TaskTable(
            Scheduler(prefetch=prefetch, max_retries=max_retries), self._now_idle, ender
        )
        self.starts = Starts(
            proto.Init("", b"", max_frame, forward_modules, log_level),
            initializer,
            other_initializer,
        )
        self.other_python = False  # a host runs another Python version (read by submit())
        self.max_tasks_per_child = max_tasks_per_child
        self.shutdown_grace, self.output = shutdown_grace, output
        self.keepalive_interval = keepalive_interval
        self.staging = staging  # files= / return_files=, when given
        self.gate = OutputGate(output)
        self.links: Dict[str, WorkerLink] = {}  # every worker the table knows, and only those
        self.dispatch = Dispatcher(self.table, self.links, self._retire_spent)
        self.dispatch.keeper.pinned |= self.starts.blob_keys
        self.on_reply = self.dispatch.on_reply  # the links' Replies: these two are the hot path
        self.after_replies = self.dispatch.after_replies
        self.actors = ActorHub(self, self.table.ender, shutdown_grace)  # ex.actor(): _pool.actors
        self.dispatch.keeper.also_in_flight.append(self.actors.in_flight)
        self.broken: Optional[BrokenPool] = None
        self.is_closing = False
        self.is_terminating = False
        self._background: Set[asyncio.Task[Any]] = set()
        self._channels: Set[Channel] = set()  # every worker channel ever opened: closed at the end
        self._idle = asyncio.Event()
        self._idle.set()
        self.final_stats: Optional[Stats] = None  # set when aclose() is done

    # ---- hosts and workers ------------------------------------------------------------

    async def start(self) -> None:
        """Connect to every host in parallel and start each one's first worker. Hosts
        that fail for a reason retrying can fix join later; the rest are given up.

        Raises WorkerStartupError (one host) or BrokenPool (several) if none can start.
        """
        results = await asyncio.gather(
            *(h.start_first() for h in self.hosts), return_exceptions=True
        )
        errors = {h: r for h, r in zip(self.hosts, results) if isinstance(r, BaseException)}
        for exc in errors.values():
            if not isinstance(exc, WorkerStartupError):
                raise exc
        if len(errors) == len(self.hosts):
            if len(errors) == 1:
                raise next(iter(errors.values()))
            raise BrokenPool(
                "no host could start a worker", {h.name: str(e) for h, e in errors.items()}
            )
        for host, exc in errors.items():
            assert isinstance(exc, WorkerStartupError)
            host.failed_at_start(exc)

    def may_start(self) -> bool:
        """New workers are wanted: not killed, not broken, and not shut down with
        nothing left to run."""
        if self.is_terminating or self.broken is not None:
            return False
        return not self.is_closing or not self.table.is_idle

    def adopt(self, link: WorkerLink) -> None:
        """A worker has started: it joins the table and the dispatch."""
        self._channels.add(link.channel)
        if not self.may_start():
            self.spawn(self._retire(link, "not needed any more"))
            return
        link.host.links.add(link)
        self.links[link.worker_id] = link
        if self.staging is not None:
            link.returned = self.staging.returned
        self.table.add_worker(
            link.worker_id, self.max_tasks_per_child, link.host.name, link.same_python
        )
        if hasattr(link.channel, "on_stopped"):  # the agent stops tasks (limits, kill)
            link.channel.on_stopped = lambda message: stops.stopped(self.table, link, message)
        link.start(self)
        link.ping()
        log.info(
            "worker started worker=%s pid=%d hostname=%s python=%s",
            link.worker_id,
            link.hello.pid,
            link.hello.hostname,
            link.hello.python,
        )
        self.dispatch.soon()

    def host_changed(self, host: Supervisor) -> None:
        self._check_broken()

    def python_seen(self, version: str) -> None:
        """A host's agent runs ``version``: another one than the client's means calls are
        pickled portably too, and results may name the script as ``__mp_main__``."""
        if not same_python(version) and not self.other_python:
            self.other_python = True
            main = sys.modules.get("__main__")
            if main is not None:
                sys.modules.setdefault("__mp_main__", main)  # as multiprocessing's spawn does

    def _bound_runnable(self) -> bool:
        """Some usable host runs, or may run (not connected yet), the client's Python; or
        no host is usable at all (then the pool is broken, which is the error to give)."""
        usable = [h for h in self.hosts if h.is_usable]
        return not usable or any(
            h.python_version is None or same_python(h.python_version) for h in usable
        )

    def _bound_error(self, task: Task) -> BaseException:
        return bound_error(task, [(h.name, h.python_version) for h in self.hosts if h.is_usable])

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool background step failed", exc_info=task.exception())

    # ---- tasks ------------------------------------------------------------------------

    def enqueue_many(self, tasks: List[Task]) -> None:
        """Queue newly submitted tasks and send them out now (no extra loop pass)."""
        for task in tasks:
            if self.broken is not None:
                self.table.fail(task, self.broken)
            elif task.bound is not None and not self._bound_runnable():
                self.table.fail(task, self._bound_error(task))
            else:
                self.table.add(task)
        if not self.table.is_idle:
            self._idle.clear()
            self.dispatch.now()

    def cancel(self, task_ids: Sequence[int]) -> None:
        """Their Futures were cancelled while queued: out of the table now."""
        for task_id in task_ids:
            self.table.cancel(task_id)

    def kill(self, future: TaskFuture) -> Optional[bool]:
        """``SSHPoolExecutor.kill``: end that task now (see ``stops.kill``)."""
        killed = stops.kill(self.table, self.links, future)
        self.dispatch.soon()
        return killed

    def cancel_queued(self) -> None:
        """shutdown(cancel_futures=True): cancel every task not yet sent to a worker."""
        self.table.cancel_queued()

    def abandon(self, futures: Sequence[TaskFuture]) -> None:
        """A timed-out map gave up on these running tasks: shutdown will not wait for them."""
        self.table.abandon(futures)

    def _now_idle(self) -> None:
        self._idle.set()

    # ---- losing and retiring workers ---------------------------------------------------

    def on_lost(self, link: WorkerLink, reason: str) -> None:
        """The link's reader ended: forget the worker everywhere, before any ``await``."""
        if self.links.get(link.worker_id) is not link:
            return
        del self.links[link.worker_id]
        expected = link.is_closing or link.init_failed
        loss = self.table.remove_worker(
            link.worker_id, charge=not expected, requeue=not self.is_terminating
        )
        if loss.charged is not None and loss.charged in loss.requeued:
            link.counters.tasks_retried += 1
        link.counters.tasks_failed += len(loss.ending)
        self.output.close(link.worker_id)
        link.host.lost(link)
        self.spawn(self._after_loss(link, loss, reason, expected))
        self._check_broken()
        self.dispatch.soon()

    async def _after_loss(self, link: WorkerLink, loss: Loss, reason: str, expected: bool) -> None:
        how = reason or "lost"
        try:
            if not reason:
                how = await link.channel.exit_reason(LOSS_REASON_WAIT)
        finally:  # even when shutdown cancels this: the ending tasks end
            self._end_lost_tasks(link, loss, how, expected)
        await link.channel.aclose(0.5 if not expected else self.shutdown_grace)
        self._channels.discard(link.channel)

    def _end_lost_tasks(self, link: WorkerLink, loss: Loss, how: str, expected: bool) -> None:
        if expected:
            how = f"{link.end_reason} ({how})" if link.end_reason else how
            log.info("worker ended worker=%s pid=%d: %s", link.worker_id, link.pid, how)
        else:
            described = f"pid {link.pid}, {how}"
            tail = link.channel.stderr_tail().splitlines()
            if tail:
                described += f" (last stderr: {tail[-1][:200]})"
            if loss.charged is not None:
                loss.charged.losses += ((link.worker_id, described),)
            log.warning(
                "worker lost worker=%s pid=%d in_flight=%d requeued=%d: %s",
                link.worker_id,
                link.pid,
                len(loss.requeued) + len(loss.ending),
                len(loss.requeued),
                how,
            )
        self.table.fail_ending(
            loss.ending, lambda t: WorkerLostError(t.task_id, t.losses or [(link.worker_id, how)])
        )

    def _retire_spent(self, link: WorkerLink) -> None:
        self.spawn(self._retire(link, "max_tasks_per_child reached"))

    async def _retire(self, link: WorkerLink, reason: str) -> None:
        link.expect_end(reason)
        link.send(proto.encode(proto.Shutdown()))
        await link.channel.aclose(self.shutdown_grace)
        if link.reader is None:  # never joined the pool; on_lost will not run for it
            link.is_alive = False
            self._channels.discard(link.channel)

    def _check_broken(self) -> None:
        if not self._bound_runnable():
            self.table.fail_bound(self._bound_error)
        now, closing = asyncio.get_running_loop().time(), self.is_closing
        for host in self.hosts:
            if not host.links and not host.is_waited_for(now, closing):
                reason = host.error or host.last_error or "no live worker"
                self.table.fail_group(
                    host.name,
                    BrokenPool(f"host {host.name} has no usable worker", {host.name: reason}),
                )
        if self.broken is not None or self.links:
            return
        if any(h.is_waited_for(now, closing) for h in self.hosts):
            return
        self.broken = BrokenPool(
            "no usable worker is left on any host",
            {h.name: h.error or h.last_error or "no live worker" for h in self.hosts},
        )
        log.error("%s", self.broken)
        self.table.fail_all(self.broken)

    async def send_files(self, entries: List[Local]) -> None:
        """``send_files``: on every host now (and on every host that connects later);
        raises SSHExecError naming each host that could not take them, and why."""
        assert self.staging is not None
        self.staging.add(entries)
        errors: Dict[str, BaseException] = {}

        async def one(host: Supervisor) -> None:
            if host.opening is not None:  # it may have offered the files before add()
                await asyncio.wait([host.opening])
            session = host.session
            if host.is_usable and session is not None and session.is_alive:
                try:
                    await self.staging.send(session, entries)  # type: ignore[union-attr]
                except WorkerStartupError as exc:
                    errors[host.name] = exc

        await asyncio.gather(*(one(host) for host in self.hosts))
        if errors:
            raise staging_failed(errors)

    # ---- stats and shutdown -------------------------------------------------------------

    async def stats(self, refresh: float) -> Stats:
        """A snapshot, after pinging every worker (waiting up to ``refresh`` s)."""
        await ping_all([link for link in self.links.values() if not link.is_closing], refresh)
        return snapshot(self.hosts)

    def terminate(self) -> None:
        """kill_workers(): queued tasks are cancelled, running ones fail, nothing starts."""
        self.is_closing = self.is_terminating = True
        self.table.cancel_queued()
        self.table.fail_queued(
            BrokenPool("the pool was killed (kill_workers) before this task could run again")
        )
        for link in list(self.links.values()):
            link.expect_end("killed by kill_workers()")
            link.channel.kill()
        self.actors.terminate()
        self._check_broken()

    async def aclose(self, cancel_futures: bool, grace: Optional[float] = None) -> None:
        """Finish (or cancel) pending work, then stop every worker and connection.

        Running tasks are waited for (for ``grace`` seconds at most when given, then their
        workers are killed); abandoned ones are not. Every step after that is bounded,
        and every Future has ended when it returns."""
        self.is_closing = True
        if cancel_futures:
            self.table.cancel_queued()
        self._check_broken()  # hosts that are down are not waited for any more
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning(
                "shutdown: %d tasks still running after %g s; killing their workers",
                self.table.waited_for(),
                grace,
            )
        if len(self.table):  # abandoned, or past the grace
            self.terminate()
            self.table.wait_for_all()
            if not self.table.is_idle:
                self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), self.shutdown_grace + 2.0)
            except asyncio.TimeoutError:
                log.warning("shutdown: %d workers did not die in time", len(self.links))
        await self.actors.aclose(0.0 if self.is_terminating else grace)
        links = list(self.links.values())
        await asyncio.gather(
            *(self._retire(link, "shutdown") for link in links), return_exceptions=True
        )
        readers = [link.reader for link in links if link.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=self.shutdown_grace + 2.0)
        pending = [t for t in self._background if not t.done()]
        for background in pending:
            background.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        self.table.fail_all(BrokenPool("the executor shut down before this task ended"))
        await asyncio.gather(
            *(h.close_session(self.shutdown_grace) for h in self.hosts), return_exceptions=True
        )
        channels, self._channels = self._channels, set()
        await asyncio.gather(*(c.aclose(0.0) for c in channels), return_exceptions=True)
        await asyncio.gather(*(h.transport.aclose() for h in self.hosts), return_exceptions=True)
        await self._stop_output()
        if self.staging is not None:
            self.staging.returned.close()
        self.final_stats = snapshot(self.hosts)

    async def _stop_output(self) -> None:
        """Let the output writer finish what is queued, without blocking the loop."""
        self.output.stop()
        deadline = asyncio.get_running_loop().time() + WRITER_TIMEOUT
        while self.output.is_writing() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self.output.is_writing():
            log.warning(
                "remote output: stdout/stderr has not taken %d bytes in %g s; giving up on them",
                self.output.backlog,
                WRITER_TIMEOUT,
            )
