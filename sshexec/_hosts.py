"""Host specs and the transports built from them.

Owns: ``Host`` and ``parse_host`` (``[user@]host[:port]``, IPv6 in brackets), the
``SSHEXEC_HOSTS`` variable, how ``max_workers`` is shared over hosts, and building
one transport per host (``_ssh``, hence asyncssh, is imported only for remote
hosts). Must not import: asyncio, the pool, or know about tasks.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple, Union

from ._bootstrap import interpreters
from ._transport import LocalTransport

if TYPE_CHECKING:
    from ._transport import Transport

HOSTS_ENV = "SSHEXEC_HOSTS"


@dataclass(frozen=True)
class Host:
    """One machine to run workers on, with its own options.

    Args:
        hostname: A name or address ssh can reach, or a ``~/.ssh/config`` alias.
        user: Login name; default from ``~/.ssh/config``, else the local user.
        port: SSH port; default from ``~/.ssh/config``, else 22.
        workers: Worker processes on this host; default its usable cores.
        python: Remote interpreter (e.g. a venv's ``bin/python``); default
            ``python3.<client minor>``, then ``python3``.
        options: Extra keyword arguments for ``asyncssh.connect``.
    """

    hostname: str
    user: Optional[str] = None
    port: Optional[int] = None
    workers: Optional[int] = None
    python: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)

    __module__ = "sshexec"

    def __post_init__(self) -> None:
        if not self.hostname or any(c.isspace() for c in self.hostname):
            raise ValueError(f"invalid host name {self.hostname!r}")
        if self.port is not None and not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise ValueError(f"host {self.hostname}: port must be 1..65535, got {self.port!r}")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers > 0):
            raise ValueError(
                f"host {self.hostname}: workers must be a positive int, got {self.workers!r}"
            )

    @property
    def label(self) -> str:
        """``user@host:port`` as given, used in worker ids, logs and errors."""
        name = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        if self.user:
            name = f"{self.user}@{name}"
        return f"{name}:{self.port}" if self.port is not None else name


_SPEC = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]\s]+)\]|(?P<name>[^:\s\[\]@]+))"
    r"(?::(?P<port>[^:\s]*))?$"
)


def parse_host(spec: Union[str, Host]) -> Host:
    """``[user@]host[:port]`` (IPv6 in brackets: ``[2001:db8::7]:22``) or a ``Host``."""
    if isinstance(spec, Host):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a host must be a str or sshexec.Host, got {type(spec).__name__}")
    text = spec.strip()
    if text.count(":") > 1 and "[" not in text and "@" not in text:
        return Host(text)  # a bare IPv6 address
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(
            f"invalid host spec {spec!r}: expected [user@]host[:port], IPv6 in brackets"
        )
    port: Optional[int] = None
    if match.group("port") is not None:
        if not match.group("port").isdigit() or not 0 < int(match.group("port")) < 65536:
            raise ValueError(f"invalid host spec {spec!r}: port must be a number in 1..65535")
        port = int(match.group("port"))
    return Host(match.group("v6") or match.group("name"), user=match.group("user"), port=port)


def hosts_from_env() -> Optional[List[str]]:
    value = os.environ.get(HOSTS_ENV, "").strip()
    return [s.strip() for s in value.split(",") if s.strip()] or None


def local_cpu_count() -> int:
    counter = getattr(os, "process_cpu_count", None)  # 3.13+: honours affinity
    if counter is not None:
        return int(counter() or 1)
    getaffinity = getattr(os, "sched_getaffinity", None)
    return len(getaffinity(0)) if getaffinity is not None else (os.cpu_count() or 1)


def share_workers(total: Optional[int], hosts: Sequence[Host]) -> List[Optional[int]]:
    """Worker count per host: its own ``workers``, else a round-robin share of
    ``max_workers``, else None (its cores, learnt when it connects)."""
    open_hosts = [i for i, h in enumerate(hosts) if h.workers is None]
    counts: List[Optional[int]] = [h.workers for h in hosts]
    if total is not None and open_hosts:
        left = max(total - sum(h.workers or 0 for h in hosts), 0)
        for rank, index in enumerate(open_hosts):
            counts[index] = left // len(open_hosts) + (1 if rank < left % len(open_hosts) else 0)
    return counts


def build_transports(
    specs: Optional[List[Union[str, Host]]],
    max_workers: Optional[int],
    python: Optional[str],
    known_hosts: Optional[str],
    unsafe: bool,
    connect_timeout: float,
    keepalive_interval: float,
    ssh_options: Optional[Mapping[str, Any]],
) -> List[Tuple[Transport, Optional[int], str]]:
    """(transport, planned workers, interpreter label) for each host; local workers when
    ``specs`` is None. asyncssh is imported only here, and only for remote hosts."""
    if specs is None:
        return [
            (LocalTransport(python), max_workers or local_cpu_count(), python or sys.executable)
        ]
    parsed = [parse_host(s) for s in specs]
    labels = [h.label for h in parsed]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"host {twice[0]} is listed twice; use Host(..., workers=N) instead")
    from ._ssh import SSHTransport  # asyncssh is imported only when there are remote hosts

    built: List[Tuple[Transport, Optional[int], str]] = []
    for host, count in zip(parsed, share_workers(max_workers, parsed)):
        if count == 0:
            continue  # max_workers is smaller than the number of hosts
        chosen = host.python or python
        transport = SSHTransport(
            host.label,
            host.hostname,
            port=host.port,
            username=host.user,
            python=chosen,
            known_hosts=known_hosts,
            unsafe_skip_host_key_check=unsafe,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
            options={**(ssh_options or {}), **host.options},
        )
        built.append((transport, count, " or ".join(interpreters(chosen))))
    return built
