"""Staged files (``files=``, ``send_files``) and files brought back (``return_files=``), on
local workers and real sshd hosts: every worker finds the tree at the same relative paths,
a host's cache keeps contents by hash (a rerun sends almost nothing, a changed file alone
travels), outputs come back before their Futures end, and per-executor directories are
gone after shutdown. Each test gives its hosts a cache of its own (``XDG_CACHE_HOME``)."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import cloudpickle
import pytest

from benchmarks.proxy import DelayProxy
from sshexec import Host, SSHExecError, SSHPoolExecutor, parse_host
from sshexec._node import staging as node_staging
from sshexec._node.store import BlobStore
from sshexec._pool import hashes as client_hashes
from sshexec._progress import follow
from sshexec._wire import messages as msgs

from .sshd import SSHServer, executor_kwargs
from .test_cli import run_cli
from .waits import shut_down

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # nodes have no copy of the tests

Make = Callable[..., SSHPoolExecutor]
REPO = str(Path(__file__).resolve().parent.parent)
MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fit(index: int) -> Tuple[str, str, bool, str]:
    """A lab script's task: reads its inputs where it runs, writes an output file."""
    with open("params.json") as f:
        params = f.read()
    with open("data/run42/latest.h5", "rb") as f:  # a symlink inside the tree
        data = f.read()
    runnable = os.access("scripts/run.sh", os.X_OK)
    os.makedirs("out", exist_ok=True)
    result = sha(data).encode() + os.urandom(1000 + index)
    with open(f"out/fit_{index}.npz", "wb") as f:
        f.write(result)
    return params, sha(data), runnable, sha(result)


def make_tree(root: Path) -> None:
    (root / "params.json").write_text('{"alpha": 0.5}')
    run = root / "data" / "run42"
    run.mkdir(parents=True)
    (run / "a.h5").write_bytes(os.urandom(300_000))
    (run / "latest.h5").symlink_to("a.h5")
    (root / "data" / "empty").mkdir()
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (scripts / "run.sh").chmod(0o755)


def cache_hosts(make: Make, cache: Path, total: int = 2) -> List[Host]:
    return make.hosts_with(total, env={"XDG_CACHE_HOME": str(cache)})  # type: ignore[attr-defined,no-any-return]


def work_dirs(cache: Path) -> List[str]:
    work = cache / "sshexec" / "work"
    return sorted(os.listdir(work)) if work.exists() else []


