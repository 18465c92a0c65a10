"""The largest |eigenvalue| of K random N x N matrices, computed with numpy on the hosts.

    python examples/eigenvalues.py                                # local workers
    python examples/eigenvalues.py --hosts me@node1,node2 --count 16 --size 1500
    python examples/eigenvalues.py --hosts node1 --python /opt/venv/bin/python

numpy is imported inside the task, so it must already be installed on every node
(for the interpreter the workers run, see ``--python``): sshexec ships your own
pure-Python code but never installs compiled packages. When numpy is missing there,
the task fails with an error naming the package, the host and the interpreter; this
script prints it with a hint and exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List, Optional, Tuple

from sshexec import SSHPoolExecutor


def largest_eigenvalue(size: int, seed: int) -> Tuple[int, float]:
    """(seed, the largest |eigenvalue| of a seeded random ``size`` x ``size`` matrix)."""
    import numpy  # imported on the node: the client's numpy is never sent

    rng = numpy.random.default_rng(seed)
    matrix = rng.standard_normal((size, size))
    return seed, float(numpy.abs(numpy.linalg.eigvals(matrix)).max())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8, help="how many matrices (K, default 8)")
    parser.add_argument("--size", type=int, default=400, help="rows and columns (N, default 400)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first matrix")
    parser.add_argument(
        "--hosts",
        help="comma-separated [user@]host[:port] or ~/.ssh/config aliases "
        "(default: $SSHEXEC_HOSTS, else local workers)",
    )
    parser.add_argument("--python", help="the nodes' Python interpreter, e.g. a venv's")
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 1:
        parser.error("count and size must be at least 1")

    hosts = args.hosts.split(",") if args.hosts else None  # None: SSHEXEC_HOSTS or local
    seeds = range(args.seed, args.seed + args.count)
    start = time.perf_counter()
    with SSHPoolExecutor(hosts=hosts, python=args.python) as executor:
        try:
            radii = list(executor.map(largest_eigenvalue, [args.size] * args.count, seeds))
        except ImportError as exc:  # ModuleNotFoundError: numpy is missing on a node
            executor.shutdown(cancel_futures=True)
            print(f"error: {exc}", file=sys.stderr)
            print(
                f"hint: {exc.name or 'numpy'} must already be installed on every node, for the "
                "interpreter the workers run there (named above): sshexec forwards your own "
                "pure-Python modules but never installs compiled packages. Or pass --python "
                "an interpreter that has it.",
                file=sys.stderr,
            )
            return 1
    for seed, radius in radii:
        print(f"matrix seed={seed} ({args.size}x{args.size}): largest |eigenvalue| = {radius:.4f}")
    mean = sum(r for _, r in radii) / len(radii)
    # The circular law: the eigenvalues of an N x N standard normal matrix fill a disc of
    # radius about sqrt(N), so the printed values should all be close to it.
    print(
        f"mean {mean:.4f}; the circular law predicts about sqrt({args.size}) = "
        f"{math.sqrt(args.size):.4f}"
    )
    print(f"{args.count} matrices in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
