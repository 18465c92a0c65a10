"""Where hosts come from: ``spec`` (``Host``, ``parse_host``), ``files`` (host files),
``allocation`` (the hosts a batch scheduler granted: Slurm, PBS, LSF, SGE), ``hostlist``
(Slurm's hostlist syntax, pure) and ``resolve`` (the executor's ``hosts`` argument,
``SSHEXEC_HOSTS``, sharing ``max_workers``, one transport per host). Must not import:
asyncio, the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .allocation import Allocation, allocation
from .files import read_hosts
from .hostlist import compress_hostlist, expand_hostlist
from .resolve import (
    FROM_ALLOCATION,
    HOSTS_ENV,
    allocation_from_env,
    build_transports,
    hosts_from_env,
    local_cpu_count,
    resolve_hosts,
    share_workers,
)
from .spec import LOCAL, TRANSPORTS, Host, parse_host

if TYPE_CHECKING:
    from .resolve import HostsArg

__all__ = [
    "FROM_ALLOCATION",
    "HOSTS_ENV",
    "LOCAL",
    "TRANSPORTS",
    "Allocation",
    "Host",
    "HostsArg",
    "allocation",
    "allocation_from_env",
    "build_transports",
    "compress_hostlist",
    "expand_hostlist",
    "hosts_from_env",
    "local_cpu_count",
    "parse_host",
    "read_hosts",
    "resolve_hosts",
    "share_workers",
]
