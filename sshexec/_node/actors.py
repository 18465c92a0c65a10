"""The object an actor's worker process keeps, and the calls that reach it.

An actor is a worker process of its own (forked by the agent as any worker, driven by
the client through its own link, never given pool tasks). The client sends it plain
calls of the functions below, by reference: ``create`` builds the object and keeps it
for the life of the process, ``call`` runs one of its methods, ``end`` runs its
``close()`` (if it has one) and lets it go, and ``this`` is what a proxy of the actor
pickles to, so a proxy passed to a call of the same actor arrives as the object.

Owns: the kept object and its token. Must not import: any client module (this ships
to nodes), asyncio or threads.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

_kept: Optional[Tuple[str, Any]] = None  # (token, the object), once ``create`` ran


def create(token: str, cls: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Build ``cls(*args, **kwargs)`` and keep it; what it raises ends the actor."""
    global _kept
    _kept = None
    _kept = (token, cls(*args, **kwargs))


def call(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """``object.name(*args, **kwargs)``."""
    if _kept is None:
        raise RuntimeError("this actor holds no object (its constructor did not finish)")
    return getattr(_kept[1], name)(*args, **kwargs)


def end() -> None:
    """The actor is closed: its object's ``close()`` runs, then the object is let go."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        close = getattr(kept[1], "close", None)
        if callable(close):
            close()


def this(token: str) -> Any:
    """A proxy, unpickled here: the object itself when it is this actor's."""
    if _kept is None or _kept[0] != token:
        raise TypeError(
            "an actor's proxy can be passed only to calls of that same actor (where it "
            "arrives as the object itself), not to tasks or to other actors"
        )
    return _kept[1]
