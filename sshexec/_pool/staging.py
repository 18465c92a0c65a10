"""Staged files, client side: what ``files=`` and ``send_files`` put on every host.

Owns: ``scan`` (walking the given files and trees from the client's working directory:
each regular file hashed, SHA-256 read piece by piece, by a few threads at once when
there is much to hash, unless ``hashes`` remembers it by its stat; directories and
symlinks inside a tree kept, a symlink leading outside its tree refused, naming it), ``Staging`` (one per executor: everything staged
so far, which every new host session is given before its first worker; the return
patterns; ``Returned``, the files tasks send back) and its transfer to one host:
``StageDir``, the manifest in ``StageOffer`` pieces, only the contents the host's cache
lacks (``StageWant``) streamed in ``StagePut`` pieces from the files, waiting for the
channel's write-ahead to drain after each (never a whole file in memory), then ``StageCommit`` and the
agent's ``Staged``; ``StageReplies``, where a session's reader hands those answers (and
its loss). Bytes sent and saved count in the host's blob counters (``stats()``).
Loop thread only, except ``scan``. Must not import: asyncssh, subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import msgpack

from .._errors import SSHExecError, WorkerStartupError
from .._logs import logger
from .._wire import messages as msgs
from .._wire import protocol as proto
from . import hashes
from .returned import Returned

if TYPE_CHECKING:
    from .session import HostSession

log = logger("sshexec.pool")

HASH_READ = 1 << 20
HASH_THREADS = 4  # files hashed at once, at most (and no more than the CPUs)
HASH_IN_THREADS = 8 << 20  # bytes to hash from which threads share the work
OFFER_BYTES = 1 << 20  # manifest bytes per StageOffer frame, about
STAGE = "files"  # the WorkerStartupError stage of a host that could not take the files
_batches = itertools.count(1)


@dataclass(frozen=True)
class Local:
    """One staged entry: where it goes (``path``, relative) and where it comes from."""

    path: str
    kind: str  # "f" file, "d" directory, "l" symlink
    mode: int
    size: int
    key: bytes  # files: SHA-256 of the content + 2 bytes of mode (msgs.STAGE_KEY)
    target: str  # symlinks: where it points (relative, inside its tree)
    source: str  # files: the absolute path on this machine

    def wire(self) -> List[Union[str, int, bytes]]:
        return [self.path, self.kind, self.mode, self.size, self.key, self.target]


Found = Union[Local, Tuple[str, os.stat_result]]  # a file: where it is, to be hashed


def scan(paths: Iterable[Union[str, os.PathLike[str]]], base: str) -> List[Local]:
    """The entries for ``paths`` (relative to ``base``, kept at the same relative path;
    one outside ``base`` goes under its own name). Raises FileNotFoundError or ValueError
    (a symlink leading outside its tree, a special file) naming the path."""
    found: Dict[str, Found] = {}
    for given in paths:
        name = os.fspath(given)
        full = os.path.abspath(os.path.join(base, name))
        dest = os.path.relpath(full, base)
        if dest == os.curdir:
            dest = ""
        elif dest == os.pardir or dest.startswith(os.pardir + os.sep):
            dest = os.path.basename(full)
        if not os.path.exists(full):
            raise FileNotFoundError(f"files=: {name} does not exist (from {base})")
        if os.path.isdir(full):
            _walk(full, dest, found)
        else:
            found[dest] = (full, os.stat(full))
    return _hashed(found)


def _walk(top: str, dest: str, found: Dict[str, Found]) -> None:
    real_top = os.path.realpath(top)
    if dest:
        found[dest] = Local(dest, "d", stat.S_IMODE(os.stat(top).st_mode), 0, b"", "", "")
    for folder, dirs, files in os.walk(top):
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(folder, name)
            path = (
                os.path.join(dest, os.path.relpath(full, top))
                if dest
                else os.path.relpath(full, top)
            )
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                found[path] = _symlink(full, path, real_top)
            elif stat.S_ISDIR(info.st_mode):
                found[path] = Local(path, "d", stat.S_IMODE(info.st_mode), 0, b"", "", "")
            elif stat.S_ISREG(info.st_mode):
                found[path] = (full, info)
            else:
                raise ValueError(f"files=: {path} is not a regular file, directory or symlink")
        dirs.sort()


def _symlink(full: str, path: str, real_top: str) -> Local:
    real = os.path.realpath(full)
    if real != real_top and not real.startswith(real_top + os.sep):
        raise ValueError(
            f"files=: {path} is a symlink to {os.readlink(full)}, outside the tree "
            f"{real_top} that is sent: refused (send its target too, or copy it in)"
        )
    here = os.path.realpath(os.path.dirname(full))
    return Local(path, "l", 0o777, 0, b"", os.path.relpath(real, here), "")


def _hashed(found: Dict[str, Found]) -> List[Local]:
    """Every file found made an entry, its content hashed unless this process or an
    earlier run knows it (``hashes``): by ``HASH_THREADS`` threads at once when there is
    enough to hash (hashlib and reads let go of the GIL), each taking the next file as
    it is free."""
    hashes.load()
    made: Dict[str, Local] = {}
    unknown: List[Tuple[str, str, os.stat_result]] = []
    for path, entry in found.items():
        if isinstance(entry, tuple):
            digest = hashes.known(hashes.stat_of(entry[1]))
            if digest is None:
                unknown.append((path, *entry))
            else:
                made[path] = _file(entry[0], path, entry[1], digest)

    def hash_some(work: Iterator[Tuple[str, str, os.stat_result]]) -> None:
        for path, full, info in work:
            made[path] = _file(full, path, info, _hash(full, info))

    threads = min(HASH_THREADS, os.cpu_count() or 1, len(unknown))
    if threads > 1 and sum(info.st_size for _, _, info in unknown) >= HASH_IN_THREADS:
        work = iter(unknown)  # next() on a list's iterator is atomic: each file once
        with ThreadPoolExecutor(threads, thread_name_prefix="sshexec-hash") as hashers:
            for running in [hashers.submit(hash_some, work) for _ in range(threads)]:
                running.result()  # an unreadable file: its error, here
    else:
        hash_some(iter(unknown))
    if unknown:
        hashes.save()
    return [made[p] if isinstance(f, tuple) else f for p, f in found.items()]


def _hash(full: str, info: os.stat_result) -> bytes:
    """The SHA-256 of the file's content, read piece by piece, and remembered."""
    started = time.time_ns()
    sha = hashlib.sha256()
    with open(full, "rb") as source:
        for piece in iter(lambda: source.read(HASH_READ), b""):
            sha.update(piece)
    digest = sha.digest()
    hashes.remember(hashes.stat_of(info), digest, started)
    return digest


