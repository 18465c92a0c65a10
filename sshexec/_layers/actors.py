"""``SSHPoolExecutor.actor()``'s client side: the proxy of a remote object.

Owns: ``ActorProxy`` (attribute access gives the remote object's methods; calling one
returns a plain ``concurrent.futures.Future`` at once; ``close()``, ``with`` and garbage
collection end the remote object; pickled into a call of the same actor it arrives as
the object itself) and ``new_actor`` (checks, the constructor call pickled once).
The actor's process, its calls' order and its death are ``_pool.actors``'; the node's
side is ``_node.actors``. Must not import: pool internals; only the executor's own
(private) actor methods.
"""

from __future__ import annotations

import itertools
import uuid
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Optional, Tuple

from .._node import actors as node

if TYPE_CHECKING:
    from .._executor import SSHPoolExecutor

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
        owner: SSHPoolExecutor,
        actor_id: int,
        token: str,
        name: str,
        methods: Optional[FrozenSet[str]],
    ) -> None:
        self._sshexec_owner, self._sshexec_id, self._sshexec_token = owner, actor_id, token
        self._sshexec_methods = methods  # None: any name (a factory, a class with __getattr__)
        self._sshexec_closed, self._sshexec_name = False, name
        # collected without close(): the remote object ends too (at exit, shutdown does it)
        weakref.finalize(self, _dropped, weakref.ref(owner), actor_id).atexit = False

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
            encoded = owner._actor_encode(node.call, (name, args, kwargs))
        except Exception as exc:  # an unpicklable call fails its own Future
            future.set_exception(exc)
            return future
        owner._actor_post("call", self._sshexec_id, future, encoded)
        return future

    def close(self) -> None:
        """End the remote object once the calls made before have run: its ``close()``
        (if it has one) runs there first. Later calls raise ``RuntimeError``. Blocks
        until its process has ended (not when called from a done-callback's thread
        of the executor's own loop)."""
        if self._sshexec_closed:
            return
        self._sshexec_closed = True
        self._sshexec_owner._actor_close(self._sshexec_id)

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


def _dropped(owner: Callable[[], Optional[SSHPoolExecutor]], actor_id: int) -> None:
    """The proxy was collected without close(): the remote object ends too. Any thread,
    perhaps inside a lock the collector interrupted: no lock, no wait."""
    executor = owner()
    if executor is not None:
        executor._actor_post("close", actor_id, locked=False)


def new_actor(
    executor: SSHPoolExecutor,
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
    names = executor._actor_hosts()
    if host is not None and host not in names:
        raise ValueError(f"host {host!r} is not one of this executor's hosts: {names}")
    token = uuid.uuid4().hex
    encoded = executor._actor_encode(node.create, (token, cls, args, kwargs))  # raises
    end = executor._actor_encode(node.end, ())
    name = getattr(cls, "__qualname__", None) or repr(cls)
    actor_id = next(_ids)
    executor._actor_post("create", actor_id, name, (encoded, end), host, restart, memory)
    return ActorProxy(executor, actor_id, token, name, _methods(cls))


def _methods(cls: Any) -> Optional[FrozenSet[str]]:
    """The names a proxy answers: the class's callable attributes (so a typo, or a
    notebook probing ``_repr_html_``, is an ``AttributeError`` here, not a remote call);
    None (any name) for a factory function or a class with ``__getattr__``."""
    if not isinstance(cls, type) or hasattr(cls, "__getattr__"):
        return None
    return frozenset(name for name in dir(cls) if callable(getattr(cls, name, None)))