def test_a_tree_reaches_every_worker_and_outputs_come_back(
    make_executor: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_tree(tmp_path)
    cache = tmp_path / "cache"
    executor = make_executor(
        hosts=cache_hosts(make_executor, cache, 4),
        files=["params.json", "data/", Path("scripts")],
        return_files=["out/*.npz"],
    )
    futures = [executor.submit(fit, i) for i in range(100)]
    expected = sha((tmp_path / "data" / "run42" / "a.h5").read_bytes())
    for index, future in enumerate(futures):
        params, data, runnable, written = future.result(timeout=60)
        assert (params, data, runnable) == ('{"alpha": 0.5}', expected, True)
        # written here before its Future resolved, with the same content
        assert sha((tmp_path / "out" / f"fit_{index}.npz").read_bytes()) == written
    assert len(os.listdir(tmp_path / "out")) == 100
    assert work_dirs(cache)  # the per-executor directories, while it runs
    stats = executor.stats(0)
    assert all(h.bytes_saved >= 0 for h in stats.hosts.values())
    shut_down(executor)
    assert work_dirs(cache) == []  # removed at shutdown


def write_same(_: int) -> str:
    os.makedirs("out", exist_ok=True)
    with open("out/same.npz", "wb") as f:
        f.write(os.urandom(100))
    return "written"


def leak() -> str:
    os.makedirs("out", exist_ok=True)
    os.symlink("/etc/hostname", "out/evil.npz")
    return "linked"


def test_outputs_that_collide_or_escape_fail_their_future(
    make_executor: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    executor = make_executor(
        hosts=cache_hosts(make_executor, tmp_path / "cache"), return_files=["out/*.npz"]
    )
    first = executor.submit(write_same, 1)
    assert first.result(timeout=60) == "written"
    kept = (tmp_path / "out" / "same.npz").read_bytes()
    second = executor.submit(write_same, 2)
    cf.wait([second], timeout=60)
    with pytest.raises(FileExistsError, match=r"out/same.npz .*already brought back by task"):
        second.result()
    assert (tmp_path / "out" / "same.npz").read_bytes() == kept  # not overwritten
    escaping = executor.submit(leak)
    cf.wait([escaping], timeout=60)
    with pytest.raises(PermissionError, match=r"out/evil.npz .*outside the working directory"):
        escaping.result()
    assert not (tmp_path / "out" / "evil.npz").exists()


def test_bad_paths_are_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "data" / "out").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match=r"data/out is a symlink to .*outside the tree"):
        SSHPoolExecutor(1, files=["data"])
    with pytest.raises(ValueError, match="leads outside the working directory"):
        SSHPoolExecutor(1, return_files=["../elsewhere/*.npz"])
    with pytest.raises(FileNotFoundError, match=r"missing\.json does not exist"):
        SSHPoolExecutor(1, files=["missing.json"])


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_send_files_replaces_a_changed_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: List[SSHPoolExecutor]
) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for index in range(5):
        (data / f"{index}.bin").write_bytes(os.urandom(200_000))
    cache = tmp_path / "cache"
    executor = SSHPoolExecutor(2, hosts=[Host(":", env={"XDG_CACHE_HOME": str(cache)})], files=[])
    made.append(executor)
    with pytest.raises(FileNotFoundError):
        executor.submit(read, "data/0.bin").result(timeout=60)
    executor.send_files(["data"])
    assert executor.submit(read, "data/3.bin").result(timeout=60) == (data / "3.bin").read_bytes()
    before = executor.stats(0).hosts["local"]
    (data / "3.bin").write_bytes(b"changed")
    executor.send_files(["data"])
    after = executor.stats(0).hosts["local"]
    assert after.bytes_saved - before.bytes_saved == 4 * 200_000  # the others stayed
    assert after.bytes_sent - before.bytes_sent < 200_000  # the changed one, and a manifest
    results = [executor.submit(read, "data/3.bin") for _ in range(4)]
    assert {f.result(timeout=60) for f in results} == {b"changed"}


def test_the_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    for index in range(4):
        path = folder / f"{index:02x}"
        path.write_bytes(b"x" * 1000)
        os.utime(path, ns=(index * 10**9, node_staging.STAMP))
    freed = node_staging.evict(str(folder), 2500, keep={"00"})
    assert freed == 2000
    assert sorted(os.listdir(folder)) == ["00", "03"]


def test_a_stale_half_arrived_content_is_swept_and_a_fresh_one_kept(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "aa.123.part").write_bytes(b"x" * 10)  # an agent killed long ago left it
    day_ago = time.time_ns() - int((node_staging.PART_STALE + 60) * 1e9)
    os.utime(folder / "aa.123.part", ns=(day_ago, day_ago))
    (folder / "bb.456.part").write_bytes(b"y" * 10)  # arriving now
    assert node_staging.evict(str(folder), 1 << 30, keep=set()) == 10
    assert os.listdir(folder) == ["bb.456.part"]


def test_files_made_ahead_of_their_pieces_leave_nothing_behind(tmp_path: Path) -> None:
    """The agent's creator process makes the temporary files of a batch while its pieces
    come: contents that arrived are in place, one still arriving keeps its file, the
    rest (made after their content was renamed into place, or never sent) are gone, and
    so is the creator; a long list is stopped at once."""
    folder = tmp_path / "files"
    store = BlobStore([str(folder)], private=False)
    keys = [bytes([index]) * msgs.STAGE_KEY for index in range(40)]
    store.prepare(keys)
    assert store._creator is not None
    creator = store._creator[0]
    for key in keys[:10]:
        assert store.put(key, 5, b"hello") is None
    assert store.put(keys[10], 10, b"hello") is None  # half of it
    store.settle()
    part = f"{keys[10].hex()}.{os.getpid()}.part"
    assert sorted(os.listdir(folder)) == sorted([k.hex() for k in keys[:10]] + [part])
    assert not os.path.exists(f"/proc/{creator}")  # ended and reaped
    store.close()
    assert sorted(os.listdir(folder)) == sorted(k.hex() for k in keys[:10])

    many = [index.to_bytes(msgs.STAGE_KEY, "big") for index in range(200_000)]
    started = time.monotonic()
    store.prepare(many)
    store.settle()
    assert time.monotonic() - started < 5.0
    assert len(os.listdir(folder)) == 10


