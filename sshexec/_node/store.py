"""The agent's blob store: the files its workers read a map's function, an initializer
or a shared object from.

Owns: ``BlobStore``: one private directory per base (``/dev/shm`` first, memory-backed,
then the system's temp dir on disk; ``SSHEXEC_BLOB_DIRS``, a path list, overrides
them), blobs arriving in pieces (appended to a temporary file, renamed into place when
complete), a blob that does not fit where it started moved on to the next directory,
``forget`` deleting one, and removing what agents that died without cleaning up left.
A blob that fits nowhere is reported (``put`` returns why) and never ends the agent.
``prepare`` has a child process create the temporary files of blobs about to arrive,
ahead of their pieces (creating a file is the slow step on many disks and on NFS: the
agent's one thread then opens and writes), and ``settle`` ends it and removes what it
made that no piece filled.
Workers are told every directory (``path``: an ``os.pathsep`` list) and look in each.
The same store, not private (``private=False``), is the content cache of staged files
(``staging``): one directory that outlives the agent.
Must not import: any client module, asyncio; never start a thread.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from .._wire import protocol as proto
from .spawn import AGENT_SIGNALS, _close_from, may_fork

BLOB_PREFIX = "sshexec-blobs-"
COPY_SIZE = 1 << 20  # bytes per read when a partial blob moves to the next directory
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # posix_fallocate's "it does not fit"
PREPARE_AT_LEAST = 16  # blobs in a batch worth a process that creates their files ahead
SETTLE_WAIT = 5.0  # seconds ``settle`` waits for that process to end (a hung disk)


class _Partial:
    """A blob whose pieces are arriving."""

    def __init__(self, size: int, errors: List[str]) -> None:
        self.size = size
        self.received = 0  # bytes of pieces seen (kept or not)
        self.written = 0  # bytes in the temporary file
        self.at = 0  # index of the directory it is written in
        self.fd = -1
        self.path = ""
        self.errors = errors  # why each directory tried failed


class BlobStore:
    def __init__(self, bases: Optional[List[str]] = None, private: bool = True) -> None:
        self.dirs: List[str] = []
        self.errors: List[str] = []  # bases that could not take a directory, and why
        self.private = private  # a directory of this agent's own (else the bases: a cache)
        for base in _bases() if bases is None else bases:
            try:
                if private:
                    self.dirs.append(_private_dir(base))
                else:
                    os.makedirs(base, 0o700, exist_ok=True)
                    self.dirs.append(base)
            except OSError as exc:
                self.errors.append(f"{base}: {exc.strerror or exc}")
        self._partial: Dict[bytes, _Partial] = {}
        self._creator: Optional[Tuple[int, int, int, List[bytes]]] = None  # pid, stop, done, keys

    @property
    def path(self) -> str:
        """Where workers look, in order."""
        return os.pathsep.join(self.dirs)

    def put(self, key: bytes, size: int, data: proto.Tail) -> Optional[str]:
        """One piece of the blob ``key``; when it was the last and the blob could not be
        kept anywhere, the reason (else None)."""
        partial = self._partial.get(key)
        if partial is None:
            partial = self._partial[key] = _Partial(size, list(self.errors))
            self._open(key, partial)
        for piece in proto.tail_pieces(data):
            partial.received += len(piece)
            if partial.fd >= 0:
                self._write(key, partial, memoryview(piece))
        if partial.received < partial.size:
            return None
        del self._partial[key]
        if partial.fd < 0:
            return "; ".join(partial.errors or ["no directory to keep it in"])
        os.close(partial.fd)
        final = os.path.join(self.dirs[partial.at], key.hex())
        try:
            os.replace(partial.path, final)
        except OSError as exc:  # nothing to fall back on: the bytes are written there
            _remove(partial.path)
            return _failed(self.dirs[partial.at], exc)
        return None

    def forget(self, key: bytes) -> None:
        for folder in self.dirs:
            _remove(os.path.join(folder, key.hex()))

    def is_partial(self, key: bytes) -> bool:
        """Pieces of ``key`` have come and more are due."""
        return key in self._partial

    def drop_partial(self, key: bytes) -> None:
        """The rest of ``key`` will not come (its sender gave up): its pieces go."""
        partial = self._partial.pop(key, None)
        if partial is not None and partial.fd >= 0:
            os.close(partial.fd)
            _remove(partial.path)

    def prepare(self, keys: List[bytes]) -> None:
        """Blobs ``keys`` are about to arrive, in this order: a child process creates
        their temporary files (in the first directory) while the pieces come. Nothing
        when there are few, no fork here, or one is at work already."""
        if len(keys) < PREPARE_AT_LEAST or not self.dirs or self._creator is not None:
            return
        if not may_fork():
            return
        paths = [self._part_path(0, key) for key in keys]
        stop_r, stop_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: creates, never returns
            try:
                _create_all(paths, stop_r, done_w)
            finally:
                os._exit(0)
        os.close(stop_r)
        os.close(done_w)
        self._creator = (pid, stop_w, done_r, keys)

    def settle(self) -> None:
        """The batch is over: the creator (``prepare``) has ended, and the files it made
        that no piece filled are gone."""
        creator, self._creator = self._creator, None
        if creator is None:
            return
        pid, stop_w, done_r, keys = creator
        os.close(stop_w)  # it stops before its next file
        try:
            poller = select.poll()
            poller.register(done_r, select.POLLIN | select.POLLHUP)
            poller.poll(SETTLE_WAIT * 1000)  # its end closes done's write end
        finally:
            os.close(done_r)
        _reap(pid)
        for key in keys:
            if key not in self._partial:
                _remove(self._part_path(0, key))

    def close(self) -> None:
        self.settle()
        for key in list(self._partial):
            self.drop_partial(key)
        if self.private:
            for folder in self.dirs:
                shutil.rmtree(folder, ignore_errors=True)

    # ---- writing, and moving on when a directory is full --------------------------------

    def _open(self, key: bytes, partial: _Partial) -> None:
        """A temporary file in the first directory from ``partial.at`` that can take the
        whole blob; fd -1 when none can."""
        while partial.at < len(self.dirs):
            folder = self.dirs[partial.at]
            path = self._part_path(partial.at, key)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError as exc:
                partial.errors.append(_failed(folder, exc))
                partial.at += 1
                continue
            full = _reserve(fd, partial.size)
            if full is not None:
                os.close(fd)
                _remove(path)
                partial.errors.append(_failed(folder, OSError(full, os.strerror(full))))
                partial.at += 1
                continue
            partial.fd, partial.path = fd, path
            return

    def _part_path(self, at: int, key: bytes) -> str:
        return os.path.join(self.dirs[at], f"{key.hex()}.{os.getpid()}.part")

    def _write(self, key: bytes, partial: _Partial, view: memoryview) -> None:
        while view:
            try:
                written = os.write(partial.fd, view)
            except OSError as exc:
                if not self._move_on(key, partial, exc):
                    return
                continue
            partial.written += written
            view = view[written:]

    def _move_on(self, key: bytes, partial: _Partial, error: OSError) -> bool:
        """The directory could not take more: copy what it holds to the next one that
        can; False when none can (the rest of the blob is dropped)."""
        old_fd, old_path = partial.fd, partial.path
        partial.errors.append(_failed(self.dirs[partial.at], error))
        partial.fd = -1
        try:
            while True:
                partial.at += 1
                self._open(key, partial)
                if partial.fd < 0:
                    return False
                try:
                    _copy(old_path, partial.fd, partial.written)
                    return True
                except OSError as exc:  # the next one is full too: on to the one after
                    partial.errors.append(_failed(self.dirs[partial.at], exc))
                    os.close(partial.fd)
                    _remove(partial.path)
                    partial.fd = -1
        finally:
            os.close(old_fd)
            _remove(old_path)


def _reap(pid: int) -> None:
    """The creator, ended: reaped here unless the agent's reaper (``waitpid(-1)``) took
    it first; never waited for long (a process stuck on a hung disk stays the agent's)."""
    for _ in range(50):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        time.sleep(0.001)


def _create_all(paths: List[str], stop: int, done: int) -> None:
    """The creator: each file made (empty, never truncated: the agent may be writing it
    already) until the list ends or the agent closes ``stop``."""
    signal.set_wakeup_fd(-1)
    for signum in AGENT_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    os.dup2(stop, 0)  # the agent's channel and the workers' pipes are not its to hold
    os.dup2(done, 1)
    _close_from(2)
    stop = 0
    poller = select.poll()
    poller.register(stop, select.POLLIN | select.POLLHUP)
    for path in paths:
        if poller.poll(0):
            return
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            return  # the agent meets the same error, and says it


def _failed(folder: str, exc: OSError) -> str:
    """``/dev/shm: No space left on device``: the base directory, and why."""
    return f"{os.path.dirname(folder)}: {exc.strerror or exc}"


def _copy(path: str, fd: int, size: int) -> None:
    with open(path, "rb") as source:
        while size > 0:
            chunk = source.read(min(COPY_SIZE, size))
            if not chunk:
                return
            size -= len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]


def _reserve(fd: int, size: int) -> Optional[int]:
    """Claim the blob's room now (tmpfs: its pages), so a full directory is known before
    a byte is written; the errno when it does not fit, None otherwise (or unknowable)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None or size <= 0:
        return None
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        return exc.errno if exc.errno in _FULL else None
    return None


def _bases() -> List[str]:
    named = os.environ.get("SSHEXEC_BLOB_DIRS")
    if named:
        return [base for base in named.split(os.pathsep) if base]
    disk = tempfile.gettempdir()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return ["/dev/shm"] if os.path.realpath(disk) == "/dev/shm" else ["/dev/shm", disk]
    return [disk]


def _private_dir(base: str) -> str:
    """A private directory in ``base``; those of agents that died without cleaning up
    (killed) are removed first."""
    for name in os.listdir(base):
        if name.startswith(BLOB_PREFIX):
            pid = name[len(BLOB_PREFIX) :].split("-", 1)[0]
            path = os.path.join(base, name)
            try:
                if os.stat(path).st_uid == os.getuid() and pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
    return tempfile.mkdtemp(prefix=f"{BLOB_PREFIX}{os.getpid()}-", dir=base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
