"""``SSHTransport``: workers on one host, reached through asyncssh.

Owns: connections to one host (opened lazily, more of them when sshd's
``MaxSessions`` refuses further channels), the ProxyJump hosts in front of it,
exec channels running the bootstrap, host-key and authentication policy, and
translating asyncssh/OS errors into ``WorkerStartupError`` at this edge. Must not import: the pool or executor, or
know about tasks, Futures or message contents.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Dict, Final, List, Mapping, Optional, Tuple

import asyncssh

from . import _bootstrap
from ._errors import WorkerStartupError
from ._protocol import Buffer
from ._transport import READ_SIZE, Channel, StderrSink, StderrTail, describe_exit

log = logging.getLogger("sshexec.ssh")

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

MAX_JUMPS: Final = 8  # nested ProxyJump levels followed; more means a loop in the ssh config
_HOST_ONLY: Final = ("port", "username", "tunnel", "proxy_command", "host")


def split_hop(hop: str) -> Tuple[Optional[str], str, Optional[int]]:
    """(user, host, port) of one ProxyJump entry: ``[ssh://][user@]host[:port]``."""
    text = hop.strip()
    text = text[6:] if text.startswith("ssh://") else text
    user, _, text = text.rpartition("@")
    port = ""
    if text.startswith("["):
        text, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        text, port = text.split(":")
    if not text or (port and not port.isdigit()):
        raise ValueError(f"invalid ProxyJump entry {hop!r}")
    return user or None, text, int(port) if port else None


class _Connection:
    """One SSH connection and how many worker channels it carries."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.sessions = 0
        self.capacity: Optional[int] = None  # learnt when sshd refuses a channel

    def has_room(self) -> bool:
        return not self.conn.is_closed() and (
            self.capacity is None or self.sessions < self.capacity
        )


class SSHChannel:
    """An exec channel running the bootstrap and then one worker."""

    def __init__(
        self,
        host: str,
        process: asyncssh.SSHClientProcess[bytes],
        owner: _Connection,
        on_stderr: StderrSink,
    ) -> None:
        self.host, self.process, self.owner = host, process, owner
        self.stderr = StderrTail(on_stderr)
        self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr())
        self._released = False
        self._closed = False
        self.pid: Optional[int] = None  # the worker's, from its Hello
        self._killer: Optional[asyncio.Task[None]] = None

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
        if self.owner.conn.is_closed():
            return f"the SSH connection to {self.host} was lost"
        return (
            "still running"
            if not self.process.is_closing()
            else "channel closed without exit status"
        )

    def stderr_tail(self) -> str:
        return self.stderr.text()

    def kill(self) -> None:
        """sshd does not forward signals, so: ``kill -KILL <pid>`` in a session of its own,
        and close this channel, whose EOF ends the worker within its grace anyway."""
        if self.pid is not None and self._killer is None and not self.owner.conn.is_closed():
            self._killer = asyncio.get_running_loop().create_task(self._kill_by_pid(self.pid))
        self.process.close()

    async def _kill_by_pid(self, pid: int) -> None:
        try:
            await asyncio.wait_for(self.owner.conn.run(f"kill -KILL {pid}", check=False), 5.0)
        except (asyncio.TimeoutError, asyncssh.Error, OSError):  # MaxSessions, or gone
            log.debug(
                "host=%s could not run kill for pid %d; its channel is closed", self.host, pid
            )

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
        if self._killer is not None:
            await asyncio.wait([self._killer], timeout=5.0)
        if not self._stderr_task.done():
            self._stderr_task.cancel()
        if not self._released:
            self._released = True
            self.owner.sessions -= 1


class SSHTransport:
    """Connections to one host. Only the loop thread uses it."""

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
        self._jump_kwargs = {k: v for k, v in jump.items() if k not in _HOST_ONLY}
        self._connections: List[_Connection] = []
        # One handshake at a time per host (sshd's MaxStartups); made on the loop thread,
        # since before 3.10 an asyncio.Lock binds to the loop current at its creation.
        self._lock: Optional[asyncio.Lock] = None

    def __repr__(self) -> str:
        return f"SSHTransport({self.host!r})"

    @property
    def python_label(self) -> str:
        return " or ".join(_bootstrap.interpreters(self.python))

    def _connect_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def connect(self) -> None:
        async with self._connect_lock():
            if not any(c.has_room() for c in self._connections):
                await self._open_connection()

    async def _open_connection(self) -> _Connection:
        entry = _Connection(await self._connect_route(self.hostname, self._kwargs, None, 0))
        self._connections.append(entry)
        log.info("connected host=%s connections=%d", self.host, len(self._connections))
        return entry

    def _resolve(self, hostname: str, kwargs: Mapping[str, Any]) -> Tuple[str, int, str]:
        """(address, port, ProxyJump) for ``hostname`` as the ssh config has them."""
        probe = {k: kwargs[k] for k in ("port", "username", "config") if k in kwargs}
        try:  # no keys, agent or known_hosts: only the config is read
            options = asyncssh.SSHClientConnectionOptions(
                host=hostname, client_keys=None, known_hosts=None, agent_path=None, **probe
            )
        except (asyncssh.Error, OSError, ValueError) as exc:
            raise WorkerStartupError(
                self.host, "connect", f"cannot read the ssh config for {hostname}: {exc}"
            ) from exc
        jump = kwargs.get("tunnel", options.tunnel)  # tunnel="a,b" is a ProxyJump list too
        return options.host, options.port, jump if isinstance(jump, str) else ""

    async def _connect_route(
        self, hostname: str, kwargs: Mapping[str, Any], hop: Optional[str], depth: int
    ) -> asyncssh.SSHClientConnection:
        """Connect to ``hostname``, first through its ProxyJump hosts, each opened here with
        the jump options, and the target through the last as an explicit tunnel."""
        address, port, jumps = self._resolve(hostname, kwargs)
        if not jumps:
            return await self._dial(hostname, kwargs, None, (hop, address, port))
        if depth >= MAX_JUMPS:
            raise WorkerStartupError(
                self.host,
                "connect",
                f"over {MAX_JUMPS} nested ProxyJump hosts",
                "Check the ssh config for a loop.",
            )
        tunnel: Optional[asyncssh.SSHClientConnection] = None
        try:
            for spec in jumps.split(","):
                try:
                    user, name, jump_port = split_hop(spec)
                except ValueError as exc:
                    raise WorkerStartupError(self.host, "connect", str(exc)) from exc
                options = dict(self._jump_kwargs)
                options.update({"username": user} if user else {})
                options.update({"port": jump_port} if jump_port else {})
                if tunnel is None:  # the first hop may have a ProxyJump of its own
                    conn = await self._connect_route(name, options, spec, depth + 1)
                else:
                    where = self._resolve(name, options)[:2]
                    conn = await self._dial(name, options, tunnel, (spec, *where))
                    conn.set_tunnel(tunnel)  # closing a hop closes the ones before it
                tunnel = conn
            conn = await self._dial(hostname, kwargs, tunnel, (hop, address, port))
        except BaseException:
            if tunnel is not None:
                tunnel.close()
            raise
        conn.set_tunnel(tunnel)  # as asyncssh does for its own ProxyJump: closed together
        return conn

    async def _dial(
        self,
        hostname: str,
        kwargs: Mapping[str, Any],
        tunnel: Optional[asyncssh.SSHClientConnection],
        where: Tuple[Optional[str], str, int],
    ) -> asyncssh.SSHClientConnection:
        """One ``asyncssh.connect``, its errors named for this host and, for a jump host,
        for that hop (``where`` is the hop's spec or None, its address and port)."""
        hop, address, port = where
        via = f"jump host {hop}: " if hop else ""
        call = {**kwargs, "tunnel": tunnel} if tunnel is not None else kwargs
        try:
            return await asyncio.wait_for(
                asyncssh.connect(hostname, **call), self.connect_timeout + 5
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._host_key_error(exc, address, port, via) from exc
        except asyncssh.PermissionDenied as exc:
            raise WorkerStartupError(
                self.host,
                "authentication",
                f"{via}the server refused every key offered ({exc.reason})",
                "Check that your public key is in the node's ~/.ssh/authorized_keys, that ssh-agent "
                "holds the key or IdentityFile in ~/.ssh/config names it, and the user name.",
            ) from exc
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise WorkerStartupError(
                self.host,
                "connect",
                f"{via}no answer within {self.connect_timeout:g} s",
                "Check that the host is up and the port is right (does `ssh` reach it?).",
            ) from exc
        except OSError as exc:
            raise WorkerStartupError(
                self.host,
                "connect",
                f"{via}cannot reach {address} port {port}: {exc.strerror or exc}",
                "Check the host name and port, and that sshd runs there.",
            ) from exc
        except (asyncssh.Error, ValueError) as exc:
            raise WorkerStartupError(
                self.host, "connect", f"{via}{type(exc).__name__}: {exc}"
            ) from exc

    def _host_key_error(
        self, exc: asyncssh.HostKeyNotVerifiable, hostname: str, port: int, via: str
    ) -> WorkerStartupError:
        path = self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        target = hostname if port == 22 else f"[{hostname}]:{port}"
        try:
            known = asyncssh.read_known_hosts(path).match(hostname, "", port)[0]
        except (OSError, ValueError, asyncssh.Error):
            known = []
        if known:
            return WorkerStartupError(
                self.host,
                "host key",
                f"{via}the host key of {target} does NOT match the one recorded in {path}: it has "
                "changed, and someone could be intercepting the connection (refused, as OpenSSH does)",
                f"If the node was reinstalled, remove the old key with `ssh-keygen -R '{target}'` "
                "and verify the new one before connecting again.",
            )
        return WorkerStartupError(
            self.host,
            "host key",
            f"{via}{target} is not in {path} ({exc.reason})",
            f"Verify its fingerprint and add it, e.g. `ssh -p {port} {hostname}` once, or "
            f"`ssh-keyscan -p {port} {hostname} >> {path}` after checking the key.",
        )

    async def open_channel(self, on_stderr: StderrSink) -> Channel:
        command = _bootstrap.remote_command(self.python, self.env, self.cwd)
        for _ in range(64):  # bounded: each pass either opens a channel or learns a capacity
            async with self._connect_lock():
                self._connections = [c for c in self._connections if not c.conn.is_closed()]
                entry = next((c for c in self._connections if c.has_room()), None)
                if entry is None:
                    entry = await self._open_connection()
                entry.sessions += 1
            try:
                process = await entry.conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as exc:
                entry.sessions -= 1
                if entry.conn.is_closed():
                    continue
                if entry.sessions == 0:
                    raise WorkerStartupError(
                        self.host, "session", f"sshd refused to open a session: {exc.reason}"
                    ) from exc
                entry.capacity = entry.sessions  # sshd's MaxSessions, learnt the hard way
                log.info(
                    "host=%s refused channel %d on a connection (%s); opening another",
                    self.host,
                    entry.sessions + 1,
                    exc.reason,
                )
                continue
            except (asyncssh.Error, OSError) as exc:
                entry.sessions -= 1
                raise WorkerStartupError(
                    self.host, "session", f"{type(exc).__name__}: {exc}"
                ) from exc
            return SSHChannel(self.host, process, entry, on_stderr)
        raise WorkerStartupError(self.host, "session", "sshd refused every channel")

    async def aclose(self) -> None:
        connections, self._connections = self._connections, []
        for entry in connections:
            entry.conn.close()
        for entry in connections:
            try:
                await asyncio.wait_for(entry.conn.wait_closed(), 5.0)
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                log.warning("host=%s connection did not close in time", self.host)
