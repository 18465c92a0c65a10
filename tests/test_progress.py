"""progress(): the built-in bar on a terminal and in a log, the tqdm path, and that it
wraps executor loops without changing what they yield."""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import as_completed
from typing import Iterator

import pytest

import sshexec
from sshexec import SSHPoolExecutor, _progress, progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the built-in bar even when tqdm is installed."""
    monkeypatch.setattr(_progress, "_load_tqdm", lambda: None)


def test_exported() -> None:
    assert "progress" in sshexec.__all__
    assert sshexec.__all__ == sorted(sshexec.__all__)
    assert progress.__doc__ is not None and ">>>" not in progress.__doc__
    assert "as_completed" in progress.__doc__


def test_non_tty_prints_a_few_lines(plain: None) -> None:
    out = io.StringIO()
    assert list(progress(range(1000), desc="blocks", file=out)) == list(range(1000))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # 25, 50, 75, 100 %
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("blocks:  25%|") and "250/1000" in lines[0]
    assert lines[-1].startswith("blocks: 100%|") and "1000/1000" in lines[-1]


def test_non_tty_unknown_total_prints_one_line(plain: None) -> None:
    out = io.StringIO()
    items = iter(range(7))  # no len()
    assert sum(progress(items, file=out)) == 21
    assert out.getvalue().count("\n") == 1
    assert out.getvalue().startswith("7 [")


def test_tty_redraws_in_place(plain: None) -> None:
    out = FakeTTY()

    def slow() -> Iterator[int]:
        for i in range(4):
            time.sleep(_progress.REDRAW_INTERVAL * 1.2)
            yield i

    assert list(progress(slow(), total=4, desc="x", file=out)) == [0, 1, 2, 3]
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn with \r
    assert text.count("\r") >= 4
    assert "x:   0%|" in text and "x: 100%|" in text and "4/4" in text


def test_bar_closed_on_break_and_error(plain: None) -> None:
    out = io.StringIO()
    for item in progress(range(100), file=out):
        if item == 9:
            break
    assert "10/100" in out.getvalue() or "9/100" in out.getvalue()
    out = io.StringIO()

    def failing() -> Iterator[int]:
        yield 1
        raise KeyError("boom")

    with pytest.raises(KeyError):
        list(progress(failing(), total=5, file=out))
    assert "1/5" in out.getvalue()


def test_disable_yields_only(plain: None) -> None:
    out = io.StringIO()
    assert list(progress(range(3), file=out, disable=True)) == [0, 1, 2]
    assert out.getvalue() == ""


def test_tqdm_when_installed() -> None:
    pytest.importorskip("tqdm")
    out = io.StringIO()
    assert list(progress(range(50), desc="tq", file=out)) == list(range(50))
    text = out.getvalue()
    assert "tq: 100%" in text and "50/50" in text and "it/s" in text  # tqdm's own format


def test_wraps_map_and_as_completed(plain: None) -> None:
    out = io.StringIO()
    with SSHPoolExecutor(2) as executor:
        squares = list(progress(executor.map(pow, range(20), [2] * 20), total=20, file=out))
        futures = [executor.submit(os.getpid) for _ in range(8)]
        pids = [f.result() for f in progress(as_completed(futures), total=len(futures), file=out)]
    assert squares == [n * n for n in range(20)]
    assert len(pids) == 8 and os.getpid() not in pids
    assert "20/20" in out.getvalue() and "8/8" in out.getvalue()
