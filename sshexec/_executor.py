"""``SSHPoolExecutor``: the public executor, its arguments, Futures and loop thread.

Owns: argument checks and host specs, pickling calls, task ids, Futures, the
``map`` iterator, the daemon loop thread that runs the pool, and the hooks that
shut forgotten executors down (garbage collection and interpreter exit). Builds
the transports (importing ``_ssh``, hence asyncssh, only for remote hosts) and
hands them to ``_pool``. Must not touch: bytes, frames, asyncssh, or placement.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import logging
import os
import re
import sys
import threading
import time
import weakref
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

import cloudpickle

from ._pool import STARTUP_TIMEOUT, Pool, Task
from ._protocol import DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT
from ._worker import process_chunk

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from ._transport import Transport

    P = ParamSpec("P")

T = TypeVar("T")
log = logging.getLogger("sshexec.executor")

HOSTS_ENV = "SSHEXEC_HOSTS"
FRAME_OVERHEAD = 64  # msgpack envelope around a Run payload, generously
_loop_ids = itertools.count()
_live: Set[_Runtime] = set()  # runtimes whose loop thread still runs; drained at exit
_exiting = False  # the interpreter is shutting down: no new work


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


def _share(total: Optional[int], hosts: Sequence[Host]) -> List[Optional[int]]:
    """Worker count per host: its own ``workers``, else a round-robin share of
    ``max_workers``, else None (its cores, learnt when it connects)."""
    open_hosts = [i for i, h in enumerate(hosts) if h.workers is None]
    counts: List[Optional[int]] = [h.workers for h in hosts]
    if total is not None and open_hosts:
        left = max(total - sum(h.workers or 0 for h in hosts), 0)
        for rank, index in enumerate(open_hosts):
            counts[index] = left // len(open_hosts) + (1 if rank < left % len(open_hosts) else 0)
    return counts


def _write_remote_output(worker_id: str, line: bytes) -> None:
    try:
        sys.stderr.write(f"[{worker_id}] {line.decode('utf-8', 'replace')}")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr closed or replaced: drop the line
        pass


class _Runtime:
    """The loop thread and its pool. Holds no reference to the executor, so a
    forgotten executor can be collected and its finalizer can shut this down."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self._run, name=f"sshexec-loop-{next(_loop_ids)}", daemon=True
        )
        self.pool: Optional[Pool] = None
        self.closing: Optional[Future[None]] = None
        self.lock = threading.Lock()  # the only lock: guards the flags below
        self.is_shut_down = False
        self.thread.start()
        _live.add(self)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            while True:
                try:
                    self.loop.run_forever()
                    break  # stopped by _close or abandon
                except BaseException:  # SystemExit in a done-callback (user code): keep serving
                    log.exception(
                        "an exception escaped the executor's event loop; it keeps running"
                    )
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.wait(pending, timeout=2.0))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()
                _live.discard(self)

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self.lock:
            first = not self.is_shut_down
            self.is_shut_down = True
            if self.loop.is_closed():
                return
            if first:
                self.closing = asyncio.run_coroutine_threadsafe(
                    self._close(cancel_futures), self.loop
                )
            elif cancel_futures and self.pool is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.pool.cancel_queued)
        if wait and self.closing is not None:
            if self.on_loop_thread():
                raise RuntimeError(
                    "shutdown(wait=True) called from the executor's own loop thread (a Future "
                    "callback?): it would wait for itself; use shutdown(wait=False) there"
                )
            self.closing.result()
            self.thread.join(10.0)

    async def _close(self, cancel_futures: bool) -> None:
        try:
            if self.pool is not None:
                await self.pool.aclose(cancel_futures)
        except Exception:  # still stop the loop; say why the close was not clean
            log.exception("error while shutting down the pool")
        finally:
            self.loop.call_soon(self.loop.stop)

    def abandon(self) -> None:
        """The constructor failed: stop the loop and thread at once."""
        with self.lock:
            self.is_shut_down = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)


