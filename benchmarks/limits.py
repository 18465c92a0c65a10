"""``python -m benchmarks.limits``: kill latency, and what task limits cost a map.

Kill latency: a worker runs a task that never ends; ``kill()`` of its Future, timed to
the Future failing (``TaskKilled``), to the worker process being gone from the node's
process table, and to its replacement being ready (a new worker live, the host back to
its planned count); p50 and p95 over ``--kills`` kills. Limits cost: ``map`` of a tiny
function over ``--items`` items with ``chunksize=1``, without limits and through
``options(timeout=60, memory="4G")`` (the agent then reads every task's board and
measures the worker's memory every 20 ms), alternated ``--rounds`` times in this one run;
the best of each and their ratio. Local workers by default; ``--ssh`` runs the same
over a loopback sshd. Targets (issue 19): p95 kill <= 0.5 s; limits cost <= 5 %.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from sshexec import SSHPoolExecutor, TaskKilled


def hang(path: str) -> None:
    """Writes this worker's pid to ``path``, then never returns."""
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    while True:
        time.sleep(60)


def tiny(x: int) -> int:
    return x


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _live_ids(ex: SSHPoolExecutor) -> Set[str]:
    return {w.worker_id for w in ex.stats(refresh=0).workers.values() if w.is_alive}


def _planned(ex: SSHPoolExecutor) -> int:
    return sum(h.workers or 0 for h in ex._pool.hosts)


def _wait(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {seconds} s")
        time.sleep(0.001)


def kill_latency(ex: SSHPoolExecutor, kills: int, scratch: Path) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {
        "future failed": [],
        "process gone": [],
        "replacement ready": [],
    }
    _wait(lambda: len(_live_ids(ex)) == _planned(ex), 30, "every worker started")
    for round_ in range(kills):
        for what, seconds in one_kill(ex, str(scratch / f"pid{round_}")).items():
            times[what].append(seconds)
    return times


def one_kill(ex: SSHPoolExecutor, path: str) -> Dict[str, float]:
    future = ex.submit(hang, path)
    _wait(lambda: os.path.exists(path), 30, "the task started")
    pid = int(Path(path).read_text())
    before = _live_ids(ex)
    times: Dict[str, float] = {}
    started = time.perf_counter()
    if not ex.kill(future):
        raise RuntimeError("kill() stopped nothing")
    cf.wait([future], timeout=30)
    times["future failed"] = time.perf_counter() - started
    if not isinstance(future.exception(), TaskKilled):
        raise RuntimeError(f"the Future failed with {future.exception()!r}")
    _wait(lambda: not _alive(pid), 30, "the worker process is gone")
    times["process gone"] = time.perf_counter() - started

    def replaced() -> bool:
        live = _live_ids(ex)
        return len(live) == _planned(ex) and bool(live - before)

    _wait(replaced, 30, "a replacement worker is ready")
    times["replacement ready"] = time.perf_counter() - started
    return times


def map_seconds(ex: Any, items: int) -> float:
    started = time.perf_counter()
    for _ in ex.map(tiny, range(items), chunksize=1):
        pass
    return time.perf_counter() - started


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(kwargs: Dict[str, Any], label: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sshexec-limits-") as scratch:
        with SSHPoolExecutor(args.workers, **kwargs) as ex:
            times = kill_latency(ex, args.kills, Path(scratch))
            print(f"\n{label}: kill latency over {args.kills} kills, {args.workers} workers")
            print("| from kill() to | p50 ms | p95 ms | max ms |")
            print("|---|---|---|---|")
            for what, values in times.items():
                print(
                    f"| {what} | {1000 * statistics.median(values):.1f} | "
                    f"{1000 * pct(values, 0.95):.1f} | {1000 * max(values):.1f} |"
                )
            limited = ex.options(timeout=60, memory="4G")
            map_seconds(ex, args.items // 10)  # warm up
            plain: List[float] = []
            with_limits: List[float] = []
            for _ in range(args.rounds):
                plain.append(map_seconds(ex, args.items))
                with_limits.append(map_seconds(limited, args.items))
            best_plain, best_limited = min(plain), min(with_limits)
            print(f"\n{label}: map(tiny, range({args.items}), chunksize=1), best of {args.rounds}")
            print("| map | seconds | us per item |")
            print("|---|---|---|")
            for name, seconds in (("no limits", best_plain), ("timeout + memory", best_limited)):
                print(f"| {name} | {seconds:.3f} | {1e6 * seconds / args.items:.1f} |")
            print(f"limits cost: {100 * (best_limited / best_plain - 1):+.1f} % (target <= 5 %)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.limits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ssh", action="store_true", help="also over a loopback sshd")
    args = parser.parse_args(argv)
    run({}, "local workers", args)
    if args.ssh:
        from . import sshd as loopback

        if not loopback.available():
            print("no sshd here: skipped the ssh run", file=sys.stderr)
            return 0
        with tempfile.TemporaryDirectory(prefix="sshexec-limits-ssh-") as scratch:
            root = Path(scratch)
            client = loopback.Client(root / "client")
            server = loopback.Sshd(root, client, "sshd0").start()
            try:
                run(client.executor_kwargs([server.port]), "one loopback sshd", args)
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
