"""The ``sshexec`` command: ``sshexec demo [--hosts ...]``.

The demo counts primes below ``--limit`` in blocks, on local workers by default or
on the given hosts, then prints how much each host and worker did and the speedup
over one process.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for d in range(3, math.isqrt(n) + 1, 2):
        if n % d == 0:
            return False
    return True


def count_primes(block: Tuple[int, int]) -> Tuple[str, int, int, float]:
    """Primes in [lo, hi), with the host and pid that counted them and the CPU time."""
    lo, hi = block
    started = time.process_time()
    found = sum(1 for n in range(lo, hi) if is_prime(n))
    return socket.gethostname(), os.getpid(), found, time.process_time() - started


def blocks(limit: int, size: int) -> List[Tuple[int, int]]:
    return [(lo, min(lo + size, limit)) for lo in range(0, limit, size)]


def demo(
    hosts: Optional[List[str]], limit: int, block: int, workers: Optional[int], serial: bool
) -> int:
    import cloudpickle

    from . import SSHPoolExecutor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # nodes need no sshexec install
    where = ", ".join(hosts) if hosts else "local workers"
    print(f"Counting primes below {limit:,} in blocks of {block:,} on {where}")
    started = time.perf_counter()
    with SSHPoolExecutor(workers, hosts=hosts) as executor:
        ready = time.perf_counter()
        results = list(executor.map(count_primes, blocks(limit, block)))
    elapsed = time.perf_counter() - started
    total = sum(r[2] for r in results)
    per_worker: Dict[Tuple[str, int], int] = Counter()
    per_host: Dict[str, int] = Counter()
    for hostname, pid, _, _ in results:
        per_worker[(hostname, pid)] += 1
        per_host[hostname] += 1
    print(
        f"{total:,} primes below {limit:,} in {elapsed:.2f} s "
        f"(pool ready in {ready - started:.2f} s, {len(per_worker)} workers)"
    )
    print(f"{'host':<24} {'worker pid':>10} {'blocks':>7} {'share':>6}")
    for (hostname, pid), count in sorted(per_worker.items()):
        print(f"{hostname:<24} {pid:>10} {count:>7} {count / len(results):>6.0%}")
    for hostname, count in sorted(per_host.items()):
        print(f"{hostname:<24} {'all':>10} {count:>7} {count / len(results):>6.0%}")
    if serial:
        one_started = time.perf_counter()
        expected = sum(count_primes(b)[2] for b in blocks(limit, block))
        one = time.perf_counter() - one_started
        assert expected == total, "parallel and serial counts differ"
        print(f"one process: {one:.2f} s -> speedup {one / elapsed:.2f}x")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sshexec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("demo", help="count primes on local workers or --hosts")
    run.add_argument(
        "--hosts",
        help="comma-separated [user@]host[:port] (default: $SSHEXEC_HOSTS, else local workers)",
    )
    run.add_argument("--limit", type=int, default=3_000_000, help="count primes below this")
    run.add_argument("--block", type=int, default=50_000, help="numbers per task")
    run.add_argument("--workers", type=int, default=None, help="total workers (default: cores)")
    run.add_argument(
        "--no-serial",
        dest="serial",
        action="store_false",
        help="skip the one-process run used for the speedup",
    )
    args = parser.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else None
    return demo(hosts, args.limit, args.block, args.workers, args.serial)


if __name__ == "__main__":
    sys.exit(main())
