"""Loop-thread orchestration: workers, dispatch, replies, Futures, shutdown.

Data flow (every step after the first runs on the executor's loop thread)::

    submit() ──Task──▶ Pool.enqueue ──▶ Scheduler.submit
                                   └──▶ _dispatch: Scheduler.assignments()
                                          ──Run frames, coalesced per worker──▶ Channel.write
    worker: Run ──▶ fn(*args) ──▶ Done | Failed
    _read_replies(link) ──FrameDecoder──▶ _on_reply ──▶ Future.set_result / set_exception
                                             │      └──▶ Scheduler.complete ──▶ _dispatch
                                             └─ Output/Log/Fetch/Pong ──▶ link.on_side_message
    EOF / protocol error ──▶ _on_lost ──▶ Scheduler.remove_worker: requeue or WorkerLostError
                                     └──▶ _start_worker(host) as a replacement

Owns: the live ``WorkerLink``s and host states, deciding when to start and replace
workers (``_links.open_worker`` starts each one), resolving Futures, broken-pool
detection and the shutdown escalation (``Shutdown`` frame → grace → close channel
→ close connection). Only the loop thread touches any of
it. Must not import: subprocess or asyncssh, placement policy, or frame layout
details beyond ``_protocol``'s codec.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .._errors import (
    BrokenPool,
    ProtocolError,
    WorkerLostError,
    WorkerStartupError,
)
from .._output import OutputRouter
from .._scheduler import Scheduler, depth_for
from .._stats import Stats
from .._transports.base import Channel, Transport
from .._wire import protocol as proto
from .link import (
    HostState,
    Task,
    TaskFuture,
    WorkerLink,
    fail,
    open_worker,
    ping_all,
    settle,
    snapshot,
)

log = logging.getLogger("sshexec.pool")

MAX_START_FAILURES = 3  # consecutive failed starts (other than connecting) before giving up
MAX_BACKOFF = 10.0  # seconds between reconnect attempts to a host that is down
PING_EVERY = 1.0  # seconds between round-trip measurements of a busy worker
# Startup failures that retrying cannot fix.
FATAL_STAGES = frozenset({"host key", "authentication", "interpreter", "version", "initializer"})


class Pool:
    """All workers of one executor. Create and use it on the loop thread only."""

    def __init__(
        self,
        hosts: Sequence[Tuple[Transport, Optional[int], str]],
        *,
        initializer: bytes,
        max_tasks_per_child: Optional[int],
        prefetch: int,
        max_retries: int,
        max_frame: int,
        shutdown_grace: float,
        reconnect_grace: float,
        output: OutputRouter,
        forward_modules: bool = True,
        log_level: int = logging.WARNING,
    ) -> None:
        self.hosts = [HostState(t, n, python) for t, n, python in hosts]
        self.scheduler = Scheduler(prefetch=prefetch, max_retries=max_retries)
        self.init = proto.Init("", initializer, max_frame, forward_modules, log_level)
        self.max_tasks_per_child = max_tasks_per_child
        self.max_frame, self.shutdown_grace, self.output = max_frame, shutdown_grace, output
        self.reconnect_grace = reconnect_grace
        self.abandoned: Set[int] = set()  # running tasks nobody waits for (a timed-out map)
        self.links: Dict[str, WorkerLink] = {}
        self.tasks: Dict[int, Task] = {}
        self.broken: Optional[BrokenPool] = None
        self.is_closing = False
        self.is_terminating = False
        self._background: Set[asyncio.Task[Any]] = set()
        self._channels: Set[Channel] = set()  # every worker channel ever opened: closed at the end
        self._dispatch_pending = False
        self._payload_mean = 0.0  # moving mean of Run payload sizes (bytes)
        self._idle = asyncio.Event()
        self._idle.set()
        self.final_stats: Optional[Stats] = None  # set when aclose() is done

    # ---- starting workers ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect to every host in parallel and start each one's first worker.

        Raises WorkerStartupError (one host) or BrokenPool (several) if none can start.
        """
        results = await asyncio.gather(
            *(self._start_host(h) for h in self.hosts), return_exceptions=True
        )
        errors = {h.name: r for h, r in zip(self.hosts, results) if isinstance(r, BaseException)}
        for name, exc in errors.items():
            if not isinstance(exc, Exception):
                raise exc
            log.warning("host unusable, left out host=%s: %s", name, exc)
        if len(errors) == len(self.hosts):
            if len(errors) == 1:
                raise next(iter(errors.values()))
            raise BrokenPool("no host could start a worker", {n: str(e) for n, e in errors.items()})

    async def _start_host(self, host: HostState) -> None:
        host.starting += 1
        try:
            try:
                await host.transport.connect()
            except BaseException:
                host.starting -= 1
                raise
            link = await self._start_worker(host)
        except WorkerStartupError as exc:
            host.error = str(exc)
            raise
        if host.workers is None:
            host.workers = link.hello.cpus
        self._top_up(host)

    def _top_up(self, host: HostState) -> None:
        """Start workers until the host has its planned number (live + starting); while
        the host is down, a single start at a time probes it."""
        if not host.is_usable or host.workers is None:
            return
        planned = 1 if host.down_since is not None else host.workers
        while len(host.links) + host.starting < planned and not self._is_done():
            host.starting += 1  # counted from now, so this loop ends
            self._spawn(self._replace(host))

    async def _replace(self, host: HostState) -> None:
        if host.failures:
            await asyncio.sleep(min(0.1 * 2**host.failures, MAX_BACKOFF))
        try:
            await self._start_worker(host)
        except WorkerStartupError as exc:
            host.failures += 1
            host.last_error = str(exc)
            fatal = exc.stage in FATAL_STAGES
            if fatal or (exc.stage != "connect" and host.failures >= MAX_START_FAILURES):
                self._give_up(host, str(exc))
                return
            if host.down_since is None:  # the host went away: reconnect with backoff
                host.down_since = asyncio.get_running_loop().time()
                asyncio.get_running_loop().call_later(self.reconnect_grace, self._check_broken)
            log.warning("worker start failed host=%s attempt=%d: %s", host.name, host.failures, exc)
            self._check_broken()
            self._top_up(host)
        else:
            if host.down_since is not None:
                log.warning("host back host=%s after %d failed starts", host.name, host.failures)
            host.failures, host.down_since, host.last_error = 0, None, None
            self._top_up(host)

    async def _start_worker(self, host: HostState) -> WorkerLink:
        """Start one worker; the caller has counted it in ``host.starting``."""
        worker_id = f"{host.name}#{host.next_index}"
        host.next_index += 1
        try:
            channel, hello, decoder = await open_worker(host, worker_id, self.init, self.output)
        finally:
            host.starting -= 1
        link = WorkerLink(worker_id, host, channel, hello)
        self._channels.add(channel)
        if self.is_closing and not self.tasks:
            await self._retire(link)
            return link
        host.links.add(link)
        self.links[worker_id] = link
        self.scheduler.add_worker(worker_id, budget=self.max_tasks_per_child, group=host.name)
        link.reader = self._spawn(self._read_replies(link, decoder))
        link.ping()
        log.info(
            "worker started worker=%s pid=%d hostname=%s python=%s",
            worker_id,
            hello.pid,
            hello.hostname,
            hello.python,
        )
        self._dispatch_soon()
        return link

    def _give_up(self, host: HostState, reason: str) -> None:
        if host.error is None:
            host.error = reason
            log.error("host given up host=%s: %s", host.name, reason)
        self._fail_pinned(host, reason)
        self._check_broken()

    def _fail_pinned(self, host: HostState, reason: str) -> None:
        """Tasks that may run only on ``host`` (run_on_hosts) fail when it is unusable."""
        for task_id in self.scheduler.drain_group(host.name):
            task = self.tasks.pop(task_id, None)
            if task is not None:
                fail(
                    task.future,
                    BrokenPool(f"host {host.name} has no usable worker", {host.name: reason}),
                )
        self._note_idle()

    # ---- tasks --------------------------------------------------------------------------

    def enqueue_many(self, tasks: List[Task]) -> None:
        """Queue newly submitted tasks and send them out now (no extra loop pass)."""
        for task in tasks:
            if self.broken is not None:
                fail(task.future, self.broken)
                continue
            self.tasks[task.task_id] = task
            self.scheduler.submit(task.task_id, task.group)
        if self.tasks:
            self._idle.clear()
            self._dispatch()

    def cancel_queued(self) -> None:
        """shutdown(cancel_futures=True): cancel every task not yet sent to a worker."""
        for task_id in self.scheduler.drain_queue():
            task = self.tasks.pop(task_id, None)
            if task is not None:
                task.future.cancel()
        self._note_idle()

    def _dispatch_soon(self) -> None:
        if not self._dispatch_pending:
            self._dispatch_pending = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        batches: Dict[str, List[proto.Message]] = {}
        for worker_id, task_id in self.scheduler.assignments():
            task = self.tasks.get(task_id)
            if task is not None and not task.is_started:
                task.is_started = True
                if not task.future.set_running_or_notify_cancel():
                    task = None  # cancelled while queued: drop it
            if task is None:
                self.tasks.pop(task_id, None)
                self.scheduler.complete(worker_id, task_id)
                continue
            log.debug("dispatch task=%d worker=%s", task_id, worker_id)
            self._payload_mean += (task.size - self._payload_mean) * 0.1
            batches.setdefault(worker_id, []).append(proto.Run(task_id, task.payload, task.buffers))
        for worker_id, task_id in self.scheduler.steals():
            log.debug("revoke task=%d worker=%s", task_id, worker_id)
            batches.setdefault(worker_id, []).append(proto.Revoke(task_id))
        for worker_id, messages in batches.items():
            self.links[worker_id].send(*proto.frame_pieces(messages))  # few writes per worker
        self._note_idle()

    async def _read_replies(self, link: WorkerLink, decoder: proto.FrameDecoder) -> None:
        reason = ""
        try:
            while True:
                for message in decoder.messages():
                    self._on_reply(link, message)
                self._after_replies(link)
                chunk = await link.channel.read()
                if not chunk:
                    decoder.end()
                    break
                link.counters.bytes_received += len(chunk)
                decoder.feed(chunk)
        except proto.FrameError as exc:
            error = ProtocolError(f"worker {link.worker_id} sent an invalid frame: {exc}")
            log.error("%s; closing that worker", error)
            reason = str(error)
        await self._on_lost(link, reason)

    def _on_reply(self, link: WorkerLink, message: proto.Message) -> None:
        if link.on_side_message(message, self.output):
            return
        if (
            isinstance(message, (proto.Done, proto.Failed))
            and message.task_id == proto.INIT_TASK_ID
        ):
            link.init_failed = True
            assert isinstance(message, proto.Failed)
            self._give_up(link.host, f"initializer failed: {message.type_name}: {message.message}")
            return
        if isinstance(message, proto.Ready):
            log.debug("worker ready worker=%s", link.worker_id)
            return
        if isinstance(message, proto.Revoked):
            self.scheduler.returned(link.worker_id, message.task_id)
            return
        if not isinstance(message, (proto.Done, proto.Failed)):
            log.warning("unexpected %s from worker=%s", type(message).__name__, link.worker_id)
            return
        self.scheduler.complete(link.worker_id, message.task_id)
        link.counters.busy_seconds += message.seconds
        link.note_task_time(message.seconds)
        if isinstance(message, proto.Done):
            link.counters.tasks_done += 1
        else:
            link.counters.tasks_failed += 1
        task = self.tasks.pop(message.task_id, None)
        if task is None or task.future.done():
            return
        settle(task, message, link.worker_id)
        log.debug("task done task=%d worker=%s", task.task_id, link.worker_id)

    def _tune(self, link: WorkerLink) -> None:
        """Adaptive prefetch, once per chunk of replies: hold enough tasks at the worker to
        cover its round trip (re-measured every PING_EVERY s) at its mean task time."""
        rtt, mean = link.counters.rtt_seconds, link.task_time
        if rtt is not None and mean is not None:
            self.scheduler.set_depth(link.worker_id, depth_for(rtt, mean, self._payload_mean))
        link.ping_if_due(PING_EVERY)

    async def stats(self, refresh: float) -> Stats:
        """A snapshot, after pinging every worker (waiting up to ``refresh`` s)."""
        await ping_all([link for link in self.links.values() if not link.is_closing], refresh)
        return snapshot(self.hosts)

    def _after_replies(self, link: WorkerLink) -> None:
        if link.init_failed:
            return
        if link.is_alive and not link.is_closing and self.scheduler.is_spent(link.worker_id):
            self._spawn(self._retire(link))  # max_tasks_per_child reached
        if link.is_alive:
            self._tune(link)
        self._dispatch_soon()
        self._note_idle()

    # ---- losing and retiring workers ------------------------------------------------------

    async def _retire(self, link: WorkerLink) -> None:
        link.is_closing = True
        link.channel.write(proto.encode(proto.Shutdown()))
        await link.channel.aclose(self.shutdown_grace)
        if link.reader is None:  # never joined the pool; _on_lost will not run for it
            link.is_alive = False
            self._channels.discard(link.channel)

    async def _on_lost(self, link: WorkerLink, reason: str) -> None:
        if not link.is_alive:
            return
        link.is_alive = False
        link.host.links.discard(link)
        self.links.pop(link.worker_id, None)
        expected = link.is_closing or link.init_failed
        how = reason or await link.channel.exit_reason(2.0)
        loss = self.scheduler.remove_worker(link.worker_id, charge=not expected)
        self.output.close(link.worker_id)
        if loss.charged is not None and loss.charged in loss.requeued:
            link.counters.tasks_retried += 1
        link.counters.tasks_failed += len(loss.failed)
        link.retire_counters()
        if not expected:
            described = f"pid {link.pid}, {how}"
            tail = link.channel.stderr_tail().splitlines()
            if tail:
                described += f" (last stderr: {tail[-1][:200]})"
            if loss.charged is not None and loss.charged in self.tasks:
                self.tasks[loss.charged].losses += ((link.worker_id, described),)
            doomed = list(loss.failed) + (
                self.scheduler.drain_queue() if self.is_terminating else []
            )
            for task_id in doomed:
                task = self.tasks.pop(task_id, None)
                if task is not None:
                    fail(
                        task.future,
                        WorkerLostError(task_id, task.losses or [(link.worker_id, how)]),
                    )
            log.warning(
                "worker lost worker=%s pid=%d in_flight=%d requeued=%d: %s",
                link.worker_id,
                link.pid,
                len(loss.requeued) + len(loss.failed),
                len(loss.requeued),
                how,
            )
        await link.channel.aclose(0.5 if not expected else self.shutdown_grace)
        self._channels.discard(link.channel)
        if link.host.is_usable and not self._is_done():
            self._top_up(link.host)
        self._check_broken()
        self._dispatch_soon()
        self._note_idle()

    def _is_waiting_for(self, host: HostState) -> bool:
        """Usable and not down for longer than the grace (none once shutting down)."""
        if not host.is_usable:
            return False
        if host.down_since is None:
            return True
        down_for = asyncio.get_running_loop().time() - host.down_since
        return not self.is_closing and down_for < self.reconnect_grace

    def _check_broken(self) -> None:
        for host in self.hosts:
            if not host.links and not self._is_waiting_for(host):
                self._fail_pinned(host, host.error or host.last_error or "no live worker")
        if self.broken is not None or self.links:
            return
        if any(self._is_waiting_for(h) for h in self.hosts):
            return
        self.broken = BrokenPool(
            "no usable worker is left on any host",
            {h.name: h.error or h.last_error or "no live worker" for h in self.hosts},
        )
        log.error("%s", self.broken)
        self.scheduler.drain_queue()
        tasks, self.tasks = self.tasks, {}
        for task in tasks.values():
            fail(task.future, self.broken)
        self._note_idle()

    # ---- shutdown -------------------------------------------------------------------------

    def _is_done(self) -> bool:
        return self.is_closing and not self.tasks

    def _note_idle(self) -> None:
        if self.abandoned:  # rare (a timed-out map): keep the common path O(1)
            self.abandoned.intersection_update(self.tasks)
        if len(self.abandoned) == len(self.tasks):  # nothing left that anyone waits for
            self._idle.set()

    def abandon(self, futures: Sequence[TaskFuture]) -> None:
        """A timed-out map gave up on these running tasks: shutdown will not wait for them."""
        wanted = {id(f) for f in futures}
        self.abandoned.update(t for t, task in self.tasks.items() if id(task.future) in wanted)
        self._note_idle()

    def terminate(self) -> None:
        """kill_workers(): queued tasks are cancelled, running ones fail, nothing restarts."""
        self.is_closing = self.is_terminating = True
        self.cancel_queued()
        for link in list(self.links.values()):
            link.channel.kill()
        self._check_broken()

    async def aclose(self, cancel_futures: bool, grace: Optional[float] = None) -> None:
        """Finish (or cancel) pending work, then stop every worker and connection.

        Running tasks are waited for (for ``grace`` seconds at most when given, then their
        workers are killed); abandoned ones are not. Every step after that is bounded."""
        self.is_closing = True
        if cancel_futures:
            self.cancel_queued()
        self._check_broken()  # hosts that are down are not waited for any more
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning(
                "shutdown: %d tasks still running after %g s; killing their workers",
                len(self.tasks),
                grace,
            )
        if self.tasks:  # abandoned, or past the grace
            self.terminate()
            self.abandoned.clear()
            self._idle.clear()
            self._note_idle()
            try:
                await asyncio.wait_for(self._idle.wait(), self.shutdown_grace + 2.0)
            except asyncio.TimeoutError:
                log.warning("shutdown: %d workers did not die in time", len(self.links))
        links = list(self.links.values())
        await asyncio.gather(*(self._retire(link) for link in links), return_exceptions=True)
        readers = [link.reader for link in links if link.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=self.shutdown_grace + 2.0)
        pending = [t for t in self._background if not t.done()]
        for background in pending:
            background.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        channels, self._channels = self._channels, set()
        await asyncio.gather(*(c.aclose(0.0) for c in channels), return_exceptions=True)
        await asyncio.gather(*(h.transport.aclose() for h in self.hosts), return_exceptions=True)
        self.final_stats = snapshot(self.hosts)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
