"""What the pool sees of a host: the ``Channel`` and ``Transport`` protocols, and the
start-marker handshake every transport's channels go through.

Owns: ``Channel`` (one worker process's byte pipe, its stderr and how it ended),
``Transport`` (opens channels on one host), ``StderrTail``, ``describe_exit`` and
``handshake()``, which skips shell chatter up to the start marker and ships the
bundle when the node's cache lacks it. Must not import: asyncssh, subprocess, or
know about tasks, Futures or message contents.
"""

from __future__ import annotations

import collections
import signal
from typing import Callable, Deque, Optional, Protocol

from .. import _bootstrap
from .._errors import WorkerStartupError
from .._logs import logger
from .._wire.protocol import START_MARKER, Buffer

log = logger("sshexec.pool")

READ_SIZE = 1 << 20
# bytes a channel holds for its pipe before ``drain`` waits (it returns below a quarter of
# this): a bulk sender (staged files, big blobs) keeps the pipe full between its writes
WRITE_AHEAD = 4 << 20
MAX_CHATTER = 1 << 20  # bytes of login-shell output tolerated before the start marker
STDERR_TAIL_LINES = 20

StderrSink = Callable[[bytes], None]


class Channel(Protocol):
    """One worker process's stdin/stdout, plus what is known of how it ended."""

    pid: Optional[int]  # the worker's pid once its Hello has been read

    async def read(self) -> bytes:
        """Next chunk of the worker's stdout; ``b""`` at EOF."""

    def write(self, data: Buffer) -> None: ...

    async def drain(self) -> None: ...

    def backlog(self) -> int:
        """Bytes written and not yet taken by the other end (the pipe to the process,
        or the SSH channel's window); 0 when unknown. Shrinking, it shows the host is
        there: its silence while our writes still drain is not silence."""

    async def aclose(self, grace: float) -> None:
        """End the worker: close its stdin, wait up to ``grace``, then force it. Bounded."""

    async def exit_reason(self, timeout: float) -> str:
        """How the process ended ("exit status 1", "killed by signal KILL"), waiting up to
        ``timeout`` for it to be known."""

    def stderr_tail(self) -> str: ...

    def kill(self) -> None:
        """Best effort: signal the worker to die now (used for ``kill_workers``)."""


class Transport(Protocol):
    host: str
    kind: str  # "local", "asyncssh", "openssh" or "srun": what carries the bytes

    async def connect(self) -> None: ...

    async def open_channel(self, on_stderr: StderrSink) -> Channel: ...

    async def aclose(self) -> None: ...


class StderrTail:
    """Relays a worker's stderr line by line and keeps the last lines for error messages."""

    def __init__(self, sink: StderrSink) -> None:
        self.sink = sink
        self.lines: Deque[bytes] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self._emit(line + b"\n")

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial + b"\n")
            self._partial = b""

    def _emit(self, line: bytes) -> None:
        self.lines.append(line)
        self.sink(line)

    def text(self) -> str:
        return b"".join(self.lines).decode("utf-8", "replace").strip()


def describe_exit(status: Optional[int], signal_name: Optional[str] = None) -> str:
    if signal_name:  # sshd reports "KILL", Popen -9: say SIGKILL for both
        return f"killed by signal {signal_name if signal_name.startswith('SIG') else 'SIG' + signal_name}"
    if status is None:
        return "ended with no exit status"
    if status < 0:
        try:
            return f"killed by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


async def handshake(channel: Channel, host: str, python: str) -> bytes:
    """Read past shell chatter to the start marker; send the bundle if asked.

    Returns the bytes already read beyond the handshake (the start of the frames).
    Raises WorkerStartupError naming the host when no worker can start there.
    """
    channel.write(_bootstrap.stage1_code())
    buffer = bytearray()
    while True:
        at = buffer.find(START_MARKER)
        if at >= 0 and len(buffer) > at + len(START_MARKER):
            break
        if len(buffer) > MAX_CHATTER:
            raise WorkerStartupError(
                host,
                "bootstrap",
                f"over {MAX_CHATTER} bytes of output before the worker started",
                "Make the login shell quiet for non-interactive sessions (~/.bashrc, ~/.profile).",
            )
        chunk = await channel.read()
        if not chunk:
            raise await _no_start(channel, host, python, bytes(buffer))
        buffer += chunk
    if at:
        chatter = bytes(buffer[:at]).decode("utf-8", "replace").strip()
        log.warning("shell chatter before the worker started host=%s: %.200r", host, chatter)
    answer, rest = buffer[at + len(START_MARKER)], bytes(buffer[at + len(START_MARKER) + 1 :])
    if answer in (_bootstrap.NEED[0], _bootstrap.NEED_SOURCE[0]):
        channel.write(_bootstrap.bundle_message(compiled=answer == _bootstrap.NEED[0]))
        await channel.drain()
        return rest
    if answer == _bootstrap.HAVE[0]:
        return rest
    if answer == _bootstrap.WRONG_VERSION[0]:
        while chunk := await channel.read():
            rest += chunk
        found = rest.decode("ascii", "replace")
        oldest = "%d.%d" % _bootstrap.OLDEST
        raise WorkerStartupError(
            host,
            "interpreter",
            f"remote interpreter {python!r} is Python {found}; sshexec needs Python {oldest} "
            "or newer on the nodes",
            f"Install Python {oldest}+ on {host} (python{_bootstrap.client_version()} is best: "
            "everything runs there, lambdas included) or point at one with "
            "python='/path/to/python3' (SSHPoolExecutor(python=...) or Host(..., python=...)).",
        )
    raise WorkerStartupError(host, "bootstrap", f"unexpected handshake byte {answer!r}")


async def _no_start(channel: Channel, host: str, python: str, output: bytes) -> WorkerStartupError:
    how = await channel.exit_reason(timeout=2.0)
    stderr = channel.stderr_tail()
    detail = f"; stderr: {stderr[-600:]}" if stderr else ""
    if how == f"exit status {_bootstrap.MISSING_CWD_EXIT}":
        said = [x for x in stderr.splitlines() if x.startswith(_bootstrap.CWD_ERROR)]
        return WorkerStartupError(
            host,
            "working directory",
            said[-1][len("sshexec: ") :] if said else f"cannot change to it ({how})",
            f"Create that directory on {host}, or fix Host(cwd=...) / the host file's cwd=.",
        )
    if how == f"exit status {_bootstrap.MISSING_PYTHON_EXIT}":
        return WorkerStartupError(
            host,
            "interpreter",
            f"no usable Python found ({python}){detail}",
            f"Install Python {_bootstrap.client_version()} on {host}, or pass python='/path/to/python3'.",
        )
    seen = f"; stdout before exit: {output[-200:]!r}" if output else ""
    return WorkerStartupError(
        host,
        "bootstrap",
        f"the worker process ended before starting ({how}){detail}{seen}",
        f"Check that `{python}` runs on {host} for this user.",
    )
