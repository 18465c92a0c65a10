"""sshexec: a drop-in ``concurrent.futures.ProcessPoolExecutor`` whose workers run on
other machines over SSH (or as local subprocesses when no hosts are given).

Public names only; see ``SSHPoolExecutor`` and ``Pool``; the joblib backend is
``sshexec.joblib``. Must not import asyncssh (it is imported only when an executor has
remote hosts), nor joblib or scikit-learn.
"""

from __future__ import annotations

from ._errors import (
    ActorDiedError,
    BrokenPool,
    CallDecodeError,
    ProtocolError,
    PythonVersionError,
    RemoteError,
    ResultDecodeError,
    SSHExecError,
    TaskKilled,
    TaskMemoryError,
    TaskTimeout,
    WorkerLostError,
    WorkerStartupError,
)
from ._executor import SSHPoolExecutor
from ._hosts import Host, allocation, expand_hostlist, parse_host, read_hosts
from ._layers import joblib_hook as _joblib_hook
from ._layers.mppool import Pool
from ._progress import progress
from ._stats import ActorInfo, HostStats, Stats, WorkerStats

__version__ = "0.2.0"

_joblib_hook.offer()  # joblib already loaded: backend="sshexec" is found on first use

__all__ = [
    "ActorDiedError",
    "ActorInfo",
    "BrokenPool",
    "CallDecodeError",
    "Host",
    "HostStats",
    "Pool",
    "ProtocolError",
    "PythonVersionError",
    "RemoteError",
    "ResultDecodeError",
    "SSHExecError",
    "SSHPoolExecutor",
    "Stats",
    "TaskKilled",
    "TaskMemoryError",
    "TaskTimeout",
    "WorkerLostError",
    "WorkerStartupError",
    "WorkerStats",
    "__version__",
    "allocation",
    "expand_hostlist",
    "parse_host",
    "progress",
    "read_hosts",
]
