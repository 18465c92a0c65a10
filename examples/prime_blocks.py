"""All primes in a range [start, stop), searched in blocks across the hosts.

    python examples/prime_blocks.py                               # local workers
    python examples/prime_blocks.py --hosts me@node1,node2 --start 0 --stop 50000000 --block 1000000

One task per block, collected with ``as_completed`` as the blocks finish (in any
order), then merged back into one sorted list.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import as_completed
from typing import Dict, List, Optional, Tuple

from sshexec import SSHPoolExecutor


def primes_in(lo: int, hi: int) -> Tuple[int, List[int]]:
    """(lo, the primes in [lo, hi)): a segmented sieve of Eratosthenes; runs on a worker."""
    lo = max(lo, 2)
    if hi <= lo:
        return lo, []
    root = math.isqrt(hi - 1)
    small = bytearray([1]) * (root + 1)  # sieve the primes up to sqrt(hi) first
    small[:2] = b"\0\0"
    for k in range(2, math.isqrt(root) + 1):
        if small[k]:
            small[k * k :: k] = bytes(len(range(k * k, root + 1, k)))
    block = bytearray([1]) * (hi - lo)  # block[i] stands for lo + i
    for p in (k for k in range(2, root + 1) if small[k]):
        first = max(p * p, (lo + p - 1) // p * p)
        block[first - lo :: p] = bytes(len(range(first - lo, hi - lo, p)))
    return lo, [lo + i for i, flag in enumerate(block) if flag]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=0, help="first number searched (default 0)")
    parser.add_argument("--stop", type=int, default=20_000_000, help="end of the range, excluded")
    parser.add_argument("--block", type=int, default=500_000, help="numbers per task")
    parser.add_argument(
        "--hosts",
        help="comma-separated [user@]host[:port] or ~/.ssh/config aliases "
        "(default: $SSHEXEC_HOSTS, else local workers)",
    )
    parser.add_argument("--python", help="the nodes' Python interpreter, e.g. a venv's")
    args = parser.parse_args(argv)
    if args.block < 1 or args.start < 0 or args.stop < args.start:
        parser.error("need 0 <= start <= stop and block >= 1")

    hosts = args.hosts.split(",") if args.hosts else None  # None: SSHEXEC_HOSTS or local
    started = time.perf_counter()
    blocks: Dict[int, List[int]] = {}
    show_progress = sys.stdout.isatty()
    with SSHPoolExecutor(hosts=hosts, python=args.python) as executor:
        futures = [
            executor.submit(primes_in, lo, min(lo + args.block, args.stop))
            for lo in range(args.start, args.stop, args.block)
        ]
        for done, future in enumerate(as_completed(futures), 1):
            lo, found = future.result()
            blocks[lo] = found
            if show_progress:  # a one-line counter on a terminal, nothing in a pipe
                print(f"\rblocks done: {done}/{len(futures)}", end="", flush=True)
    if show_progress:
        print()
    primes = [p for lo in sorted(blocks) for p in blocks[lo]]  # blocks in order: a sorted list
    print(f"{len(primes)} primes in [{args.start}, {args.stop})")
    if primes:
        print(f"smallest: {primes[0]}, largest: {primes[-1]}, sum: {sum(primes)}")
    print(f"{len(futures)} blocks of {args.block} in {time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
