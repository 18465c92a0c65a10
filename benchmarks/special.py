"""Workloads with their own executors: 64 sleeping workers, and a slow link.

Both compare throughput with the ideal (workers / task time) and interleave
their contenders rep by rep like the main workloads.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from sshexec import SSHPoolExecutor

from . import rawssh, report, tasks
from .contenders import settle
from .proxy import DelayProxy
from .sshd import Client, Sshd

MANY = 64
MANY_SLEEP = 0.05
SLOW_DELAY = 0.025  # each way
SLOW_TASK = 0.01
SLOW_WORKERS = 2


def ssh_connections(port: int) -> int:
    """Established client-side TCP connections to 127.0.0.1:port (from /proc/net/tcp)."""
    count = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].split(":")[1], 16) == port:
                    count += 1
    except (OSError, StopIteration, IndexError, ValueError):
        return -1
    return count


def _interleave(
    makers: List[Tuple[str, Callable[[], Executor]]],
    measure: Callable[[Executor], float],
    reps: int,
    workers: int,
    errors: List[str],
    on_ready: Optional[Callable[[str, Executor, Dict[str, Any]], None]] = None,
) -> Dict[str, List[Optional[float]]]:
    """Build every executor once, wait for all its workers, then measure round-robin."""
    live: Dict[str, Executor] = {}
    samples: Dict[str, List[Optional[float]]] = {name: [None] * reps for name, _ in makers}
    try:
        for name, make in makers:
            try:
                start = time.perf_counter()
                live[name] = make()
                info = settle(live[name], workers, timeout=180.0)
                info["ready_seconds"] = time.perf_counter() - start
                if on_ready is not None:
                    on_ready(name, live[name], info)
            except Exception as exc:
                errors.append(f"{name}: could not start: {type(exc).__name__}: {exc}")
        names = list(live)
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)] if names else []
            for name in order:
                try:
                    samples[name][rep] = measure(live[name])
                except Exception as exc:
                    errors.append(f"{name} rep {rep}: {type(exc).__name__}: {exc}")
    finally:
        for ex in live.values():
            try:
                ex.shutdown(wait=True, cancel_futures=True)
            except Exception as exc:
                errors.append(f"shutdown: {type(exc).__name__}: {exc}")
    return samples


def many_workers(
    root: Path, client: Client, tasks_per_worker: int, reps: int, errors: List[str]
) -> Dict[str, Any]:
    """64 workers running time.sleep(0.05): throughput as a share of 64/0.05 per second."""
    sshd = Sshd(root, client, "many").start()  # sshd's default MaxSessions (10) per connection
    n = MANY * tasks_per_worker
    ideal = MANY / MANY_SLEEP
    ready: Dict[str, Dict[str, Any]] = {}

    def note(name: str, ex: Executor, info: Dict[str, Any]) -> None:
        if name == "sshexec-ssh":
            info["connections"] = ssh_connections(sshd.port)
        ready[name] = info

    def measure(ex: Executor) -> float:
        start = time.perf_counter()
        done = sum(1 for _ in ex.map(tasks.sleep_for, [MANY_SLEEP] * n, timeout=300))
        if done != n:
            raise RuntimeError(f"{done} of {n} results")
        return n / (time.perf_counter() - start)

    makers: List[Tuple[str, Callable[[], Executor]]] = [  # PPE first: see driver.py
        ("ppe", lambda: ProcessPoolExecutor(MANY)),
        ("sshexec-ssh", lambda: SSHPoolExecutor(MANY, **client.executor_kwargs([sshd.port]))),
        ("sshexec-local", lambda: SSHPoolExecutor(MANY)),
    ]
    try:
        samples = _interleave(makers, measure, reps, MANY, errors, note)
    finally:
        sshd.stop()
    lines = []
    for name, values in samples.items():
        info = ready.get(name, {})
        mid = report.median(values)
        lines.append(
            [
                name,
                report.fmt(mid),
                report.spread(values),
                report.fmt(100 * mid / ideal) + " %" if mid else "—",
                info.get("workers_seen", "—"),
                report.fmt(info.get("ready_seconds")),
                info.get("connections", ""),
            ]
        )
    ssh = report.median(samples.get("sshexec-ssh", []))
    return {
        "title": f"{MANY} workers, time.sleep({MANY_SLEEP}) tasks, {n:,} per rep "
        f"(ideal {ideal:,.0f} tasks/s); sshd MaxSessions default (10)",
        "columns": [
            "contender",
            "tasks/s",
            "min\u2013max",
            "of ideal",
            "workers seen",
            "s to all workers",
            "SSH connections",
        ],
        "lines": lines,
        "samples": samples,
        "ready": ready,
        "target": 100 * ssh / ideal if ssh else None,
    }


def slow_link(
    sshd: Sshd, client: Client, count: int, reps: int, errors: List[str]
) -> Dict[str, Any]:
    """2 SSH workers behind a proxy adding 25 ms each way, running 10 ms tasks."""
    proxy = DelayProxy(sshd.port, SLOW_DELAY)
    proxy_port = proxy.start()
    client.trust(proxy_port, sshd.host_key)
    ideal = SLOW_WORKERS / SLOW_TASK
    rtt: Optional[float] = None
    try:
        rtt = rawssh.ping({**client.connect_options(proxy_port)}, 20)["rt_p50"] / 1000
    except Exception as exc:
        errors.append(f"slow link ping: {type(exc).__name__}: {exc}")

    def measure(ex: Executor) -> float:
        start = time.perf_counter()
        done = sum(1 for _ in ex.map(tasks.sleep_for, [SLOW_TASK] * count, timeout=300))
        if done != count:
            raise RuntimeError(f"{done} of {count} results")
        return count / (time.perf_counter() - start)

    kwargs = client.executor_kwargs([proxy_port])
    makers: List[Tuple[str, Callable[[], Executor]]] = [
        ("sshexec-ssh", lambda: SSHPoolExecutor(SLOW_WORKERS, **kwargs)),
        ("sshexec-ssh prefetch=8", lambda: SSHPoolExecutor(SLOW_WORKERS, prefetch=8, **kwargs)),
    ]
    try:
        samples = _interleave(makers, measure, reps, SLOW_WORKERS, errors)
    finally:
        proxy.stop()
    lines = []
    for name, values in samples.items():
        mid = report.median(values)
        lines.append(
            [
                name,
                report.fmt(mid),
                report.spread(values),
                report.fmt(100 * mid / ideal) + " %" if mid else "—",
            ]
        )
    ssh = report.median(samples.get("sshexec-ssh", []))
    return {
        "title": f"slow link: proxy adding {SLOW_DELAY * 1000:g} ms each way "
        f"(measured raw ping p50 {report.fmt(rtt)} ms), {SLOW_WORKERS} workers, "
        f"time.sleep({SLOW_TASK}) tasks, {count:,} per rep (ideal {ideal:,.0f} tasks/s)",
        "columns": ["contender", "tasks/s", "min\u2013max", "of ideal"],
        "lines": lines,
        "samples": samples,
        "rtt_ms": rtt,
        "target": 100 * ssh / ideal if ssh else None,
    }
