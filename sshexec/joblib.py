"""The joblib backend ``"sshexec"``: ``joblib.Parallel``, and scikit-learn's ``n_jobs``, on
an ``SSHPoolExecutor``'s workers.

    import sshexec.joblib                     # registers the backend (or call register())
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(backend="sshexec", hosts=["node1", "node2"], n_jobs=-1):
        Parallel()(delayed(fit)(p) for p in grid)

Owns: the ``Backend`` class (joblib's custom-backend API, joblib 1.3 to the newest:
``submit`` with a retrieve callback on 1.5+, ``apply_async`` before), its registration,
the executor it starts on first use and keeps across the ``Parallel`` calls of one
``parallel_config`` block, and the workers' thread limits (``OMP_NUM_THREADS`` and friends).
Must not import: pool internals (only the public executor). Importing ``sshexec`` never
imports this module, nor joblib.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Tuple

import cloudpickle
from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    register_parallel_backend,
)

from ._ending import inline
from ._executor import SSHPoolExecutor
from ._hosts import local_cpu_count, resolve_hosts, share_workers
from ._layers import byvalue as _byvalue
from ._layers.adapters import CallbackThread, planned_workers
from ._wire import calls, shared

__all__ = ["NAME", "Backend", "register"]

NAME = "sshexec"
cloudpickle.register_pickle_by_value(_byvalue)  # the workers' initializer travels by value

_EXECUTOR_OPTIONS = frozenset(inspect.signature(SSHPoolExecutor).parameters) - {"mp_context"}


class Backend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``"sshexec"`` backend: each batch of ``delayed`` calls is a task on an
    ``SSHPoolExecutor``.

    joblib builds one per ``parallel_config(backend="sshexec", ...)`` block (or per
    ``Parallel(backend="sshexec")``); its keywords beyond joblib's own are the executor's.
    The executor is started on first use and kept for every ``Parallel`` call that uses
    this backend; it is shut down when joblib lets go of the backend: as the
    ``parallel_config`` block ends, or, when a call in it raised (the traceback holds a
    reference cycle), at the next garbage collection; at the latest at interpreter exit.
    To choose the moment, make the backend yourself and use it as a context manager:
    ``with Backend(hosts=...) as backend, parallel_config(backend=backend): ...``.
    After an exception in one call joblib aborts the others: the workers are killed and a
    new executor is started when the next call needs one.

    ``n_jobs``: 1 runs in this process, as joblib always does; -1 is every worker of the
    pool, -2 all but one, and so on; k > 1 is at most k workers. The pool's size is set by
    the hosts (one worker per core) or ``max_workers``, not by ``n_jobs``.

    Nested ``Parallel`` calls inside a task use threads on that worker at the first level
    and run sequentially below, as under joblib's process backends. Each worker's
    ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` and friends are
    set before the first task to ``inner_max_num_threads`` if given, else to the value in
    this process's environment, else to ``max(cores // workers, 1)`` of its host; a value
    the worker already has (``Host(env=...)``) is kept.

    Args:
        nesting_level: Set by joblib.
        inner_max_num_threads: Set by joblib from ``parallel_config``.
        **executor_options: ``SSHPoolExecutor``'s arguments: ``hosts``, ``max_workers``,
            ``python``, ``known_hosts``, ``ssh_options``, ``initializer``, ... .

    Raises:
        TypeError: A keyword that is neither joblib's nor the executor's.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1  # backend="sshexec" without n_jobs: the whole pool

    def __init__(
        self,
        nesting_level: Optional[int] = None,
        inner_max_num_threads: Optional[int] = None,
        **executor_options: Any,
    ) -> None:
        unknown = sorted(set(executor_options) - _EXECUTOR_OPTIONS)
        if unknown:
            raise TypeError(
                f"the sshexec joblib backend got unknown option(s) {', '.join(unknown)}; "
                f"it takes SSHPoolExecutor's: {', '.join(sorted(_EXECUTOR_OPTIONS))}"
            )
        # joblib < 1.5 hands unknown keywords on to object.__init__: keep them here
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._options = executor_options
        self._lock = threading.Lock()
        self._held = _Held()
        weakref.finalize(self, self._held.let_go)
        self._parallel: Callable[[], Any] = lambda: None
        self._sharing = shared.Sharing()
        # the scope whose blobs are claimed, and on which executor's hosts
        self._claimed: Optional[Tuple[shared.Sharing, weakref.ref[SSHPoolExecutor]]] = None

    # joblib sets and reads backend.parallel; a weak reference keeps Parallel -> backend
    # the only direction, so the backend (and its executor) goes when joblib lets go of it.
    @property
    def parallel(self) -> Any:
        """The ``Parallel`` call being run (set by joblib; held weakly)."""
        return self._parallel()

    @parallel.setter
    def parallel(self, value: Any) -> None:
        self._parallel = (lambda: None) if value is None else weakref.ref(value)

    # -- the executor

    def _executor_now(self) -> SSHPoolExecutor:
        with self._lock:
            held = self._held
            if held.executor is None:
                held.executor = SSHPoolExecutor(**self._executor_kwargs())
            if held.callbacks is None:
                held.callbacks = CallbackThread("joblib-callbacks")
            return held.executor

    def _executor_kwargs(self) -> Dict[str, Any]:
        """The options with the initializer that limits each worker's native threads."""
        kwargs = dict(self._options)
        max_workers = kwargs.get("max_workers")
        specs = resolve_hosts(kwargs.get("hosts"))
        default_workers: Optional[int] = None
        if specs is None:  # local workers
            default_workers = max_workers or local_cpu_count()
        else:  # tell each host's workers how many they are, where it is known now
            counts = share_workers(max_workers, specs)  # within an allocation's grant
            kwargs["hosts"] = [
                dataclasses.replace(
                    host, workers=n, env={**host.env, _byvalue.HOST_WORKERS_VAR: str(n)}
                )
                if n
                else host
                for host, n in zip(specs, counts)
                if n != 0  # max_workers is smaller than the number of hosts
            ]
        client_values = {n: os.environ[n] for n in _byvalue.THREAD_VARS if n in os.environ}
        kwargs["initializer"] = _byvalue.limit_threads
        kwargs["initargs"] = (
            self.inner_max_num_threads,
            client_values,
            default_workers,
            self._options.get("initializer"),
            tuple(self._options.get("initargs", ())),
        )
        return kwargs

    # -- joblib's backend API

    def effective_n_jobs(self, n_jobs: Optional[int]) -> int:
        """How many batches can run at once: see the class docstring for ``n_jobs``."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs == 1:
            return 1
        workers = planned_workers(self._executor_now())
        effective = max(workers + 1 + n_jobs, 1) if n_jobs < 0 else min(n_jobs, workers)
        # joblib runs a call in this process when told 1; a one-worker pool gets it instead
        return max(effective, 2)

    def configure(
        self,
        n_jobs: Optional[int] = 1,
        parallel: Any = None,
        prefer: Optional[str] = None,
        require: Optional[str] = None,
        **parallel_options: Any,
    ) -> int:
        """Called by joblib at the start of each ``Parallel`` call; joblib's own options
        (``max_nbytes``, ``mmap_mode``, ``temp_folder``: memory-mapping for local
        processes) do not apply to remote workers and are ignored."""
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        effective = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        self._sharing, self._claimed = shared.Sharing(), None  # this Parallel call's, only
        return effective

    def submit(self, func: Callable[[], Any], callback: Optional[Callable[..., Any]] = None) -> Any:
        """Run one batch on a worker; ``callback(future)`` runs on this backend's callback
        thread (never on the executor's loop thread) once it has ended."""
        executor = self._executor_now()
        entries = self._shared_by(func)
        sharing = self._sharing
        if entries and (
            self._claimed is None
            or self._claimed[0] is not sharing
            or self._claimed[1]() is not executor
        ):
            # its arrays stay on the hosts while this Parallel call's scope lives, and go
            # once it is let go (terminate): the client no longer holds them
            executor._submitter.claim_blobs(sharing, sharing.keys)
            self._claimed = (sharing, weakref.ref(executor))
        with calls.sharing(entries):
            future = executor.submit(func)
        if callback is not None:
            callbacks = self._held.callbacks
            assert callbacks is not None
            future.add_done_callback(inline(lambda done: callbacks.post(callback, done)))
        return future

    apply_async = submit  # the same call under its name before joblib 1.5

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or raise its exception (the remote stack as its cause)."""
        return out.result()

    def _shared_by(self, batch: Callable[[], Any]) -> List[shared.Entry]:
        """The big array arguments of one batch (a training set passed to every fit; 1 MB
        or more, joblib's own threshold for memmapping them), each keyed by its content
        now: each crosses once per host, held by the host's agent, and reaches the
        workers read-only, as joblib's memmapped arrays do; a changed array is a new one
        (the rule is in ``_wire.shared``)."""
        entries: List[shared.Entry] = []
        sharing = self._sharing
        for item in getattr(batch, "items", ()):  # joblib's BatchedCalls: (func, args, kwargs)
            try:
                _, args, kwargs = item
            except (TypeError, ValueError):
                continue
            for value in (*args, *kwargs.values()):
                if _is_big_array(value) and all(value is not e[0] for e in entries):
                    entries.append(sharing.check(value))
        return entries

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """An exception ended the call: kill its other batches now (every worker is
        killed); a new executor starts when the next call needs one, whatever
        ``ensure_ready`` says."""
        with self._lock:
            held = self._held
            executor, callbacks = held.executor, held.callbacks
            held.executor = held.callbacks = None
        if executor is not None:
            executor.kill_workers()
        if callbacks is not None:  # the killed batches' callbacks are moot: joblib is aborting
            callbacks.stop(wait=False)

    def terminate(self) -> None:
        """End of one ``Parallel`` call: the executor stays for the next."""
        self.reset_batch_stats()
        self.parallel = None
        self._sharing, self._claimed = shared.Sharing(), None  # let go of its arrays' copies

    def shutdown(self, wait: bool = True) -> None:
        """Shut this backend's executor down now: its tasks finish, then its workers stop
        (joblib itself never calls this; a later ``Parallel`` call would start a new one).
        Thread-safe."""
        with self._lock:
            held = self._held
            executor, callbacks = held.executor, held.callbacks
            held.executor = held.callbacks = None
        if executor is not None:
            executor.shutdown(wait=wait)
        if callbacks is not None:
            callbacks.stop(wait=wait, timeout=10.0)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        """``shutdown()``: the workers end where the ``with`` block does."""
        self.shutdown()

    def __reduce__(self) -> Tuple[Any, ...]:
        raise TypeError("the sshexec joblib backend owns an executor and cannot be pickled")


class _Held:
    """What a backend owns, apart from it, so that its finalizer can end them."""

    def __init__(self) -> None:
        self.executor: Optional[SSHPoolExecutor] = None
        self.callbacks: Optional[CallbackThread] = None

    def let_go(self) -> None:
        """The backend is gone: its tasks finish, then the workers stop. May run on any
        thread (garbage collection, the loop thread included), so it never waits."""
        if self.executor is not None:
            self.executor.shutdown(wait=False)
        if self.callbacks is not None:
            self.callbacks.stop(wait=False)


def register(make_default: bool = False) -> None:
    """Register the ``"sshexec"`` backend with joblib (importing ``sshexec.joblib`` does);
    with ``make_default``, ``Parallel()`` uses it without ``parallel_config``."""
    register_parallel_backend(NAME, Backend, make_default=make_default)


register()


SHARE_MIN = 1 << 20  # joblib's default max_nbytes for memmapping large arrays ("1M")


def _is_big_array(value: Any) -> bool:
    """A numpy array (or one like it) of ``SHARE_MIN`` bytes or more."""
    if getattr(value, "__array_interface__", None) is None:
        return False
    return bool(getattr(value, "nbytes", 0) >= SHARE_MIN)
