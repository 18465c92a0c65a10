"""The link's own limit: a bare asyncssh channel to the same loopback sshd, with the
cipher sshexec prefers (aes128-gcm@openssh.com). No pickling, no frames, no worker.

``up``: 64 MiB into ``cat >/dev/null`` until its exit status; ``down``: ``cat`` of a
64 MiB file; ``echo``: 64 MiB through ``cat`` and back (both directions at once);
``ping``: 1 byte echoed by ``cat``, one at a time; ``session``: connect, log in and
run ``true``, the floor under any SSH worker's start-up.
"""

from __future__ import annotations

import asyncio
import shlex
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import asyncssh

TIMEOUT = 120.0


async def _connect(options: Dict[str, Any]) -> asyncssh.SSHClientConnection:
    return await asyncio.wait_for(asyncssh.connect("127.0.0.1", **options), 30)


async def _ready(conn: asyncssh.SSHClientConnection, command: str) -> Any:
    """Start ``command`` after the login shell is up (it says R first), so that the
    shell's own start-up (a ~/.bashrc can take 100 ms) is not timed."""
    proc = await conn.create_process(f"echo R; {command}", encoding=None)
    if await asyncio.wait_for(proc.stdout.readexactly(2), 30) != b"R\n":
        raise RuntimeError("raw channel: unexpected output before the command")
    return proc


async def _up(options: Dict[str, Any], data: bytes) -> float:
    async with await _connect(options) as conn:
        proc = await _ready(conn, "exec cat >/dev/null")
        start = time.perf_counter()
        proc.stdin.write(data)
        proc.stdin.write_eof()
        await proc.wait(timeout=TIMEOUT)
        return time.perf_counter() - start


async def _down(options: Dict[str, Any], path: Path, size: int) -> float:
    async with await _connect(options) as conn:
        proc = await _ready(conn, f"read x; exec cat {shlex.quote(str(path))}")
        start = time.perf_counter()
        proc.stdin.write(b"\n")
        got = 0
        while chunk := await proc.stdout.read(1 << 20):
            got += len(chunk)
        elapsed = time.perf_counter() - start
        await proc.wait(timeout=TIMEOUT)
        if got != size:
            raise RuntimeError(f"raw down: read {got} of {size} bytes")
        return elapsed


async def _echo(options: Dict[str, Any], data: bytes) -> float:
    async with await _connect(options) as conn:
        proc = await _ready(conn, "exec cat")
        start = time.perf_counter()
        proc.stdin.write(data)
        proc.stdin.write_eof()
        got = 0
        while chunk := await proc.stdout.read(1 << 20):
            got += len(chunk)
        elapsed = time.perf_counter() - start
        await proc.wait(timeout=TIMEOUT)
        if got != len(data):
            raise RuntimeError(f"raw echo: got {got} of {len(data)} bytes back")
        return elapsed


async def _ping(options: Dict[str, Any], count: int) -> List[float]:
    async with await _connect(options) as conn:
        proc = await _ready(conn, "exec cat")
        times = []
        for _ in range(count):
            start = time.perf_counter()
            proc.stdin.write(b"x")
            await asyncio.wait_for(proc.stdout.readexactly(1), 10)
            times.append(time.perf_counter() - start)
        proc.stdin.write_eof()
        await proc.wait(timeout=10)
        return times


async def _session(options: Dict[str, Any]) -> float:
    start = time.perf_counter()
    async with await _connect(options) as conn:
        await asyncio.wait_for(conn.run("true", check=True), TIMEOUT)
        return time.perf_counter() - start


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT + 30))


def payload(options: Dict[str, Any], data: bytes, path: Path) -> Dict[str, float]:
    """MB/s (10^6 bytes) for up, down and echo."""
    if not path.exists() or path.stat().st_size != len(data):
        path.write_bytes(data)
    mb = len(data) / 1e6
    return {
        "arg_in": mb / _run(_up(options, data)),
        "result_out": mb / _run(_down(options, path, len(data))),
        "echo": mb / _run(_echo(options, data)),
    }


def ping(options: Dict[str, Any], count: int) -> Dict[str, float]:
    """p50 and p90 of a 1-byte echo round trip, in microseconds."""
    times = sorted(_run(_ping(options, count)))
    return {"rt_p50": percentile(times, 50) * 1e6, "rt_p90": percentile(times, 90) * 1e6}


def session(options: Dict[str, Any], timeout: float = TIMEOUT) -> Dict[str, float]:
    """Seconds to connect, log in and run ``true`` (the login shell's start-up included)."""
    return {"startup": asyncio.run(asyncio.wait_for(_session(options), timeout))}


def percentile(sorted_values: List[float], pct: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(pct) - 1]
