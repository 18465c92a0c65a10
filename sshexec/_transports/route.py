"""How one host is reached over SSH: its ssh config, the ProxyJump hosts in front of it,
and what a refused host key means.

Owns: ``split_hop``, ``Destination`` (where a name leads), ``Route`` (resolving a name
through the ssh config as ``asyncssh.connect`` does, ``~/.ssh/config`` when no config is
given, so that ``sshexec check`` and the executor probe and connect to the same
address, port and user; dialling every ProxyJump hop with sshexec's own options so known_hosts and keys apply to the bastions
too, and translating asyncssh/OS errors into ``WorkerStartupError`` naming the host,
the hop, the stage and the fix). Must not import: the pool, or know about channels,
tasks or Futures.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Final, Mapping, Optional, Tuple

from .._errors import WorkerStartupError
from .sshlib import asyncssh

MAX_JUMPS: Final = 8  # nested ProxyJump levels followed; more means a loop in the ssh config
HOST_ONLY: Final = ("port", "username", "tunnel", "proxy_command", "host")


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


@dataclass(frozen=True)
class Destination:
    """Where a host name leads once the ssh config is read."""

    name: str  # as given
    address: str  # HostName
    port: int
    user: str
    jumps: str  # the ProxyJump list, "" for none
    proxy_command: str  # the config's ProxyCommand, "" for none
    config: Tuple[str, ...]  # the ssh config files read
    configured: bool  # those files set HostName, Port, User, ProxyJump or ProxyCommand


def _config_files(config: Any) -> Tuple[str, ...]:
    """The files asyncssh reads for ``config=`` (``()``: ``~/.ssh/config`` if readable)."""
    if config == ():
        default = os.path.expanduser(os.path.join("~", ".ssh", "config"))
        return (default,) if os.access(default, os.R_OK) else ()
    if config is None:
        return ()
    if isinstance(config, (str, PurePath)):
        return (str(config),)
    return tuple(str(path) for path in config)


class Route:
    """Connections to one host, through its ProxyJump hosts when the config names any."""

    def __init__(
        self,
        host: str,
        known_hosts: Optional[str],
        connect_timeout: float,
        jump_kwargs: Mapping[str, Any],
    ) -> None:
        self.host, self.known_hosts, self.connect_timeout = host, known_hosts, connect_timeout
        self._jump_kwargs = {k: v for k, v in jump_kwargs.items() if k not in HOST_ONLY}

    async def connect(
        self, hostname: str, kwargs: Mapping[str, Any]
    ) -> asyncssh.SSHClientConnection:
        return await self._connect_route(hostname, kwargs, None, 0)

    def resolve(self, hostname: str, kwargs: Mapping[str, Any]) -> Destination:
        """Where ``hostname`` leads with the ``asyncssh.connect`` keywords ``kwargs``:
        the ssh config read as asyncssh reads it (``~/.ssh/config`` when ``kwargs`` name
        none), without connecting.

        Raises:
            WorkerStartupError: The ssh config cannot be read.
        """
        probe = {k: kwargs[k] for k in ("port", "username") if k in kwargs}
        config = kwargs.get("config", ())  # (): the default, as asyncssh.connect has it
        try:  # no keys, agent or known_hosts: only the config is read
            options = asyncssh.SSHClientConnectionOptions(
                host=hostname,
                client_keys=None,
                known_hosts=None,
                agent_path=None,
                config=config,
                **probe,
            )
        except (asyncssh.Error, OSError, ValueError) as exc:
            raise WorkerStartupError(
                self.host, "connect", f"cannot read the ssh config for {hostname}: {exc}"
            ) from exc
        jump = kwargs.get("tunnel", options.tunnel)  # tunnel="a,b" is a ProxyJump list too
        jumps = jump if isinstance(jump, str) else ""
        proxy = kwargs.get("proxy_command", options.proxy_command)
        proxy_command = " ".join(proxy) if isinstance(proxy, (list, tuple)) else str(proxy or "")
        found = options.config
        configured = any(
            found.get(key) is not None
            for key in ("Hostname", "Port", "User", "ProxyJump", "ProxyCommand")
        )
        return Destination(
            hostname,
            options.host,
            options.port,
            str(options.username),
            jumps,
            proxy_command,
            _config_files(config),
            configured,
        )

    async def open_tunnel(
        self, hostname: str, kwargs: Mapping[str, Any]
    ) -> Optional[asyncssh.SSHClientConnection]:
        """The last ProxyJump hop to ``hostname``, connected (through the hops before it,
        closed with it), or None when the config names none."""
        return await self._tunnel(self.resolve(hostname, kwargs), 0)

    async def _connect_route(
        self, hostname: str, kwargs: Mapping[str, Any], hop: Optional[str], depth: int
    ) -> asyncssh.SSHClientConnection:
        """Connect to ``hostname``, first through its ProxyJump hosts, each opened here with
        the jump options, and the target through the last as an explicit tunnel."""
        destination = self.resolve(hostname, kwargs)
        tunnel = await self._tunnel(destination, depth)
        where = (hop, destination.address, destination.port)
        try:
            conn = await self._dial(hostname, kwargs, tunnel, where)
        except BaseException:
            if tunnel is not None:
                tunnel.close()
            raise
        if tunnel is not None:
            conn.set_tunnel(tunnel)  # as asyncssh does for its own ProxyJump: closed together
        return conn

    async def _tunnel(
        self, destination: Destination, depth: int
    ) -> Optional[asyncssh.SSHClientConnection]:
        """The ProxyJump hops to ``destination``, each through the one before, the first
        with its own ProxyJump if it has one; the last of them, or None for no hop."""
        if not destination.jumps:
            return None
        if depth >= MAX_JUMPS:
            raise WorkerStartupError(
                self.host,
                "connect",
                f"over {MAX_JUMPS} nested ProxyJump hosts",
                "Check the ssh config for a loop.",
            )
        tunnel: Optional[asyncssh.SSHClientConnection] = None
        try:
            for spec in destination.jumps.split(","):
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
                    hop = self.resolve(name, options)
                    conn = await self._dial(name, options, tunnel, (spec, hop.address, hop.port))
                    conn.set_tunnel(tunnel)  # closing a hop closes the ones before it
                tunnel = conn
        except BaseException:
            if tunnel is not None:
                tunnel.close()
            raise
        return tunnel

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
