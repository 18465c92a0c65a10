"""The client's memory of its files' content hashes (``files=``), so an unchanged file is
not read again: not in this process, nor in the next run.

Owns: a file's hash looked up by its stat (device, inode, size, modification and change
times, in nanoseconds: what git's index and rsync's quick check trust), remembered in
this process and kept on disk between runs (``$XDG_CACHE_HOME/sshexec/hashes``, else
``~/.cache/sshexec/hashes``: msgpack rows, written whole to a temporary file and renamed,
the last writer winning; at most ``KEEP`` rows, this process's first). A file changed
within ``RACY`` seconds of being hashed is not remembered: a second change within the
filesystem's timestamp granularity would leave its stat as it was (git's "racy" case).
Threads may look up and remember at once (dict operations under the GIL). Must not
import: asyncio, asyncssh, any other client module.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional, Set, Tuple

import msgpack

KEEP = 200_000  # rows kept on disk
RACY = 2.0  # seconds: a file changed this recently is hashed again next time

Stat = Tuple[int, int, int, int, int]

_known: Dict[Stat, bytes] = {}
_used: Set[Stat] = set()  # rows this process looked up or added: kept first on disk
_loaded_from = ""
_dirty = False


def path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sshexec", "hashes")


def stat_of(info: os.stat_result) -> Stat:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def load() -> None:
    """What earlier runs remembered (once per cache path; an unreadable file is none)."""
    global _loaded_from
    where = path()
    if _loaded_from == where:
        return
    _loaded_from = where
    try:
        with open(where, "rb") as f:
            rows = msgpack.unpackb(f.read(), raw=False, use_list=False)
        for *key, digest in rows:
            if len(key) == 5 and isinstance(digest, bytes) and len(digest) == 32:
                _known.setdefault(tuple(key), digest)
    except (OSError, ValueError, TypeError, msgpack.UnpackException):
        pass


def known(key: Stat) -> Optional[bytes]:
    digest = _known.get(key)
    if digest is not None:
        _used.add(key)
    return digest


def remember(key: Stat, digest: bytes, hashed_at_ns: int) -> None:
    """``digest`` of the file with this stat, hashed from ``hashed_at_ns`` (wall clock)."""
    global _dirty
    if max(key[3], key[4]) >= hashed_at_ns - int(RACY * 1e9):
        return  # changed too recently: the same stat may yet hold other bytes
    _known[key] = digest
    _used.add(key)
    _dirty = True


def save() -> None:
    """Kept on disk for the next run, when this one learned something; never raises (a
    read-only home only costs the next run its hashing)."""
    global _dirty
    if not _dirty:
        return
    _dirty = False
    rows = [(*key, d) for key, d in _known.items() if key in _used]
    rows += [(*key, d) for key, d in _known.items() if key not in _used][: max(0, KEEP - len(rows))]
    where = path()
    try:
        os.makedirs(os.path.dirname(where), 0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".hashes-", dir=os.path.dirname(where))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgpack.packb(rows[:KEEP], use_bin_type=True))
            os.replace(temporary, where)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        pass


def forget() -> None:
    """This process's memory emptied and the disk read again at the next ``load`` (a
    benchmark's first run, as a new process on a new machine)."""
    global _loaded_from, _dirty
    _known.clear()
    _used.clear()
    _loaded_from = ""
    _dirty = False
