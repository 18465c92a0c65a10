"""Channels to worker processes, the local transport, and the start-marker handshake.

Owns: the ``Channel`` and ``Transport`` protocols the pool talks to,
``LocalTransport`` (workers as subprocesses of this machine, same bootstrap and
same frames as over SSH) and ``handshake()``, which skips shell chatter up to
the start marker and ships the bundle when the node's cache lacks it. Foreign
errors (``OSError``) are translated here. Must not import: asyncssh, or know
about tasks and Futures.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
import time
from typing import Callable, Deque, List, Mapping, Optional, Protocol

from . import _bootstrap
from ._errors import WorkerStartupError
from ._protocol import START_MARKER, Buffer

log = logging.getLogger("sshexec.pool")

READ_SIZE = 1 << 20
MAX_CHATTER = 1 << 20  # bytes of login-shell output tolerated before the start marker
STDERR_TAIL_LINES = 20

StderrSink = Callable[[bytes], None]


class Channel(Protocol):
    """One worker process's stdin/stdout, plus what is known of how it ended."""

    pid: Optional[int]  # the worker's pid once its Hello has been read

    async def read(self) -> bytes:
        """Next chunk of the worker's stdout; ``b""`` at EOF."""

    def write(self, data: Buffer) -> None: ...

    async def drain(self) -> None: ...

    async def aclose(self, grace: float) -> None:
        """End the worker: close its stdin, wait up to ``grace``, then force it. Bounded."""

    async def exit_reason(self, timeout: float) -> str:
        """How the process ended ("exit status 1", "killed by signal KILL"), waiting up to
        ``timeout`` for it to be known."""

    def stderr_tail(self) -> str: ...

    def kill(self) -> None:
        """Best effort: signal the worker to die now (used for ``kill_workers``)."""


class Transport(Protocol):
    host: str

    async def connect(self) -> None: ...

    async def open_channel(self, on_stderr: StderrSink) -> Channel: ...

    async def aclose(self) -> None: ...


class StderrTail:
    """Relays a worker's stderr line by line and keeps the last lines for error messages."""

    def __init__(self, sink: StderrSink) -> None:
        self.sink = sink
        self.lines: Deque[bytes] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self._emit(line + b"\n")

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial + b"\n")
            self._partial = b""

    def _emit(self, line: bytes) -> None:
        self.lines.append(line)
        self.sink(line)

    def text(self) -> str:
        return b"".join(self.lines).decode("utf-8", "replace").strip()


def describe_exit(status: Optional[int], signal_name: Optional[str] = None) -> str:
    if signal_name:  # sshd reports "KILL", Popen -9: say SIGKILL for both
        return f"killed by signal {signal_name if signal_name.startswith('SIG') else 'SIG' + signal_name}"
    if status is None:
        return "ended with no exit status"
    if status < 0:
        try:
            return f"killed by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


async def handshake(channel: Channel, host: str, python: str) -> bytes:
    """Read past shell chatter to the start marker; send the bundle if asked.

    Returns the bytes already read beyond the handshake (the start of the frames).
    Raises WorkerStartupError naming the host when no worker can start there.
    """
    channel.write(_bootstrap.stage1_code())
    buffer = bytearray()
    while True:
        at = buffer.find(START_MARKER)
        if at >= 0 and len(buffer) > at + len(START_MARKER):
            break
        if len(buffer) > MAX_CHATTER:
            raise WorkerStartupError(
                host,
                "bootstrap",
                f"over {MAX_CHATTER} bytes of output before the worker started",
                "Make the login shell quiet for non-interactive sessions (~/.bashrc, ~/.profile).",
            )
        chunk = await channel.read()
        if not chunk:
            raise await _no_start(channel, host, python, bytes(buffer))
        buffer += chunk
    if at:
        chatter = bytes(buffer[:at]).decode("utf-8", "replace").strip()
        log.warning("shell chatter before the worker started host=%s: %.200r", host, chatter)
    answer, rest = buffer[at + len(START_MARKER)], bytes(buffer[at + len(START_MARKER) + 1 :])
    if answer == _bootstrap.NEED[0]:
        channel.write(_bootstrap.bundle_message())
        await channel.drain()
        return rest
    if answer == _bootstrap.HAVE[0]:
        return rest
    if answer == _bootstrap.WRONG_VERSION[0]:
        while chunk := await channel.read():
            rest += chunk
        found = rest.decode("ascii", "replace")
        wanted = _bootstrap.client_version()
        raise WorkerStartupError(
            host,
            "interpreter",
            f"remote interpreter {python!r} is Python {found}, this client runs Python {wanted}",
            f"Install python{wanted} on {host} or point at one with python='/path/to/python{wanted}' "
            "(SSHPoolExecutor(python=...) or Host(..., python=...)).",
        )
    raise WorkerStartupError(host, "bootstrap", f"unexpected handshake byte {answer!r}")


async def _no_start(channel: Channel, host: str, python: str, output: bytes) -> WorkerStartupError:
    how = await channel.exit_reason(timeout=2.0)
    stderr = channel.stderr_tail()
    detail = f"; stderr: {stderr[-600:]}" if stderr else ""
    if how == f"exit status {_bootstrap.MISSING_CWD_EXIT}":
        said = [x for x in stderr.splitlines() if x.startswith(_bootstrap.CWD_ERROR)]
        return WorkerStartupError(
            host,
            "working directory",
            said[-1][len("sshexec: ") :] if said else f"cannot change to it ({how})",
            f"Create that directory on {host}, or fix Host(cwd=...) / the host file's cwd=.",
        )
    if how == f"exit status {_bootstrap.MISSING_PYTHON_EXIT}":
        return WorkerStartupError(
            host,
            "interpreter",
            f"no usable Python found ({python}){detail}",
            f"Install Python {_bootstrap.client_version()} on {host}, or pass python='/path/to/python3'.",
        )
    seen = f"; stdout before exit: {output[-200:]!r}" if output else ""
    return WorkerStartupError(
        host,
        "bootstrap",
        f"the worker process ended before starting ({how}){detail}{seen}",
        f"Check that `{python}` runs on {host} for this user.",
    )


class PipeChannel:
    """A local worker subprocess; reaped by polling, so no child-watcher thread is needed."""

    def __init__(self, proc: subprocess.Popen[bytes], on_stderr: StderrSink) -> None:
        self.proc = proc
        self.stderr = StderrTail(on_stderr)
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._stderr_task: Optional[asyncio.Task[None]] = None
        self._pipes: List[asyncio.BaseTransport] = []
        self.pid: Optional[int] = proc.pid
        self._closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self._reader = asyncio.StreamReader(limit=READ_SIZE)
        reader = self._reader
        out_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self.proc.stdout
        )
        self._pipes.append(out_transport)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin,
            self.proc.stdin,
        )
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
        try:
            return await self._reader.read(READ_SIZE)
        except OSError:
            return b""

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
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C reaches the client, which then closes the workers
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                cwd=self.cwd,
            )
        except OSError as exc:
            raise WorkerStartupError(
                self.host, "interpreter", f"cannot run {argv[0]}: {exc}", "Check python=."
            ) from exc
        channel = PipeChannel(proc, on_stderr)
        try:
            await channel.start()
        except BaseException:  # cancelled during shutdown: leave no process behind
            await channel.aclose(0.0)
            raise
        return channel

    async def aclose(self) -> None:
        pass
