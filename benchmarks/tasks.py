"""The functions the benchmark runs in workers.

Imported by reference on every worker (the benchmark puts the repository on
``PYTHONPATH`` for local workers and sets it in the loopback sshd's session
environment), so no contender pays for shipping code by value. Keep imports light.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Dict, List

BLOCK = 1 << 20  # incompressible block repeated to build payloads cheaply
_BLOCK_CACHE: Dict[int, bytes] = {}


def tiny(x: Any) -> Any:
    return x


def run_chunk(fn: Callable[[Any], Any], chunk: List[Any]) -> List[Any]:
    """One batch of a chunked map, for executors whose map has no chunksize (Dask)."""
    return [fn(x) for x in chunk]


def nbytes(data: Any) -> int:
    """Size of a bytes or numpy argument (the 'argument to a worker' payload)."""
    return int(getattr(data, "nbytes", None) or len(data))


def _block() -> bytes:
    if 0 not in _BLOCK_CACHE:
        _BLOCK_CACHE[0] = random.Random(20240601).randbytes(BLOCK)
    return _BLOCK_CACHE[0]


def blob(size: int) -> bytes:
    """``size`` incompressible bytes (a 1 MiB random block repeated: no compressor with a
    window under 1 MiB can shrink it), built with one memcpy per MiB."""
    whole, rest = divmod(size, BLOCK)
    return _block() * whole + _block()[:rest]


def make_blob(size: int) -> bytes:
    return blob(size)


def make_array(size: int) -> Any:
    import numpy

    return numpy.frombuffer(blob(size), dtype=numpy.uint8)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    if n % 3 == 0:
        return n == 3
    i = 5
    while i * i <= n:
        if n % i == 0 or n % (i + 2) == 0:
            return False
        i += 6
    return True


def sleep_for(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def getpid(_: Any = None) -> int:
    return os.getpid()
