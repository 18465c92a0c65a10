"""Who did what: per-worker and per-host counters and the snapshot ``stats()`` returns.

Owns: ``Counters`` (mutated on the loop thread only), the frozen ``WorkerStats``,
``HostStats``, ``ActorInfo`` and ``Stats`` snapshots handed to users, and their text table.
Must not import: asyncio, the pool, or any I/O.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional


@dataclass
class Counters:
    """Running totals for one worker (and, summed, for one host). Loop thread only."""

    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_retried: int = 0
    busy_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    rtt_seconds: Optional[float] = None
    timeouts: int = 0  # tasks stopped on the node past their time limit
    memory_kills: int = 0  # ... past their memory limit
    kills: int = 0  # ... by kill()

    def add(self, other: Counters) -> None:
        self.timeouts += other.timeouts
        self.memory_kills += other.memory_kills
        self.kills += other.kills
        self.tasks_done += other.tasks_done
        self.tasks_failed += other.tasks_failed
        self.tasks_retried += other.tasks_retried
        self.busy_seconds += other.busy_seconds
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received


def _mean(busy: float, done: int, failed: int) -> float:
    return busy / (done + failed) if done + failed else 0.0


@dataclass(frozen=True)
class WorkerStats:
    """One worker process: what it ran and what crossed its channel.

    Attributes:
        worker_id: ``"host#N"``, as in logs and the ``[host:N]`` output prefix.
        host: The host's label.
        pid: The worker's process id on its host.
        is_alive: False once the worker has ended (retired, replaced or lost).
        tasks_done: Tasks that returned a result.
        tasks_failed: Tasks that raised, or were lost with the worker past ``max_retries``.
        tasks_retried: Tasks lost with this worker and run again elsewhere.
        busy_seconds: Measured on the worker around each call (unpickling the call,
            running it, pickling the result).
        bytes_sent: Frame bytes sent to the worker.
        bytes_received: Frame bytes received from it.
        rtt_seconds: The latest ping to the worker process (through SSH for remote
            hosts), None before the first answer.
    """

    worker_id: str
    host: str
    pid: int
    is_alive: bool
    tasks_done: int
    tasks_failed: int
    tasks_retried: int
    busy_seconds: float
    bytes_sent: int
    bytes_received: int
    rtt_seconds: Optional[float]

    __module__ = "sshexec"

    @property
    def mean_task_seconds(self) -> float:
        """Mean busy time per finished task (0.0 before the first)."""
        return _mean(self.busy_seconds, self.tasks_done, self.tasks_failed)


@dataclass(frozen=True)
class HostStats:
    """One host: totals over every worker it ever ran, and its live worker count.

    Attributes:
        host: The host's label (``user@name:port`` as given).
        workers: Live workers now.
        tasks_done: Tasks that returned a result.
        tasks_failed: Tasks that raised, or were lost past ``max_retries``.
        tasks_retried: Tasks this host lost with a worker and that were run again.
        busy_seconds: Sum of its workers' busy time.
        bytes_sent: Frame bytes sent to its workers, with the blobs and the contents of
            staged files (``files=``) sent to its agent.
        bytes_received: Frame bytes received from them.
        rtt_seconds: Median of its live workers' latest pings; None when unknown.
        error: Why the host was given up, or None.
        python: The Python version its workers run ("3.12.1"), once it is known. A
            version other than the client's runs what travels between versions (see the
            README's "What a node needs"); code that exists only as code (a lambda, a
            closure) goes to hosts of the client's version.
        bytes_saved: Bytes that did not cross the network because the host's agent
            already held them (a ``map``'s function or the initializer, sent once per
            host instead of with every task or worker; staged files its cache already
            had). ``bytes_sent`` counts them once.
        timeouts: Tasks whose worker was killed on the host for passing their time limit.
        memory_kills: ... for passing their memory limit.
        kills: ... by ``SSHPoolExecutor.kill()`` while they ran.
        actor_calls: Actor method calls served on this host (not counted as tasks; the
            bytes of actors' calls are in ``bytes_sent`` and ``bytes_received``).
        actors: Actors' processes live on this host now.
    """

    host: str
    workers: int
    tasks_done: int
    tasks_failed: int
    tasks_retried: int
    busy_seconds: float
    bytes_sent: int
    bytes_received: int
    rtt_seconds: Optional[float]
    error: Optional[str] = None  # why the host was given up, if it was
    bytes_saved: int = 0
    python: Optional[str] = None
    timeouts: int = 0
    memory_kills: int = 0
    kills: int = 0
    actor_calls: int = 0
    actors: int = 0

    __module__ = "sshexec"

    @property
    def mean_task_seconds(self) -> float:
        """Mean busy time per finished task (0.0 before the first)."""
        return _mean(self.busy_seconds, self.tasks_done, self.tasks_failed)


@dataclass(frozen=True)
class ActorInfo:
    """One actor, as ``SSHPoolExecutor.actors()`` lists it.

    Attributes:
        actor_id: Its number in this executor.
        cls: Its class's qualified name.
        host: The host its process runs on (or ran on last); None before it was placed.
        state: ``"starting"``, ``"alive"``, ``"dying"`` (lost; its calls are failing),
            ``"closed"`` or ``"dead"`` (see ``ActorDiedError``).
        calls_served: Method calls it answered (over its restarts).
        pid: Its process id on its host while it has one.
        restarts: Times it was re-created after its process died (``restart=``).
    """

    actor_id: int
    cls: str
    host: Optional[str]
    state: str
    calls_served: int
    pid: Optional[int]
    restarts: int

    __module__ = "sshexec"


@dataclass(frozen=True)
class Stats:
    """What ``SSHPoolExecutor.stats()`` returns: a consistent snapshot, safe to keep.

    ``str(stats)`` (or ``stats.table()``) is a text table, one row per host.

    Attributes:
        hosts: Host label -> ``HostStats``.
        workers: Worker id -> ``WorkerStats``, live workers and the latest ended ones.
    """

    hosts: Dict[str, HostStats] = field(default_factory=dict)
    workers: Dict[str, WorkerStats] = field(default_factory=dict)

    __module__ = "sshexec"

    @property
    def tasks_done(self) -> int:
        """Tasks that returned a result, over all hosts."""
        return sum(h.tasks_done for h in self.hosts.values())

    @property
    def tasks_failed(self) -> int:
        """Tasks that failed, over all hosts."""
        return sum(h.tasks_failed for h in self.hosts.values())

    @property
    def busy_seconds(self) -> float:
        """Busy time of every worker, summed."""
        return sum(h.busy_seconds for h in self.hosts.values())

    def table(self, per_worker: bool = False) -> str:
        """Aligned text table: one row per host (and per worker with ``per_worker``)."""
        header = ["host", "workers", "done", "failed", "retried", "busy s", "mean ms"]
        header += ["sent", "received", "rtt ms"]
        saved = any(h.bytes_saved for h in self.hosts.values())
        if saved:
            header.append("saved")
        actors = any(h.actor_calls or h.actors for h in self.hosts.values())
        if actors:
            header.append("actor calls")
        rows: List[List[str]] = []
        for host in self.hosts.values():
            rows.append(_row(host.host, str(host.workers), host))
            if saved:
                rows[-1].append(_size(host.bytes_saved))
            if actors:
                rows[-1].append(str(host.actor_calls))
            if per_worker:
                for worker in self.workers.values():
                    if worker.host == host.host:
                        alive = "" if worker.is_alive else " (gone)"
                        rows.append(_row(f"  {worker.worker_id}{alive}", "", worker))
                        rows[-1].extend([""] * (saved + actors))
        return _format([header, *rows])

    def __str__(self) -> str:
        return self.table()


def _row(name: str, workers: str, s: WorkerStats | HostStats) -> List[str]:
    rtt = "-" if s.rtt_seconds is None else f"{s.rtt_seconds * 1000:.2f}"
    return [
        name,
        workers,
        str(s.tasks_done),
        str(s.tasks_failed),
        str(s.tasks_retried),
        f"{s.busy_seconds:.2f}",
        f"{s.mean_task_seconds * 1000:.2f}",
        _size(s.bytes_sent),
        _size(s.bytes_received),
        rtt,
    ]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # unreachable


def _format(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def median_rtt(values: Iterable[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None
