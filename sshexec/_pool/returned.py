"""Files tasks send back (``return_files=``), written on the client before their Futures end.

Owns: ``Returned``: each worker's ``FileBack`` pieces written to a temporary file beside
the destination (the same relative path under the client's working directory as the
executor started), renamed into place with its mode when complete; which task brought
each path back (a second task bringing the same path back is an error on that task's
Future, and the first one's file stays); and the verdict on a task's reply: a task whose
files could not be taken (a path leading outside the directory, no space left, no
permission) fails with that error, naming the host and the file. Loop thread only.
Must not import: asyncssh, subprocess.
"""

from __future__ import annotations

import os
import traceback
from typing import Dict, Union

from .._logs import logger
from .._wire import calls
from .._wire import messages as msgs
from .._wire import protocol as proto

log = logger("sshexec.pool")
_UP = os.pardir + os.sep


class _Incoming:
    """One file arriving from one worker."""

    def __init__(self, task_id: int, path: str, dest: str, mode: int) -> None:
        self.task_id, self.path, self.dest, self.mode = task_id, path, dest, mode
        self.temporary = ""
        self.fd = -1
        self.received = 0

    def close(self, keep: bool) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temporary:
            if keep:
                os.chmod(self.temporary, self.mode & 0o7777)
                os.replace(self.temporary, self.dest)
            else:
                try:
                    os.unlink(self.temporary)
                except OSError:
                    pass
            self.temporary = ""


class Returned:
    def __init__(self, root: str) -> None:
        self.root = root
        self.owners: Dict[str, int] = {}  # path -> the task that brought it back
        self.incoming: Dict[str, _Incoming] = {}  # worker id -> the file arriving from it
        self.errors: Dict[int, BaseException] = {}  # task id -> why its files failed it
        self.count = 0  # files written

    def take(self, worker_id: str, host: str, message: msgs.FileBack) -> None:
        arriving = self.incoming.get(worker_id)
        if arriving is None or (arriving.task_id, arriving.path) != (
            message.task_id,
            message.path,
        ):
            if arriving is not None:
                arriving.close(keep=False)
            arriving = self._start(host, message)
            self.incoming[worker_id] = arriving
        pieces = proto.tail_pieces(message.data)
        arriving.received += sum(map(len, pieces))
        if arriving.fd >= 0:
            try:
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(arriving.fd, view) :]
            except OSError as exc:
                arriving.close(keep=False)
                self._fail(message.task_id, _here(exc, message.path, host))
        if arriving.received >= message.size:
            del self.incoming[worker_id]
            try:
                arriving.close(keep=arriving.fd >= 0)
            except OSError as exc:
                arriving.close(keep=False)
                self._fail(message.task_id, _here(exc, message.path, host))
                return
            if arriving.task_id not in self.errors:
                self.count += 1

    def _start(self, host: str, message: msgs.FileBack) -> _Incoming:
        path, task_id = message.path, message.task_id
        norm = os.path.normpath(path) if path else ""
        dest = os.path.join(self.root, norm)
        arriving = _Incoming(task_id, path, dest, message.mode)
        if not norm or os.path.isabs(norm) or norm == os.pardir or norm.startswith(_UP):
            self._fail(
                task_id,
                PermissionError(
                    f"{path!r} from {host} leads outside the working directory: not written"
                ),
            )
            return arriving
        owner = self.owners.setdefault(norm, task_id)
        if owner != task_id:
            self._fail(
                task_id,
                FileExistsError(
                    f"{path} (return_files), written on {host} by task {task_id}, was already "
                    f"brought back by task {owner}: two tasks wrote the same path; the first "
                    "one's file is kept"
                ),
            )
            return arriving
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            arriving.temporary = f"{dest}.sshexec-{os.getpid()}.part"
            arriving.fd = os.open(arriving.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            arriving.temporary = ""
            self._fail(task_id, _here(exc, path, host))
        return arriving

    def _fail(self, task_id: int, error: BaseException) -> None:
        log.warning("return_files task=%d: %s", task_id, error)
        self.errors.setdefault(task_id, error)

    def verdict(
        self, worker_id: str, reply: Union[proto.Done, proto.Failed]
    ) -> Union[proto.Done, proto.Failed]:
        """The reply the task's Future gets: its own, or the error of its files."""
        arriving = self.incoming.get(worker_id)
        if arriving is not None and arriving.task_id == reply.task_id:  # cut short
            del self.incoming[worker_id]
            arriving.close(keep=False)
        error = self.errors.pop(reply.task_id, None)
        if error is None or isinstance(reply, proto.Failed):
            return reply
        return _failed(reply.task_id, worker_id, error)

    def close(self) -> None:
        for arriving in self.incoming.values():
            arriving.close(keep=False)
        self.incoming.clear()


def _here(exc: OSError, path: str, host: str) -> BaseException:
    error = type(exc)(
        exc.errno or 0,
        f"{path} (return_files, from {host}): writing it here failed: {exc.strerror or exc}",
    )
    return error


def _failed(task_id: int, worker_id: str, error: BaseException) -> proto.Failed:
    name = type(error).__qualname__
    if type(error).__module__ != "builtins":
        name = f"{type(error).__module__}.{name}"
    text = f"on the client, taking the files worker {worker_id} sent back:\n"
    text += "".join(traceback.format_exception_only(type(error), error))
    try:
        blob = calls.serialize(error)
    except Exception:  # an exception that cannot pickle: a RemoteError carries its text
        blob = b""
    return proto.Failed(task_id, name, str(error), text, blob, proto.STAGE_RESULT)
