"""``SSHTransport``: workers on one host, reached through asyncssh.

Owns: the connection to one host (opened lazily through ``route.Route``, again when it
was lost), the exec channel running the bootstrap and then the host's agent, the
connection options (host-key and authentication policy), and
translating asyncssh/OS errors into ``WorkerStartupError`` at this edge. Must not
import: the pool or executor, or know about tasks, Futures or message contents.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Mapping, Optional

from .. import _bootstrap
from .._errors import WorkerStartupError
from .._logs import logger
from .._wire.protocol import Buffer
from .base import READ_SIZE, WRITE_AHEAD, Channel, StderrSink, StderrTail, describe_exit
from .route import Route
from .sshlib import asyncssh

log = logger("sshexec.ssh")

# Fast AEAD ciphers first (AES-GCM is about twice chacha20's speed in asyncssh), then the
# rest of asyncssh's defaults so that any server still finds a common cipher.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)


class SSHChannel:
    """An exec channel running the bootstrap, then the host's agent."""

    def __init__(
        self,
        host: str,
        process: asyncssh.SSHClientProcess[bytes],
        conn: asyncssh.SSHClientConnection,
        on_stderr: StderrSink,
    ) -> None:
        self.host, self.process, self.conn = host, process, conn
        self.stderr = StderrTail(on_stderr)
        self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr())
        self._closed = False
        self.pid: Optional[int] = None
        process.stdin.channel.set_write_buffer_limits(high=WRITE_AHEAD)

    async def _read_stderr(self) -> None:
        try:
            while chunk := await self.process.stderr.read(READ_SIZE):
                self.stderr.feed(chunk)
        except (asyncssh.Error, OSError):
            pass
        self.stderr.close()

    async def read(self) -> bytes:
        try:
            return await self.process.stdout.read(READ_SIZE)
        except (asyncssh.Error, OSError):
            return b""

    def write(self, data: Buffer) -> None:
        try:  # the client's pieces are bytes already; asyncssh wants bytes
            self.process.stdin.write(data if isinstance(data, bytes) else bytes(data))
        except (asyncssh.Error, OSError):
            pass  # the read side sees the channel end and reports it

    async def drain(self) -> None:
        try:
            await self.process.stdin.drain()
        except (asyncssh.Error, OSError):
            pass

    def backlog(self) -> int:
        """What waits for the SSH channel's window: sshd opens it as the agent reads."""
        return int(self.process.stdin.channel.get_write_buffer_size())

    async def exit_reason(self, timeout: float) -> str:
        try:
            await asyncio.wait_for(self.process.wait_closed(), timeout)
        except (asyncio.TimeoutError, asyncssh.Error, OSError):
            pass
        await asyncio.wait([self._stderr_task], timeout=0.5)
        signal_info = self.process.exit_signal
        if signal_info is not None:
            return describe_exit(None, signal_info[0])
        status = self.process.exit_status
        if status is not None and status >= 0:
            return describe_exit(status)
        if self.conn.is_closed():
            return f"the SSH connection to {self.host} was lost"
        return (
            "still running"
            if not self.process.is_closing()
            else "channel closed without exit status"
        )

    def stderr_tail(self) -> str:
        return self.stderr.text()

    def kill(self) -> None:
        """Close the channel: sshd forwards no signal, but the agent on the other end ends
        its workers and itself when its channel closes."""
        self.process.close()

    async def aclose(self, grace: float) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.process.stdin.write_eof()
        except (asyncssh.Error, OSError):
            pass
        if await self.exit_reason(grace) == "still running":
            self.kill()
            await self.exit_reason(1.0)
        self.process.close()
        if not self._stderr_task.done():
            self._stderr_task.cancel()


class SSHTransport:
    """Connections to one host. Only the loop thread uses it."""

    kind = "asyncssh"

    def __init__(
        self,
        host: str,
        hostname: str,
        *,
        port: Optional[int] = None,
        username: Optional[str] = None,
        python: Optional[str] = None,
        known_hosts: Optional[str] = None,
        unsafe_skip_host_key_check: bool = False,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 10.0,
        keepalive_count_max: int = 3,
        options: Optional[Mapping[str, Any]] = None,
        jump_options: Optional[Mapping[str, Any]] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> None:
        self.host, self.hostname, self.python = host, hostname, python
        self.env, self.cwd = dict(env or {}), cwd
        self.port, self.known_hosts = port, known_hosts
        self.connect_timeout = connect_timeout
        kwargs: Dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "login_timeout": connect_timeout,
            "keepalive_interval": keepalive_interval,
            "keepalive_count_max": keepalive_count_max,
            "encryption_algs": PREFERRED_CIPHERS,
            # Never wait at a prompt: keys, agent and ~/.ssh/config only.
            "password_auth": False,
            "kbdint_auth": False,
        }
        if unsafe_skip_host_key_check:
            kwargs["known_hosts"] = None
        elif known_hosts is not None:
            kwargs["known_hosts"] = known_hosts
        if port is not None:
            kwargs["port"] = port
        if username is not None:
            kwargs["username"] = username
        # ProxyJump hosts get sshexec's own options too (host keys, timeouts, no prompts)
        # plus the executor-wide ssh_options; asyncssh alone would open them with its
        # defaults, ignoring known_hosts= and unsafe_skip_host_key_check.
        jump = {**kwargs, **((options or {}) if jump_options is None else jump_options)}
        kwargs.update(options or {})
        if "config" in kwargs:
            jump["config"] = kwargs["config"]
        self._kwargs = kwargs
        self._route = Route(host, known_hosts, connect_timeout, jump)
        self._conn: Optional[asyncssh.SSHClientConnection] = None
        # One handshake at a time per host (sshd's MaxStartups); made on the loop thread,
        # since before 3.10 an asyncio.Lock binds to the loop current at its creation.
        self._lock: Optional[asyncio.Lock] = None

    def __repr__(self) -> str:
        return f"SSHTransport({self.host!r})"

    @property
    def route(self) -> Route:
        """How this host is reached (``sshexec check`` probes through the same one)."""
        return self._route

    @property
    def connect_kwargs(self) -> Dict[str, Any]:
        """The ``asyncssh.connect`` keywords this transport connects with (a copy)."""
        return dict(self._kwargs)

    @property
    def python_label(self) -> str:
        return " or ".join(_bootstrap.interpreters(self.python))

    def _connect_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def connect(self) -> None:
        async with self._connect_lock():
            if self._conn is None or self._conn.is_closed():
                self._conn = await self._route.connect(self.hostname, self._kwargs)
                log.info("connected host=%s", self.host)

    async def open_channel(self, on_stderr: StderrSink) -> Channel:
        """The exec channel for the host's agent: one per host (a second only while a
        lost one is replaced), so sshd's MaxSessions never limits the workers."""
        await self.connect()
        conn = self._conn
        assert conn is not None
        command = _bootstrap.remote_command(self.python, self.env, self.cwd)
        try:
            process = await conn.create_process(command, encoding=None)
        except asyncssh.ChannelOpenError as exc:
            raise WorkerStartupError(
                self.host, "session", f"sshd refused to open a session: {exc.reason}"
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise WorkerStartupError(self.host, "session", f"{type(exc).__name__}: {exc}") from exc
        return SSHChannel(self.host, process, conn, on_stderr)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), 5.0)
        except (asyncio.TimeoutError, asyncssh.Error, OSError):
            log.warning("host=%s connection did not close in time", self.host)
