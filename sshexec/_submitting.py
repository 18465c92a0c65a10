"""Calls made into tasks: what ``submit``, ``map`` and ``run_on_hosts`` hand the pool.

Owns: ``Submitter`` (one per executor): pickling a call (``_encode``; a call that cannot
be pickled, or is over ``max_frame`` with the blobs it names, fails its own Future, not
the pool), task ids, the Future (or a ``map`` item's slot) and its cancel hook, the
``Task`` posted to the loop thread under the runtime's lock (refused after shutdown or
once the pool is broken), ``map``'s lazy, ordered submission (``_mapresults``), and the
blobs a map's function or a ``Parallel`` call's shared arrays keep on the hosts while
they live (``claim_blobs``). Any thread; never waits for the loop. Must not import:
asyncssh, the transports, the node's modules.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import time
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, List, Optional, Tuple, TypeVar

from ._encode import FRAME_OVERHEAD, Encoded, MapFunction, encode, on_wire
from ._layers.options import KEEP, Limits
from ._loop import Runtime, is_exiting
from ._mapresults import MapItem, MapResults, flatten, in_chunks, ordered_results
from ._pool.blobs import CLAIMS
from ._tasks import Task
from ._wire import calls

if TYPE_CHECKING:
    from ._pool.pool import Pool

T = TypeVar("T")


class Submitter:
    """An executor's calls made into tasks. Thread-safe."""

    def __init__(self, runtime: Runtime, pool: Pool, max_frame: int, limits: Limits) -> None:
        self.runtime, self.pool, self.max_frame, self.limits = runtime, pool, max_frame, limits
        self.task_ids = itertools.count(1)

    def submit(
        self,
        fn: Callable[..., T],
        args: Any,
        kwargs: Any,
        group: Optional[str],
        function: Optional[MapFunction] = None,
        item: Optional[MapItem] = None,
        limits: Any = KEEP,
    ) -> Any:
        """A Future, or for ``map`` ``item``, its slot; ``function``: ``fn`` already
        pickled (by ``map``, once for all its items); ``limits``: not the executor's."""
        future: Any = Future() if item is None else item
        failure: Optional[BaseException] = None
        encoded: Optional[Encoded] = None
        try:
            encoded = encode(fn, args, kwargs, function, self.pool.other_python)
        except Exception as exc:  # an unpicklable call fails its own Future, not the pool
            failure = exc
        except KeyboardInterrupt:  # Ctrl-C while pickling: the user stops the program
            raise
        except BaseException as exc:  # SystemExit from a __reduce__, say: as loky does
            failure = pickle.PicklingError(f"pickling the call raised {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
        if encoded is not None:
            size = on_wire(encoded)  # with its buffers' sizes and the blobs it names
            if size > self.max_frame - FRAME_OVERHEAD:
                failure = ValueError(
                    f"the pickled call is {size} bytes with the stored function and shared "
                    f"objects it names, over max_frame={self.max_frame} (the call and every "
                    "blob it names must fit in max_frame together); send less data per call "
                    "or raise max_frame"
                )
        runtime = self.runtime
        task_id = next(self.task_ids)
        if item is not None:
            item.task_id = task_id
        elif failure is None:  # cancelled while queued, its task leaves the pool at once
            future.add_done_callback(_CancelHook(runtime, task_id))
        with runtime.lock:
            if runtime.is_shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if is_exiting():
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if self.pool.broken is not None:
                raise self.pool.broken
            if failure is None and encoded is not None:
                payload, size, blobs, bound, other = encoded
                if limits is KEEP:
                    limits = self.limits
                task = Task(task_id, payload, size, future, group, blobs, bound, other, limits)
                runtime.post(task)
        if failure is not None:
            future.set_exception(failure)
        return future

    def map(
        self,
        fn: Callable[..., T],
        iterables: Tuple[Iterable[Any], ...],
        timeout: Optional[float],
        chunksize: int,
        buffersize: Optional[int],
        limits: Limits,
    ) -> Iterator[T]:
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        items: Iterator[Tuple[Any, ...]] = zip(*iterables)
        if chunksize == 1:
            return self._map_futures(fn, items, deadline, buffersize, limits)
        chunks = ((fn, chunk) for chunk in in_chunks(items, chunksize))
        return flatten(
            self._map_futures(calls.process_chunk, chunks, deadline, buffersize, limits, True)
        )

    def _map_futures(
        self,
        fn: Callable[..., T],
        items: Iterator[Tuple[Any, ...]],
        deadline: Optional[float],
        buffersize: Optional[int],
        limits: Limits,
        chunked: bool = False,
    ) -> Iterator[T]:
        try:  # once for every item; a function that cannot be pickled fails each item
            function: Optional[MapFunction] = MapFunction(fn, self.max_frame)
        except KeyboardInterrupt:
            raise
        except BaseException:  # each item's own pickling then fails its slot, and says why
            function = None
        if function is not None:  # its blobs may be forgotten on the hosts once it is gone
            self.claim_blobs(function, function.keys)
        shared = MapResults()  # one condition for all items: no Future per item
        submitter = weakref.ref(self)  # an abandoned iterator must not keep the pool alive

        def submit(args: Tuple[Any, ...]) -> Optional[MapItem]:
            owner = submitter()
            if owner is None:
                return None
            limited = limits  # per item: a chunk of n items gets n times the time
            if chunked and limits is not None and limits[0]:
                limited = (limits[0] * len(args[1]), limits[1])
            item: MapItem = owner.submit(fn, args, {}, None, function, MapItem(shared), limited)
            return item

        runtime = self.runtime
        return ordered_results(
            submit,
            items,
            deadline,
            buffersize,
            runtime.on_loop_thread,
            runtime.forget,
            lambda cancelled: runtime.cancel([item.task_id for item in cancelled]),
        )

    def claim_blobs(self, owner: object, keys: List[bytes]) -> None:
        """The blobs named by ``keys`` (a list ``owner`` may still append to) stay on
        this pool's hosts while ``owner`` lives; once it is collected, the hosts forget
        those no task needs (a map's function; a ``Parallel`` call's shared arrays)."""
        loop, keeper = self.runtime.loop, self.pool.dispatch.keeper
        CLAIMS.claim(owner, keys, functools.partial(_released, loop, keeper))


def _released(loop: Any, keeper: Any, keys: Any) -> None:
    """A map's function was collected (on whatever thread): its hosts may forget it."""
    try:
        loop.call_soon_threadsafe(keeper.released, keys)
    except RuntimeError:  # the loop is closed: the agents are gone with their blobs
        pass


class _CancelHook:
    """A submit's Future ended; when by ``cancel()``, its queued task leaves the pool.
    Ours, cheap and non-blocking: a Future with only this callback ends on the loop thread."""

    __slots__ = ("runtime", "task_id")
    _sshexec_inline = True  # _ending.INLINE

    def __init__(self, runtime: Runtime, task_id: int) -> None:
        self.runtime, self.task_id = runtime, task_id

    def __call__(self, future: Future[Any]) -> None:
        if future.cancelled():
            self.runtime.cancel([self.task_id])
