"""A slow link on loopback: a TCP proxy on 127.0.0.1 that delays and can cap each direction.

Every chunk read from one side is written to the other ``delay`` seconds later,
in order, so the link has ``2 * delay`` of round-trip latency (a delay line, not a
per-chunk pause). With ``rate`` (bytes per second) each direction also passes a token
bucket shared by all of the proxy's connections, like one capped link, and buffers
at most ~1 MiB. ``moved`` counts the bytes delivered each way (``up``: towards the
target). Runs its own event loop in a daemon thread; ``stop()`` ends every connection.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, Optional, Set, Tuple

ADDRESS = "127.0.0.1"
CHUNK = 1 << 16
MAX_QUEUED_CHUNKS = 1024  # per direction: reading pauses beyond this (at most 64 MiB)
CAPPED_QUEUED_CHUNKS = 16  # with a rate cap: ~1 MiB in flight, not a 64 MiB bufferbloat


class TokenBucket:
    """``rate`` bytes per second with ``burst`` bytes of credit; callers queue up as debt."""

    def __init__(self, rate: float, burst: float = float(CHUNK)) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp: Optional[float] = None

    async def take(self, count: int) -> None:
        now = asyncio.get_running_loop().time()
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= count
        if self.tokens < 0:  # later callers see the debt grow, so they wait longer: FIFO
            await asyncio.sleep(-self.tokens / self.rate)


class DelayProxy:
    def __init__(self, target_port: int, delay: float, rate: Optional[float] = None) -> None:
        self.target_port, self.delay, self.rate = target_port, delay, rate
        self.moved: Dict[str, int] = {"up": 0, "down": 0}  # loop thread writes; ints: safe reads
        self._buckets = {d: TokenBucket(rate) for d in self.moved} if rate else {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-proxy")
        self._thread.daemon = True
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set[asyncio.Task[Any]] = set()

    def start(self) -> int:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(10)
        return self.port

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, ADDRESS, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(ADDRESS, self.target_port), 10
            )
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, "up"), self._pipe(up_reader, writer, "down")
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        loop = asyncio.get_running_loop()
        bucket = self._buckets.get(direction)
        line: asyncio.Queue[Tuple[float, bytes]] = asyncio.Queue(
            CAPPED_QUEUED_CHUNKS if bucket else MAX_QUEUED_CHUNKS
        )

        async def feed() -> None:
            try:
                while data := await reader.read(CHUNK):
                    await line.put((loop.time() + self.delay, data))
            except OSError:
                pass
            await line.put((loop.time() + self.delay, b""))

        feeder = loop.create_task(feed())
        try:
            while True:
                due, data = await line.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    break
                if bucket is not None:
                    await bucket.take(len(data))
                writer.write(data)
                self.moved[direction] += len(data)
                await writer.drain()
        finally:
            feeder.cancel()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
