"""Sum of the primes below n for several n: the classic Parallel Python example.

    python examples/sum_primes.py                                 # local workers
    python examples/sum_primes.py --hosts me@node1,node2 100000 200000

``executor.map`` works as with ``ProcessPoolExecutor``: one task per n, results
in input order.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import List, Optional

from sshexec import SSHPoolExecutor


def is_prime(n: int) -> bool:
    """True when ``n`` is prime (trial division by odd numbers up to its square root)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % k for k in range(3, math.isqrt(n) + 1, 2))


def sum_primes(n: int) -> int:
    """The sum of all primes below ``n``; runs on a worker."""
    return sum(x for x in range(2, n) if is_prime(x))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "ns",
        nargs="*",
        type=int,
        default=[100_000 + 100 * i for i in range(8)],  # the inputs Parallel Python used
        help="upper bounds (default: 100000, 100100, ..., 100700)",
    )
    parser.add_argument(
        "--hosts",
        help="comma-separated [user@]host[:port] or ~/.ssh/config aliases "
        "(default: $SSHEXEC_HOSTS, else local workers)",
    )
    parser.add_argument("--python", help="the nodes' Python interpreter, e.g. a venv's")
    args = parser.parse_args(argv)

    hosts = args.hosts.split(",") if args.hosts else None  # None: SSHEXEC_HOSTS or local
    start = time.perf_counter()
    with SSHPoolExecutor(hosts=hosts, python=args.python) as executor:
        for n, total in zip(args.ns, executor.map(sum_primes, args.ns)):
            print(f"Sum of primes below {n} is {total}", flush=True)
    print(f"{len(args.ns)} sums in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
