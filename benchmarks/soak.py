"""``python -m benchmarks soak``: many small tasks, RSS sampled throughout, then a leak check.

For each target (local workers, and SSH to a loopback sshd when one is available):
1,000,000 tasks through ``map`` with a bounded ``buffersize`` and 100,000 through
``submit`` + ``as_completed``. Afterwards the file descriptors, threads and
worker processes must be back to what they were before.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional

from sshexec import SSHPoolExecutor
from tests.procs import worker_pids

from . import report, tasks
from . import sshd as loopback

MAP_TASKS, SUBMIT_TASKS = 1_000_000, 100_000
BUFFERSIZE = 1000
TIMEOUT = 1200.0  # per phase


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def snapshot() -> Dict[str, Any]:
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": sorted(t.name for t in threading.enumerate()),
        "workers": sorted(worker_pids(os.getpid())),
    }


class Sampler:
    """Samples this process's RSS every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.values: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.values.append(rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.values.append(rss_mb())


def soak_one(name: str, kwargs: Dict[str, Any], scale: float) -> Dict[str, Any]:
    map_n, submit_n = int(MAP_TASKS * scale), int(SUBMIT_TASKS * scale)
    out: Dict[str, Any] = {"target": name, "map_tasks": map_n, "submit_tasks": submit_n}
    with Sampler() as rss:
        start = time.perf_counter()
        with SSHPoolExecutor(2, **kwargs) as ex:
            total = 0
            for value in ex.map(tasks.tiny, range(map_n), buffersize=BUFFERSIZE, timeout=TIMEOUT):
                total += value
            if total != map_n * (map_n - 1) // 2:
                raise RuntimeError("map results do not add up")
            out["map_seconds"] = time.perf_counter() - start
            out["rss_after_map"] = rss_mb()
            begin = time.perf_counter()
            futures = [ex.submit(tasks.tiny, i) for i in range(submit_n)]
            got = sum(f.result() for f in as_completed(futures, timeout=TIMEOUT))
            del futures
            if got != submit_n * (submit_n - 1) // 2:
                raise RuntimeError("submit results do not add up")
            out["submit_seconds"] = time.perf_counter() - begin
    out.update(
        rss_start=rss.values[0],
        rss_peak=max(rss.values),
        rss_end=rss.values[-1],
        samples=len(rss.values),
    )
    return out


def settle_leaks(before: Dict[str, Any], timeout: float = 15.0) -> Dict[str, Any]:
    """What is still more than before, after giving workers and threads time to end."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot()
        leaked = {
            "fds": now["fds"] - before["fds"],
            "threads": [t for t in now["threads"] if t not in before["threads"]],
            "workers": [p for p in now["workers"] if p not in before["workers"]],
        }
        if (leaked["fds"] <= 0 and not leaked["threads"] and not leaked["workers"]) or (
            time.monotonic() > deadline
        ):
            return leaked
        time.sleep(0.2)


def main(args: argparse.Namespace) -> int:
    scale = 0.05 if args.quick else 1.0
    results: List[Dict[str, Any]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="sshexec-soak-") as tmp:
        server: Optional[loopback.Sshd] = None
        targets: List[tuple[str, Dict[str, Any]]] = [("sshexec-local", {})]
        if loopback.available():
            client = loopback.Client(Path(tmp) / "client")
            server = loopback.Sshd(Path(tmp), client, "soak").start()
            targets.append(("sshexec-ssh", client.executor_kwargs([server.port])))
        try:
            for name, kwargs in targets:
                if args.only and name not in args.only.split(","):
                    continue
                before = snapshot()
                print(
                    f"soak {name}: {int(MAP_TASKS * scale):,} map + {int(SUBMIT_TASKS * scale):,} submit",
                    flush=True,
                )
                try:
                    result = soak_one(name, kwargs, scale)
                except Exception as exc:
                    result = {"target": name, "error": f"{type(exc).__name__}: {exc}"}
                    failed = True
                result["leaked"] = settle_leaks(before)
                leaked = result["leaked"]
                if leaked["fds"] > 0 or leaked["threads"] or leaked["workers"]:
                    failed = True
                results.append(result)
        finally:
            if server is not None:
                server.stop()
    print(
        "\n| target | map tasks/s | submit tasks/s | RSS start MB | peak MB | end MB | leaked fds | leaked threads | leaked workers |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        if "error" in r:
            print(
                f"| {r['target']} | error: {r['error']} | | | | | {r['leaked']['fds']} | {r['leaked']['threads']} | {r['leaked']['workers']} |"
            )
            continue
        print(
            f"| {r['target']} | {report.fmt(r['map_tasks'] / r['map_seconds'])} "
            f"| {report.fmt(r['submit_tasks'] / r['submit_seconds'])} | {report.fmt(r['rss_start'])} "
            f"| {report.fmt(r['rss_peak'])} | {report.fmt(r['rss_end'])} | {r['leaked']['fds']} "
            f"| {r['leaked']['threads'] or 'none'} | {r['leaked']['workers'] or 'none'} |"
        )
    out = args.output.with_name("soak.json") if args.output.name == "latest.json" else args.output
    report.write_json(out, {"machine": report.machine(), "soak": results})
    print(f"\nJSON: {out}")
    return 1 if failed else 0
