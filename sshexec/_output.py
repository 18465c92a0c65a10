"""Remote output, client side: where tasks' prints, stderr and log records end up.

Owns: ``OutputRouter``, which turns ``Output`` frames and relayed stderr lines into
whole lines on this process's ``sys.stdout``/``sys.stderr`` prefixed ``[host:N]``
(or unprefixed, or into ``logging`` only), and re-emits ``Log`` frames as records of
the client's ``logging`` with ``host`` and ``worker`` attached.

Lines and records are cut on the loop thread but written by a writer thread of the
router's own (``sshexec-output-<n>``, started on the first line): a slow consumer
(``| less``), a blocked terminal or a logging handler that raises never stops the
loop thread, so the results of workers that print nothing keep coming. The pool
keeps a worker's results behind its output (``pending``: a Future resolves after its
task's prints are written) and stops reading from workers whose output is waiting
while more than ``HIGH_WATER`` bytes wait to be written, so a worker that outprints the
consumer waits (its agent stops reading it), as a local process blocked on a full pipe
does, and workers that print nothing go on. Must not import: asyncio, the
pool, or anything about frames beyond ``_wire.protocol``'s message classes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import sys
import threading
from typing import Callable, Deque, Dict, Final, Optional, TextIO, Tuple, Union

from ._wire import protocol as proto

OUTPUT_MODES: Final = ("prefix", "plain", "logging")
MAX_PARTIAL = 1 << 16  # a line longer than this is written in pieces
HIGH_WATER: Final = 4 << 20  # bytes waiting to be written beyond which workers wait
WRITER_TIMEOUT: Final = 5.0  # seconds shutdown waits for the writer to finish
remote_log = logging.getLogger("sshexec.remote")
_writer_ids = itertools.count()

Line = Tuple[str, int, str]  # worker_id, stream (1 or 2), text without newline
Item = Union[Line, Tuple[logging.Logger, logging.LogRecord]]


def prefix(worker_id: str) -> str:
    """``host#3`` -> ``[host:3]``."""
    host, _, index = worker_id.rpartition("#")
    return f"[{host}:{index}]" if host else f"[{worker_id}]"


def host_of(worker_id: str) -> str:
    """``host#3`` -> ``host``: the ``host`` attribute of records from that worker."""
    return worker_id.rpartition("#")[0] or worker_id


class OutputRouter:
    """Whole lines per worker and stream, in the order each worker wrote them.

    Fed on the loop thread; written on the writer thread. ``wake`` (set by the pool) is
    called from the writer thread after a write when the loop asked with ``want_wake``.
    """

    def __init__(self, mode: str = "prefix") -> None:
        if mode not in OUTPUT_MODES:
            raise ValueError(
                f"remote_output must be one of {', '.join(OUTPUT_MODES)}, got {mode!r}"
            )
        self.mode = mode
        self.wake: Callable[[], None] = lambda: None
        self._partial: Dict[Tuple[str, int], bytes] = {}
        self._queue: Deque[Tuple[Item, int]] = collections.deque()  # (item, its size)
        self._cond = threading.Condition(threading.Lock())
        self._backlog = 0  # bytes queued, not yet written
        self._queued = 0  # items ever queued; an item's number is its position
        self._written = 0  # items written (or dropped) by the writer, in order
        self._last: Dict[str, int] = {}  # worker -> number of its latest queued item
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._wanted = False  # the loop waits for progress: wake it after the next write

    # ---- fed on the loop thread -------------------------------------------------------

    def output(self, worker_id: str, message: proto.Output) -> None:
        """An ``Output`` frame: a chunk of a task's stdout (1) or stderr (2)."""
        key = (worker_id, 2 if message.stream == 2 else 1)
        data = self._partial.pop(key, b"") + message.data
        *lines, rest = data.split(b"\n")
        for line in lines:
            self._line(worker_id, key[1], line)
        if len(rest) > MAX_PARTIAL:
            self._line(worker_id, key[1], rest)
        elif rest:
            self._partial[key] = rest

    def stderr_line(self, worker_id: str, line: bytes) -> None:
        """A line the worker process wrote to its real stderr (C code, the interpreter)."""
        self._line(worker_id, 2, line.rstrip(b"\n"))

    def close(self, worker_id: str) -> None:
        """The worker is gone: write out its unfinished lines."""
        for stream in (1, 2):
            rest = self._partial.pop((worker_id, stream), None)
            if rest:
                self._line(worker_id, stream, rest)
        self._last.pop(worker_id, None)

    def record(self, worker_id: str, message: proto.Log) -> None:
        """Re-emit a task's log record through this process's ``logging``."""
        logger = logging.getLogger(message.name)
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
        self._put(worker_id, (logger, record), len(message.message) + 200)

    def _line(self, worker_id: str, stream: int, line: bytes) -> None:
        self._put(worker_id, (worker_id, stream, line.decode("utf-8", "replace")), len(line) + 1)

    def _put(self, worker_id: str, item: Item, size: int) -> None:
        with self._cond:
            if not self._closed:
                self._queued += 1
                self._last[worker_id] = self._queued
                self._queue.append((item, size))
                self._backlog += size
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._write_all, name=f"sshexec-output-{next(_writer_ids)}"
                    )
                    self._thread.daemon = True  # a consumer blocked for good must not hang exit
                    self._thread.start()
                self._cond.notify()
                return
        self._write(item)  # after stop(): late stderr of a closing worker, written here

    # ---- asked on the loop thread -----------------------------------------------------

    def pending(self, worker_id: str) -> bool:
        """Some of this worker's output is not written yet."""
        return self._last.get(worker_id, 0) > self._written

    @property
    def is_backlogged(self) -> bool:
        return self._backlog > HIGH_WATER

    def want_wake(self) -> None:
        """Call ``wake`` after the writer's next progress (the loop is about to wait)."""
        self._wanted = True

    def stop(self) -> None:
        """No more lines: the writer writes what is queued, then ends (see ``is_writing``)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def is_writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def backlog(self) -> int:
        return self._backlog

    # ---- the writer thread ------------------------------------------------------------

    def _write_all(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            streams = set()
            for item, _ in batch:
                streams.add(self._write(item, flush=False))
            for stream in streams:
                _flush(stream)
            with self._cond:
                self._written += len(batch)
                self._backlog -= sum(size for _, size in batch)
            if self._wanted:
                self._wanted = False
                try:
                    self.wake()
                except BaseException:  # the loop is gone: nobody waits any more
                    pass

    def _write(self, item: Item, flush: bool = True) -> Optional[TextIO]:
        try:
            if isinstance(item[0], logging.Logger):
                logger, record = item
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
                return None
            worker_id, stream, text = item
            if self.mode == "logging":
                remote_log.log(
                    logging.WARNING if stream == 2 else logging.INFO,
                    "%s %s",
                    prefix(worker_id),
                    text,
                    extra={"host": host_of(worker_id), "worker": worker_id},
                )
                return None
            out: Optional[TextIO] = sys.stderr if stream == 2 else sys.stdout
            if out is None:  # pythonw, or closed by the application
                return None
            out.write(f"{prefix(worker_id)} {text}\n" if self.mode == "prefix" else text + "\n")
            if flush:
                _flush(out)
            return out
        except BaseException:  # a closed stream, a handler that raises: drop it, go on
            return None


def _flush(stream: Optional[TextIO]) -> None:
    if stream is not None:
        try:
            stream.flush()
        except BaseException:  # closed or replaced meanwhile
            pass
