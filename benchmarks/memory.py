"""The client's peak RSS during a huge ``map``, each measured in a fresh subprocess.

``python -m benchmarks.memory '<json spec>'`` is the probe: it builds the executor,
maps ``tiny`` over ``range(items)`` at chunksize 1000 (with or without
``buffersize``), and prints one JSON line with VmHWM (peak RSS) and timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Dict, List, Optional

from . import report

CHUNKSIZE = 1000
BUFFERSIZE = 1000
PROBE_TIMEOUT = 900.0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # kB -> MB (10^6 bytes)
    return float("nan")


def probe(spec: Dict[str, Any]) -> Dict[str, Any]:
    from . import tasks

    start_rss = _status_mb("VmRSS")
    ex: Executor
    if spec["contender"] == "ppe":
        ex = ProcessPoolExecutor(2)
    else:
        from sshexec import SSHPoolExecutor

        ex = SSHPoolExecutor(2, **spec.get("kwargs", {}))
    with ex:
        list(ex.map(tasks.tiny, range(100)))
        ready_rss = _status_mb("VmRSS")
        extra = {"buffersize": BUFFERSIZE} if spec["buffered"] else {}
        begin = time.perf_counter()
        count = 0
        for _ in ex.map(tasks.tiny, range(spec["items"]), chunksize=CHUNKSIZE, **extra):
            count += 1
        elapsed = time.perf_counter() - begin
    if count != spec["items"]:
        raise RuntimeError(f"{count} of {spec['items']} results")
    return {
        "start_mb": start_rss,
        "ready_mb": ready_rss,
        "peak_mb": _status_mb("VmHWM"),
        "seconds": elapsed,
    }


def run(
    kwargs_ssh: Optional[Dict[str, Any]], items: int, reps: int, errors: List[str]
) -> Dict[str, Any]:
    """Every (contender, buffersize) case ``reps`` times, round-robin, one subprocess each."""
    cases = [("sshexec-local", True), ("sshexec-local", False)]
    if kwargs_ssh is not None:
        cases += [("sshexec-ssh", True), ("sshexec-ssh", False)]
    if sys.version_info >= (3, 14):
        cases.append(("ppe", True))  # ProcessPoolExecutor.map has buffersize from 3.14
    cases.append(("ppe", False))
    results: Dict[str, List[Dict[str, Any]]] = {f"{c} {b}": [] for c, b in cases}
    for rep in range(reps):
        shift = rep % len(cases)
        for contender, buffered in cases[shift:] + cases[:shift]:
            spec = {"contender": contender, "buffered": buffered, "items": items}
            if contender == "sshexec-ssh":
                spec["kwargs"] = kwargs_ssh
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    timeout=PROBE_TIMEOUT,
                )
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip()[-800:])
                results[f"{contender} {buffered}"].append(json.loads(done.stdout.splitlines()[-1]))
            except Exception as exc:
                errors.append(
                    f"memory {contender} buffered={buffered}: {type(exc).__name__}: {exc}"
                )
    lines = []
    target = None
    for (contender, buffered), runs in zip(cases, results.values()):
        peaks = [r["peak_mb"] for r in runs]
        seconds = [r["seconds"] for r in runs]
        mode = f"chunksize {CHUNKSIZE}, " + (
            f"buffersize {BUFFERSIZE}" if buffered else "no buffersize"
        )
        peak = report.median(peaks)
        lines.append(
            [
                contender,
                mode,
                report.fmt(peak),
                report.spread(peaks),
                report.fmt(report.median([r["ready_mb"] for r in runs])),
                report.fmt(report.median(seconds)),
                report.fmt(items / m) if (m := report.median(seconds)) else "—",
            ]
        )
        if contender == "sshexec-ssh" and buffered:
            target = peak
    return {
        "title": f"client peak RSS (VmHWM), map(tiny, range({items:,})), one subprocess per sample",
        "columns": [
            "contender",
            "mode",
            "peak RSS MB",
            "min\u2013max",
            "RSS after construct MB",
            "seconds",
            "items/s",
        ],
        "lines": lines,
        "runs": results,
        "items": items,
        "target": target,
    }


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