def _file(full: str, path: str, info: os.stat_result, digest: bytes) -> Local:
    mode = stat.S_IMODE(info.st_mode)
    key = digest + (mode & 0o555).to_bytes(2, "big")
    return Local(path, "f", mode, info.st_size, key, "", full)


def check_patterns(patterns: Iterable[str]) -> List[str]:
    """``return_files=`` patterns: relative, inside the working directory."""
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern or "\0" in pattern:
            raise ValueError(f"return_files: {pattern!r} is not a glob pattern")
        norm = os.path.normpath(pattern)
        if os.path.isabs(pattern) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise ValueError(
                f"return_files: {pattern!r} leads outside the working directory: "
                "patterns are relative to it"
            )
        checked.append(pattern)
    return checked


class StageReplies:
    """A session's answers to staging (``StageWant``, ``Staged``), by batch."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._waiting: Dict[int, asyncio.Future[proto.Message]] = {}
        self._lost = ""

    def expect(self, batch: int) -> asyncio.Future[proto.Message]:
        future: asyncio.Future[proto.Message] = asyncio.get_running_loop().create_future()
        if self._lost:
            future.set_exception(WorkerStartupError(self.host, STAGE, self._lost))
        else:
            self._waiting[batch] = future
        return future

    def on_message(self, message: Union[msgs.StageWant, msgs.Staged]) -> None:
        future = self._waiting.pop(message.batch, None)
        if future is not None and not future.done():
            future.set_result(message)

    def lost(self, reason: str) -> None:
        self._lost = reason
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(WorkerStartupError(self.host, STAGE, reason))


STAGE_REPLIES = (msgs.StageWant, msgs.Staged)


class Staging:
    """An executor's staged files. Loop thread only."""

    def __init__(self, entries: List[Local], patterns: List[str], root: str) -> None:
        self.entries: Dict[str, Local] = {e.path: e for e in entries}
        self.patterns, self.root = patterns, root
        self.returned = Returned(root)
        self.done = self.total = 0  # bytes staged (sent or found cached), and to stage

    async def prepare(self, session: HostSession) -> None:
        """A new session, before its first worker: the directories, and every file so
        far; raises WorkerStartupError (stage ``files``) naming the host and the file."""
        session.send(msgs.StageDir("\0".join(self.patterns)))
        await self.send(session, list(self.entries.values()))

    def add(self, entries: List[Local]) -> None:
        for entry in entries:
            self.entries[entry.path] = entry

    async def send(self, session: HostSession, entries: List[Local]) -> None:
        host, replies = session.host, session.files
        self.total += sum(e.size for e in entries)
        batch = next(_batches)
        wanted_at = replies.expect(batch)
        for part, last in _offers(entries):
            session.send(msgs.StageOffer(batch, part, last))
            session.blobs.bytes_stored += len(part)  # the manifest travels too
        want = await wanted_at
        assert isinstance(want, msgs.StageWant)
        keys = {want.keys[i : i + msgs.STAGE_KEY] for i in range(0, len(want.keys), msgs.STAGE_KEY)}
        saved = 0
        sources: Dict[bytes, Local] = {}
        for entry in entries:
            if entry.kind == "f":
                if entry.key in keys and entry.key not in sources:
                    sources[entry.key] = entry
                else:
                    saved += entry.size
        session.blobs.bytes_saved += saved
        self.done += saved
        problem = ""
        for entry in sources.values():
            try:
                await _stream(session, entry, self)
            except OSError as exc:
                problem = f"{entry.path}: could not be read here: {exc.strerror or exc}"
                break
        done_at = replies.expect(batch)
        session.send(msgs.StageCommit(batch))
        staged = await done_at
        assert isinstance(staged, msgs.Staged)
        error = problem or staged.error
        if error:
            raise WorkerStartupError(
                host,
                STAGE,
                f"the host could not take the staged files: {error}",
                "Free space or fix permissions there (the cache is ~/.cache/sshexec, or "
                "$XDG_CACHE_HOME/sshexec; `sshexec clean --hosts ...` empties it)",
            )
        log.info(
            "files staged host=%s entries=%d sent=%d saved=%d",
            host,
            len(entries),
            sum(e.size for e in sources.values()),
            saved,
        )