COUNT_READS = """
import builtins, json, sys
from sshexec._pool import staging
read = []
staging.open = lambda path, mode: read.append(path.rsplit("/", 1)[-1]) or builtins.open(path, mode)
keys = [e.key.hex() for e in staging.scan(sys.argv[1:], ".") if e.kind == "f"]
print(json.dumps([sorted(read), keys]))
"""


def scan_in_a_new_process(where: Path, cache: Path, *paths: str) -> Tuple[List[str], List[str]]:
    """The files a fresh client process read to scan ``paths``, and their keys."""
    done = subprocess.run(
        [sys.executable, "-c", COUNT_READS, *paths],
        cwd=where,
        env={**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        check=True,
    )
    read, keys = json.loads(done.stdout)
    return read, keys


def test_the_next_run_reads_only_what_changed(tmp_path: Path) -> None:
    """The client remembers hashes on disk by each file's stat: a new process reads
    again only a changed file (same size and modification time, a new change time)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    hour_ago = time.time_ns() - 3600 * 10**9
    for index in range(5):
        (tree / f"f{index}").write_bytes(os.urandom(1000))
        os.utime(tree / f"f{index}", ns=(hour_ago, hour_ago))
    time.sleep(client_hashes.RACY + 0.1)  # their change times are old enough to trust
    cache = tmp_path / "cache"
    read, first = scan_in_a_new_process(tmp_path, cache, "tree")
    assert read == ["f0", "f1", "f2", "f3", "f4"]
    read, again = scan_in_a_new_process(tmp_path, cache, "tree")
    assert (read, again) == ([], first)
    (tree / "f2").write_bytes(os.urandom(1000))
    os.utime(tree / "f2", ns=(hour_ago, hour_ago))  # as a copy keeping times would
    read, changed = scan_in_a_new_process(tmp_path, cache, "tree")
    assert read == ["f2"]
    assert [a == b for a, b in zip(first, changed)] == [True, True, False, True, True]


def test_a_file_changed_just_now_is_hashed_again() -> None:
    """Its stat may not change with a second write within the timestamp granularity."""
    now = time.time_ns()
    recent = (1, 2, 3, now - 10**9, now - 10**9)
    client_hashes.remember(recent, b"d" * 32, now)
    assert client_hashes.known(recent) is None
    older = (1, 2, 3, now - 10 * 10**9, now - 10 * 10**9)
    client_hashes.remember(older, b"d" * 32, now)
    assert client_hashes.known(older) == b"d" * 32


# ---- a big tree over real links ----------------------------------------------------------


@pytest.fixture
def counted_links(sshd_pair: List[SSHServer]) -> Iterator[List[Tuple[Dict[str, Any], DelayProxy]]]:
    """Both hosts, each behind a proxy that counts the bytes over its link."""
    proxies = []
    try:
        links = []
        for server in sshd_pair:
            proxy = DelayProxy(server.port, 0.0)
            port = proxy.start()
            proxies.append(proxy)
            with server.client.known_hosts.open("a") as f:
                f.write(f"[{server.address}]:{port} {server.host_key}\n")
            kwargs = executor_kwargs([server])
            kwargs["hosts"] = [f"{server.client.user}@{server.address}:{port}"]
            links.append((kwargs, proxy))
        yield links
    finally:
        for proxy in proxies:
            proxy.stop()


def make_big_tree(root: Path) -> int:
    """1 GiB: 2048 small files (32 KiB) in 32 directories, and three big ones."""
    total = 0
    for folder in range(32):
        where = root / "tree" / f"d{folder:02d}"
        where.mkdir(parents=True)
        for index in range(64):
            (where / f"f{index:02d}.dat").write_bytes(os.urandom(32 * 1024))
            total += 32 * 1024
    block = os.urandom(MiB)
    for index in range(3):
        with open(root / "tree" / f"big{index}.bin", "wb") as f:
            for at in range(320):  # distinct blocks: nothing repeats within a file
                f.write(block[:-8] + (index * 1000 + at).to_bytes(8, "big"))
        total += 320 * MiB
    return total


def digest_of(path: str) -> str:
    with open(path, "rb") as f:
        return sha(f.read())


@pytest.mark.ssh
@pytest.mark.timeout(300)
def test_a_gib_tree_crosses_each_link_once(
    counted_links: List[Tuple[Dict[str, Any], DelayProxy]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    made: List[SSHPoolExecutor],
) -> None:
    monkeypatch.chdir(tmp_path)
    size = make_big_tree(tmp_path)
    assert size == 1 << 30
    hosts = []
    for index, (kwargs, _) in enumerate(counted_links):
        env = {"XDG_CACHE_HOME": str(tmp_path / f"cache{index}")}
        hosts.append(dataclasses.replace(parse_host(kwargs["hosts"][0]), workers=1, env=env))
    options = {k: v for k, v in counted_links[0][0].items() if k != "hosts"}

    def run() -> List[int]:
        moved = [proxy.moved["up"] for _, proxy in counted_links]
        executor = SSHPoolExecutor(hosts=hosts, files=["tree"], **options)
        made.append(executor)
        found = {
            host: future.result(timeout=60)
            for host, future in executor.run_on_hosts(digest_of, "tree/d07/f03.dat").items()
        }
        shut_down(executor)
        assert set(found.values()) == {digest_of(str(tmp_path / "tree/d07/f03.dat"))}
        return [proxy.moved["up"] - m for (_, proxy), m in zip(counted_links, moved)]

    first = run()
    assert all(size <= sent <= 1.05 * size for sent in first), first
    again = run()  # a new executor: the hosts' caches have it all
    assert all(sent <= MiB for sent in again), again
    (tmp_path / "tree/d07/f03.dat").write_bytes(os.urandom(32 * 1024))
    touched = run()  # that file alone travels
    assert all(32 * 1024 <= sent <= MiB + 32 * 1024 for sent in touched), touched
    for index in range(2):
        assert work_dirs(tmp_path / f"cache{index}") == []
        cached = os.listdir(tmp_path / f"cache{index}" / "sshexec" / "files")
        assert len(cached) == 2048 + 3 + 1  # and the old content of the touched file
        mode = os.stat(tmp_path / f"cache{index}" / "sshexec" / "files" / cached[0]).st_mode
        assert not mode & stat.S_IWUSR  # read-only: shared by every worker's tree


FIT_MODULE = """
import hashlib, os

def run(name):
    with open(os.path.join("data", name), "rb") as f:
        data = f.read()
    os.makedirs("out", exist_ok=True)
    with open(os.path.join("out", name + ".npz"), "wb") as f:
        f.write(data[::-1])
    return hashlib.sha256(data).hexdigest()
"""


def test_the_command_line_sends_returns_and_cleans(tmp_path: Path) -> None:
    """``sshexec map --files --return`` moves a script's inputs and outputs;
    ``sshexec clean`` empties the hosts' caches."""
    (tmp_path / "fitmod.py").write_text(FIT_MODULE)
    (tmp_path / "data").mkdir()
    names = [f"run{i}" for i in range(6)]
    for name in names:
        (tmp_path / "data" / name).write_bytes(os.urandom(5000))
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    stdin = "".join(f"{name}\n" for name in names)
    args = ["--files", "data", "--return", "out/*.npz", "--workers", "2"]
    result = run_cli("map", "fitmod:run", *args, cwd=tmp_path, stdin=stdin, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [sha((tmp_path / "data" / n).read_bytes()) for n in names]
    for name in names:
        back = (tmp_path / "out" / f"{name}.npz").read_bytes()
        assert back == (tmp_path / "data" / name).read_bytes()[::-1]
    assert len(os.listdir(cache / "sshexec" / "files")) == len(names)
    result = run_cli("clean", "--hosts", ":", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert f"local: freed {6 * 5000} bytes" in result.stdout
    assert os.listdir(cache / "sshexec" / "files") == []


def test_an_error_names_the_host_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.bin").write_bytes(b"y" * 10_000)
    cache = tmp_path / "cache"
    (cache / "sshexec").mkdir(parents=True)
    (cache / "sshexec" / "files").write_text("not a directory")  # nowhere to keep contents
    with pytest.raises(SSHExecError, match=r"^local: files failed: .*big.bin: .*sshexec/files"):
        SSHPoolExecutor(1, hosts=[Host(":", env={"XDG_CACHE_HOME": str(cache)})], files=["big.bin"])


def copy_out(name: str) -> int:
    data = read(os.path.join("data", name))
    os.makedirs("out", exist_ok=True)
    with open(os.path.join("out", name), "wb") as f:
        f.write(data)
    return len(data)


def test_pool_and_joblib_take_the_same_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    joblib = pytest.importorskip("joblib")
    import sshexec.joblib
    from sshexec import Pool

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for index in range(4):
        (tmp_path / "data" / f"{index}.bin").write_bytes(os.urandom(1000 + index))
    hosts = [Host(":", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})]
    options: Dict[str, Any] = {"hosts": hosts, "files": ["data"], "return_files": ["out/*"]}
    with Pool(2, **options) as pool:
        assert pool.map(copy_out, ["0.bin", "1.bin"]) == [1000, 1001]
    backend = sshexec.joblib.Backend(max_workers=2, **options)
    with backend, joblib.parallel_config(backend=backend, n_jobs=2):
        sizes = joblib.Parallel()(joblib.delayed(copy_out)(f"{i}.bin") for i in (2, 3))
    assert sizes == [1002, 1003]
    for index in range(4):
        name = f"{index}.bin"
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "data" / name).read_bytes()
    assert work_dirs(tmp_path / "cache") == []


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_transfer_draws_a_bar_on_a_terminal() -> None:
    future: cf.Future[str] = cf.Future()
    timer = threading.Timer(1.5, future.set_result, ("started",))
    timer.start()
    sent = [0]

    def counts() -> Tuple[int, int]:
        sent[0] = min(sent[0] + (8 << 20), 100 << 20)
        return sent[0], 100 << 20

    out = Terminal()
    assert follow(future, 30, counts, "files to hosts", out) == "started"
    timer.join()
    assert "files to hosts (MiB):" in out.getvalue()
    quiet = io.StringIO()  # not a terminal (a batch job's log): nothing drawn
    assert follow(future, 1, counts, "files to hosts", quiet) == "started"
    assert quiet.getvalue() == ""


VANISHING_CLIENT = """
import os, sys
from sshexec import SSHPoolExecutor
executor = SSHPoolExecutor(2, files=["params.json"], return_files=["out/*"])
assert executor.submit(os.getcwd).result(timeout=60)
print("ready", flush=True)
os._exit(0)  # no shutdown: the agent is left to notice
"""


def test_the_agent_removes_the_directories_when_the_client_vanishes(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text("{}")
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent)])
    done = subprocess.run(
        [sys.executable, "-c", VANISHING_CLIENT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.stdout.strip() == "ready", done.stderr
    deadline = time.monotonic() + 30
    while work_dirs(cache) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert work_dirs(cache) == []


def test_a_killed_agent_is_replaced_and_its_directory_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: List[SSHPoolExecutor]
) -> None:
    """kill -9 of a host's agent: the next agent stages the files again for its workers
    (from its cache) and removes the directory the killed one left."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.json").write_text('{"x": 1}')
    cache = tmp_path / "cache"
    hosts = [Host(":", env={"XDG_CACHE_HOME": str(cache)})]
    executor = SSHPoolExecutor(2, hosts=hosts, files=["params.json"], reconnect_grace=30)
    made.append(executor)
    assert executor.submit(read, "params.json").result(timeout=60) == b'{"x": 1}'
    (left,) = work_dirs(cache)
    agent = int(left.split("-")[-2])
    os.kill(agent, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        future = executor.submit(read, "params.json")
        cf.wait([future], timeout=60)
        if future.exception() is None and left not in work_dirs(cache):
            break
        time.sleep(0.2)
    assert future.result() == b'{"x": 1}'
    assert left not in work_dirs(cache) and len(work_dirs(cache)) == 1
    shut_down(executor)
    assert work_dirs(cache) == []
