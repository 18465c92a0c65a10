"""Flow control and the blob store's lifecycle, end to end.

A task that outprints a client which is not reading waits (as a local process does on a
full pipe) instead of growing the client's memory; blobs stored on a host are forgotten
once nothing needs them, within a byte budget; a blob the agent cannot keep fails the
tasks needing it with the reason and leaves the agent up; a shared object over
``max_frame`` fails its own Future and leaves the host's agent up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from sshexec import SSHExecError, SSHPoolExecutor
from sshexec._pool import blobs
from sshexec._wire import calls, shared
from sshexec._wire import protocol as proto

from .sshd import SSHServer, executor_kwargs


@contextlib.contextmanager
def sharing(*objects: Any) -> Iterator[List[str]]:
    """The calls this thread makes inside name ``objects`` by key (as the joblib backend's
    do for a Parallel call's big arrays); their keys, in hex."""
    scope = shared.Sharing()
    entries = [scope.check(obj) for obj in objects]
    with calls.sharing(entries):
        yield [entry[1].hex() for entry in entries]


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


def start_client(
    template: str, child_kwargs: Dict[str, Any], **fields: Any
) -> subprocess.Popen[bytes]:
    """A client process running ``template`` (formatted with the repository's root,
    ``LINES`` and ``fields``; the executor's arguments in ``KW``), its output piped."""
    root = str(Path(__file__).resolve().parent.parent)
    return subprocess.Popen(
        [sys.executable, "-c", template.format(root=root, lines=LINES, **fields)],
        env={**os.environ, "KW": json.dumps(child_kwargs)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stream", [1, 2], ids=["print", "fd2"])
def test_a_task_outprinting_a_paused_client_waits_and_the_client_stays_small(
    child_kwargs: Dict[str, Any], stream: int, tmp_path: Path
) -> None:
    progress, report = tmp_path / "progress", tmp_path / "hwm"
    proc = start_client(
        FLOOD, child_kwargs, progress=str(progress), stream=stream, report=str(report)
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


# ---- blobs -------------------------------------------------------------------------


def closure_over(n: int, size: int = 2 << 20) -> Callable[[int], int]:
    """A map function carrying ``size`` bytes of its own (a blob, stored once per host)."""
    payload = bytes([n % 256]) * size

    def f(x: int) -> int:
        return x + len(payload) + payload[0]

    return f


def stored_files(base: Path) -> Dict[str, int]:
    """The complete blobs in an agent's private directories under ``base``."""
    found = {}
    for f in base.glob("sshexec-blobs-*/*"):
        if re.fullmatch(r"[0-9a-f]{64}", f.name):
            try:
                found[f.name] = f.stat().st_size
            except FileNotFoundError:  # forgotten meanwhile
                pass
    return found


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def blob_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Local agents keep their blobs under this directory (and nowhere else)."""
    base = tmp_path / "blobs"
    base.mkdir()
    monkeypatch.setenv("SSHEXEC_BLOB_DIRS", str(base))
    return base


def test_map_functions_are_forgotten_on_the_node_once_their_maps_are_done(
    blob_base: Path,
) -> None:
    with SSHPoolExecutor(2) as ex:
        for n in range(40):
            fn = closure_over(n)
            results = ex.map(fn, range(4))
            assert next(results) == (2 << 20) + n
            assert len(stored_files(blob_base)) == 1  # kept while its map lives
            assert list(results) == [x + (2 << 20) + n for x in range(1, 4)]
            del fn, results
            gc.collect()
            wait_until(
                lambda: not stored_files(blob_base),
                f"map {n}: the node still holds {stored_files(blob_base)}",
            )
        assert ex.stats(refresh=0)  # the pool is healthy
    assert not list(blob_base.iterdir())  # the agent removed its directory at the end


def test_blobs_nothing_needs_are_evicted_least_recently_used_and_stored_again(
    blob_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    numpy = pytest.importorskip("numpy")
    monkeypatch.setattr(blobs, "BUDGET", 5 << 20)
    a, b, c = (numpy.full(1 << 18, fill, dtype=numpy.float64) for fill in (1, 2, 3))  # 2 MiB
    with SSHPoolExecutor(1) as ex, sharing(a, b, c) as keys:
        for obj in (a, b, c):
            assert ex.submit(numpy.sum, obj).result(timeout=60) == obj.sum()
        held = stored_files(blob_base)
        assert keys[0] not in held and {keys[1], keys[2]} <= set(held)  # a: the oldest
        assert ex.submit(numpy.sum, a).result(timeout=60) == a.sum()  # stored again
        held = stored_files(blob_base)
        assert keys[1] not in held and {keys[0], keys[2]} <= set(held)


def test_a_shared_object_over_max_frame_fails_its_future_and_the_agent_stays_up(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    numpy = pytest.importorskip("numpy")
    ex = make_executor(1, max_frame=2 << 20)
    big = numpy.ones(3 << 18)  # 6 MiB, named by reference: only its blob is big
    with sharing(big):
        future = ex.submit(numpy.sum, big)
    concurrent.futures.wait([future], timeout=60)
    with pytest.raises(ValueError, match="max_frame=2097152"):
        future.result(timeout=0)
    assert ex.submit(pow, 2, 10).result(timeout=60) == 1024  # same agent, later tasks run
    small = numpy.arange(1 << 17, dtype=numpy.float64)  # 1 MiB: fits
    with sharing(small):
        assert ex.submit(numpy.sum, small).result(timeout=60) == small.sum()


def test_a_blob_bigger_than_a_chunk_crosses_in_pieces(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    numpy = pytest.importorskip("numpy")
    # integer-valued: its sum is exact whatever order (alignment) numpy adds it in
    big = numpy.random.default_rng(1).integers(0, 1000, (3 * proto.CHUNK) // 8 + 12345) * 1.0
    ex = make_executor(1)
    with sharing(big):
        assert ex.submit(numpy.sum, big).result(timeout=60) == big.sum()
    sent: List[proto.Message] = []
    host = blobs.HostBlobs(sent.append, proto.CHUNK)
    data = pickle.dumps(big, protocol=5)
    assert host.store(b"k" * 32, data) and not host.store(b"k" * 32, data)
    pieces = [m.data for m in sent if isinstance(m, proto.Store)]
    assert [sum(map(len, proto.tail_pieces(p))) for p in pieces] == [
        proto.CHUNK,
        proto.CHUNK,
        proto.CHUNK,
        len(data) - 3 * proto.CHUNK,
    ]
    assert all(isinstance(m, proto.Store) and m.size == len(data) for m in sent)


def test_why_a_blob_was_not_kept_outlives_sending_it_again() -> None:
    """A task's failed reply can be read after a later task sent the blob again (the
    reply waits in its worker's channel while the dispatcher goes on): the reason the
    agent gave must still be there to name."""
    host = blobs.HostBlobs(lambda message: None, proto.CHUNK)
    host.store(b"k" * 32, b"data")
    host.store_failed(b"k" * 32, "/dev/shm: No space left on device")
    assert host.store(b"k" * 32, b"data")  # the next task sends it again
    assert host.failed[b"k" * 32] == "/dev/shm: No space left on device"
    for n in range(blobs.FAILED_KEPT + 1):
        host.store_failed(n.to_bytes(32, "big"), "full")
    assert len(host.failed) == blobs.FAILED_KEPT and b"k" * 32 not in host.failed


# ---- a store that cannot keep a blob ---------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only): a /dev/shm that is full."""
    path = tmp_path / "tiny"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_store_falls_back_to_the_next_directory(
    tiny_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    monkeypatch.setenv("SSHEXEC_BLOB_DIRS", os.pathsep.join([str(tiny_tmpfs), str(disk)]))
    with SSHPoolExecutor(1) as ex:
        results = ex.map(closure_over(7), [1, 2])
        assert next(results) == 1 + (2 << 20) + 7
        assert len(stored_files(disk)) == 1 and not stored_files(tiny_tmpfs)  # map alive
        assert list(results) == [2 + (2 << 20) + 7]


def test_a_blob_no_directory_can_keep_fails_its_tasks_clearly_and_the_agent_lives(
    tiny_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    numpy = pytest.importorskip("numpy")
    missing = tmp_path / "missing"
    monkeypatch.setenv("SSHEXEC_BLOB_DIRS", os.pathsep.join([str(tiny_tmpfs), str(missing)]))

    def check(error: BaseException) -> None:
        assert isinstance(error, SSHExecError), repr(error)
        message = str(error)
        assert "could not keep a blob" in message
        assert f"{tiny_tmpfs}: No space left on device" in message
        assert f"{missing}: No such file or directory" in message

    with SSHPoolExecutor(2) as ex:
        with pytest.raises(SSHExecError) as raised:  # a map whose function is a blob
            list(ex.map(closure_over(9), range(3), timeout=60))
        check(raised.value)
        array = numpy.ones(1 << 18)  # a shared object, 2 MiB
        with sharing(array):
            futures = [ex.submit(numpy.sum, array) for _ in range(4)]
        done, _ = concurrent.futures.wait(futures, timeout=60)
        assert len(done) == 4
        for future in futures:
            check(future.exception(timeout=0))  # type: ignore[arg-type]
        assert ex.submit(pow, 3, 3).result(timeout=60) == 27  # the agent lives on


def test_the_node_store_takes_pieces_and_moves_a_blob_that_outgrows_its_directory(
    tiny_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sshexec._node import store

    monkeypatch.setattr(store, "_reserve", lambda fd, size: None)  # find out while writing
    disk = tmp_path / "disk"
    disk.mkdir()
    kept = store.BlobStore([str(tiny_tmpfs), str(disk)])
    try:
        data = os.urandom(3 << 20)
        key = calls.blob_key(data)
        for at in range(0, len(data), 1 << 19):  # in pieces; the tmpfs fills at 1 MiB
            assert kept.put(key, len(data), data[at : at + (1 << 19)]) is None
        assert (disk / Path(kept.dirs[1]).name / key.hex()).read_bytes() == data
        assert not list(Path(kept.dirs[0]).iterdir())  # the partial copy is gone
        small = b"small"
        assert kept.put(calls.blob_key(small), len(small), small) is None
        assert (Path(kept.dirs[0]) / calls.blob_key(small).hex()).read_bytes() == small
        kept.forget(key)
        assert not (Path(kept.dirs[1]) / key.hex()).exists()
        fails = store.BlobStore([str(tiny_tmpfs)])
        reason = fails.put(b"k" * 32, len(data), (data[:100], data[100:]))
        assert reason == f"{tiny_tmpfs}: No space left on device"
        fails.close()
    finally:
        kept.close()
    assert not list(tiny_tmpfs.iterdir()) and not list(disk.iterdir())


def test_a_worker_drops_kept_objects_whose_blobs_were_forgotten(tmp_path: Path) -> None:
    from sshexec._node.lookups import Lookups

    lookups = Lookups(str(tmp_path), lambda name: None)
    keys = []
    for n in range(2):
        found = shared.pieces(list(range(n + 3)))
        keys.append(shared.key_of(found))
        (tmp_path / keys[-1].hex()).write_bytes(b"".join(found))
    assert lookups.shared_object(keys[0]) == [0, 1, 2]
    (tmp_path / keys[0].hex()).unlink()  # the agent forgot it
    assert lookups.shared_object(keys[1]) == [0, 1, 2, 3]
    assert keys[0] not in lookups._shared and keys[1] in lookups._shared
    with pytest.raises(LookupError, match="not in the agent's store"):
        lookups.shared_object(keys[0])


OTHERS = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from sshexec import SSHPoolExecutor

    def flood(progress):
        pad = "x" * 990
        for i in range({lines}):
            print(f"{{i:08d}} {{pad}}")
            if i % 500 == 0:
                with open(progress, "w") as f:
                    f.write(str(i))
        return 0

    with SSHPoolExecutor(2, **json.loads(os.environ["KW"])) as ex:
        flooding = ex.submit(flood, {progress!r})
        while not os.path.exists({progress!r}):
            time.sleep(0.05)
        for n in range(100_000):  # one at a time: each goes to the idle worker
            assert ex.submit(pow, 2, n % 64).result(timeout=120) == 2 ** (n % 64)
            with open({others!r}, "w") as f:
                f.write(str(n))
            if flooding.done():
                break
    """
)


def test_workers_that_print_nothing_go_on_while_another_outprints_a_paused_client(
    child_kwargs: Dict[str, Any], tmp_path: Path
) -> None:
    progress, others = tmp_path / "progress", tmp_path / "others"
    proc = start_client(OTHERS, child_kwargs, progress=str(progress), others=str(others))
    try:
        assert proc.stdout is not None
        wait_until(lambda: _progress(progress).isdigit(), "the flood never started", 60)
        time.sleep(3.0)  # the flood fills what it may and blocks
        held = _progress(progress)
        assert held.isdigit() and int(held) < LINES // 2
        done = _progress(others)

        def others_went_on() -> bool:  # one read: the client rewrites the file as we look
            text = _progress(others)
            return text.isdigit() and int(text) > int(done or 0) + 50

        wait_until(
            others_went_on, f"the other worker's results stopped too (at {_progress(others)})", 20
        )
        assert _progress(progress) == held or int(_progress(progress)) < LINES // 2
        lines = sum(1 for line in proc.stdout if b" xxxx" in line)
        assert proc.wait(timeout=120) == 0
        assert lines == LINES
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_blob_over_the_budget_goes_once_its_last_task_has_ended(
    blob_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    numpy = pytest.importorskip("numpy")
    monkeypatch.setattr(blobs, "BUDGET", 1 << 20)
    big = numpy.ones(1 << 18)  # 2 MiB: over the budget by itself, kept while needed
    with SSHPoolExecutor(1) as ex:
        with sharing(big):
            assert ex.submit(numpy.sum, big).result(timeout=60) == big.sum()
        wait_until(lambda: not stored_files(blob_base), "the blob stayed over the budget", 10)


def test_a_parallel_calls_shared_arrays_leave_the_node_when_the_call_ends(
    blob_base: Path,
) -> None:
    """The joblib backend's shared arrays are held on the hosts for one Parallel call:
    once it ends, the client no longer holds them, and neither does the node."""
    numpy = pytest.importorskip("numpy")
    joblib = pytest.importorskip("joblib")
    import sshexec.joblib  # noqa: F401  (registers the backend)

    data = numpy.arange(1 << 18, dtype=numpy.float64)  # 2 MiB: shared, as joblib memmaps
    key = shared.key_of(shared.pieces(data)).hex()
    with joblib.parallel_config(backend="sshexec", n_jobs=2, max_workers=2):
        with joblib.Parallel() as parallel:
            sums = parallel(joblib.delayed(numpy.sum)(data) for _ in range(6))
            assert sums == [data.sum()] * 6
            assert key in stored_files(blob_base)  # it crossed as a blob
            again = parallel(joblib.delayed(numpy.sum)(data) for _ in range(2))
            assert again == [data.sum()] * 2
            gc.collect()
            assert key in stored_files(blob_base)  # kept while the call's scope lives
        gc.collect()  # the call ended: its scope is let go, the executor stays
        wait_until(
            lambda: key not in stored_files(blob_base),
            "the array stayed on the node after its Parallel call ended",
            20,
        )
        assert (
            joblib.Parallel()(joblib.delayed(numpy.sum)(data) for _ in range(2)) == [data.sum()] * 2
        )  # a later call sends it again
    gc.collect()  # the backend goes, and its executor with it
