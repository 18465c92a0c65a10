"""Small functions that ``sshexec.Pool`` and the joblib backend run on the workers.

They travel by value (this module is registered with ``cloudpickle.register_pickle_by_value``
by its users), so a node needs no copy of sshexec: only the standard library is used here.
Must not import: any sshexec module, or anything beyond the standard library.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

# What joblib's process backends limit in their workers (its MAX_NUM_THREADS_VARS).
THREAD_VARS: Tuple[str, ...] = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
TBB_IPC_VAR = "ENABLE_IPC"
# Set per host (Host.env) by the joblib backend when it knows the host's worker count.
HOST_WORKERS_VAR = "SSHEXEC_HOST_WORKERS"


def map_chunk(fn: Callable[[Any], Any], items: Iterable[Any]) -> List[Any]:
    """One ``Pool.map`` task: ``fn`` applied to each item of a chunk."""
    return [fn(item) for item in items]


def starmap_chunk(fn: Callable[..., Any], items: Iterable[Sequence[Any]]) -> List[Any]:
    """One ``Pool.starmap`` task: ``fn(*args)`` for each argument tuple of a chunk."""
    return [fn(*args) for args in items]


def _cpus() -> int:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        return len(getaffinity(0)) or 1
    return os.cpu_count() or 1


def limit_threads(
    explicit: Optional[int],
    client_values: Mapping[str, str],
    default_workers: Optional[int],
    then: Optional[Callable[..., object]] = None,
    then_args: Tuple[Any, ...] = (),
) -> None:
    """A joblib worker's initializer: cap the native thread pools (OpenMP, BLAS, ...) at
    the worker's share of its host's cores before any of them is loaded.

    ``explicit`` (``inner_max_num_threads``) wins; else a variable this worker already has
    (from ``Host(env=...)``, the node's environment, or inherited by a local worker) is
    kept; else the client's own value; else ``max(cores // workers on this host, 1)``.
    Then the user's initializer, if any, runs.
    """
    workers = int(os.environ.get(HOST_WORKERS_VAR) or default_workers or _cpus())
    share = str(explicit if explicit is not None else max(_cpus() // max(workers, 1), 1))
    for name in THREAD_VARS:
        if explicit is not None:
            os.environ[name] = share
        elif name not in os.environ:
            os.environ[name] = client_values.get(name, share)
    os.environ.setdefault(TBB_IPC_VAR, "1")  # TBB schedulers coordinate across processes
    if then is not None:
        then(*then_args)