def _offers(entries: List[Local]) -> Iterable[Tuple[bytes, bool]]:
    part: List[List[Union[str, int, bytes]]] = []
    size = 0
    for entry in entries:
        item = entry.wire()
        part.append(item)
        size += len(entry.path) + len(entry.target) + 64
        if size >= OFFER_BYTES:
            yield msgpack.packb(part, use_bin_type=True), False
            part, size = [], 0
    yield msgpack.packb(part, use_bin_type=True), True


async def _stream(session: HostSession, entry: Local, staging: Staging) -> None:
    """One file's content in pieces, each written before the next is read."""
    piece, left = session.piece, entry.size
    with open(entry.source, "rb") as source:
        while True:
            data = source.read(min(piece, left)) if left else b""
            if left and not data:
                raise OSError(f"it shrank while being sent ({entry.size - left} bytes read)")
            session.send(msgs.StagePut(entry.key, entry.size, (data,)))
            session.blobs.bytes_stored += len(data)
            staging.done += len(data)
            left -= len(data)
            await asyncio.sleep(0)  # the session's flush runs first
            await session.drain()
            if not left:
                return


def staging_failed(errors: Dict[str, BaseException]) -> SSHExecError:
    return SSHExecError(
        "send_files: " + "; ".join(f"{host}: {error}" for host, error in errors.items())
    )


STAGING_RATE = 100_000  # bytes per second: the slowest link a transfer is waited for


def paths_of(paths: Any) -> List[Any]:
    """``files=`` or ``send_files``' argument: one path, or several."""
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    return list(paths)


def from_options(files: Any, return_files: Any) -> Optional[Staging]:
    """``files=`` and ``return_files=`` checked and scanned (hashing each file here),
    or None when neither is given."""
    if isinstance(return_files, str):
        return_files = [return_files]
    patterns = check_patterns(return_files)
    if files is None and not patterns:
        return None
    root = os.getcwd()
    return Staging(scan(paths_of(files or ()), root), patterns, root)
