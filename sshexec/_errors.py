"""The exception hierarchy, remote tracebacks and ``rebuild()``.

Owns: every sshexec exception class, turning a worker's ``Failed`` reply back into
the exception the caller sees, and filling a remote traceback's missing source lines
from the client's (``with_source_lines``). Must not import: asyncio, asyncssh, or do
any I/O beyond ``linecache`` reading the client's source files.
"""

from __future__ import annotations

import linecache
import pickle
import re
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ._wire.protocol import STAGE_CALL

if TYPE_CHECKING:
    from ._wire.protocol import Failed

__all__ = [
    "ActorDiedError",
    "BrokenPool",
    "CallDecodeError",
    "ProtocolError",
    "PythonVersionError",
    "RemoteError",
    "ResultDecodeError",
    "SSHExecError",
    "TaskKilled",
    "TaskMemoryError",
    "TaskTimeout",
    "WorkerLostError",
    "WorkerStartupError",
    "rebuild",
    "with_source_lines",
]


class SSHExecError(Exception):
    """Base class for failures of sshexec itself (not of the user's callable)."""

    __module__ = "sshexec"


class BrokenPool(SSHExecError, BrokenProcessPool):
    """No usable worker is left; ``reasons`` maps each host to why it is unusable."""

    __module__ = "sshexec"

    def __init__(self, message: str, reasons: Optional[Mapping[str, str]] = None) -> None:
        self.reasons: Dict[str, str] = dict(reasons or {})
        lines = [message] + [f"  {host}: {why}" for host, why in self.reasons.items()]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> Any:
        return (_rebuild_broken_pool, (str(self), self.reasons))


def _rebuild_broken_pool(text: str, reasons: Dict[str, str]) -> BrokenPool:
    exc = BrokenPool("", None)
    exc.args, exc.reasons = (text,), reasons
    return exc


class WorkerLostError(SSHExecError, BrokenProcessPool):
    """The worker running a task died; names host, pid and exit status of each attempt."""

    __module__ = "sshexec"

    def __init__(self, task_id: int, attempts: Sequence[Tuple[str, str]]) -> None:
        self.task_id = task_id
        self.attempts: Tuple[Tuple[str, str], ...] = tuple(attempts)  # (worker_id, how it died)
        if len(self.attempts) == 1:
            worker, how = self.attempts[0]
            text = f"task {task_id}: worker {worker} was lost while running it: {how}"
        else:
            tries = "; ".join(f"{w}: {how}" for w, how in self.attempts)
            text = (
                f"task {task_id} lost its worker on each of {len(self.attempts)} attempts: {tries}"
            )
        super().__init__(text)

    @property
    def host(self) -> str:
        """The host of the last worker that died running the task."""
        return self.attempts[-1][0].rsplit("#", 1)[0] if self.attempts else ""

    def __reduce__(self) -> Any:
        return (WorkerLostError, (self.task_id, self.attempts))


class _TaskStopped(SSHExecError):
    """A task the pool ended on purpose: its worker killed, on the node, for it."""

    def __init__(
        self, task_id: int, host: str, worker_id: str, limit: Optional[float], detail: str
    ) -> None:
        self.task_id, self.host, self.worker_id = task_id, host, worker_id
        self.limit = limit  # seconds (TaskTimeout), bytes (TaskMemoryError), None (TaskKilled)
        self.detail = detail
        super().__init__(f"task {task_id} on host {host} (worker {worker_id}) {self._what()}")

    def _what(self) -> str:
        return self.detail

    def __reduce__(self) -> Any:
        args = (self.task_id, self.host, self.worker_id, self.limit, self.detail)
        return (type(self), args)


class TaskTimeout(_TaskStopped, TimeoutError):
    """A task ran past its time limit (``task_timeout``, ``options(timeout=)``): its
    worker was killed on the node with everything it started, and replaced; never
    retried. ``limit`` is the limit in seconds, ``host`` and ``task_id`` say which."""

    __module__ = "sshexec"

    def _what(self) -> str:
        return f"passed its time limit of {self.limit:g} s ({self.detail}); its worker was killed"


class TaskMemoryError(_TaskStopped, MemoryError):
    """A task's process tree (the worker and every process it started) used more resident
    memory than its limit (``task_memory``, ``options(memory=)``): killed on the node and
    replaced; never retried. ``limit`` is the limit in bytes."""

    __module__ = "sshexec"

    def _what(self) -> str:
        return (
            f"passed its memory limit of {self.limit:.0f} bytes ({self.detail}); "
            "its worker was killed"
        )


class TaskKilled(_TaskStopped):
    """The task was ended by ``SSHPoolExecutor.kill()`` while it ran (its worker killed
    with everything it started, and replaced)."""

    __module__ = "sshexec"

    def _what(self) -> str:
        return f"was killed by kill() ({self.detail})"


class ActorDiedError(SSHExecError):
    """An actor's process ended (its ``__init__`` raised, it crashed or was killed, its
    host was lost): its pending calls and every later one fail with this, unless it was
    made with ``restart=`` and restarts are left (then only the pending calls fail).
    ``host``, ``cls`` (the class's name) and ``how`` (exit status, signal, or the
    exception ``__init__`` raised) say which and why; never retried."""

    __module__ = "sshexec"

    def __init__(self, host: str, cls: str, how: str) -> None:
        self.host, self.cls, self.how = host, cls, how
        super().__init__(f"actor {cls} on host {host} died: {how}")

    def __reduce__(self) -> Any:
        return (ActorDiedError, (self.host, self.cls, self.how))


