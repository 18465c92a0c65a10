"""The worker's side channels: task output, logging and modules, all over the frames.

Owns: ``FrameRaw``/``frame_stream`` (a task's ``sys.stdout``/``sys.stderr`` become
``Output`` frames), ``FrameLogHandler`` (``logging`` records become ``Log`` frames) and
``ClientFinder``/``SourceLoader`` (a module this interpreter lacks is fetched from the
client as source). Shipped to nodes. Must not import: any sshexec module outside
``_wire`` and ``_node``, asyncio, or anything beyond the stdlib.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import io
import linecache
import logging
import os
import sys
import types
from typing import TYPE_CHECKING, Any, Set

from .._wire import protocol as proto

if TYPE_CHECKING:
    from .worker import Worker


def _write_all(fd: int, data: proto.Buffer) -> None:  # also the worker's frame writer
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FrameRaw(io.RawIOBase):
    """``sys.stdout``/``sys.stderr`` of tasks: bytes become ``Output`` frames, so they reach
    the client in order with the replies. If the frame channel is gone they go to fd 2."""

    def __init__(self, worker: Worker, stream: int) -> None:
        super().__init__()
        self.worker, self.stream = worker, stream

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream  # C-level writes: fd 1 points at fd 2, which the host relays too

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        if chunk:
            try:
                self.worker.send(proto.Output(self.stream, chunk))
            except OSError:
                _write_all(2, chunk)
        return len(chunk)


def frame_stream(worker: Worker, stream: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.BufferedWriter(FrameRaw(worker, stream)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )


class FrameLogHandler(logging.Handler):
    """Sends each ``logging`` record of a task to the host as a ``Log`` frame."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker
        self.formatter: logging.Formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = ""
            if record.exc_info:
                exc_text = self.formatter.formatException(record.exc_info)
            if record.stack_info:
                exc_text += ("\n" if exc_text else "") + self.formatter.formatStack(
                    record.stack_info
                )
            self.worker.send(
                proto.Log(
                    record.name,
                    record.levelno,
                    record.getMessage(),
                    record.pathname,
                    record.lineno or 0,
                    record.funcName or "",
                    record.created,
                    exc_text,
                    record.threadName or "",
                )
            )
        except Exception:  # logging's own policy: report on stderr, never raise
            self.handleError(record)


class SourceLoader(importlib.abc.Loader):
    """Runs a module's source fetched from the client; tracebacks show its lines."""

    def __init__(self, source: proto.Source) -> None:
        self.source = source

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        origin = self.source.origin or f"<sshexec forwarded {self.source.name}>"
        code = compile(self.source.code, origin, "exec", dont_inherit=True)
        lines = self.source.code.splitlines(keepends=True)
        linecache.cache[origin] = (len(self.source.code), None, lines, origin)
        exec(code, module.__dict__)

    def get_source(self, name: str) -> str:
        return self.source.code

    def is_package(self, name: str) -> bool:
        return self.source.is_package


class ClientFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: a module this interpreter cannot import is asked for
    from the client (pure-Python source only) and kept in ``sys.modules`` from then on.
    With ``prefix`` (``"sshexec."``), early on ``sys.meta_path`` and only for names under
    it: the rest of the client's own sshexec always comes from the client, never from an
    sshexec installed on the node (another version, an editable install's finder)."""

    def __init__(self, worker: Worker, prefix: str = "") -> None:
        self.worker, self.prefix = worker, prefix
        self.absent: Set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname in self.absent or not fullname.startswith(self.prefix):
            return None
        reply = self.worker.fetch(fullname)
        if reply is None or reply.kind == "missing":
            if reply is not None and reply.detail:
                raise ModuleNotFoundError(self._where(fullname, reply.detail), name=fullname)
            self.absent.add(fullname)
            return None
        if reply.kind == "compiled":
            dist = reply.detail or fullname.partition(".")[0]
            raise ModuleNotFoundError(
                self._where(
                    fullname,
                    f"the client has it from package {dist!r}, which contains compiled code "
                    f"({reply.origin or 'a C extension'}) that sshexec cannot forward. "
                    f"Install it there: {sys.executable} -m pip install {dist}",
                ),
                name=fullname,
            )
        origin = reply.origin or None
        spec = importlib.util.spec_from_loader(
            fullname, SourceLoader(reply), origin=origin, is_package=reply.is_package
        )
        if spec is not None and origin:
            spec.has_location = True  # sets __file__, as for a module imported from disk
        return spec

    def _where(self, fullname: str, why: str) -> str:
        host = self.worker.worker_id.rsplit("#", 1)[0]
        python = "%d.%d.%d" % sys.version_info[:3]
        return (
            f"No module named {fullname!r} on host {host} (hostname {self.worker.hostname}, "
            f"interpreter {sys.executable}, Python {python}): {why}"
        )
