"""``LocalTransport``: workers as subprocesses of this machine.

Owns: ``PipeChannel`` (a worker subprocess's pipes, reaped by polling; its stdout a
``PipeReader``, read or pushed), ``launch`` (a
command with pipes, its channel started: here and for ``ssh`` and ``srun``) and
``LocalTransport`` (``hosts=None`` or ``":"``): the same bootstrap and the same frames
as over SSH, with no shell. Translates ``OSError`` at this edge. Must not import:
asyncssh, or know about tasks and Futures.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import time
from typing import Any, Callable, Deque, List, Mapping, Optional, Sequence, TypeVar

from .. import _bootstrap
from .._errors import WorkerStartupError
from .._logs import logger
from .._wire.protocol import Buffer
from .base import READ_SIZE, WRITE_AHEAD, Channel, StderrSink, StderrTail, describe_exit

log = logger("sshexec.pool")

C = TypeVar("C", bound="PipeChannel")


class PipeReader(asyncio.Protocol):
    """A pipe's bytes, read (``read``) or handed on as they arrive (``push_to``): what the
    command's stdout gives the session. Reading pauses while ``2 * READ_SIZE`` wait."""

    def __init__(self) -> None:
        self._chunks: Deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._waiter: Optional[asyncio.Future[None]] = None
        self._sink: Optional[Callable[[bytes], None]] = None
        self._ended: Optional[asyncio.Future[None]] = None
        self._transport: Optional[asyncio.ReadTransport] = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > 2 * READ_SIZE and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> None:
        self._end()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._end()

    def _end(self) -> None:
        self._eof = True
        self._wake()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._paused and self._size <= READ_SIZE and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    def push_to(self, sink: Callable[[bytes], None]) -> asyncio.Future[None]:
        """From now on ``sink`` takes each chunk in the pipe's own callback (no task
        between the pipe and its reader); what was read already goes first. The future
        ends at the pipe's end."""
        self._ended = asyncio.get_running_loop().create_future()
        while self._chunks:
            sink(self._chunks.popleft())
        self._size = 0
        self._sink = sink
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        if self._eof:
            self._ended.set_result(None)
        return self._ended

    def stop_pushing(self) -> None:
        """What arrives from now on is dropped (the session gave the pipe up)."""
        self._sink = _drop


def _drop(data: bytes) -> None:
    pass


class PipeChannel:
    """A local worker subprocess; reaped by polling, so no child-watcher thread is needed."""

    def __init__(self, proc: subprocess.Popen[bytes], on_stderr: StderrSink) -> None:
        self.proc = proc
        self.stderr = StderrTail(on_stderr)
        self._reader: Optional[PipeReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._stderr_task: Optional[asyncio.Task[None]] = None
        self._pipes: List[asyncio.BaseTransport] = []
        self.pid: Optional[int] = proc.pid
        self._closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self._reader = reader = PipeReader()
        out_transport, _ = await loop.connect_read_pipe(lambda: reader, self.proc.stdout)
        self._pipes.append(out_transport)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin,
            self.proc.stdin,
        )
        transport.set_write_buffer_limits(high=WRITE_AHEAD)
        self._writer = asyncio.StreamWriter(transport, protocol, None, loop)
        err_reader = asyncio.StreamReader(limit=READ_SIZE)
        err_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(err_reader), self.proc.stderr
        )
        self._pipes.append(err_transport)
        self._stderr_task = loop.create_task(self._read_stderr(err_reader))

    async def _read_stderr(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(READ_SIZE):
            self.stderr.feed(chunk)
        self.stderr.close()

    async def read(self) -> bytes:
        assert self._reader is not None
        return await self._reader.read()

    def push_to(self, sink: Callable[[bytes], None]) -> asyncio.Future[None]:
        """See ``PipeReader.push_to``: for the session, once the handshake is read."""
        assert self._reader is not None
        return self._reader.push_to(sink)

    def stop_pushing(self) -> None:
        if self._reader is not None:
            self._reader.stop_pushing()

    def write(self, data: Buffer) -> None:
        assert self._writer is not None
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.drain()
        except (OSError, RuntimeError):  # the worker died; the read loop reports it
            pass

    def backlog(self) -> int:
        if self._writer is None or self._writer.is_closing():
            return 0
        return int(self._writer.transport.get_write_buffer_size())

    async def exit_reason(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._stderr_task is not None:
            await asyncio.wait([self._stderr_task], timeout=max(0.0, deadline - time.monotonic()))
        status = self.proc.poll()
        return "still running" if status is None else describe_exit(status)

    def stderr_tail(self) -> str:
        return self.stderr.text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    async def aclose(self, grace: float) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                self._writer.close()
            if await self.exit_reason(grace) == "still running":
                self.kill()
                await self.exit_reason(1.0)
        finally:  # even when cancelled mid-way: no process left unkilled or unreaped
            if self.proc.poll() is None:
                self.proc.kill()
                try:
                    self.proc.wait(1.0)  # SIGKILL: immediate; blocking here is brief
                except subprocess.TimeoutExpired:
                    log.warning("local worker pid=%d survived SIGKILL", self.proc.pid)
            if self._stderr_task is not None and not self._stderr_task.done():
                self._stderr_task.cancel()
            for transport in self._pipes:
                transport.close()
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


class LocalTransport:
    """Workers as subprocesses of this machine: no SSH, the same bootstrap and frames."""

    kind = "local"

    def __init__(
        self,
        python: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        host: str = "local",
    ) -> None:
        self.python, self.host = python, host
        self.env = dict(env or {})
        self.cwd = os.path.expanduser(cwd) if cwd else None

    async def connect(self) -> None:
        if self.cwd is not None and not os.path.isdir(self.cwd):
            raise WorkerStartupError(
                self.host,
                "working directory",
                f"{self.cwd} does not exist or is not a directory on this machine",
                "Create it, or fix Host(cwd=...) / the host file's cwd=.",
            )

    async def open_channel(self, on_stderr: StderrSink) -> Channel:
        argv = _bootstrap.local_argv(self.python)
        await self.connect()  # the directory may have gone since
        return await launch(
            argv,
            self.host,
            lambda proc: PipeChannel(proc, on_stderr),
            stage="interpreter",
            fix="Check python=.",
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            cwd=self.cwd,
        )

    async def aclose(self) -> None:
        pass


async def launch(
    argv: Sequence[str],
    host: str,
    make: Callable[[subprocess.Popen[bytes]], C],
    stage: str = "connect",
    fix: str = "",
    **popen: Any,
) -> C:
    """Run ``argv`` with pipes, in a session of its own (Ctrl-C reaches the client, which
    then closes it), and start the channel ``make`` builds on it. ``popen``: ``env``,
    ``cwd``.

    Raises:
        WorkerStartupError: The command cannot run (named with ``host`` and ``stage``).
    """
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **popen,
        )
    except OSError as exc:
        raise WorkerStartupError(
            host,
            stage,
            f"cannot run {argv[0]}: {exc}",
            fix or f"Check that {argv[0]} is installed.",
        ) from exc
    channel = make(proc)
    try:
        await channel.start()
    except BaseException:  # cancelled during shutdown: leave no process behind
        await channel.aclose(0.0)
        raise
    return channel
