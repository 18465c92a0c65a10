"""The executors compared, each behind a factory that builds a 2-worker instance.

``sshexec-ssh`` (workers over SSH to loopback sshd processes through asyncssh),
``sshexec-openssh`` (the same through the ``ssh`` binary), ``sshexec-local``
(``hosts=None``), ``ppe`` (``ProcessPoolExecutor``, default start method) and
``ppe-spawn`` (start-up only), plus ``loky``, ``dask`` and ``execnet`` when importable, and
two pseudo-contenders that workloads special-case: ``raw`` (a bare asyncssh
channel) and ``serial`` (one process, the CPU-bound baseline).
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import sys
import warnings
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from sshexec import SSHPoolExecutor

from .execnet_peer import ExecnetExecutor
from .sshd import ADDRESS, Client
from .tasks import run_chunk

WORKERS = 2
Factory = Callable[[], Executor]


@dataclass
class Contender:
    name: str
    label: str
    kind: str  # sshexec | ppe | loky | dask | raw | serial
    factory: Optional[Factory] = None
    task_scale: float = 1.0  # share of per-task workload sizes it runs (slow per-task paths)
    chunked_map: bool = True  # map honours chunksize
    only: Tuple[str, ...] = ()  # workloads it takes part in; empty: all that fit its kind
    executor: Optional[Executor] = None
    failures: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def is_executor(self) -> bool:
        return self.factory is not None

    def get(self) -> Executor:
        """The long-lived instance the throughput workloads share (built on first use)."""
        if self.executor is None:
            assert self.factory is not None
            self.executor = self.factory()
        return self.executor

    def discard(self) -> None:
        """Drop a broken or finished instance without waiting on it."""
        executor, self.executor = self.executor, None
        if executor is not None:
            try:
                executor.shutdown(wait=False, cancel_futures=True)
            except Exception as exc:  # a broken pool may refuse; nothing to save
                self.notes.append(f"shutdown after failure raised {type(exc).__name__}: {exc}")


class DaskExecutor(Executor):
    """Dask distributed behind the ``Executor`` interface: ``pure=False`` so equal
    arguments are not deduplicated, ``map`` as ``client.map`` + ``gather`` (its
    fastest path). Dask's own ``ClientExecutor.map`` ignores ``chunksize``; here a
    chunksize above 1 is honoured by batching the items into lists by hand."""

    def __init__(self, ssh: Optional[Tuple[Client, int]]) -> None:
        import dask
        from distributed import Client as DaskClient
        from distributed import LocalCluster, SSHCluster

        dask.config.set(
            {"distributed.worker.profile.enabled": False, "distributed.worker.daemon": False}
        )
        cluster: Any
        if ssh is not None:
            client, port = ssh
            cluster = SSHCluster(
                [ADDRESS] * (WORKERS + 1),  # the scheduler, then one worker per entry
                connect_options=client.connect_options(port),
                worker_options={"nthreads": 1, "n_workers": 1, "host": ADDRESS},
                scheduler_options={"host": ADDRESS, "port": 0, "dashboard": False},
                remote_python=sys.executable,
            )
        else:
            cluster = LocalCluster(
                n_workers=WORKERS,
                threads_per_worker=1,
                processes=True,
                host=ADDRESS,
                dashboard_address=None,
            )
        self.cluster = cluster
        self.client = DaskClient(cluster)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Any = self.client.submit(fn, *args, pure=False, **kwargs)
        return future  # a distributed.Future: result(timeout) as concurrent.futures

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
    ) -> Iterator[Any]:
        from distributed import wait

        if chunksize > 1 and len(iterables) == 1:  # batch by hand: client.map has no chunksize
            items = list(iterables[0])
            chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
            futures = self.client.map(functools.partial(run_chunk, fn), chunks, pure=False)
            wait(futures, timeout=timeout)
            return itertools.chain.from_iterable(self.client.gather(futures))
        futures = self.client.map(fn, *iterables, pure=False)
        wait(futures, timeout=timeout)
        return iter(self.client.gather(futures))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        try:
            self.client.close(timeout=10)
        finally:
            self.cluster.close(timeout=10)


def _quiet_dask() -> None:
    import distributed  # its import configures logging: quieten after it

    del distributed
    for name in ("distributed", "asyncssh", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*Large object.*")
    warnings.filterwarnings("ignore", message=".*Sending large graph.*")
    warnings.filterwarnings("ignore", category=ResourceWarning)


def importable(name: str) -> Optional[str]:
    """The module's version if it imports, else None."""
    try:
        module = __import__(name)
    except Exception:
        return None
    return str(getattr(module, "__version__", "?"))