class WorkerStartupError(SSHExecError):
    """A host could not start a worker: connect, host key, auth, interpreter, version
    or initializer. ``stage`` says which, ``fix`` what to check."""

    __module__ = "sshexec"

    def __init__(self, host: str, stage: str, reason: str, fix: str = "") -> None:
        self.host, self.stage, self.reason, self.fix = host, stage, reason, fix
        text = f"{host}: {stage} failed: {reason}"
        super().__init__(f"{text}. {fix}" if fix else text)

    def __reduce__(self) -> Any:
        return (WorkerStartupError, (self.host, self.stage, self.reason, self.fix))


class PythonVersionError(SSHExecError):
    """A task carries code only the client's Python version can load (a lambda, a
    closure, a nested function, a notebook cell), and no host runs that version; the
    message names the function, its file and line, the versions and the fix."""

    __module__ = "sshexec"


class ProtocolError(SSHExecError):
    """A worker sent bytes that are not a valid frame stream; that link is closed."""

    __module__ = "sshexec"


class ResultDecodeError(SSHExecError, BrokenProcessPool):
    """The worker's result could not be unpickled on this host (only that Future fails;
    a ``BrokenProcessPool`` as in ProcessPoolExecutor)."""

    __module__ = "sshexec"


class CallDecodeError(SSHExecError, BrokenProcessPool):
    """The worker could not unpickle the call (a module missing on the node, say). Only
    that Future fails; a ``BrokenProcessPool`` as in ProcessPoolExecutor and loky.

    The message names the task, the worker and the remote exception's type and message.
    As loky's "A task has failed to un-serialize", the ``__cause__`` is a
    ``concurrent.futures.process._RemoteTraceback`` whose text is the worker's
    traceback: host and pid, the frames, and the exception's type and message.
    ``original`` is that exception itself, rebuilt here as ``result()`` would raise it
    (its own type when it unpickles, else a ``RemoteError``; its ``__cause__`` is the
    same traceback), or None when the error was made by hand.
    """

    __module__ = "sshexec"

    def __init__(self, message: str, original: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.original = original

    def __reduce__(self) -> Any:
        return (CallDecodeError, (str(self), self.original))


class RemoteError(SSHExecError):
    """A user exception that could not cross back; carries its type name, text and stack."""

    __module__ = "sshexec"

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name, self.message, self.remote_traceback = type_name, message, remote_traceback
        super().__init__(f"{type_name}: {message}" if message else type_name)

    def __reduce__(self) -> Any:
        return (RemoteError, (self.type_name, self.message, self.remote_traceback))


def _load_exception(data: bytes) -> Optional[BaseException]:
    if not data:
        return None
    try:
        exc = pickle.loads(data)
    except BaseException:  # an exception class whose __init__ needs arguments is the classic case
        return None
    return exc if isinstance(exc, BaseException) else None


def rebuild(failure: Failed, worker_id: str = "") -> BaseException:
    """The exception ``result()`` raises for a ``Failed`` reply: the user's own type when
    it unpickles, with the stdlib's ``_RemoteTraceback`` as its cause; else ``RemoteError``.
    A call the worker could not unpickle is a ``CallDecodeError`` whose cause is the
    ``_RemoteTraceback``. Either traceback has the client's source lines where the
    worker had none (``with_source_lines``)."""
    text = with_source_lines(failure.traceback)
    exc = _load_exception(failure.exception)
    if exc is None:
        exc = RemoteError(failure.type_name, failure.message, text)
    remote = _RemoteTraceback(_quoted(text))  # type: ignore[arg-type]  # a str at runtime
    exc.__cause__ = remote
    if failure.stage != STAGE_CALL:
        return exc
    where = f"worker {worker_id}" if worker_id else "the worker"
    error = CallDecodeError(
        f"task {failure.task_id}: {where} could not unpickle the call: "
        f"{failure.type_name}: {failure.message} (is everything it needs importable on that node?)",
        exc,
    )
    error.__cause__ = remote
    return error


def _quoted(traceback_text: str) -> str:
    # The layout ProcessPoolExecutor gives its remote tracebacks.
    return f'\n"""\n{traceback_text}"""'


# A frame line of traceback.format_exception, 3.9 to 3.13: in an exception group each
# line has a margin of two spaces per level and "| ". A SyntaxError's location line has
# no ", in name" and is left alone (its text comes with the exception, not from a file).
_FRAME = re.compile(r'(?P<margin>(?: *\| )?)  File "(?P<file>.+)", line (?P<line>\d+), in ')


def _client_line(filename: str, lineno: int) -> str:
    linecache.checkcache(filename)  # as the traceback module does: a changed file is reread
    return linecache.getline(filename, lineno)


def with_source_lines(
    traceback_text: str, getline: Callable[[str, int], str] = _client_line
) -> str:
    """``traceback_text`` with the source line put under each frame that has none.

    A function that travelled by value (from ``__main__``, a notebook, a module the node
    lacks) has no file on the node, so the worker's traceback shows only where each of
    its frames was. The client usually has those files, or their lines in ``linecache``
    (notebook cells): each line is indented as CPython's traceback module indents it.
    A frame the client has no line for stays as it came; nothing else changes.
    """
    lines = traceback_text.split("\n")
    out: List[str] = []
    for at, line in enumerate(lines):
        out.append(line)
        frame = _FRAME.match(line)
        if frame is None:
            continue
        margin = frame["margin"]
        following = lines[at + 1] if at + 1 < len(lines) else ""
        if following.startswith(margin + "    "):  # the node showed the source already
            continue
        source = getline(frame["file"], int(frame["line"])).strip()
        if source:
            out.append(f"{margin}    {source}")
    return "\n".join(out)
