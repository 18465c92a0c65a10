"""A slow link on loopback: a TCP proxy on 127.0.0.1 that delays each direction.

Every chunk read from one side is written to the other ``delay`` seconds later,
in order, so the link has ``2 * delay`` of round-trip latency but no bandwidth
limit of its own (a delay line, not a per-chunk pause). Runs its own event loop
in a daemon thread; ``stop()`` ends every connection.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Optional, Set, Tuple

ADDRESS = "127.0.0.1"
MAX_QUEUED_CHUNKS = 1024  # per direction: reading pauses beyond this (at most 64 MiB)


class DelayProxy:
    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-proxy")
        self._thread.daemon = True
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set[asyncio.Task[None]] = set()

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
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(ADDRESS, self.target_port), 10
            )
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[Tuple[float, bytes]] = asyncio.Queue(MAX_QUEUED_CHUNKS)

        async def feed() -> None:
            try:
                while data := await reader.read(1 << 16):
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
                writer.write(data)
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
