"""The executor's ``hosts`` argument, and the transports built from it.

Owns: the ``SSHEXEC_HOSTS`` variable (``allocation`` there means the scheduler's grant),
turning the executor's ``hosts`` argument into ``Host`` values, how ``max_workers`` is
shared over hosts (within an allocation's grant), and building one transport per host:
``local``, ``asyncssh`` or ``openssh`` (the asyncssh module, hence asyncssh, is imported
only for hosts that use it). Must not import: asyncio, the pool, or know about tasks.
"""

from __future__ import annotations

import os
import sys
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

from .._bootstrap import interpreters
from .._transports.local import LocalTransport
from .allocation import Allocation, allocation
from .files import read_hosts
from .spec import Host, parse_host

if TYPE_CHECKING:
    from .._transports.base import Transport

HOSTS_ENV = "SSHEXEC_HOSTS"
FROM_ALLOCATION = "allocation"  # SSHEXEC_HOSTS=allocation

if TYPE_CHECKING:
    HostsArg = Union[str, "os.PathLike[str]", Host, Iterable[Union[str, Host, "os.PathLike[str]"]]]


def _split(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def hosts_from_env() -> Optional[List[str]]:
    return _split(os.environ.get(HOSTS_ENV, "")) or None


def allocation_from_env() -> bool:
    """``SSHEXEC_HOSTS=allocation``: the hosts of the batch allocation this runs in."""
    return os.environ.get(HOSTS_ENV, "").strip() == FROM_ALLOCATION


def resolve_hosts(hosts: Optional[HostsArg]) -> Optional[List[Host]]:
    """The executor's ``hosts`` argument as ``Host`` values; None means local workers.

    A str is a comma-separated list; an item ``@path`` or a path object is a host file;
    None reads ``SSHEXEC_HOSTS`` the same way (``allocation`` there: ``allocation()``).
    An ``Allocation`` is kept as it is: it knows it is a grant."""
    items: List[Any]
    if isinstance(hosts, Allocation):
        if not hosts:
            raise ValueError("hosts is an empty allocation")
        return hosts
    if hosts is None and allocation_from_env():
        return allocation()
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
    ``max_workers``, else None (its cores, learnt when it connects). Within an
    ``Allocation``, ``max_workers`` takes that many of the granted workers.

    Raises:
        ValueError: ``max_workers`` is more than an allocation granted.
    """
    if isinstance(hosts, Allocation) and total is not None:
        return list(hosts.fit(total))
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
    parsed = specs if isinstance(specs, Allocation) else [parse_host(s) for s in specs]
    labels = [h.label for h in parsed]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"host {twice[0]} is listed twice; use Host(..., workers=N) instead")
    kinds = {h.transport or transport for h in parsed if not h.is_local}
    if "asyncssh" in kinds:  # imported only when a host uses it
        from .._transports.asyncssh import SSHTransport
    if "openssh" in kinds:
        from .._transports.openssh import OpenSSHTransport
    if "srun" in kinds:
        from .._transports.srun import SrunTransport

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
