"""The interleaved workloads: what one repetition of one contender measures.

Each workload returns ``{row key: value}`` for one sample; the driver calls every
workload for every contender in turn, rep after rep. Every wait is bounded.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import rawssh, tasks
from .contenders import Contender

TIMEOUT = 180.0  # any single map or result() call
MiB = 1 << 20


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    unit: str
    higher_better: bool


@dataclass
class Sizes:
    map1: int = 10_000
    map256: int = 200_000
    submit: int = 10_000
    roundtrip: int = 500
    payload: int = 64 * MiB
    cpu_seconds: float = 4.0  # serial time the is_prime list is calibrated to
    many_tasks_per_worker: int = 20
    slow_tasks: int = 600
    memory_items: int = 10_000_000
    reps: int = 5

    @classmethod
    def quick(cls) -> Sizes:
        return cls(3_000, 50_000, 3_000, 200, 16 * MiB, 1.0, 6, 150, 1_000_000, 2)


@dataclass
class Context:
    sizes: Sizes
    raw_options: Optional[Dict[str, Any]]  # asyncssh.connect kwargs for the raw peer
    scratch: Path
    numpy: Any = None
    data: bytes = b""
    primes: List[int] = field(default_factory=list)
    prime_chunksize: int = 1

    def prepare(self) -> None:
        self.data = tasks.blob(self.sizes.payload)
        self.primes, self.prime_chunksize = calibrate_primes(self.sizes.cpu_seconds)


def calibrate_primes(target: float) -> Tuple[List[int], int]:
    """Consecutive integers from 10^9 whose serial is_prime takes about ``target`` s."""
    start, probe = 10**9, 4000
    begin = time.perf_counter()
    for n in range(start, start + probe):
        tasks.is_prime(n)
    per_item = (time.perf_counter() - begin) / probe
    count = max(2000, int(target / per_item))
    return list(range(start, start + count)), max(1, count // 64)


def _n(contender: Contender, base: int) -> int:
    return max(10, int(base * contender.task_scale))


def _timed_map(ex: Executor, fn: Callable[..., Any], items: Any, chunksize: int) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in ex.map(fn, items, chunksize=chunksize, timeout=TIMEOUT))
    elapsed = time.perf_counter() - start
    if count != len(items):
        raise RuntimeError(f"map returned {count} of {len(items)} results")
    return elapsed


def map1(c: Contender, ctx: Context) -> Dict[str, float]:
    n = _n(c, ctx.sizes.map1)
    return {"map1": n / _timed_map(c.get(), tasks.tiny, range(n), 1)}


def map256(c: Contender, ctx: Context) -> Dict[str, float]:
    n = ctx.sizes.map256
    return {"map256": n / _timed_map(c.get(), tasks.tiny, range(n), 256)}


def submit_ac(c: Contender, ctx: Context) -> Dict[str, float]:
    """Throughput of ``submit`` for every item, drained with ``as_completed``."""
    ex = c.get()
    n = _n(c, ctx.sizes.submit)
    send = getattr(ex, "submit_pipelined", ex.submit)  # execnet's hand-rolled Futures
    start = time.perf_counter()
    futures = [send(tasks.tiny, i) for i in range(n)]
    total = sum(f.result() for f in as_completed(futures, timeout=TIMEOUT))
    elapsed = time.perf_counter() - start
    if total != n * (n - 1) // 2:
        raise RuntimeError("wrong submit/as_completed results")
    return {"submit_ac": n / elapsed}


def roundtrip(c: Contender, ctx: Context) -> Dict[str, float]:
    if c.kind == "raw":
        assert ctx.raw_options is not None
        return rawssh.ping(ctx.raw_options, ctx.sizes.roundtrip)
    ex = c.get()
    times = []
    for i in range(_n(c, ctx.sizes.roundtrip)):
        start = time.perf_counter()
        if ex.submit(tasks.tiny, i).result(TIMEOUT) != i:
            raise RuntimeError("wrong round-trip result")
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "rt_p50": rawssh.percentile(times, 50) * 1e6,
        "rt_p90": rawssh.percentile(times, 90) * 1e6,
    }


def _transfer(ex: Executor, fn: Callable[..., Any], arg: Any, expect: int) -> float:
    """MB/s (10^6 bytes) of one call that moves ``expect`` bytes one way."""
    start = time.perf_counter()
    result = ex.submit(fn, arg).result(TIMEOUT)
    elapsed = time.perf_counter() - start
    got = result if isinstance(result, int) else tasks.nbytes(result)
    if got != expect:
        raise RuntimeError(f"payload of {got} bytes, expected {expect}")
    return expect / 1e6 / elapsed


def payload(c: Contender, ctx: Context) -> Dict[str, float]:
    if c.kind == "raw":
        assert ctx.raw_options is not None
        return rawssh.payload(ctx.raw_options, ctx.data, ctx.scratch / "raw-payload.bin")
    ex, size = c.get(), len(ctx.data)
    return {
        "arg_in": _transfer(ex, tasks.nbytes, ctx.data, size),
        "result_out": _transfer(ex, tasks.make_blob, size, size),
    }


def numpy_payload(c: Contender, ctx: Context) -> Dict[str, float]:
    ex, size = c.get(), len(ctx.data)
    array = ctx.numpy.frombuffer(ctx.data, dtype=ctx.numpy.uint8)
    return {
        "np_in": _transfer(ex, tasks.nbytes, array, size),
        "np_out": _transfer(ex, tasks.make_array, size, size),
    }


def startup(c: Contender, ctx: Context) -> Dict[str, float]:
    """A fresh executor to its first result; for SSH the node cache is already warm."""
    if c.kind == "raw":
        assert ctx.raw_options is not None
        return rawssh.session(ctx.raw_options)
    assert c.factory is not None
    start = time.perf_counter()
    ex = c.factory()
    try:
        ex.submit(tasks.tiny, 1).result(TIMEOUT)
        elapsed = time.perf_counter() - start
    finally:
        down = time.perf_counter()
        ex.shutdown(wait=True)
    return {"startup": elapsed, "shutdown": time.perf_counter() - down}


def cpu(c: Contender, ctx: Context) -> Dict[str, float]:
    if c.kind == "serial":
        start = time.perf_counter()
        found = sum(map(tasks.is_prime, ctx.primes))
        elapsed = time.perf_counter() - start
    else:
        ex = c.get()
        start = time.perf_counter()
        found = sum(
            ex.map(tasks.is_prime, ctx.primes, chunksize=ctx.prime_chunksize, timeout=TIMEOUT)
        )
        elapsed = time.perf_counter() - start
    if found == 0:
        raise RuntimeError("no primes found")
    return {"cpu_time": elapsed}


@dataclass(frozen=True)
class Workload:
    name: str
    run: Callable[[Contender, Context], Dict[str, float]]
    kinds: Tuple[str, ...]
    needs_numpy: bool = False
    chunked: bool = False  # only contenders whose map honours chunksize


WORKLOADS = (
    Workload("map1", map1, ("sshexec", "ppe", "loky", "dask", "execnet")),
    Workload("map256", map256, ("sshexec", "ppe", "loky", "execnet"), chunked=True),
    Workload("submit_ac", submit_ac, ("sshexec", "ppe", "loky", "execnet")),  # dask: own Futures
    Workload("roundtrip", roundtrip, ("sshexec", "ppe", "loky", "dask", "execnet", "raw")),
    Workload("payload", payload, ("sshexec", "ppe", "loky", "dask", "execnet", "raw")),
    Workload("numpy", numpy_payload, ("sshexec", "ppe", "loky", "dask"), needs_numpy=True),
    Workload("startup", startup, ("sshexec", "ppe", "loky", "dask", "execnet", "raw")),
    Workload("cpu", cpu, ("sshexec", "ppe", "loky", "dask", "execnet", "serial")),
)


def takes_part(w: Workload, c: Contender) -> bool:
    if c.kind not in w.kinds or (w.chunked and not c.chunked_map):
        return False
    return not c.only or w.name in c.only


def rows(sizes: Sizes) -> List[Row]:
    mib = f"{sizes.payload // MiB} MiB"
    return [
        Row("map1", f"map(tiny, range(N)), chunksize=1 (N={sizes.map1:,})", "tasks/s", True),
        Row("map256", f"map chunksize=256 (N={sizes.map256:,})", "tasks/s", True),
        Row(
            "submit_ac",
            f"submit(tiny) for each of N, as_completed (N={sizes.submit:,})",
            "tasks/s",
            True,
        ),
        Row("rt_p50", "submit(tiny).result() round trip, p50", "µs", False),
        Row("rt_p90", "submit(tiny).result() round trip, p90", "µs", False),
        Row("arg_in", f"{mib} bytes argument → worker (returns len)", "MB/s", True),
        Row("result_out", f"{mib} bytes result ← worker", "MB/s", True),
        Row("echo", f"{mib} through `cat` and back (raw channel only)", "MB/s", True),
        Row("np_in", f"{mib} numpy array argument → worker", "MB/s", True),
        Row("np_out", f"{mib} numpy array result ← worker", "MB/s", True),
        Row(
            "startup",
            "construct → first result (SSH: warm node cache; raw: connect + run `true`)",
            "s",
            False,
        ),
        Row("shutdown", "shutdown(wait=True) after that", "s", False),
        Row(
            "cpu_speedup",
            f"CPU-bound is_prime map (~{sizes.cpu_seconds:g} s serial): speedup",
            "\u00d7",
            True,
        ),
        Row("cpu_time", "CPU-bound is_prime map: wall time", "s", False),
    ]
