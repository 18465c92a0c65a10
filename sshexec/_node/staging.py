"""Staged files on a node: the content cache and the workers' working directories.

Owns: ``Staging``, the agent's side of ``files=`` and ``return_files=``: after
``StageDir`` it makes one directory for this client under the cache
(``$XDG_CACHE_HOME/sshexec``, else ``~/.cache/sshexec``: ``work/<host>-<pid>-*``,
removed when the agent ends, and by the next agent when this one was killed) and a
working directory of its own for every worker forked from then on (``before_spawn``:
the agent enters it to fork, so the worker starts there). A batch's manifest
(``StageOffer``) is answered with the contents the cache lacks (``StageWant``); those
arrive in pieces (``StagePut``) into the content cache (``files/``, a non-private
``store.BlobStore``: one store, one lifecycle, for blobs and staged contents), each
kept read-only under its key with a fixed modification time (a content changed in
place is not trusted again); ``StageCommit`` lays the batch out in every worker's
directory as hard links into the cache (one copy on disk for all workers; a copy where
a link cannot be made), directories and symlinks as they were, and answers ``Staged``.
The cache holds at most ``SSHEXEC_CACHE_SIZE`` bytes (default ``CACHE_SIZE``), least
recently used contents evicted first. ``clean_cache`` empties it (``sshexec clean``).
Must not import: any client module, asyncio; never start a thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import msgpack

from .._wire import messages as msgs
from .._wire import protocol as proto
from .store import BlobStore, _alive

CACHE_SIZE = 10 << 30  # bytes of staged contents a node keeps, unless SSHEXEC_CACHE_SIZE says
STAMP = 1_000_000_000 * 10**9  # ns: the modification time of every cached content
PART_STALE = 86400.0  # seconds after which a content left half-arrived is removed
RETURN_ENV = "SSHEXEC_RETURN"  # the return patterns, for the workers (NUL-separated)

STAGE_COMMANDS = (msgs.StagePut, msgs.StageOffer, msgs.StageCommit, msgs.StageDir)
Entry = Tuple[str, str, int, int, bytes, str]  # path, kind, mode, size, key, target


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sshexec")


def cache_size() -> int:
    try:
        return int(os.environ.get("SSHEXEC_CACHE_SIZE", "") or CACHE_SIZE)
    except ValueError:
        return CACHE_SIZE


class Staging:
    """The agent's staged files. The agent's thread only."""

    def __init__(self, send: Callable[[proto.Message], None]) -> None:
        self.send = send
        self.root = cache_root()
        self.host = os.uname().nodename
        self.home = os.getcwd()  # where the agent returns after forking a worker
        self.store: Optional[BlobStore] = None
        self.workdir = ""  # this client's directory, once StageDir came
        self.dirs: Dict[int, str] = {}  # slot -> its worker's working directory
        self.staged: Dict[str, Entry] = {}  # path -> entry: everything laid out so far
        self.offered: List[Entry] = []  # the batch being offered
        self.failed: Dict[bytes, str] = {}  # key -> why its content could not be kept
        self.hashing: Dict[bytes, Any] = {}  # key -> the hash of its pieces so far
        self.error = ""  # why the directory could not be made

    def command(self, message: proto.Message) -> None:
        try:
            if isinstance(message, msgs.StagePut):
                self._put(message)
            elif isinstance(message, msgs.StageOffer):
                self._offer(message)
            elif isinstance(message, msgs.StageCommit):
                self._commit(message.batch)
            elif isinstance(message, msgs.StageDir):
                self._open(message.returns)
        except Exception as exc:  # a bug of ours must not end the agent: the client hears
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            if isinstance(message, msgs.StageOffer) and message.last:
                self.offered = []
                self.send(msgs.StageWant(message.batch, b""))
            elif isinstance(message, msgs.StageCommit):
                self.send(msgs.Staged(message.batch, self.error))

    # ---- the client's directory and the workers' ---------------------------------------

    def _open(self, returns: str) -> None:
        if self.workdir or self.error:
            return
        os.environ[RETURN_ENV] = returns  # every worker forked from now on reads it
        try:
            self.store = BlobStore([os.path.join(self.root, "files")], private=False)
            if self.store.errors:
                raise OSError(self.store.errors[0])
            work = os.path.join(self.root, "work")
            os.makedirs(work, 0o700, exist_ok=True)
            _sweep(work, f"{self.host}-")
            self.workdir = tempfile.mkdtemp(prefix=f"{self.host}-{os.getpid()}-", dir=work)
        except OSError as exc:
            self.error = f"{self.root}: {exc.strerror or exc}"

    def before_spawn(self, slot: int) -> str:
        """The agent is about to fork the worker in ``slot``: into its directory, with
        every staged file; why it cannot be (then no worker starts), else ""."""
        if not self.workdir:
            return ""
        folder = os.path.join(self.workdir, f"w{slot}")
        try:
            os.makedirs(folder, 0o700, exist_ok=True)
            self.dirs[slot] = folder
            self._lay_out(list(self.staged.values()), folder)
            os.chdir(folder)
        except OSError as exc:
            where = _relative(exc.filename, folder)
            return f"laying out the staged files on {self.host} failed: {where}: {exc.strerror}"
        return ""

    def after_spawn(self) -> None:
        if self.workdir:
            try:
                os.chdir(self.home)
            except OSError:
                os.chdir("/")

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.workdir:
            remove_tree(self.workdir)

    # ---- a batch ----------------------------------------------------------------------

    def _offer(self, message: msgs.StageOffer) -> None:
        for item in msgpack.unpackb(message.entries, raw=False) if message.entries else ():
            path, kind, mode, size, key, target = item
            self.offered.append((str(path), str(kind), int(mode), int(size), bytes(key), target))
        if not message.last:
            return
        wanted: List[bytes] = []
        if self.error:  # nowhere to keep them: the commit says why
            self.send(msgs.StageWant(message.batch, b""))
            return
        seen: Set[bytes] = set()
        for _, kind, _, size, key, _ in self.offered:
            if kind == "f" and key not in seen:
                seen.add(key)
                if not self._cached(key, size):
                    wanted.append(key)
                    self.failed.pop(key, None)
        self.send(msgs.StageWant(message.batch, b"".join(wanted)))
        if self.store is not None:
            self.store.prepare(wanted)  # their files made ahead of their pieces

    def _put(self, message: msgs.StagePut) -> None:
        if self.store is None:
            return
        key = message.key
        digest = self.hashing.get(key)
        if digest is None:
            digest = self.hashing[key] = hashlib.sha256()
        for piece in proto.tail_pieces(message.data):
            digest.update(piece)
        reason = self.store.put(key, message.size, message.data)
        if self.store.is_partial(key):
            return
        del self.hashing[key]
        if reason is not None:
            self.failed[key] = reason
            return
        path = self._path(key)
        if digest.digest() != key[:32]:  # the file changed while it was read: not kept
            _unlink(path)
            self.failed[key] = "it changed while it was being sent"
            return
        os.chmod(path, _mode(key))
        os.utime(path, ns=(time.time_ns(), STAMP))

    def _commit(self, batch: int) -> None:
        entries, self.offered = self.offered, []
        if self.store is not None:
            self.store.settle()
        error = self._check(entries)
        if not error:
            for folder in self.dirs.values():
                try:
                    self._lay_out(entries, folder)
                except OSError as exc:
                    error = f"{_relative(exc.filename, folder)}: {exc.strerror or exc}"
                    break
        if not error:
            for entry in entries:
                self.staged[entry[0]] = entry
            self._touch_and_evict(entries)
        self.send(msgs.Staged(batch, error))

    def _check(self, entries: List[Entry]) -> str:
        """Why the batch cannot be laid out ("" when it can)."""
        if self.error:
            files = [path for path, kind, *_ in entries if kind == "f"]
            return f"{files[0]}: {self.error}" if files else self.error
        for path, kind, _, size, key, target in entries:
            if not _inside(path) or (kind == "l" and not _inside(os.path.join(path, "..", target))):
                return f"{path}: refused, it would lead outside the working directory"
            if kind == "f" and not self._cached(key, size):
                if self.store is not None:
                    self.store.drop_partial(key)
                self.hashing.pop(key, None)
                why = self.failed.get(key, "its content did not arrive")
                return f"{path}: {why}"
        return ""

    def _cached(self, key: bytes, size: int) -> bool:
        if self.store is None or not self.store.dirs:
            return False
        try:
            found = os.lstat(self._path(key))
        except OSError:
            return False
        return stat.S_ISREG(found.st_mode) and found.st_size == size and found.st_mtime_ns == STAMP

    def _path(self, key: bytes) -> str:
        assert self.store is not None
        return os.path.join(self.store.dirs[0], key.hex())

    def _lay_out(self, entries: List[Entry], folder: str) -> None:
        dirs: List[Tuple[str, int]] = []
        for path, kind, mode, _, key, target in entries:
            dest = os.path.join(folder, path)
            os.makedirs(os.path.dirname(dest), 0o700, exist_ok=True)
            if kind == "d":
                if os.path.lexists(dest) and not os.path.isdir(dest):
                    os.unlink(dest)
                os.makedirs(dest, 0o700, exist_ok=True)
                dirs.append((dest, mode))
                continue
            if os.path.isdir(dest) and not os.path.islink(dest):
                remove_tree(dest)
            temporary = f"{dest}.sshexec-{os.getpid()}"
            if kind == "l":
                os.symlink(target, temporary)
            else:
                _link_or_copy(self._path(key), temporary)
            os.replace(temporary, dest)
        for dest, mode in reversed(dirs):  # the owner keeps writing: outputs, clean-up
            os.chmod(dest, (mode & 0o7777) | 0o700)

    def _touch_and_evict(self, entries: List[Entry]) -> None:
        """Mark the batch's contents used now; then evict the least recently used
        contents (never the batch's) while the cache holds more than its bound."""
        used = set()
        now = time.time_ns()
        for _, kind, _, _, key, _ in entries:
            if kind == "f" and key.hex() not in used:
                used.add(key.hex())
                try:
                    os.utime(self._path(key), ns=(now, STAMP))
                except OSError:
                    pass
        if self.store is not None:
            evict(self.store.dirs[0], cache_size(), used)


def evict(folder: str, bound: int, keep: Set[str]) -> int:
    """Delete least recently used contents of ``folder`` (not those in ``keep``) until it
    holds ``bound`` bytes at most; the bytes freed. A content still arriving (``.part``)
    stays unless untouched for ``PART_STALE`` (its agent was killed: on a cache shared
    by several hosts, an age is what tells, not a process id)."""
    items: List[Tuple[int, str, int]] = []
    total = freed = 0
    stale = time.time_ns() - int(PART_STALE * 1e9)
    with os.scandir(folder) as found:
        for entry in found:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not entry.name.endswith(".part"):
                items.append((info.st_atime_ns, entry.name, info.st_size))
            elif info.st_mtime_ns < stale:
                _unlink(entry.path)
                freed += info.st_size
            total += info.st_size
    for _, name, size in sorted(items):
        if total - freed <= bound:
            break
        if name not in keep:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                continue
            freed += size
    return freed


def clean_cache() -> int:
    """Empty this node's content cache (and what killed agents left); the bytes freed.
    Runs in a worker (``sshexec clean``): it must be importable on the node."""
    root = cache_root()
    freed = 0
    folder = os.path.join(root, "files")
    if os.path.isdir(folder):
        freed = evict(folder, 0, set())
    work = os.path.join(root, "work")
    if os.path.isdir(work):
        _sweep(work, f"{os.uname().nodename}-")
    return freed


def _mode(key: bytes) -> int:
    """The mode a content is kept with: its read and execute bits, never writable (a
    task writing into a staged input would change every worker's copy, and the cache's)."""
    return (int.from_bytes(key[-2:], "big") & 0o555) | 0o400


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in (errno.EMLINK, errno.EXDEV, errno.EPERM, errno.EACCES):
            raise
        shutil.copyfile(source, dest)
        os.chmod(dest, stat.S_IMODE(os.stat(source).st_mode))


def _inside(path: str) -> bool:
    """A relative path that stays inside the directory it is relative to."""
    if not path or "\0" in path or os.path.isabs(path):
        return False
    norm = os.path.normpath(path)
    return norm != ".." and not norm.startswith(".." + os.sep)


def _relative(path: Any, folder: str) -> str:
    if not isinstance(path, str):
        return "?"
    return os.path.relpath(path, folder) if path.startswith(folder) else path


def _sweep(work: str, prefix: str) -> None:
    """Remove the directories of this host's agents that are gone (killed)."""
    for name in os.listdir(work):
        if name.startswith(prefix):
            pid = name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                remove_tree(os.path.join(work, name))


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything in it, directories a task made read-only too."""

    def retry(function: Any, failed: str, *_: Any) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            function(failed)
        except OSError:
            pass

    keyword = "onexc" if sys.version_info >= (3, 12) else "onerror"
    shutil.rmtree(path, **{keyword: retry})  # type: ignore[arg-type]
