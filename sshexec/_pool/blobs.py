"""Blobs on the hosts, client side: which each host's agent holds, and when to forget them.

Owns: ``HostBlobs`` (one per host session: the blobs its agent holds, least recently
used first, sent in ``CHUNK`` pieces, forgotten with ``Forget``; a blob the agent could
not keep is remembered with the reason, for the errors of the tasks that needed it),
``Claims`` (client objects that stand behind blobs: a ``map``'s function, while its
iterator or one of its tasks lives) and ``Keeper`` (the pool's sweep: a blob no task,
nor actor call, on that host still needs is forgotten once its claimant is gone, or when the host holds
more than ``BUDGET`` bytes, least recently used first). A blob needed again after it
was forgotten is simply stored again. Loop thread only, except ``Claims.claim`` and
the release it posts; asyncio only for the timer of a sweep retried later. Must not
import: subprocess, asyncssh.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from typing import Callable, Dict, Final, Iterable, List, Optional, Set, Tuple

from .._wire import protocol as proto

# Bytes of blobs no task needs that a host's agent may keep, in case they are needed
# again (a map's function between its tasks, a shared array between Parallel calls).
# A constant, not an option: a blob a task needs is never evicted, so this only bounds
# a cache, and 1 GiB is a small part of a compute node's memory (or its /dev/shm).
BUDGET: Final = 1 << 30
FAILED_KEPT: Final = 256  # reasons of blobs the agent could not keep, remembered
SWEEP_EVERY: Final = 0.5  # seconds between sweeps retried while needed blobs block them


class HostBlobs:
    """The blobs one host's agent holds. Loop thread only."""

    def __init__(self, send: Callable[[proto.Message], None], piece: int) -> None:
        self._send, self._piece = send, piece
        self.budget = BUDGET  # read at creation: tests lower the module constant
        self.held: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.held_bytes = 0
        # key -> why the agent last could not keep it. Kept when the blob is sent again:
        # a task's failed reply may be read after a later task re-sent the blob.
        self.failed: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self.bytes_saved = 0  # bytes of blobs that did not cross again (stats)
        self.bytes_stored = 0  # bytes of blobs sent (stats: part of the host's bytes sent)

    def store(self, key: bytes, data: bytes) -> bool:
        """Make ``data`` available to the host's workers under ``key``; False when it
        already was (then it did not travel again)."""
        if key in self.held:
            self.held.move_to_end(key)
            self.bytes_saved += len(data)
            return False
        self.held[key] = len(data)
        self.held_bytes += len(data)
        self.bytes_stored += len(data)
        view, size, piece = memoryview(data), len(data), self._piece
        for at in range(0, max(size, 1), piece):
            self._send(proto.Store(key, size, (view[at : at + piece],)))
        return True

    def forget(self, key: bytes) -> None:
        size = self.held.pop(key, None)
        if size is not None:
            self.held_bytes -= size
            self._send(proto.Forget(key))

    def store_failed(self, key: bytes, reason: str) -> None:
        """The agent could not keep it: it is not held (a later task stores it again)."""
        size = self.held.pop(key, None)
        if size is not None:
            self.held_bytes -= size
        self.failed[key] = reason
        self.failed.move_to_end(key)
        while len(self.failed) > FAILED_KEPT:
            self.failed.popitem(last=False)

    @property
    def over_budget(self) -> bool:
        return self.held_bytes > self.budget

    def sweep(self, needed: Set[bytes], released: Set[bytes]) -> bool:
        """Forget what no task here needs and either nobody claims any more or exceeds
        the budget (least recently used first); True when something needed was left
        that a later sweep should look at again."""
        blocked = False
        for key in list(self.held):
            if key in needed:
                blocked = blocked or key in released
                continue
            if key in released or self.over_budget:
                self.forget(key)
        return blocked or self.over_budget


class Claims:
    """Client objects standing behind blobs. ``claim`` may be called from any thread."""

    def __init__(self) -> None:
        self._claims: Dict[int, List[bytes]] = {}

    def claim(
        self, owner: object, keys: List[bytes], on_release: Callable[[Set[bytes]], None]
    ) -> None:
        """``keys`` (a list ``owner`` may still append to) are wanted while ``owner``
        lives; ``on_release(keys)`` runs, on whatever thread collects it, when it is gone."""
        ident = id(owner)
        self._claims[ident] = keys
        weakref.finalize(owner, self._release, ident, on_release)

    def _release(self, ident: int, on_release: Callable[[Set[bytes]], None]) -> None:
        keys = set(self._claims.pop(ident, ()))
        try:
            on_release(keys)
        except BaseException:  # the pool's loop is gone: nobody to tell
            pass

    def claimed(self) -> Set[bytes]:
        """Every key a live claimant stands behind."""
        return {key for keys in list(self._claims.values()) for key in list(keys)}


CLAIMS: Final = Claims()  # one per process: claimants are the caller's objects


# per task sent and not ended: its host's blobs, and (key, data) of the blobs it names
Placed = Iterable[Tuple[HostBlobs, Iterable[Tuple[bytes, bytes]]]]


class Keeper:
    """The pool's blob sweeps. Loop thread only."""

    def __init__(
        self, in_flight: Callable[[], Placed], hosts: Callable[[], Iterable[HostBlobs]]
    ) -> None:
        self._in_flight, self._hosts = in_flight, hosts
        self.also_in_flight: List[Callable[[], Placed]] = []  # actors' calls, say
        self.pinned: Set[bytes] = set()  # never forgotten: the initializer, for the pool's life
        self._released: Set[bytes] = set()  # keys whose claimant is gone, maybe still held
        self._due = False
        self._swept_at = 0.0
        self._later: Optional[asyncio.TimerHandle] = None

    def released(self, keys: Set[bytes]) -> None:
        """A claimant is gone (posted by its finalizer): its blobs may go."""
        self._released |= keys
        self._due = True
        self.sweep()

    def stored(self, blobs: HostBlobs) -> None:
        """After storing on a host: sweep when it holds too much."""
        if blobs.over_budget:
            self._due = True
            self.sweep()

    def maybe_sweep(self) -> None:
        """After replies, or a while after a sweep that left something behind (a blob
        still needed): sweep again, at most every ``SWEEP_EVERY`` seconds."""
        if self._due and time.monotonic() - self._swept_at > SWEEP_EVERY:
            self.sweep()

    def _sweep_later(self) -> None:
        if self._later is None:
            self._later = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._retry)

    def _retry(self) -> None:
        self._later = None
        self.maybe_sweep()
        if self._due:
            self._sweep_later()

    def sweep(self) -> None:
        self._due, self._swept_at = False, time.monotonic()
        released = self._released - CLAIMS.claimed() - self.pinned
        needed: Dict[int, Set[bytes]] = {}
        for source in (self._in_flight, *self.also_in_flight):
            for host, blobs in source():
                needed.setdefault(id(host), set()).update(key for key, _ in blobs)
        left = False
        still_held: Set[bytes] = set()
        for host in self._hosts():
            wanted = needed.get(id(host), set()) | self.pinned
            left = host.sweep(wanted, released) or left
            still_held.update(host.held)
        self._released = released & still_held  # what may still need forgetting
        if left:  # looked at again when the tasks needing it may have ended
            self._due = True
            self._sweep_later()
