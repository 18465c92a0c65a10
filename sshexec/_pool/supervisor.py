"""One ``Supervisor`` per host: how many workers it should have, starting them, backoff,
and when the host is down or given up.

Hosts come and go on one rule, at construction as later: a start that fails for a
reason retrying can fix (no answer, a refused session, a bootstrap cut short) is
retried with exponential backoff, one probe at a time while the host has no live
worker; such a host is *down* from its first failed start and counts toward a broken
pool only once it has been down for ``reconnect_grace``. A failure retrying cannot fix
(host key, authentication, interpreter, version, working directory, initializer,
files=)
gives the host up at once; so do ``MAX_START_FAILURES`` failed starts in a row of a
host with no live worker. A host with live workers is never marked down and never
given up for a failed start: it keeps retrying (backoff) to reach its planned count.

Owns: the host's transport, planned and live counts (actors' workers, started through
``agent()`` by ``_pool.actors``, are outside them; their links and calls are counted in
its stats), ``starting``, failures, the
down/given-up state, its ended workers' stats and ``snapshot()``. Loop thread only.
Must not import: subprocess or asyncssh, or know about tasks beyond the pool's hooks.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Coroutine, Deque, Dict, List, Optional, Protocol, Set

from .._errors import WorkerStartupError
from .._logs import logger
from .._stats import Counters, HostStats, Stats, WorkerStats, median_rtt
from .._transports.base import Transport
from .link import STARTUP_TIMEOUT, OutputGate, WorkerLink, open_worker
from .session import HostSession
from .staging import Staging
from .versions import CLIENT, Starts, minor

if TYPE_CHECKING:
    from .._output import OutputRouter

log = logger("sshexec.pool")

MAX_START_FAILURES = 3  # failed starts in a row (not transient) that give up an idle host
MAX_BACKOFF = 10.0  # seconds between start attempts, at most
KEEP_GONE_WORKERS = 32  # per host: stats of this many ended workers are kept
# Startup failures that retrying cannot fix: the host is given up at once.
FATAL_STAGES = frozenset(
    {
        "host key",
        "authentication",
        "interpreter",
        "version",
        "initializer",
        "working directory",
        "files",
    }
)
TRANSIENT_STAGES = frozenset({"connect", "session"})  # retried for as long as the pool lives


class PoolHooks(Protocol):
    """What a supervisor needs of its pool."""

    starts: Starts
    output: OutputRouter
    gate: OutputGate
    keepalive_interval: float
    staging: Optional[Staging]

    def python_seen(self, version: str) -> None: ...

    def may_start(self) -> bool: ...

    def adopt(self, link: WorkerLink) -> None: ...

    def host_changed(self, host: Supervisor) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...


@dataclass(eq=False)
class Supervisor:
    transport: Transport
    workers: Optional[int]  # planned worker count; None until the first Hello tells cores
    python: str
    pool: PoolHooks
    reconnect_grace: float
    next_index: int = 0
    starting: int = 0  # starts under way (counted before their backoff sleep)
    failures: int = 0  # failed starts in a row
    error: Optional[str] = None  # set when the host is given up
    last_error: Optional[str] = None  # why the latest start failed
    down_since: Optional[float] = None  # loop time of the first failed start, while no worker lives
    links: Set[WorkerLink] = field(default_factory=set)
    session: Optional[HostSession] = None  # the host's agent, while there is one
    python_version: Optional[str] = None  # what its agent runs ("3.12.1"), once known
    opening: Optional[asyncio.Task[HostSession]] = None  # a session being opened
    ended: Counters = field(default_factory=Counters)  # totals of workers that are gone
    blobs_saved: int = 0  # bytes_saved and bytes_stored of sessions that ended
    blobs_stored: int = 0
    gone: Deque[WorkerStats] = field(
        default_factory=lambda: collections.deque(maxlen=KEEP_GONE_WORKERS)
    )
    actor_links: Set[WorkerLink] = field(default_factory=set)  # actors' processes (_pool.actors)
    actor_calls: int = 0  # actor method calls served here

    @property
    def name(self) -> str:
        return self.transport.host

    @property
    def is_usable(self) -> bool:
        return self.error is None

    def is_waited_for(self, now: float, closing: bool) -> bool:
        """Usable, and not down for longer than the grace (never, once shutting down, for
        a host that is down)."""
        if not self.is_usable:
            return False
        if self.down_since is None:
            return True
        return not closing and now - self.down_since < self.reconnect_grace

    # ---- starting ---------------------------------------------------------------------

    async def start_first(self) -> None:
        """Construction: connect and start the first worker; raises WorkerStartupError."""
        self.starting += 1
        try:
            try:
                await self.transport.connect()
            except BaseException:
                self.starting -= 1
                raise
            link = await self._open()
        except WorkerStartupError as exc:
            self.failures, self.last_error = 1, str(exc)
            raise
        self.pool.adopt(link)
        if self.workers is None:
            self.workers = link.hello.cpus
        self.top_up()

    def failed_at_start(self, exc: WorkerStartupError) -> None:
        """The first start failed while other hosts came up: retry later, or give up."""
        if exc.stage in FATAL_STAGES:
            self.give_up(str(exc))
            return
        log.warning("host not reachable yet host=%s, retrying with backoff: %s", self.name, exc)
        self._mark_down()
        self.top_up()

    def top_up(self) -> None:
        """Start workers until the host has its planned number (live + starting); while
        the host has none live and is down, or its core count is unknown, one probe."""
        if not self.is_usable or not self.pool.may_start():
            return
        probing = self.workers is None or (not self.links and self.down_since is not None)
        planned = 1 if probing else (self.workers or 1)
        while len(self.links) + self.starting < planned:
            self.starting += 1  # counted from now, so this loop ends
            self.pool.spawn(self._start())

    async def _start(self) -> None:
        if self.failures:
            await asyncio.sleep(min(0.1 * 2**self.failures, MAX_BACKOFF))
        if not self.is_usable or not self.pool.may_start():
            self.starting -= 1
            return
        try:
            link = await self._open()
        except WorkerStartupError as exc:
            self._start_failed(exc)
            return
        if self.down_since is not None:
            log.warning("host back host=%s after %d failed starts", self.name, self.failures)
        self.failures, self.down_since, self.last_error = 0, None, None
        if self.workers is None:
            self.workers = link.hello.cpus
        self.pool.adopt(link)
        self.pool.host_changed(self)
        self.top_up()

    def _start_failed(self, exc: WorkerStartupError) -> None:
        self.failures += 1
        self.last_error = str(exc)
        if exc.stage in FATAL_STAGES:
            self.give_up(str(exc))
            return
        if (
            not self.links
            and exc.stage not in TRANSIENT_STAGES
            and self.failures >= MAX_START_FAILURES
        ):
            self.give_up(str(exc))
            return
        log.warning("worker start failed host=%s attempt=%d: %s", self.name, self.failures, exc)
        if not self.links:
            self._mark_down()
        self.pool.host_changed(self)
        self.top_up()

    def _mark_down(self) -> None:
        if self.down_since is None:
            loop = asyncio.get_running_loop()
            self.down_since = loop.time()
            # re-judged once the grace is over: its tasks (and maybe the pool) give up then
            loop.call_later(self.reconnect_grace + 0.01, self.pool.host_changed, self)

    async def _open(self) -> WorkerLink:
        """Start one worker; the caller has counted it in ``starting``."""
        worker_id = f"{self.name}#{self.next_index}"
        self.next_index += 1
        try:
            session = await self._session()
            assert session.hello is not None
            start = self.pool.starts.for_python(session.hello.python)
            if start is None:
                raise WorkerStartupError(
                    self.name,
                    "initializer",
                    f"the initializer exists only as code (a lambda, a closure, a nested "
                    f"function), which only Python {minor(CLIENT)} can load; this host runs "
                    f"{session.hello.python}",
                    "Define the initializer at module level, or give this host "
                    f"python='/path/to/python{minor(CLIENT)}'.",
                )
            channel, hello, decoder = await open_worker(
                session, worker_id, start[0], self.pool.output, start[1]
            )
        finally:
            self.starting -= 1
        return WorkerLink(worker_id, self, channel, hello, decoder, session)

    async def agent(self) -> HostSession:
        """The host's agent (connecting again if it was lost); for actors' workers, which
        are started outside the planned count. Raises WorkerStartupError."""
        return await self._session()

    async def _session(self) -> HostSession:
        """The host's agent: the live one, or one being opened, or a new one (the first
        start after a loss reconnects)."""
        if self.session is not None and self.session.is_alive:
            return self.session
        if self.opening is None:
            self.opening = asyncio.get_running_loop().create_task(self._open_session())
        opening = self.opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self.opening is opening:
                self.opening = None

    async def _open_session(self) -> HostSession:
        old, self.session = self.session, None
        if old is not None:
            self.blobs_saved += old.bytes_saved
            self.blobs_stored += old.bytes_stored
            self.pool.spawn(old.aclose(0.5))
        output = self.pool.output
        session = HostSession(
            self.transport,
            self.python,
            lambda line: output.stderr_line(f"{self.name}#agent", line),
            self.pool.starts.max_frame,
            self.pool.keepalive_interval,
            self.pool.gate,
        )
        try:
            await asyncio.wait_for(session.open(), STARTUP_TIMEOUT)
        except asyncio.TimeoutError as exc:
            raise WorkerStartupError(
                self.name, "bootstrap", f"no Hello from the agent within {STARTUP_TIMEOUT:g} s"
            ) from exc
        staging = self.pool.staging
        if staging is not None:  # files=: on the host before its first worker
            try:
                await staging.prepare(session)
            except BaseException:
                self.pool.spawn(session.aclose(0.5))
                raise
        self.session = session
        assert session.hello is not None
        self.python_version = session.hello.python
        self.pool.python_seen(session.hello.python)
        return session

    async def close_session(self, grace: float) -> None:
        opening, self.opening = self.opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            await asyncio.wait([opening], timeout=5.0)
        session = self.session
        if session is not None:
            await session.aclose(grace)  # kept in self.session: its counts stay in stats

    def give_up(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            log.error("host given up host=%s: %s", self.name, reason)
        self.pool.host_changed(self)

    # ---- workers ending ---------------------------------------------------------------

    def lost(self, link: WorkerLink) -> None:
        """A worker of this host is gone (the pool has dealt with its tasks)."""
        self.links.discard(link)
        self.ended.add(link.counters)
        self.gone.append(link.snapshot())
        self.top_up()

    def stats(self) -> HostStats:
        total = Counters()
        total.add(self.ended)
        saved, stored = self.blobs_saved, self.blobs_stored
        if self.session is not None:
            saved += self.session.bytes_saved
            stored += self.session.bytes_stored
        live = sorted(self.links, key=lambda link: link.worker_id)
        for link in [*live, *self.actor_links]:
            total.add(link.counters)
        return HostStats(
            self.name,
            len(live),
            total.tasks_done,
            total.tasks_failed,
            total.tasks_retried,
            total.busy_seconds,
            total.bytes_sent + stored,
            total.bytes_received,
            median_rtt(link.counters.rtt_seconds for link in live),
            self.error,
            saved,
            self.python_version,
            total.timeouts,
            total.memory_kills,
            total.kills,
            self.actor_calls,
            len(self.actor_links),
        )


def snapshot(hosts: List[Supervisor]) -> Stats:
    """Every host's and worker's numbers now (loop thread)."""
    host_stats: Dict[str, HostStats] = {}
    worker_stats: Dict[str, WorkerStats] = {}
    for host in hosts:
        for ended in host.gone:
            worker_stats[ended.worker_id] = ended
        for link in sorted(host.links, key=lambda link: link.worker_id):
            worker_stats[link.worker_id] = link.snapshot()
        host_stats[host.name] = host.stats()
    return Stats(host_stats, worker_stats)
