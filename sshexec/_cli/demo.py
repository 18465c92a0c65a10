"""``sshexec demo``: count primes in blocks over the hosts, with a progress bar, the
per-host stats table and the speedup over one process.

Owns: the demo workload (``is_prime``, ``count_primes``) and its report. The workload
travels by value, so nodes need no sshexec install. Must not import: asyncssh.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Dict, List, Tuple


def is_prime(n: int) -> bool:
    """Trial division: slow on purpose, so there is CPU work to spread."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for d in range(3, math.isqrt(n) + 1, 2):
        if n % d == 0:
            return False
    return True


def count_primes(block: Tuple[int, int]) -> int:
    """Number of primes in ``[lo, hi)``."""
    lo, hi = block
    return sum(1 for n in range(lo, hi) if is_prime(n))


def blocks(limit: int, size: int) -> List[Tuple[int, int]]:
    return [(lo, min(lo + size, limit)) for lo in range(0, limit, size)]


def run_demo(
    executor_kwargs: Dict[str, Any], where: str, limit: int, block: int, serial: bool
) -> int:
    """Run the demo with ``SSHPoolExecutor(**executor_kwargs)``; returns the exit status."""
    import cloudpickle

    from .._executor import SSHPoolExecutor
    from .._progress import progress

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # nodes need no sshexec install
    work = blocks(limit, block)
    print(f"Counting primes below {limit:,} in {len(work)} blocks of {block:,} on {where}")
    sys.stdout.flush()  # before the bar on stderr
    started = time.perf_counter()
    with SSHPoolExecutor(**executor_kwargs) as executor:
        ready = time.perf_counter()
        total = sum(progress(executor.map(count_primes, work), total=len(work), desc="blocks"))
        elapsed = time.perf_counter() - started
        stats = executor.stats()
    workers = sum(h.workers for h in stats.hosts.values())
    print(
        f"{total:,} primes below {limit:,} in {elapsed:.2f} s "
        f"(pool ready in {ready - started:.2f} s, {workers} workers)"
    )
    print()
    print(stats.table(per_worker=True))
    print()
    if serial:
        one_started = time.perf_counter()
        expected = sum(count_primes(b) for b in work)
        one = time.perf_counter() - one_started
        if expected != total:
            print(f"error: one process counted {expected:,} primes, the pool {total:,}")
            return 1
        print(f"one process: {one:.2f} s -> speedup {one / elapsed:.2f}x")
    return 0