def build(
    client: Optional[Client], ports: List[int], numpy_ok: bool, notes: List[str]
) -> List[Contender]:
    """Every contender this machine can run; what is left out goes into ``notes``."""
    found: List[Contender] = []
    if client is not None and ports:
        kwargs = client.executor_kwargs(ports)
        where = f"{len(ports)} loopback sshd" if len(ports) > 1 else "1 loopback sshd"
        found.append(
            Contender(
                "sshexec-ssh",
                f"SSHPoolExecutor over SSH ({WORKERS} workers, {where})",
                "sshexec",
                lambda: SSHPoolExecutor(WORKERS, **kwargs),
            )
        )
        found.append(
            Contender(
                "sshexec-openssh",
                f"SSHPoolExecutor transport='openssh' ({WORKERS} workers, {where}, ssh binary)",
                "sshexec",
                lambda: SSHPoolExecutor(WORKERS, transport="openssh", **kwargs),
            )
        )
    else:
        notes.append("sshexec-ssh, sshexec-openssh and raw skipped: no OpenSSH sshd")
    found.append(
        Contender(
            "sshexec-local",
            f"SSHPoolExecutor hosts=None ({WORKERS} local workers)",
            "sshexec",
            lambda: SSHPoolExecutor(WORKERS),
        )
    )
    method = multiprocessing.get_start_method()
    found.append(
        Contender(
            "ppe",
            f"ProcessPoolExecutor ({WORKERS} workers, default start method: {method})",
            "ppe",
            lambda: ProcessPoolExecutor(WORKERS),
        )
    )
    spawn = multiprocessing.get_context("spawn")
    found.append(
        Contender(
            "ppe-spawn",
            f"ProcessPoolExecutor ({WORKERS} workers, spawn)",
            "ppe",
            lambda: ProcessPoolExecutor(WORKERS, mp_context=spawn),
            only=("startup",),
        )
    )
    if (version := importable("loky")) is not None:
        import loky

        found.append(
            Contender(
                "loky",
                f"loky.ProcessPoolExecutor {version} ({WORKERS} workers)",
                "loky",
                lambda: loky.ProcessPoolExecutor(WORKERS),
            )
        )
    else:
        notes.append("loky skipped: not installed (pip install -e '.[bench]')")
    if (version := importable("distributed")) is not None:
        _quiet_dask()
        ssh = (client, ports[0]) if client is not None and ports else None
        where = "SSHCluster over loopback sshd" if ssh else "LocalCluster, processes"
        found.append(
            Contender(
                "dask",
                f"dask.distributed {version} {where} ({WORKERS} workers x 1 thread)",
                "dask",
                lambda: DaskExecutor(ssh),
                task_scale=0.1,
                notes=["map chunksize emulated by batching; per-task rows run 1/10 of N"],
            )
        )
    else:
        notes.append("dask skipped: distributed not installed (pip install -e '.[bench]')")
    if client is not None and ports and (version := importable("execnet")) is not None:
        root = client.key.parent
        found.append(
            Contender(
                "execnet",
                f"execnet {version} over ssh ({WORKERS} gateways via the ssh client, "
                "pipelined send/receive loops; no numpy)",
                "execnet",
                lambda: ExecnetExecutor(client, ports, WORKERS, root),
            )
        )
    elif client is not None and ports:
        notes.append("execnet skipped: not installed (pip install -e '.[bench]')")
    if client is not None and ports:
        found.append(
            Contender(
                "raw",
                "raw asyncssh channel (aes128-gcm, same sshd): the link's own limit",
                "raw",
            )
        )
    found.append(Contender("serial", "one process, no pool", "serial", only=("cpu",)))
    if not numpy_ok:
        notes.append("numpy rows skipped: numpy not installed")
    return found


def dask_fallback(contender: Contender, reason: str) -> None:
    """SSHCluster failed on loopback: use a LocalCluster and say so in the label."""
    contender.notes.append(f"SSHCluster failed ({reason}); fell back to LocalCluster")
    contender.label = contender.label.replace("SSHCluster over loopback sshd", "LocalCluster")
    contender.factory = lambda: DaskExecutor(None)


def settle(executor: Executor, workers: int, timeout: float = 60.0) -> Dict[str, Any]:
    """Run small tasks until ``workers`` distinct worker processes have answered."""
    import time

    from .tasks import sleep_for

    deadline = time.monotonic() + timeout
    pids: set[int] = set()
    while len(pids) < workers and time.monotonic() < deadline:
        left = max(1.0, deadline - time.monotonic())
        pids.update(executor.map(sleep_for, [0.02] * (workers * 3), timeout=left))
    return {"workers_seen": len(pids), "seconds": timeout - max(0.0, deadline - time.monotonic())}