def _shutdown_at_exit() -> None:
    # As ProcessPoolExecutor: pending work finishes, then workers stop on every host, and
    # submit() refuses new work from here on.
    global _exiting
    _exiting = True
    for runtime in list(_live):
        try:
            runtime.shutdown(wait=True)
        except Exception:  # keep shutting the others down
            log.exception("error shutting down an executor at exit")


# Like concurrent.futures: before non-daemon threads are joined and before atexit hooks,
# so a hook registered later cannot submit to a pool that is going away.
getattr(threading, "_register_atexit", atexit.register)(_shutdown_at_exit)


class SSHPoolExecutor(Executor):
    """A ``ProcessPoolExecutor`` whose workers run on other machines over SSH.

    With no ``hosts`` (and ``SSHEXEC_HOSTS`` unset) the workers are local
    subprocesses speaking the same protocol, so this is a drop-in
    ``ProcessPoolExecutor`` anywhere. All methods are thread-safe.

    Args:
        max_workers: Total worker processes. None: one per usable core of each host
            (of this machine when local). Split evenly over hosts without their own
            ``Host(workers=...)``.
        mp_context: Accepted for compatibility with ``ProcessPoolExecutor``; ignored.
        initializer: Called as ``initializer(*initargs)`` in each worker before its first task.
            If it raises, that host is given up; when no host is left the pool is broken.
        initargs: Arguments for ``initializer``.
        max_tasks_per_child: Replace each worker after this many tasks.
        hosts: ``"[user@]host[:port]"`` strings or ``Host`` values. None reads
            ``SSHEXEC_HOSTS`` (comma-separated); when that is unset too, workers are local.
        python: Remote interpreter for hosts without ``Host(python=...)``.
        known_hosts: known_hosts file to check host keys against (default: ssh's).
        unsafe_skip_host_key_check: Accept any host key. UNSAFE: anyone on the path can
            impersonate the node and run code on, or read data from, your job.
        connect_timeout: Seconds to wait for each SSH connection and login.
        keepalive_interval: Seconds between SSH keepalives (3 unanswered end the connection).
        max_retries: How many more times a task is run when the worker running it dies
            (default 1). Exceptions raised by the callable are never retried.
        prefetch: Tasks kept in flight per worker so the link never idles (default 2).
        max_frame: Largest pickled call or result, in bytes (default 1 GiB).
        shutdown_grace: Seconds a worker gets to exit after shutdown before it is killed.
        ssh_options: Extra keyword arguments for every ``asyncssh.connect``.

    Raises:
        ValueError, TypeError: Invalid arguments, including malformed host specs.
        WorkerStartupError: The only host cannot start a worker (names host, stage, fix).
        BrokenPool: No host of several can start a worker (lists each host's reason).
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        mp_context: Any = None,
        initializer: Optional[Callable[..., object]] = None,
        initargs: Tuple[Any, ...] = (),
        *,
        max_tasks_per_child: Optional[int] = None,
        hosts: Optional[Iterable[Union[str, Host]]] = None,
        python: Optional[str] = None,
        known_hosts: Optional[str] = None,
        unsafe_skip_host_key_check: bool = False,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 10.0,
        max_retries: int = 1,
        prefetch: int = 2,
        max_frame: int = DEFAULT_MAX_FRAME,
        shutdown_grace: float = 5.0,
        ssh_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        del mp_context  # processes are started by SSH or subprocess, not multiprocessing
        if max_workers is not None:
            if not isinstance(max_workers, int) or isinstance(max_workers, bool):
                raise TypeError("max_workers must be an int or None")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        for name, value in (("max_retries", max_retries), ("prefetch", prefetch)):
            if not isinstance(value, int) or value < (0 if name == "max_retries" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'max_retries' else 1}")
        if not isinstance(max_frame, int) or not 1024 <= max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be an int in 1024..{MAX_FRAME_LIMIT}")
        for name, number in (
            ("connect_timeout", connect_timeout),
            ("keepalive_interval", keepalive_interval),
            ("shutdown_grace", shutdown_grace),
        ):
            if not isinstance(number, (int, float)) or number <= 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        specs: Optional[List[Union[str, Host]]] = None
        if hosts is not None:
            specs = list(hosts)
        elif (from_env := hosts_from_env()) is not None:
            specs = list(from_env)
        if specs is not None and not specs:
            raise ValueError("hosts is empty: give at least one host, or None for local workers")
        transports = self._transports(
            specs,
            max_workers,
            python,
            known_hosts,
            unsafe_skip_host_key_check,
            connect_timeout,
            keepalive_interval,
            ssh_options,
        )
        init_payload = cloudpickle.dumps((initializer, tuple(initargs))) if initializer else b""
        self._max_frame = max_frame
        self._task_ids = itertools.count(1)
        self._runtime = _Runtime()
        pool_args = dict(
            initializer=init_payload,
            max_tasks_per_child=max_tasks_per_child,
            prefetch=prefetch,
            max_retries=max_retries,
            max_frame=max_frame,
            shutdown_grace=shutdown_grace,
            output=_write_remote_output,
        )
        try:
            self._pool: Pool = self._runtime.call(
                self._start_pool(self._runtime, transports, pool_args),
                timeout=connect_timeout * 2 + STARTUP_TIMEOUT + 10,
            )
        except BaseException:
            self._runtime.abandon()
            raise
        self._hosts = [h.name for h in self._pool.hosts if h.is_usable]
        self._max_workers = sum(h.workers or 0 for h in self._pool.hosts if h.is_usable)
        weakref.finalize(self, self._runtime.shutdown, False)

    @staticmethod
    def _transports(
        specs: Optional[List[Union[str, Host]]],
        max_workers: Optional[int],
        python: Optional[str],
        known_hosts: Optional[str],
        unsafe: bool,
        connect_timeout: float,
        keepalive_interval: float,
        ssh_options: Optional[Mapping[str, Any]],
    ) -> List[Tuple[Transport, Optional[int], str]]:
        if specs is None:
            from ._transport import LocalTransport

            return [
                (LocalTransport(python), max_workers or local_cpu_count(), python or sys.executable)
            ]
        parsed = [parse_host(s) for s in specs]
        labels = [h.label for h in parsed]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"host {twice[0]} is listed twice; use Host(..., workers=N) instead")
        from ._bootstrap import interpreters
        from ._ssh import SSHTransport  # asyncssh is imported only when there are remote hosts

        built: List[Tuple[Transport, Optional[int], str]] = []
        for host, count in zip(parsed, _share(max_workers, parsed)):
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

    @staticmethod
    async def _start_pool(runtime: _Runtime, transports: Any, pool_args: Dict[str, Any]) -> Pool:
        pool = Pool(transports, **pool_args)
        runtime.pool = pool
        try:
            await pool.start()
        except BaseException:
            await pool.aclose(cancel_futures=True)
            raise
        return pool

    def __repr__(self) -> str:
        state = "shut down" if self._runtime.is_shut_down else "running"
        return f"<SSHPoolExecutor {state} workers={self._max_workers} hosts={self._hosts}>"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on a worker and return its Future.

        A call that cannot be pickled, or is larger than ``max_frame``, fails its own
        Future and leaves the pool healthy. Thread-safe; never waits for the loop, so
        done-callbacks may call it.

        Raises:
            RuntimeError: After ``shutdown()``.
            BrokenPool: When no usable worker is left on any host.
        """
        future: Future[T] = Future()
        failure: Optional[BaseException] = None
        try:
            payload = cloudpickle.dumps((fn, args, kwargs))
        except Exception as exc:  # an unpicklable call fails its own Future, not the pool
            payload, failure = b"", exc
        if failure is None and len(payload) > self._max_frame - FRAME_OVERHEAD:
            failure = ValueError(
                f"the pickled call is {len(payload)} bytes, over max_frame={self._max_frame}; "
                "send less data per call or raise max_frame"
            )
        runtime = self._runtime
        with runtime.lock:
            if runtime.is_shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if self._pool.broken is not None:
                raise self._pool.broken
            if failure is None:
                task = Task(next(self._task_ids), payload, future)
                runtime.loop.call_soon_threadsafe(self._pool.enqueue, task)
        if failure is not None:
            future.set_exception(failure)
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
    ) -> Iterator[T]:
        """Like ``ProcessPoolExecutor.map``: results in input order, ``timeout`` counted
        from this call, exceptions raised when their result is reached.

        Args:
            chunksize: Items sent to a worker per task.
            buffersize: At most this many tasks (chunks) submitted ahead of the consumer,
                so huge or endless iterables are read lazily (Python 3.14's ``buffersize``).

        Raises:
            TimeoutError: When a result is not ready ``timeout`` seconds after the call.
        """
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls: Iterator[Tuple[Any, ...]] = zip(*iterables)
        if chunksize == 1:
            return self._map_futures(fn, calls, deadline, buffersize)
        chunks = ((fn, chunk) for chunk in _chunks(calls, chunksize))
        return _flatten(self._map_futures(process_chunk, chunks, deadline, buffersize))

    def _map_futures(
        self,
        fn: Callable[..., T],
        calls: Iterator[Tuple[Any, ...]],
        deadline: Optional[float],
        buffersize: Optional[int],
    ) -> Iterator[T]:
        window = buffersize if buffersize is not None else sys.maxsize
        futures: Deque[Future[T]] = collections.deque(
            self.submit(fn, *args) for args in itertools.islice(calls, window)
        )
        executor = weakref.ref(self)  # an abandoned iterator must not keep the executor alive
        runtime = self._runtime
        del self

        def results() -> Iterator[T]:
            try:
                while futures:
                    if buffersize is not None:
                        owner = executor()
                        args = next(calls, None) if owner is not None else None
                        if owner is not None and args is not None:
                            futures.append(owner.submit(fn, *args))
                        del owner
                    if runtime.on_loop_thread():
                        raise RuntimeError(
                            "map results cannot be waited for on the executor's loop thread"
                        )
                    left = None if deadline is None else deadline - time.monotonic()
                    yield _result_or_cancel(futures.popleft(), left)
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; pending tasks finish (or are cancelled when
        ``cancel_futures``), then every worker, channel, connection and the loop thread
        end. With ``wait`` it returns when all of that is done. Thread-safe; may be
        called more than once.

        Raises:
            RuntimeError: ``wait=True`` from the executor's own loop thread.
        """
        self._runtime.shutdown(wait, cancel_futures)

    def kill_workers(self) -> None:
        """Kill every worker process now (Python 3.14's API) and shut down; Futures of
        running tasks fail and are not retried."""
        self._terminate()

    def terminate_workers(self) -> None:
        """As ``kill_workers``: SIGKILL is the only signal every sshd forwards."""
        self._terminate()

    def _terminate(self) -> None:
        runtime = self._runtime
        if not runtime.is_shut_down and not runtime.loop.is_closed():
            runtime.loop.call_soon_threadsafe(self._pool.terminate)
        self.shutdown(wait=True, cancel_futures=True)


def _chunks(calls: Iterator[Tuple[Any, ...]], size: int) -> Iterator[Tuple[Tuple[Any, ...], ...]]:
    while chunk := tuple(itertools.islice(calls, size)):
        yield chunk


def _flatten(chunks: Iterator[List[T]]) -> Iterator[T]:
    for chunk in chunks:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


def _result_or_cancel(future: Future[T], timeout: Optional[float]) -> T:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # drop the reference before the consumer sees the value
