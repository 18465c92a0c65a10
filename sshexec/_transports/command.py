"""A channel that is a local command relaying the agent elsewhere: ``ssh`` or ``srun``.

Owns: ``CommandChannel``, a ``PipeChannel`` whose command's stderr is held back until
the remote program has written its first byte, so that the command's own failure
before that (ssh's exit 255, srun refusing the step) becomes the ``WorkerStartupError``
its transport names (``startup_failure``) instead of worker output; after that byte,
stderr is the remote program's and is relayed. Must not import: asyncssh, the pool,
or know about tasks, Futures or message contents.
"""

from __future__ import annotations

import collections
import subprocess
from typing import Callable, Deque, Optional

from .._errors import WorkerStartupError
from .base import StderrSink
from .local import PipeChannel

EXIT_WAIT = 5.0  # seconds to wait for the command's exit status once its stdout has ended
HELD_LINES = 400  # the command's last stderr lines held back before the remote output


class HeldStderr:
    """A command's stderr lines, held back until the remote program has started; then
    relayed."""

    def __init__(self, sink: StderrSink) -> None:
        self.sink = sink
        # the last lines: a LogLevel DEBUG3 in the user's config says a lot before its error
        self.held: Deque[bytes] = collections.deque(maxlen=HELD_LINES)
        self.is_open = False

    def line(self, data: bytes) -> None:
        if self.is_open:
            self.sink(data)
        else:
            self.held.append(data)

    def open(self) -> None:
        if not self.is_open:
            self.is_open = True
            while self.held:
                self.sink(self.held.popleft())

    def text(self) -> str:
        return b"".join(self.held).decode("utf-8", "replace")


class CommandChannel(PipeChannel):
    """The local command (``proc``) running one agent elsewhere. ``on_started`` is called
    once, when the remote side has answered or the channel closed before it did."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        on_stderr: StderrSink,
        on_started: Optional[Callable[[], None]] = None,
    ) -> None:
        self._held = HeldStderr(on_stderr)
        super().__init__(proc, self._held.line)
        self.pid: Optional[int] = None  # the remote agent's, from its Hello (not the command's)
        self._on_started: Optional[Callable[[], None]] = on_started
        self._has_output = False

    def startup_failure(self, status: Optional[int], said: str) -> Optional[WorkerStartupError]:
        """The error to raise when the command ended (``status``) with no output, having
        written ``said`` to stderr; None when the remote program's own end explains it."""
        return None

    def _started(self) -> None:
        done, self._on_started = self._on_started, None
        if done is not None:
            done()

    async def read(self) -> bytes:
        """As PipeChannel's; raises ``startup_failure()``'s error when the command itself
        failed before the remote program wrote anything."""
        chunk = await super().read()
        if self._has_output:
            return chunk
        self._has_output = True
        self._started()
        if not chunk:
            await super().exit_reason(EXIT_WAIT)  # and its stderr, to the end
            error = self.startup_failure(self.proc.poll(), self._held.text())
            if error is not None:
                raise error
        self._held.open()  # the remote side's own stderr from here on, chatter included
        return chunk

    async def aclose(self, grace: float) -> None:
        self._started()
        await super().aclose(grace)
