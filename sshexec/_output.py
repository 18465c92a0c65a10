"""Remote output, client side: where tasks' prints, stderr and log records end up.

Owns: ``OutputRouter``, which turns ``Output`` frames and relayed stderr lines into
whole lines on this process's ``sys.stdout``/``sys.stderr`` prefixed ``[host:N]``
(or unprefixed, or into ``logging`` only), and re-emits ``Log`` frames as records of
the client's ``logging`` with ``host`` and ``worker`` attached. Runs on the loop
thread. Must not import: asyncio, the pool, or anything about frames beyond
``_protocol``'s message classes.
"""

from __future__ import annotations

import logging
import sys
from typing import Dict, Final, Optional, TextIO, Tuple

from ._wire import protocol as proto

OUTPUT_MODES: Final = ("prefix", "plain", "logging")
MAX_PARTIAL = 1 << 16  # a line longer than this is written in pieces
remote_log = logging.getLogger("sshexec.remote")


def prefix(worker_id: str) -> str:
    """``host#3`` -> ``[host:3]``."""
    host, _, index = worker_id.rpartition("#")
    return f"[{host}:{index}]" if host else f"[{worker_id}]"


def host_of(worker_id: str) -> str:
    """``host#3`` -> ``host``: the ``host`` attribute of records from that worker."""
    return worker_id.rpartition("#")[0] or worker_id


class OutputRouter:
    """Whole lines per worker and stream, in the order each worker wrote them."""

    def __init__(self, mode: str = "prefix") -> None:
        if mode not in OUTPUT_MODES:
            raise ValueError(
                f"remote_output must be one of {', '.join(OUTPUT_MODES)}, got {mode!r}"
            )
        self.mode = mode
        self._partial: Dict[Tuple[str, int], bytes] = {}

    def output(self, worker_id: str, message: proto.Output) -> None:
        """An ``Output`` frame: a chunk of a task's stdout (1) or stderr (2)."""
        key = (worker_id, 2 if message.stream == 2 else 1)
        data = self._partial.pop(key, b"") + message.data
        *lines, rest = data.split(b"\n")
        for line in lines:
            self._emit(worker_id, key[1], line)
        if len(rest) > MAX_PARTIAL:
            self._emit(worker_id, key[1], rest)
        elif rest:
            self._partial[key] = rest

    def stderr_line(self, worker_id: str, line: bytes) -> None:
        """A line the worker process wrote to its real stderr (C code, the interpreter)."""
        self._emit(worker_id, 2, line.rstrip(b"\n"))

    def close(self, worker_id: str) -> None:
        """The worker is gone: write out its unfinished lines."""
        for stream in (1, 2):
            rest = self._partial.pop((worker_id, stream), None)
            if rest:
                self._emit(worker_id, stream, rest)

    def record(self, worker_id: str, message: proto.Log) -> None:
        """Re-emit a task's log record through this process's ``logging``."""
        logger = logging.getLogger(message.name)
        if not logger.isEnabledFor(message.levelno):
            return
        record = logging.makeLogRecord(
            {
                "name": message.name,
                "levelno": message.levelno,
                "levelname": logging.getLevelName(message.levelno),
                "msg": message.message,
                "args": None,
                "pathname": message.pathname,
                "filename": message.pathname.rsplit("/", 1)[-1],
                "module": message.pathname.rsplit("/", 1)[-1].rsplit(".", 1)[0],
                "lineno": message.lineno,
                "funcName": message.func,
                "created": message.created,
                "msecs": (message.created - int(message.created)) * 1000,
                "exc_text": message.exc_text or None,
                "threadName": message.thread_name,
                "host": host_of(worker_id),
                "worker": worker_id,
            }
        )
        logger.handle(record)

    def _emit(self, worker_id: str, stream: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if self.mode == "logging":
            level = logging.WARNING if stream == 2 else logging.INFO
            remote_log.log(
                level,
                "%s %s",
                prefix(worker_id),
                text,
                extra={"host": host_of(worker_id), "worker": worker_id},
            )
            return
        out: Optional[TextIO] = sys.stderr if stream == 2 else sys.stdout
        if out is None:  # pythonw, or closed by the application
            return
        if self.mode == "prefix":
            text = f"{prefix(worker_id)} {text}"
        try:
            out.write(text + "\n")
            out.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced: drop the line
            pass
