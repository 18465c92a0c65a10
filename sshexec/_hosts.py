"""Host specs, host files and the transports built from them.

Owns: ``Host`` and ``parse_host`` (``[N/][user@]host[:port]``, IPv6 in brackets, ``:``
for this machine), host files (``read_hosts``), the ``SSHEXEC_HOSTS`` variable, turning
the executor's ``hosts`` argument into ``Host`` values, how ``max_workers`` is shared
over hosts, and building one transport per host: ``local``, ``asyncssh`` or ``openssh``
(the asyncssh module, hence asyncssh, is imported only for hosts that use it). Must not
import: asyncio, the pool, or know about tasks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from ._bootstrap import interpreters
from ._transports.local import LocalTransport

if TYPE_CHECKING:
    from ._transports.base import Transport

HOSTS_ENV = "SSHEXEC_HOSTS"
LOCAL = ":"  # GNU parallel's name for this machine
TRANSPORTS = ("asyncssh", "openssh", "srun")  # what carries a remote host's bytes
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Host:
    """One machine to run workers on, with its own options.

    Args:
        hostname: A name or address ssh can reach, a ``~/.ssh/config`` alias, or ``":"``
            for this machine (local worker subprocesses, as in GNU parallel).
        user: Login name; default from ``~/.ssh/config``, else the local user.
        port: SSH port; default from ``~/.ssh/config``, else 22.
        workers: Worker processes on this host; default its usable cores.
        python: Remote interpreter (e.g. a venv's ``bin/python``); default
            ``python3.<client minor>``, then ``python3``.
        options: Extra keyword arguments for ``asyncssh.connect``, for this host only
            (with ``transport="openssh"``: translated to ssh options where ssh has them).
        env: Environment variables for the workers, e.g. ``{"OMP_NUM_THREADS": "1"}``;
            set by the remote command (sshd's ``AcceptEnv`` is not needed). Values are
            literal, never expanded.
        cwd: The workers' working directory (``~/`` is the remote home); a host where
            it does not exist fails to start with a ``WorkerStartupError`` naming it.
        transport: ``"asyncssh"`` or ``"openssh"`` (the ``ssh`` binary) for this host;
            default the executor's ``transport=``.

    Raises:
        ValueError: An invalid name, port, worker count, variable name, directory or
            transport.
    """

    hostname: str
    user: Optional[str] = None
    port: Optional[int] = None
    workers: Optional[int] = None
    python: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    transport: Optional[str] = None

    __module__ = "sshexec"

    def __post_init__(self) -> None:
        name = self.hostname
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"invalid host name {name!r}")
        if self.port is not None and not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise ValueError(f"host {name}: port must be 1..65535, got {self.port!r}")
        if self.workers is not None and not (
            isinstance(self.workers, int)
            and not isinstance(self.workers, bool)
            and self.workers > 0
        ):
            raise ValueError(f"host {name}: workers must be a positive int, got {self.workers!r}")
        if self.transport is not None and self.transport not in TRANSPORTS:
            raise ValueError(
                f"host {name}: transport must be one of {', '.join(TRANSPORTS)}, "
                f"got {self.transport!r}"
            )
        if self.is_local and (
            self.user is not None
            or self.port is not None
            or self.options
            or self.transport is not None
        ):
            raise ValueError(
                "host ':' is this machine: user, port, options and transport do not apply"
            )
        env = dict(self.env)
        for key, value in env.items():
            if not isinstance(key, str) or not _ENV_NAME.match(key):
                raise ValueError(
                    f"host {name}: invalid environment variable name {key!r} "
                    "(letters, digits and _, not starting with a digit)"
                )
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"host {name}: env[{key!r}] must be a str without NUL bytes")
        object.__setattr__(self, "env", env)  # a private copy: later edits cannot leak in
        if self.cwd is not None and (
            not isinstance(self.cwd, str) or not self.cwd or "\0" in self.cwd
        ):
            raise ValueError(f"host {name}: cwd must be a non-empty path, got {self.cwd!r}")

    @property
    def is_local(self) -> bool:
        """True for ``":"``: workers are subprocesses of this machine."""
        return self.hostname == LOCAL

    @property
    def label(self) -> str:
        """``user@host:port`` as given (``local`` for ``":"``), used in worker ids, logs
        and errors."""
        if self.is_local:
            return "local"
        name = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        if self.user:
            name = f"{self.user}@{name}"
        return f"{name}:{self.port}" if self.port is not None else name


if TYPE_CHECKING:
    HostsArg = Union[str, "os.PathLike[str]", Host, Iterable[Union[str, Host, "os.PathLike[str]"]]]

_SPEC = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]\s]+)\]|(?P<name>[^:\s\[\]@]+))"
    r"(?::(?P<port>[^:\s]*))?$"
)
_COUNT = re.compile(r"^(?P<count>[^/@\s]*)/(?P<rest>.*)$")


def parse_host(spec: Union[str, Host]) -> Host:
    """A ``Host`` from ``[N/][user@]host[:port]`` (IPv6 in brackets: ``[2001:db8::7]:22``).

    ``N/`` sets the worker count, as in GNU parallel's ``4/me@node1``; ``:`` alone is this
    machine (``2/:`` for two local workers). A ``Host`` is returned unchanged.

    Raises:
        ValueError: A malformed spec. TypeError: neither a str nor a ``Host``.
    """
    if isinstance(spec, Host):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a host must be a str or sshexec.Host, got {type(spec).__name__}")
    text = spec.strip()
    workers: Optional[int] = None
    counted = _COUNT.match(text)
    if counted is not None:
        if not counted.group("count").isdigit() or int(counted.group("count")) == 0:
            raise ValueError(
                f"invalid host spec {spec!r}: the worker count before '/' must be a positive number"
            )
        workers, text = int(counted.group("count")), counted.group("rest")
    if text == LOCAL:
        return Host(LOCAL, workers=workers)
    if text.count(":") > 1 and "[" not in text and "@" not in text:
        return Host(text, workers=workers)  # a bare IPv6 address
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(
            f"invalid host spec {spec!r}: expected [N/][user@]host[:port], IPv6 in brackets"
        )
    port: Optional[int] = None
    if match.group("port") is not None:
        if not match.group("port").isdigit() or not 0 < int(match.group("port")) < 65536:
            raise ValueError(f"invalid host spec {spec!r}: port must be a number in 1..65535")
        port = int(match.group("port"))
    name = match.group("v6") or match.group("name")
    return Host(name, user=match.group("user"), port=port, workers=workers)


def _parse_line(line: str) -> Optional[Host]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"{exc}: {line.strip()!r}") from None
    if not words:
        return None
    host = parse_host(words[0])
    changes: Dict[str, Any] = {}
    env: Dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"expected key=value after the host, got {word!r}")
        if key.startswith("env."):
            env[key[4:]] = value
        elif key in ("python", "cwd", "transport"):
            changes[key] = value
        elif key in ("workers", "slots"):  # slots= as in MPI host files
            if not value.isdigit() or host.workers is not None or "workers" in changes:
                raise ValueError(f"{key}= must be a positive number, given once, got {value!r}")
            changes["workers"] = int(value)
        else:
            raise ValueError(
                f"unknown option {key!r} "
                "(expected python=, cwd=, workers=, slots=, transport= or env.NAME=)"
            )
    return dataclasses.replace(host, env=env, **changes) if changes or env else host


def read_hosts(path: Union[str, os.PathLike[str]]) -> List[Host]:
    """Read a host file: one host per line, as GNU parallel's ``--sshloginfile``.

    Each line is ``[N/][user@]host[:port]`` (``N`` workers; ``:`` is this machine)
    followed by optional ``key=value`` options: ``python=``, ``cwd=``, ``workers=``
    (or MPI's ``slots=``), ``transport=`` (``asyncssh`` or ``openssh``) and
    ``env.NAME=value``. Words are split as by a shell, so
    values may be quoted; ``#`` starts a comment (whole-line or trailing) unless
    quoted; blank lines are ignored. Example::

        # the cluster
        4/me@node1                       # 4 workers
        node2:2222 python=/opt/venv/bin/python cwd=/data env.OMP_NUM_THREADS=1
        node3 transport=openssh          # through the ssh binary
        2/:                              # and 2 workers on this machine

    Args:
        path: The file (``~`` is expanded).

    Returns:
        The hosts in file order (an empty list for a file of comments only).

    Raises:
        ValueError: A malformed line; the message starts with ``path:line:``.
        OSError: The file cannot be read.
    """
    where = Path(path).expanduser()
    hosts: List[Host] = []
    for number, line in enumerate(where.read_text(encoding="utf-8").splitlines(), 1):
        try:
            host = _parse_line(line)
        except ValueError as exc:
            raise ValueError(f"{where}:{number}: {exc}") from None
        if host is not None:
            hosts.append(host)
    return hosts


def _split(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def hosts_from_env() -> Optional[List[str]]:
    return _split(os.environ.get(HOSTS_ENV, "")) or None


def resolve_hosts(hosts: Optional[HostsArg]) -> Optional[List[Host]]:
    """The executor's ``hosts`` argument as ``Host`` values; None means local workers.

    A str is a comma-separated list; an item ``@path`` or a path object is a host file;
    None reads ``SSHEXEC_HOSTS`` the same way."""
    items: List[Any]
    if hosts is None:
        from_env = hosts_from_env()
        if from_env is None:
            return None
        items = list(from_env)
    elif isinstance(hosts, str):
        items = _split(hosts)
    elif isinstance(hosts, (os.PathLike, Host)):
        items = [hosts]
    else:
        items = list(hosts)
    parsed: List[Host] = []
    for item in items:
        path: Optional[Union[str, os.PathLike[str]]] = None
        if isinstance(item, os.PathLike):
            path = item
        elif isinstance(item, str) and item.strip().startswith("@"):
            path = item.strip()[1:]
        if path is None:
            parsed.append(parse_host(item))
            continue
        found = read_hosts(path)
        if not found:
            raise ValueError(f"host file {os.fspath(path)} lists no hosts")
        parsed.extend(found)
    if not parsed:
        raise ValueError("hosts is empty: give at least one host, or None for local workers")
    return parsed


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
    specs: Optional[Sequence[Union[str, Host]]],
    max_workers: Optional[int],
    python: Optional[str],
    known_hosts: Optional[str],
    unsafe: bool,
    connect_timeout: float,
    keepalive_interval: float,
    ssh_options: Optional[Mapping[str, Any]],
    transport: str = "asyncssh",
) -> List[Tuple[Transport, Optional[int], str]]:
    """(transport, planned workers, interpreter label) for each host; local workers when
    ``specs`` is None, and for a ``":"`` entry; ``transport`` for hosts without their own.
    asyncssh is imported only when a remote host uses it.

    Raises:
        ValueError: A host listed twice, or (openssh) an option ssh has no equivalent for.
    """
    if specs is None:
        return [
            (LocalTransport(python), max_workers or local_cpu_count(), python or sys.executable)
        ]
    parsed = [parse_host(s) for s in specs]
    labels = [h.label for h in parsed]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"host {twice[0]} is listed twice; use Host(..., workers=N) instead")
    kinds = {h.transport or transport for h in parsed if not h.is_local}
    if "asyncssh" in kinds:  # imported only when a host uses it
        from ._transports.asyncssh import SSHTransport
    if "openssh" in kinds:
        from ._transports.openssh import OpenSSHTransport
    if "srun" in kinds:
        from ._transports.srun import SrunTransport

    built: List[Tuple[Transport, Optional[int], str]] = []
    for host, count in zip(parsed, share_workers(max_workers, parsed)):
        if count == 0:
            continue  # max_workers is smaller than the number of hosts
        chosen = host.python or python
        made: Transport
        if host.is_local:
            made = LocalTransport(chosen, env=host.env, cwd=host.cwd, host=host.label)
            built.append((made, count or local_cpu_count(), chosen or sys.executable))
            continue
        common: Dict[str, Any] = dict(
            port=host.port,
            username=host.user,
            python=chosen,
            known_hosts=known_hosts,
            unsafe_skip_host_key_check=unsafe,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
            env=host.env,
            cwd=host.cwd,
        )
        if (host.transport or transport) == "srun":  # a step of the Slurm job on that node
            made = SrunTransport(host.label, host.hostname, options=host.options, **common)
        elif (host.transport or transport) == "openssh":
            made = OpenSSHTransport(
                host.label,
                host.hostname,
                options=host.options,  # this host only
                shared_options=ssh_options,  # every host and its jump hosts
                **common,
            )
        else:
            made = SSHTransport(
                host.label,
                host.hostname,
                options={**(ssh_options or {}), **host.options},
                jump_options=ssh_options,
                **common,
            )
        built.append((made, count, " or ".join(interpreters(chosen))))
    return built
