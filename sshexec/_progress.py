"""``progress()``: an optional progress bar for ``map`` and ``as_completed`` loops.

Owns: choosing tqdm when it is installed (the ``progress`` extra), else a small bar of
our own on stderr; ``follow``, the bar of the files sent before the first task. Must not import: the executor, asyncio, or asyncssh.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")

REDRAW_INTERVAL = 0.1  # seconds between redraws on a terminal
QUARTERS = 4  # lines printed on a non-terminal: at 25, 50, 75 and 100 %


def progress(
    iterable: Iterable[T],
    total: Optional[int] = None,
    desc: Optional[str] = None,
    disable: Optional[bool] = None,
    *,
    file: Optional[IO[str]] = None,
) -> Iterator[T]:
    """Yield the items of ``iterable`` while showing a progress bar on stderr.

    Meant for the loops that consume an executor's results::

        from concurrent.futures import as_completed
        from sshexec import SSHPoolExecutor, progress

        with SSHPoolExecutor(hosts=["node1", "node2"]) as ex:
            for result in progress(ex.map(is_prime, numbers, chunksize=1000), total=len(numbers)):
                ...
            futures = [ex.submit(simulate, seed) for seed in range(100)]
            for future in progress(as_completed(futures), total=len(futures), desc="runs"):
                print(future.result())

    With tqdm installed (``pip install 'sshexec[progress]'``) this is a tqdm bar.
    Without it, a built-in bar redraws one line on a terminal and, when stderr is a
    file or a pipe (a batch job's log), prints at most a few lines (at 25, 50, 75 and
    100 % when the total is known, else one line at the end). The bar is closed when
    the loop ends, breaks or raises. Call it from one thread per bar.

    Args:
        iterable: What to loop over, e.g. ``executor.map(...)`` or ``as_completed(fs)``.
        total: Number of items; default ``len(iterable)`` when it has one.
        desc: Label shown before the bar.
        disable: True shows nothing and just yields the items.
        file: Where to draw; default ``sys.stderr``.

    Returns:
        An iterator over the same items, in the same order.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if disable:
        return iter(iterable)
    tqdm = _load_tqdm()
    if tqdm is not None:
        return iter(tqdm(iterable, total=total, desc=desc, disable=False, file=file))
    return _plain(iterable, total, desc, file if file is not None else sys.stderr)


def follow(
    future: Future[T],
    timeout: float,
    counts: Callable[[], Tuple[int, int]],
    desc: str,
    out: Optional[IO[str]] = None,
) -> T:
    """``future.result(timeout)``, with a bar of ``counts()`` (done, total; bytes) drawn
    on a terminal once it has waited a second: the files going to the hosts before the
    first task. Nothing is drawn where ``out`` (stderr) is not a terminal."""
    out = out if out is not None else sys.stderr
    if not _is_tty(out):
        return future.result(timeout)
    deadline = time.monotonic() + timeout
    bar: Optional[PlainBar] = None
    shown = 0
    try:
        while True:
            try:
                return future.result(min(REDRAW_INTERVAL, max(deadline - time.monotonic(), 0)))
            except FutureTimeout:
                if time.monotonic() >= deadline:
                    raise
            done, total = counts()
            if bar is None and time.monotonic() - deadline + timeout > 1.0 and total:
                bar = PlainBar(total >> 20, desc + " (MiB)", out)
            if bar is not None:
                bar.update((done >> 20) - shown)
                shown = done >> 20
    finally:
        if bar is not None:
            bar.close()


def _load_tqdm() -> Optional[Callable[..., Iterable[Any]]]:
    try:
        module = importlib.import_module("tqdm.auto")  # the optional extra; untyped
    except ImportError:
        return None
    return module.tqdm  # type: ignore[no-any-return]


def _plain(
    iterable: Iterable[T], total: Optional[int], desc: Optional[str], out: IO[str]
) -> Iterator[T]:
    bar = PlainBar(total, desc, out)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()


def _is_tty(out: IO[str]) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60:02d}:{rest % 60:02d}"
    )


class PlainBar:
    """The built-in bar: ``desc:  40%|########            | 40/100 [00:02<00:03, 19.8/s]``."""

    def __init__(self, total: Optional[int], desc: Optional[str], out: IO[str]) -> None:
        self.total, self.desc, self.out = total, desc, out
        self.count = 0
        self.started = time.monotonic()
        self.is_tty = _is_tty(out)
        self._last_draw = 0.0
        self._quarters_shown = 0
        self._closed = False
        if self.is_tty:
            self._draw()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.is_tty:
            now = time.monotonic()
            if now - self._last_draw >= REDRAW_INTERVAL:
                self._draw()
        elif self.total:
            quarter = min(self.count * QUARTERS // self.total, QUARTERS)
            if quarter > self._quarters_shown:
                self._quarters_shown = quarter
                self._write(self.line() + "\n")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.is_tty:
            self._draw()
            self._write("\n")
        elif not self.total or self._quarters_shown < QUARTERS:
            self._write(self.line() + "\n")  # the end state, if it was not printed yet

    def line(self, width: int = 80) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        prefix = f"{self.desc}: " if self.desc else ""
        if not self.total:
            return f"{prefix}{self.count} [{_duration(elapsed)}, {rate:.1f}/s]"
        fraction = min(self.count / self.total, 1.0)
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        stats = f" {self.count}/{self.total} [{_duration(elapsed)}<{_duration(eta)}, {rate:.1f}/s]"
        head = f"{prefix}{fraction:4.0%}|"
        cells = max(width - len(head) - len(stats) - 2, 10)
        filled = int(fraction * cells)
        return f"{head}{'#' * filled}{' ' * (cells - filled)}|{stats}"

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self._write("\r" + self.line(width).ljust(width))

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # stderr closed: the loop matters more than the bar
            pass
