"""The n-th prime for several n, spread over the hosts (e.g. a few cloud VMs).

    python examples/nth_prime.py                                  # local workers
    python examples/nth_prime.py --hosts me@vm1,me@vm2 1000 50000 100000

Each n is one task: the workers find their primes by trial division, and the
results are printed as they come back, with the machine that found each one.
"""

from __future__ import annotations

import argparse
import socket
import time
from concurrent.futures import as_completed
from typing import List, Optional, Tuple

from sshexec import SSHPoolExecutor


# Functions defined in the script itself (``__main__``) travel to the nodes by value:
# nothing but Python needs to be installed there.
def is_prime(n: int) -> bool:
    """True when ``n`` is prime (trial division by 6k +/- 1)."""
    if n < 4:
        return n > 1
    if n % 2 == 0 or n % 3 == 0:
        return False
    k = 5
    while k * k <= n:
        if n % k == 0 or n % (k + 2) == 0:
            return False
        k += 6
    return True


def nth_prime(n: int) -> Tuple[int, int, str, float]:
    """(n, the n-th prime, the machine that found it, seconds it took)."""
    start = time.perf_counter()
    count, candidate = 0, 1
    while count < n:
        candidate += 1
        if is_prime(candidate):
            count += 1
    return n, candidate, socket.gethostname(), time.perf_counter() - start


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "ns",
        nargs="*",
        type=int,
        default=[50_000, 100_000, 150_000, 200_000, 250_000],
        help="which primes to find (default: 50,000th to 250,000th)",
    )
    parser.add_argument(
        "--hosts",
        help="comma-separated [user@]host[:port] or ~/.ssh/config aliases "
        "(default: $SSHEXEC_HOSTS, else local workers)",
    )
    parser.add_argument("--python", help="the nodes' Python interpreter, e.g. a venv's")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.ns):
        parser.error("n must be at least 1")

    # hosts=None reads SSHEXEC_HOSTS, and when that is unset too, the workers are local.
    hosts = args.hosts.split(",") if args.hosts else None
    start = time.perf_counter()
    with SSHPoolExecutor(hosts=hosts, python=args.python) as executor:
        futures = [executor.submit(nth_prime, n) for n in args.ns]
        for future in as_completed(futures):  # print each as soon as it is found
            n, prime, machine, seconds = future.result()
            print(f"nth_prime({n}) = {prime}  (on {machine}, {seconds:.2f} s)", flush=True)
    print(f"{len(args.ns)} primes in {time.perf_counter() - start:.2f} s in total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
