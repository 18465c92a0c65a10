"""Flow control and the blob store's lifecycle, end to end.

A task that outprints a client which is not reading waits (as a local process does on a
full pipe) instead of growing the client's memory; blobs stored on a host are forgotten
once nothing needs them, within a byte budget; a blob the agent cannot keep fails the
tasks needing it with the reason and leaves the agent up; a shared object over
``max_frame`` fails its own Future and leaves the host's agent up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from .sshd import SSHServer, executor_kwargs

LINES = 100_000  # of 1000 bytes: 100 MB a task writes
FLOOD = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    from sshexec import SSHPoolExecutor

    def flood(lines, progress, stream):
        import os
        pad = "x" * 990
        for i in range(lines):
            if stream == 1:
                print(f"{{i:08d}} {{pad}}")
            else:
                os.write(2, f"{{i:08d}} {{pad}}\\n".encode())
            if i % 500 == 0:
                with open(progress, "w") as f:
                    f.write(str(i))
        with open(progress, "w") as f:
            f.write("done")
        return lines

    with SSHPoolExecutor(1, **json.loads(os.environ["KW"])) as ex:
        assert ex.submit(flood, {lines}, {progress!r}, {stream}).result() == {lines}
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM")][0]
    with open({report!r}, "w") as f:
        f.write(hwm)
    """
)


@pytest.fixture(params=["local", "ssh"])
def child_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    if request.param == "local":
        return {}
    servers: List[SSHServer] = request.getfixturevalue("sshd_pair")
    return executor_kwargs(servers[:1])


def _progress(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stream", [1, 2], ids=["print", "fd2"])
def test_a_task_outprinting_a_paused_client_waits_and_the_client_stays_small(
    child_kwargs: Dict[str, Any], stream: int, tmp_path: Path
) -> None:
    progress, report = tmp_path / "progress", tmp_path / "hwm"
    root = str(Path(__file__).resolve().parent.parent)
    code = FLOOD.format(
        root=root, lines=LINES, progress=str(progress), stream=stream, report=str(report)
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "KW": json.dumps(child_kwargs)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out = proc.stdout if stream == 1 else proc.stderr
        other = proc.stderr if stream == 1 else proc.stdout
        assert out is not None and other is not None
        # nobody reads: the task gets some way, then blocks on its full pipe
        deadline = time.monotonic() + 60
        while not _progress(progress).isdigit() or int(_progress(progress)) < 1000:
            assert time.monotonic() < deadline, "the task never started writing"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        seen = ""
        for _ in range(60):  # until it has stood still for 2 s
            time.sleep(2.0)
            now = _progress(progress)
            if now == seen:
                break
            seen = now
        assert seen.isdigit() and int(seen) < LINES // 2, f"the task was not held: {seen}"
        # reading again: every line arrives, in order
        import threading

        rest: List[bytes] = []
        drain = threading.Thread(target=lambda: rest.append(other.read()))
        drain.start()
        expected, pattern = 0, re.compile(rb"(\d{8}) x{990}$")
        for line in out:
            found = pattern.search(line.rstrip(b"\n"))
            if found is None:
                continue
            assert int(found.group(1)) == expected
            expected += 1
        assert proc.wait(timeout=120) == 0, rest
        drain.join(10)
        assert expected == LINES
        peak_kb = int(report.read_text())
        assert peak_kb < 150_000, f"the client grew to {peak_kb} kB"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
