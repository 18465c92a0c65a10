"""``SSHPoolExecutor.actor()``'s client side: the proxy of a remote object.

Owns: ``ActorProxy`` (attribute access gives the remote object's methods; calling one
returns a plain ``concurrent.futures.Future`` at once; ``close()``, ``with`` and garbage
collection end the remote object; pickled into a call of the same actor it arrives as
the object itself), ``new_actor`` (checks, the constructor call pickled once) and
``ActorDoor``, the executor's one way in to the pool for actors (usable hosts, calls
pickled as tasks' are, operations handed to the loop thread's ``ActorHub`` in order,
``close`` waiting for the end, ``infos``). The actor's process, its calls' order and
its death are ``_pool.actors``'; the node's side is ``_node.actors``. Must not import:
pool internals beyond the ``Pool``'s ``actors`` hub, ``hosts`` and ``broken``.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import uuid
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from .._encode import FRAME_OVERHEAD, Encoded, encode, on_wire
from .._errors import BrokenPool
from .._loop import Runtime, is_exiting, on_loop
from .._node import actors as node

if TYPE_CHECKING:
    from .._pool.pool import Pool
    from .._stats import ActorInfo

_ids = itertools.count(1)


class ActorProxy:
    """Stands for an object kept on a host (``SSHPoolExecutor.actor``). ``proxy.m(*a,
    **k)`` runs ``obj.m(*a, **k)`` there and returns a Future; the calls of one actor
    run one at a time, in the order they were made. Thread-safe."""

    __slots__ = (
        "__weakref__",
        "_sshexec_closed",
        "_sshexec_id",
        "_sshexec_methods",
        "_sshexec_name",
        "_sshexec_owner",
        "_sshexec_token",
    )

    def __init__(
        self,
        owner: ActorDoor,
        actor_id: int,
        token: str,
        name: str,
        methods: Optional[FrozenSet[str]],
    ) -> None:
        self._sshexec_owner, self._sshexec_id, self._sshexec_token = owner, actor_id, token
        self._sshexec_methods = methods  # None: any name (a factory, a class with __getattr__)
        self._sshexec_closed, self._sshexec_name = False, name
        # collected without close(): the remote object ends too (at exit, shutdown does it)
        weakref.finalize(self, owner.post, "close", actor_id, locked=False).atexit = False

    def __getattr__(self, name: str) -> Callable[..., Future[Any]]:
        methods = self._sshexec_methods
        if (name.startswith("__") and name.endswith("__")) or (
            methods is not None and name not in methods
        ):
            raise AttributeError(f"actor {self._sshexec_name} has no method {name!r}")

        def method(*args: Any, **kwargs: Any) -> Future[Any]:
            return self._sshexec_call(name, args, kwargs)

        method.__name__ = name
        return method

    def _sshexec_call(
        self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Future[Any]:
        if self._sshexec_closed:
            raise RuntimeError(f"actor {self._sshexec_name} was closed")
        future: Future[Any] = Future()
        owner = self._sshexec_owner
        try:
            encoded = owner.encode(node.call, (name, args, kwargs))
        except Exception as exc:  # an unpicklable call fails its own Future
            future.set_exception(exc)
            return future
        owner.post("call", self._sshexec_id, future, encoded)
        return future

    def close(self) -> None:
        """End the remote object once the calls made before have run: its ``close()``
        (if it has one) runs there first. Later calls raise ``RuntimeError``. Blocks
        until its process has ended (not when called from a done-callback's thread
        of the executor's own loop)."""
        if self._sshexec_closed:
            return
        self._sshexec_closed = True
        self._sshexec_owner.close(self._sshexec_id)

    def __enter__(self) -> ActorProxy:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __reduce__(self) -> Any:
        """Pickled into a call of the same actor: the object itself, there."""
        return (node.this, (self._sshexec_token,))

    def __repr__(self) -> str:
        state = " closed" if self._sshexec_closed else ""
        return f"<sshexec actor {self._sshexec_id} {self._sshexec_name}{state}>"


def new_actor(
    door: ActorDoor,
    cls: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    host: Optional[str],
    restart: int,
    memory: int,
) -> ActorProxy:
    if not callable(cls):
        raise TypeError(f"actor() needs a class (a callable), not {type(cls).__name__}")
    if isinstance(restart, bool) or not isinstance(restart, int) or restart < 0:
        raise ValueError(f"restart must be an int >= 0, not {restart!r}")
    names = door.hosts()
    if host is not None and host not in names:
        raise ValueError(f"host {host!r} is not one of this executor's hosts: {names}")
    token = uuid.uuid4().hex
    encoded = door.encode(node.create, (token, cls, args, kwargs))  # raises
    end = door.encode(node.end, ())
    name = getattr(cls, "__qualname__", None) or repr(cls)
    actor_id = next(_ids)
    door.post("create", actor_id, name, (encoded, end), host, restart, memory)
    return ActorProxy(door, actor_id, token, name, _methods(cls))


def _methods(cls: Any) -> Optional[FrozenSet[str]]:
    """The names a proxy answers: the class's callable attributes (so a typo, or a
    notebook probing ``_repr_html_``, is an ``AttributeError`` here, not a remote call);
    None (any name) for a factory function or a class with ``__getattr__``."""
    if not isinstance(cls, type) or hasattr(cls, "__getattr__"):
        return None
    return frozenset(name for name in dir(cls) if callable(getattr(cls, name, None)))


class ActorDoor:
    """The executor's way in to its pool for actors. Any thread (the loop's too)."""

    def __init__(self, runtime: Runtime, pool: Pool, max_frame: int) -> None:
        self.runtime, self.pool, self.max_frame = runtime, pool, max_frame

    def hosts(self) -> List[str]:
        return [h.name for h in self.pool.hosts if h.is_usable]

    def encode(self, fn: Callable[..., Any], args: Tuple[Any, ...]) -> Encoded:
        """An actor's call pickled as a task's (raises what pickling raises)."""
        encoded = encode(fn, args, {}, None, self.pool.other_python)
        size = on_wire(encoded)
        if size > self.max_frame - FRAME_OVERHEAD:
            raise ValueError(
                f"the pickled actor call is {size} bytes, over max_frame={self.max_frame}"
            )
        return encoded

    def post(self, what: str, *args: Any, locked: bool = True) -> None:
        """Hand an actor operation to the pool's ``ActorHub`` (in order per thread).
        ``locked=False``: from a finalizer (a proxy collected without ``close()``), which
        may run inside the lock, on any thread: no lock, no wait."""
        runtime, hub = self.runtime, self.pool.actors
        if not locked:
            try:
                runtime.loop.call_soon_threadsafe(getattr(hub, what), *args)
            except RuntimeError:  # the loop is closed: shutdown ended every actor
                pass
            return
        with runtime.lock:
            if runtime.is_shut_down or is_exiting():
                raise RuntimeError("cannot use actors after shutdown")
            if self.pool.broken is not None:
                raise self.pool.broken
            runtime.loop.call_soon_threadsafe(getattr(hub, what), *args)

    def close(self, actor_id: int) -> None:
        runtime = self.runtime
        try:
            self.post("close", actor_id)
        except (RuntimeError, BrokenPool):  # shutdown ends it
            return
        if not runtime.on_loop_thread():
            waiting = self.pool.actors.wait_ended(actor_id)
            try:
                runtime.call(waiting, timeout=None)
            except (RuntimeError, cf.CancelledError):  # the loop ended: so did the actor
                waiting.close()

    def infos(self) -> List[ActorInfo]:
        hub, runtime = self.pool.actors, self.runtime
        if not runtime.on_loop_thread() and not runtime.loop.is_closed():
            asking = on_loop(hub.infos)
            try:
                result: List[ActorInfo] = runtime.call(asking, timeout=10.0)
                return result
            except (cf.TimeoutError, RuntimeError):  # the loop has ended: nothing moves
                asking.close()
        return hub.infos()
