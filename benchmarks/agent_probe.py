"""One measurement of ``benchmarks.agent`` in a process of its own: ``python -m
benchmarks.agent_probe '<json>'``.

The parent puts the sshexec tree under test first on ``PYTHONPATH`` (a checkout of
the commit before the node agent, or this one) and passes ``{"kind", "tree",
"workers", "kwargs", ...}``; the probe checks that ``sshexec`` came from ``tree``,
runs one measurement with only the API both versions share, and prints ``RESULT
<json>`` as its last line. ``MARK <name>`` lines are handshakes: the probe waits for a
line on stdin, so the parent can act (read its proxies' counters, cut a link) at
that moment. Only the standard library and sshexec's public API are used here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any, Callable, Dict, List

from sshexec import SSHPoolExecutor

from . import tasks
from .procs import alive, cpu_seconds, descendants, job_processes

SLEEP = 0.05
LONG_SLEEP = 60.0


def mark(name: str) -> None:
    print(f"MARK {name}", flush=True)
    sys.stdin.readline()


def live_workers(executor: SSHPoolExecutor) -> int:
    return sum(h.workers for h in executor.stats(refresh=0).hosts.values())


def build(args: Dict[str, Any], **extra: Any) -> tuple[SSHPoolExecutor, Dict[str, float]]:
    """Construct, then poll ``stats()`` until every worker is up: the start-up times."""
    workers = int(args["workers"])
    began = time.perf_counter()
    executor = SSHPoolExecutor(workers, **args["kwargs"], **extra)
    times = {"construct": time.perf_counter() - began}
    deadline = began + float(args.get("ready_timeout", 120))
    live = 0
    while time.perf_counter() < deadline:
        live = live_workers(executor)
        if live and "first" not in times:
            times["first"] = time.perf_counter() - began
        if live >= workers:
            times["all"] = time.perf_counter() - began
            break
        time.sleep(0.005)
    times["live"] = live
    if "all" in times:
        times["all/first"] = times["all"] / times["first"]
    return executor, times


def startup(args: Dict[str, Any]) -> Dict[str, Any]:
    executor, times = build(args)
    try:
        pids = set(executor.map(tasks.sleep_for, [0.05] * (3 * int(args["workers"])), timeout=60))
        times["pids_seen"] = len(pids)
    finally:
        began = time.perf_counter()
        executor.shutdown(wait=True)
        times["shutdown"] = time.perf_counter() - began
    return times


def scale(args: Dict[str, Any]) -> Dict[str, Any]:
    executor, times = build(args)
    workers = int(args["workers"])
    count = workers * int(args["tasks_per_worker"])
    try:
        if times.get("live") != workers:
            raise RuntimeError(f"only {times.get('live')} of {workers} workers came up")
        list(executor.map(tasks.sleep_for, [0.0] * (2 * workers), timeout=60))  # warm
        me = os.getpid()
        cpu_before = cpu_seconds([me]), cpu_seconds(descendants(me))
        began = time.perf_counter()
        done = sum(1 for _ in executor.map(tasks.sleep_for, [SLEEP] * count, timeout=240))
        took = time.perf_counter() - began
        cpu_after = cpu_seconds([me]), cpu_seconds(descendants(me))
        if done != count:
            raise RuntimeError(f"{done} of {count} results")
    finally:
        executor.shutdown(wait=True)
    return {
        **times,
        "tasks": count,
        "seconds": took,
        "tasks_per_s": count / took,
        "of_ideal": 100.0 * count / took / (workers / SLEEP),
        "cpu_ms_per_task": 1000 * (cpu_after[0] - cpu_before[0]) / count,
        "children_cpu_ms_per_task": 1000 * (cpu_after[1] - cpu_before[1]) / count,
    }


def _closure(size: int) -> Callable[[int], int]:
    data = os.urandom(size)  # random: no compression on the way can shrink it

    def use(item: int) -> int:
        return len(data) + item

    return use


def bandwidth(args: Dict[str, Any]) -> Dict[str, Any]:
    executor, times = build(args)
    items = int(args["items"])
    fn = _closure(int(args["size"]))
    try:
        list(executor.map(tasks.sleep_for, [0.0] * (2 * int(args["workers"])), timeout=60))
        before = executor.stats(refresh=0)
        mark("map")
        began = time.perf_counter()
        got = list(executor.map(fn, range(items), chunksize=1, timeout=600))
        took = time.perf_counter() - began
        mark("mapped")
        after = executor.stats(refresh=0)
        if got != [int(args["size"]) + i for i in range(items)]:
            raise RuntimeError("wrong results")
    finally:
        executor.shutdown(wait=True)

    def total(stats: Any, name: str) -> int:
        return sum(int(getattr(h, name, 0) or 0) for h in stats.hosts.values())

    return {
        **times,
        "seconds": took,
        "stats_sent": total(after, "bytes_sent") - total(before, "bytes_sent"),
        "stats_saved": (
            total(after, "bytes_saved") - total(before, "bytes_saved")
            if any(hasattr(h, "bytes_saved") for h in after.hosts.values())
            else None
        ),
    }


def partition(args: Dict[str, Any]) -> Dict[str, Any]:
    keepalive = float(args["keepalive"])
    executor, times = build(args, keepalive_interval=keepalive)
    result: Dict[str, Any] = {**times, "keepalive": keepalive}
    futures: List[Any] = []
    try:
        futures = [executor.submit(tasks.sleep_for, LONG_SLEEP) for _ in range(args["workers"])]
        time.sleep(1.0)  # every worker is mid-task from here on
        on_node = job_processes(int(args["sshd_pid"]))
        result["on_node"] = len(on_node)
        mark("cut")
        began = time.perf_counter()
        limit = 3 * keepalive + float(args["grace"])
        left: List[int] = list(on_node)
        while left and time.perf_counter() - began < limit:
            time.sleep(0.05)
            left = [p for p in left if alive(p, on_node[p])]
        result["left"] = len(left)
        result["waited"] = time.perf_counter() - began
        result["clean"] = result["waited"] if not left else None
    finally:
        began = time.perf_counter()
        executor.shutdown(wait=False, cancel_futures=True)
        result["shutdown"] = time.perf_counter() - began
        _, pending = wait(futures, timeout=float(args.get("settle", 15)))
        result["futures_pending"] = len(pending)  # still unresolved this long after shutdown
    return result


KINDS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "startup": startup,
    "scale": scale,
    "bandwidth": bandwidth,
    "partition": partition,
}


def main() -> int:
    args = json.loads(sys.argv[1])
    import sshexec

    where = str(Path(sshexec.__file__).resolve())
    if not where.startswith(str(Path(args["tree"]).resolve()) + os.sep):
        error = {"error": f"sshexec imported from {where}, not from {args['tree']}"}
        print(f"RESULT {json.dumps(error)}", flush=True)
        return 2
    try:
        result = KINDS[args["kind"]](args)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["sshexec"] = where
    print(f"RESULT {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
