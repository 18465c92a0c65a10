"""``SSHPoolExecutor``: the public executor, its arguments and its methods.

Owns: argument checks and wiring the parts: transports from ``_hosts``, the loop thread
from ``_loop``'s ``Runtime``, the ``Pool`` run on it, the ``Submitter`` that makes
calls into tasks (``_submitting``: pickling, task ids, Futures, ``map``), the actors'
door (``_layers.actors``), ``options()`` views, and the finalizer that shuts a forgotten
executor down. Must not touch: bytes, frames, asyncssh, or placement.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import weakref
from concurrent.futures import Executor, Future
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
)

from ._config import Settings
from ._hosts import build_transports, resolve_hosts
from ._layers.actors import ActorDoor, ActorProxy, new_actor
from ._layers.options import KEEP, Limits, Memory, Options, derive, task_limits
from ._logs import logger
from ._loop import Runtime, on_loop
from ._output import OutputRouter
from ._pool.link import STARTUP_TIMEOUT
from ._pool.pool import Pool
from ._pool.staging import STAGING_RATE, from_options, paths_of, scan
from ._pool.supervisor import snapshot
from ._progress import follow
from ._stats import ActorInfo, Stats
from ._submitting import Submitter
from ._wire.calls import carried_code, serialize
from ._wire.protocol import DEFAULT_MAX_FRAME

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from ._hosts import HostsArg

    P = ParamSpec("P")

T = TypeVar("T")
log = logger("sshexec.executor")


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
        hosts: ``"[N/][user@]host[:port]"`` strings or ``Host`` values (``":"`` is this
            machine); a str is a comma-separated list; ``"@path"`` or a ``pathlib.Path``
            is a host file (see ``read_hosts``); ``sshexec.allocation()`` is the nodes of
            the batch job this runs in, as granted. None reads ``SSHEXEC_HOSTS`` the same
            way (``allocation`` there: the batch job's nodes); when that is unset too,
            workers are local.
        python: Remote interpreter for hosts without ``Host(python=...)``.
        known_hosts: known_hosts file to check host keys against (default: ssh's).
        unsafe_skip_host_key_check: Accept any host key. UNSAFE: anyone on the path can
            impersonate the node and run code on, or read data from, your job.
        connect_timeout: Seconds to wait for each SSH connection and login.
        keepalive_interval: Seconds between SSH keepalives (3 unanswered end the connection).
        max_retries: How many more times a task is run when the worker running it dies
            (default 1). Exceptions raised by the callable are never retried.
        prefetch: Tasks kept in flight per worker so the link never idles (default 2).
        max_frame: Largest pickled call or result, in bytes (default 1 GiB). A call
            counts with every blob it names (a ``map``'s big function, objects shared
            with ``share``): the call and those blobs must fit in ``max_frame`` together.
        shutdown_grace: Seconds a worker gets to exit after shutdown before it is killed.
        reconnect_grace: Seconds a host that went away is waited for (reconnecting with
            backoff) before its tasks fail or, with no host left, the pool is broken.
        ssh_options: Extra keyword arguments for every ``asyncssh.connect``. With
            ``transport="openssh"`` the ones ssh has an equivalent for are translated
            (``client_keys``, ``config``, ``agent_path``, ``known_hosts``, ``username``,
            ``port``, ...); any other is a ``ValueError`` naming it.
        transport: What carries the bytes to remote hosts: ``"asyncssh"`` (default; SSH
            in this process) or ``"openssh"`` (one ``ssh`` client process per worker:
            encryption outside this process's GIL, and everything ``ssh`` honours, from
            ``~/.ssh/config`` and ``Match exec`` to certificates, GSSAPI and hardware
            keys); or ``"srun"`` (inside a Slurm allocation: the agent is a job step on
            the node the host names, no sshd needed). ``Host(transport=...)`` and a host
            file's ``transport=`` choose per host.
        forward_modules: When a worker cannot import a module a call needs (your project's
            ``utils.py``), send it the module's pure-Python source from this process
            (default True). A missing package with compiled code fails with an error
            naming the package, host and remote interpreter instead.
        remote_output: Where tasks' ``print()`` and ``sys.stderr`` lines go: ``"prefix"``
            (default: this process's stdout/stderr, each line prefixed ``[host:N]``),
            ``"plain"`` (the same without the prefix) or ``"logging"`` (only to the
            ``sshexec.remote`` logger). Tasks' ``logging`` records are always re-emitted
            in this process's ``logging`` with ``host`` and ``worker`` attributes.
        files: Files and directory trees (paths relative to this process's working
            directory) to put on every host before its first worker starts, at the same
            relative paths in the workers' working directory, so code that opens
            ``data/run42/a.h5`` runs unchanged. Each host keeps their contents in its
            cache (``~/.cache/sshexec``, or ``$XDG_CACHE_HOME/sshexec``; LRU, 10 GiB
            unless ``SSHEXEC_CACHE_SIZE`` says otherwise) by SHA-256: what a host already
            has is not sent again, in this executor or the next. Staged files are read-only
            on the nodes (one copy shared by the host's workers); symlinks inside a tree
            are kept, one leading outside it is a ``ValueError``. Given (even as ``[]``),
            or with ``return_files``, each worker runs in a directory of its own (instead
            of the host's ``cwd``), under a per-executor directory that is removed at
            shutdown; see ``send_files``.
        return_files: Glob patterns relative to the workers' working directory
            (``["out/*.npz"]``): files a task creates or changes that match are written
            to the same relative path here when the task ends, before its Future
            resolves. A second task bringing back the same path fails its Future with
            ``FileExistsError``; a match leading outside the working directory fails it
            with ``PermissionError``.
        task_timeout: Seconds each task may run on its worker (None: no limit). A task
            past it fails with ``TaskTimeout``: the host's agent kills its worker with
            every process it started, and starts a fresh one; never retried. The node
            keeps the time, so it holds across a slow link.
        task_memory: Resident memory each task's worker may use, with every process the
            task started: bytes, or ``"500M"``, ``"2G"`` (powers of 1024). Past it the
            task fails with ``TaskMemoryError`` (measured by the node's agent every 20
            ms; Linux). See ``options()`` for limits on some calls only.

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
        hosts: Optional[HostsArg] = None,
        python: Optional[str] = None,
        known_hosts: Optional[str] = None,
        unsafe_skip_host_key_check: bool = False,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 10.0,
        max_retries: int = 1,
        prefetch: int = 2,
        max_frame: int = DEFAULT_MAX_FRAME,
        shutdown_grace: float = 5.0,
        reconnect_grace: float = 60.0,
        ssh_options: Optional[Mapping[str, Any]] = None,
        transport: str = "asyncssh",
        forward_modules: bool = True,
        remote_output: str = "prefix",
        files: Optional[Iterable[Any]] = None,
        return_files: Iterable[str] = (),
        task_timeout: Optional[float] = None,
        task_memory: Memory = None,
    ) -> None:
        del mp_context  # processes are started by SSH or subprocess, not multiprocessing
        Settings(  # raises TypeError or ValueError for a bad argument
            max_workers,
            initializer,
            max_tasks_per_child,
            connect_timeout,
            keepalive_interval,
            max_retries,
            prefetch,
            max_frame,
            shutdown_grace,
            reconnect_grace,
            transport,
            bool(forward_modules),
        )
        self._limits: Limits = task_limits(task_timeout, task_memory)  # raises if invalid
        output = OutputRouter(remote_output)  # validates remote_output
        staging = from_options(files, return_files)
        specs = resolve_hosts(hosts)
        transports = build_transports(
            specs,
            max_workers,
            python,
            known_hosts,
            unsafe_skip_host_key_check,
            connect_timeout,
            keepalive_interval,
            ssh_options,
            transport,
        )
        init_payload = b""
        other_init: Optional[bytes] = b""
        if initializer:
            init_payload = other_init = serialize((initializer, tuple(initargs)))
            if carried_code():  # for a host of another Python: by reference, if it can be
                portable = serialize((initializer, tuple(initargs)), portable=True)
                other_init = None if carried_code() else portable
        self._max_frame = max_frame
        self._runtime = Runtime(shutdown_grace)
        pool_args = dict(
            initializer=init_payload,
            other_initializer=other_init,
            max_tasks_per_child=max_tasks_per_child,
            prefetch=prefetch,
            max_retries=max_retries,
            max_frame=max_frame,
            shutdown_grace=shutdown_grace,
            reconnect_grace=reconnect_grace,
            output=output,
            keepalive_interval=keepalive_interval,
            forward_modules=bool(forward_modules),
            log_level=logging.getLogger().getEffectiveLevel(),
            staging=staging,
        )
        timeout = connect_timeout * 2 + STARTUP_TIMEOUT + 10
        if staging is not None:  # the files go first: at 100 kB/s at least
            timeout += sum(e.size for e in staging.entries.values()) / STAGING_RATE
        try:
            starting = self._runtime.begin(self._start_pool(self._runtime, transports, pool_args))
            self._pool: Pool = (
                follow(starting, timeout, lambda: (staging.done, staging.total), "files to hosts")
                if staging is not None
                else starting.result(timeout)
            )
        except BaseException:
            self._runtime.abandon()
            raise
        self._hosts = [h.name for h in self._pool.hosts if h.is_usable]
        self._max_workers = sum(h.workers or 0 for h in self._pool.hosts if h.is_usable)
        self._actor_door = ActorDoor(self._runtime, self._pool, max_frame)
        self._submitter = Submitter(self._runtime, self._pool, max_frame, self._limits)
        weakref.finalize(self, self._runtime.shutdown, False)

    @staticmethod
    async def _start_pool(runtime: Runtime, transports: Any, pool_args: Dict[str, Any]) -> Pool:
        pool = Pool(transports, ender=runtime.ender, **pool_args)
        runtime.pool = pool
        try:
            await pool.start()
        except BaseException:
            await pool.aclose(cancel_futures=True)
            raise
        return pool

    def __repr__(self) -> str:
        state = "shut down" if self._runtime.is_shut_down else "running"
        hosts = ", ".join(
            f"{h.name}: {len(h.links)}/{h.workers or 0}"
            + (f" python {h.python_version}" if h.python_version else "")
            + ("" if h.is_usable else " (given up)")
            + (" (down)" if h.down_since is not None else "")
            for h in self._pool.hosts
        )
        live = sum(len(h.links) for h in self._pool.hosts)
        return f"<SSHPoolExecutor {state} workers={live}/{self._max_workers} hosts=[{hosts}]>"

    def stats(self, refresh: float = 1.0) -> Stats:
        """Per host and per worker: tasks done, failed and retried, busy seconds, mean
        task time, bytes each way and round-trip time. Thread-safe; also works after
        ``shutdown()`` (the numbers at the end).

        Args:
            refresh: Seconds to wait for a fresh ping of every worker (its round trip
                through SSH); 0 keeps the latest known round-trip times.
        """
        pool, runtime = self._pool, self._runtime
        if runtime.on_loop_thread():
            return snapshot(pool.hosts)
        if pool.final_stats is not None:
            return pool.final_stats
        try:
            result: Stats = runtime.call(pool.stats(refresh), timeout=refresh + 2.0)
        except (cf.TimeoutError, RuntimeError):  # the loop is closing or closed
            return pool.final_stats or snapshot(pool.hosts)
        return result

    def run_on_hosts(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Dict[str, Future[T]]:
        """Run ``fn(*args, **kwargs)`` once on every usable host (on one of its workers),
        e.g. to collect each machine's facts or warm a cache.

        Returns:
            Host name -> Future of that host's result. A host that is given up, or stays
            down past ``reconnect_grace``, fails its Future with ``BrokenPool``.

        Raises:
            RuntimeError: After ``shutdown()``.
        """
        return {
            host.name: self._submitter.submit(fn, args, kwargs, host.name)
            for host in self._pool.hosts
            if host.is_usable
        }

    def send_files(self, paths: Iterable[Any]) -> None:
        """Put more files and trees on every host, as ``files=`` does (changed files
        replace the old ones; unchanged contents are not sent again), and on every host
        that connects later. Returns when every host has them, so tasks submitted after
        it see them. Thread-safe; blocks the caller.

        Raises:
            RuntimeError: After ``shutdown()``, or when the executor was made without
                ``files=`` or ``return_files=`` (its workers have no directories of
                their own to put files in).
            FileNotFoundError, ValueError: As ``files=``.
            SSHExecError: Hosts that could not take them, each with the file and why.
        """
        staging = self._pool.staging
        if staging is None:
            raise RuntimeError(
                "send_files needs an executor made with files= (an empty list will do) "
                "or return_files="
            )
        if self._runtime.is_shut_down:
            raise RuntimeError("cannot send files after shutdown")
        entries = scan(paths_of(paths), staging.root)
        size = sum(e.size for e in entries)
        self._runtime.call(
            self._pool.send_files(entries), timeout=STARTUP_TIMEOUT + size / STAGING_RATE
        )

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on a worker and return its Future.

        A call that cannot be pickled, or is larger than ``max_frame``, fails its own
        Future and leaves the pool healthy. Thread-safe; never waits for the loop, so
        done-callbacks may call it.

        Raises:
            RuntimeError: After ``shutdown()``.
            BrokenPool: When no usable worker is left on any host.
        """
        future: Future[T] = self._submitter.submit(fn, args, kwargs, None)
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
        return self._submitter.map(fn, iterables, timeout, chunksize, buffersize, self._limits)

    def options(self, *, timeout: Any = KEEP, memory: Any = KEEP) -> Options:
        """A view of this executor whose ``submit`` and ``map`` give their tasks these
        limits instead of ``task_timeout`` / ``task_memory`` (a limit not given stays the
        executor's; None lifts it). The same pool: nothing is started, and the
        executor's own calls keep their limits. ``map``'s limits hold for each item.

        Raises:
            TypeError, ValueError: An invalid limit.
        """
        return Options(self, derive(self._limits, timeout, memory))

    def kill(self, future: Future[Any]) -> bool:
        """End one task now. A task still waiting for a worker is cancelled (as
        ``future.cancel()``); one sent to a worker fails with ``TaskKilled`` at once,
        and the host's agent kills its worker with every process it started as soon as
        it runs it (a fresh worker takes its place; other tasks run on). ``map``'s items
        are not Futures and cannot be killed: give the map a time limit
        (``options(timeout=)``). Thread-safe; waits for the pool's loop briefly.

        Returns:
            Whether it stopped anything (False for a Future that had ended, or that is
            not this executor's).
        """
        runtime = self._runtime
        for _ in range(3):  # a queued task may be sent meanwhile: then it is killed
            if future.done():
                return False
            if runtime.on_loop_thread():
                killed = self._pool.kill(future)
            else:
                try:
                    killed = runtime.call(on_loop(self._pool.kill, future), timeout=10.0)
                except (cf.TimeoutError, RuntimeError):  # the loop is closing or closed
                    return False
            if killed is not None:
                return killed
            if future.cancel():  # still queued: cancelled as Future.cancel() does
                return True
        return False

    def actor(
        self,
        cls: Callable[..., Any],
        /,
        *args: Any,
        host: Optional[str] = None,
        restart: int = 0,
        **kwargs: Any,
    ) -> ActorProxy:
        """Build ``cls(*args, **kwargs)`` in a process of its own on one host and keep it
        there: an *actor*. Returns its proxy: ``proxy.method(*a, **k)`` runs the method
        there and returns a Future at once; one actor's calls run one at a time, in the
        order they were made. The process is forked by the host's agent beside the
        pool's workers and takes none of their slots.

        Args:
            host: The host to put it on (one of ``stats().hosts``); None: the least loaded.
            restart: How many times to build it again (from these arguments, on the same
                host while its agent lives, else on another) when its process dies; the
                calls pending then fail with ``ActorDiedError`` all the same, later ones
                reach the new object. Nothing is retried.

        ``proxy.close()``, leaving ``with ex.actor(...) as proxy:`` or dropping the proxy
        ends the remote object (its ``close()``, if any, runs first); so does shutdown.
        When its process dies (``__init__`` raised, a crash, a kill, its host lost), its
        pending calls and every later one fail with ``ActorDiedError``. A proxy passed to
        a call of the same actor arrives as the object itself.

        Raises:
            RuntimeError: After ``shutdown()``.
            ValueError, TypeError: A host not of this executor, a bad ``restart``.
            pickle.PicklingError and the like: The constructor call cannot be pickled.
        """
        memory = self._limits[1] if self._limits is not None else 0
        return new_actor(self._actor_door, cls, args, kwargs, host, restart, memory)

    def actors(self) -> List[ActorInfo]:
        """Every actor made by this executor: host, state, calls served, pid, restarts."""
        return self._actor_door.infos()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; pending tasks finish (or are cancelled when
        ``cancel_futures``), then every worker, channel, connection and the loop thread
        end. With ``wait`` it returns when all of that is done and every Future has
        ended (its done-callbacks run). Thread-safe; may be called more than once, and
        from a done-callback (then the callbacks queued behind that one run after it
        returns).

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
        self._runtime.terminate()
        self.shutdown(wait=True, cancel_futures=True)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        """Normal exit: ``shutdown(wait=True)``. Leaving on an exception (a ``map``
        timeout, say) cancels queued tasks and gives running ones ``shutdown_grace``
        seconds before their workers are killed; Ctrl-C kills them at once."""
        if exc_type is None:
            self.shutdown(wait=True)
        elif issubclass(exc_type, KeyboardInterrupt):
            self._terminate()
        else:
            self._runtime.shutdown(wait=True, cancel_futures=True, bounded=True)
        return False
