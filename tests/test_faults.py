"""Faults injected for real: the kernel's OOM killer, dropped and returning hosts, a
silent network partition in a namespace, interrupted and dying clients, tasks that
never return, a slow host, oversize and garbage frames, and what the nodes expose."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Set

import pytest

from sshexec import BrokenPool, SSHPoolExecutor, WorkerLostError
from sshexec._node.limits import descendants

from . import tasks
from .procs import agents_and_workers, parent_of, wait_gone
from .sshd import Client, SSHServer, executor_kwargs

Make = Callable[..., SSHPoolExecutor]
StartServer = Callable[..., SSHServer]
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")


# ---- worker death ------------------------------------------------------------------------


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A cgroup-v1 memory group of 64 MiB; tasks join it to be OOM-killed by the kernel."""
    if os.geteuid() != 0 or not (MEMORY_CGROUP / "cgroup.procs").exists():
        pytest.skip("needs root and the cgroup v1 memory controller for a real OOM kill")
    group = MEMORY_CGROUP / f"sshexec-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(64 << 20))
    swap = group / "memory.memsw.limit_in_bytes"
    if swap.exists():
        swap.write_text(str(64 << 20))
    yield group
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def test_oom_killed_worker_is_retried_then_reported(
    make_executor: Make, memory_cgroup: Path
) -> None:
    executor = make_executor(2, max_retries=1)
    bystanders = [executor.submit(tasks.sleep_then, 0.5, i) for i in range(4)]
    doomed = executor.submit(tasks.allocate_in_cgroup, str(memory_cgroup), 512 << 20)
    with pytest.raises(WorkerLostError) as info:
        doomed.result(timeout=60)
    assert len(info.value.attempts) == 2  # the first try and one retry
    assert all("SIGKILL" in how for _, how in info.value.attempts)
    assert [f.result(timeout=30) for f in bystanders] == [0, 1, 2, 3]
    assert executor.submit(tasks.square, 4).result(timeout=30) == 16


# ---- hosts that go away ------------------------------------------------------------------


def test_host_comes_back_after_a_drop(start_server: StartServer) -> None:
    server = start_server("phoenix")
    with SSHPoolExecutor(2, **server.executor_kwargs(max_retries=2)) as executor:
        assert executor.submit(tasks.square, 2).result(timeout=30) == 4
        deadline = time.monotonic() + 30  # both workers up: none is mid-start at the drop
        while len(executor._pool.links) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.go_down()  # listener first, then every connection: reconnecting fails
        futures = [executor.submit(tasks.sleep_then, 0.1, i) for i in range(6)]
        time.sleep(1.5)  # reconnect attempts fail meanwhile
        done = [f.exception() or f.result() for f in futures if f.done()]
        assert not done, f"settled while the host was down: {done!r}"
        server.start()  # same port, same host key
        assert [f.result(timeout=60) for f in futures] == list(range(6))


def test_every_host_gone_fails_after_the_grace(
    start_server: StartServer, made: List[SSHPoolExecutor]
) -> None:
    servers = [start_server("gone-a"), start_server("gone-b")]
    kwargs = executor_kwargs(servers, max_retries=0, reconnect_grace=2.0)
    executor = SSHPoolExecutor(2, **kwargs)
    made.append(executor)
    assert executor.submit(tasks.square, 3).result(timeout=30) == 9
    for server in servers:
        server.go_down()  # listener first, then every connection: reconnecting fails
    deadline = time.monotonic() + 30
    while executor._pool.links and time.monotonic() < deadline:  # the loss is seen
        time.sleep(0.05)
    futures = [executor.submit(tasks.square, i) for i in range(5)]
    started = time.monotonic()
    _, not_done = cf.wait(futures, timeout=60)
    assert not not_done and time.monotonic() - started < 30
    for future in futures:
        error = future.exception()
        assert isinstance(error, BrokenPool)
        assert set(error.reasons) == {s.spec for s in servers}
        assert all("connect" in why for why in error.reasons.values())
    started = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - started < 10


NETNS_ADDRESS = "10.253.7.2"  # inside the test's own namespace, reached over its veth pair


@pytest.fixture
def partitioned_host(ssh_client: Client, tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """An sshd in a network namespace of its own behind a veth pair; ``cut()`` takes the
    namespace's end of the link down, so packets vanish without a reset."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) to build a network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, outside, inside = f"sshexec-{tag}", f"sxo{tag}", f"sxi{tag}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", ns)
        ip("addr", "add", "10.253.7.1/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{NETNS_ADDRESS}/30", "dev", inside)
        ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        server = SSHServer("island", tmp_path / "island", ssh_client, address=NETNS_ADDRESS)
        server.netns, server.port = ns, 2222
        server.start()
        ssh_client.trust(server)
        yield {
            "server": server,
            "cut": lambda: ip("netns", "exec", ns, "ip", "link", "set", inside, "down"),
        }
        server.go_down()  # sshd's own session for the vanished client stays otherwise
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_silent_partition_is_detected_and_requeued(
    partitioned_host: Dict[str, Any], sshd_pair: List[SSHServer]
) -> None:
    island: SSHServer = partitioned_host["server"]
    kwargs = executor_kwargs(
        [sshd_pair[0], island], keepalive_interval=1.0, connect_timeout=3.0, max_retries=2
    )
    with SSHPoolExecutor(2, **kwargs) as executor:
        seen = {host for host, _, _ in executor.map(tasks.sleep_then_where, [0.1] * 8)}
        assert seen == {"alpha", "island"}
        assert island.proc is not None
        tree = agents_and_workers(island.proc.pid)  # the node's process table
        on_node = [pid for agent, workers in tree.items() for pid in (agent, *workers)]
        assert len(tree) == 1 and len(on_node) == 2, tree
        futures = [executor.submit(tasks.sleep_then_where, 2.0) for _ in range(4)]
        time.sleep(0.3)  # the island's worker is mid-task from here on
        partitioned_host["cut"]()
        started = time.monotonic()
        # the node's side: its agent has heard nothing for 3 x 1 s and ends its worker,
        # mid-task, and itself; nothing of the job is left there once that has passed
        left = wait_gone(on_node, timeout=3 * 1.0 + 5.0)
        assert left == [], f"still on the node {time.monotonic() - started:.1f} s after the cut"
        results = [f.result(timeout=60) for f in futures]
        assert time.monotonic() - started < 20  # the client's side: 3 missed keepalives
        assert len(results) == 4


# ---- the client goes away ----------------------------------------------------------------

INTERRUPTED = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    import cloudpickle
    from tests import tasks
    cloudpickle.register_pickle_by_value(tasks)
    from sshexec import SSHPoolExecutor

    with SSHPoolExecutor(2, **json.loads(os.environ["KW"])) as ex:
        pids = sorted({{pid for _, pid, _ in ex.map(tasks.sleep_then_where, [0.2] * 6)}})
        print(json.dumps(pids), flush=True)
        {body}
    """
)


def run_client(kwargs: Dict[str, Any], body: str, interrupt_after: float = 0.0) -> List[int]:
    import json

    root = str(Path(__file__).resolve().parent.parent)
    code = INTERRUPTED.format(root=root, body=body)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "KW": json.dumps(kwargs)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    pids: List[int] = json.loads(proc.stdout.readline())
    if interrupt_after:
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    proc.communicate(timeout=60)
    assert time.monotonic() - started < 15, "the client did not exit promptly"
    return pids


@pytest.fixture(params=["local", "ssh"])
def client_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    if request.param == "local":
        return {"shutdown_grace": 2.0}
    return executor_kwargs(request.getfixturevalue("sshd_pair"), shutdown_grace=2.0)


def test_ctrl_c_during_map_leaves_no_worker(client_kwargs: Dict[str, Any]) -> None:
    pids = run_client(
        client_kwargs, "list(ex.map(tasks.sleep_then, [60] * 8))", interrupt_after=1.0
    )
    assert wait_gone(pids) == []


def test_task_that_never_returns_does_not_block_exit(client_kwargs: Dict[str, Any]) -> None:
    body = "ex.submit(tasks.sleep_then, 3600); ex.shutdown(wait=False, cancel_futures=True)"
    pids = run_client(client_kwargs, body)
    assert wait_gone(pids) == []


def test_with_block_after_map_timeout_does_not_wait_forever(make_executor: Make) -> None:
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        with make_executor(2, shutdown_grace=1.0) as executor:
            list(executor.map(tasks.sleep_then, [3600, 3600], timeout=0.5))
    assert time.monotonic() - started < 15


def test_map_timeout_caught_inside_the_block(make_executor: Make) -> None:
    started = time.monotonic()
    with make_executor(2) as executor:
        with pytest.raises(cf.TimeoutError):
            list(executor.map(tasks.sleep_then, [3600], timeout=0.5))
        assert executor.submit(tasks.square, 5).result(timeout=30) == 25
    assert time.monotonic() - started < 15  # the abandoned task's worker was killed


def test_kill_workers(make_executor: Make) -> None:
    executor = make_executor(1)
    running = executor.submit(tasks.sleep_then, 3600)
    time.sleep(0.5)
    queued = [executor.submit(tasks.square, i) for i in range(5)]
    started = time.monotonic()
    executor.kill_workers()
    assert time.monotonic() - started < 10
    assert isinstance(running.exception(timeout=0), WorkerLostError)
    assert all(f.cancelled() or isinstance(f.exception(timeout=0), WorkerLostError) for f in queued)
    with pytest.raises(RuntimeError):
        executor.submit(tasks.square, 1)


# ---- a slow host ---------------------------------------------------------------------------


def test_slow_host_does_not_hold_the_tail(sshd_pair: List[SSHServer]) -> None:
    from sshexec import Host

    hosts = [Host("127.0.0.1", user=s.client.user, port=s.port, workers=1) for s in sshd_pair]
    with SSHPoolExecutor(**executor_kwargs(sshd_pair, hosts=hosts)) as executor:
        executor.submit(tasks.square, 1).result(timeout=30)
        while len(executor._pool.links) < 2:
            time.sleep(0.05)
        started = time.monotonic()
        ran = list(executor.map(tasks.slow_on, [("beta", 2.0, 0.05)] * 12))
        elapsed = time.monotonic() - started
    assert ran.count("beta") == 1  # only the task it was running; the prefetched one moved
    assert elapsed < 3.5  # not 4 s: no task waited behind the slow one


# ---- bad frames and oversize results -------------------------------------------------------


def test_result_over_the_frame_limit_is_refused_on_the_worker(make_executor: Make) -> None:
    executor = make_executor(1, max_frame=1 << 20)
    with pytest.raises(ValueError, match="max_frame"):
        executor.submit(tasks.big, 2 << 20).result(timeout=30)
    assert executor.submit(tasks.square, 6).result(timeout=30) == 36


def test_garbage_on_the_frame_stream_closes_only_that_worker(make_executor: Make) -> None:
    executor = make_executor(2, max_retries=0)
    with pytest.raises(WorkerLostError, match="invalid frame"):
        executor.submit(tasks.write_garbage_frame).result(timeout=30)
    assert executor.submit(tasks.square, 7).result(timeout=30) == 49


def test_garbage_instead_of_a_worker(sshd_pair: List[SSHServer], tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\nprintf '\\000\\037SSHEXEC-START-1\\037\\000H'\nprintf '\\377\\377\\377\\377junk'\n"
        "sleep 1\n"
    )
    fake.chmod(0o755)
    from sshexec import WorkerStartupError

    with pytest.raises(WorkerStartupError, match=r"garbled first frame|outside"):
        SSHPoolExecutor(1, **sshd_pair[0].executor_kwargs(python=str(fake)))


# ---- what a node exposes -------------------------------------------------------------------


def listening_sockets() -> Dict[str, str]:
    """Sockets listening on this machine (TCP LISTEN, unconnected UDP): inode -> where."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] in ("0A", "07"):
                    found[fields[9]] = f"{table}:{fields[1]}"
    return found


def socket_owners(inodes: Set[str]) -> Set[int]:
    """The processes holding any of these sockets."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    owners = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if links & wanted:
            owners.add(int(pid))
    return owners


def family(pids: Set[int]) -> Set[int]:
    """``pids``, their parents (the agents) and everything descending from those."""
    return {kin for pid in pids | {parent_of(p) for p in pids} for kin in descendants(pid)}


def test_workers_listen_on_no_port_and_carry_no_payload_in_argv(make_executor: Make) -> None:
    """No process of the job (agent, workers, what they start) listens on a port, while
    tasks run. Judged by the sockets' owners: other tests' sshd may start meanwhile."""
    before = listening_sockets()
    executor = make_executor(2)
    secret = "SECRET-ARGV-5521"
    futures = [executor.submit(tasks.sleep_then_where, 1.0) for _ in range(2)]
    time.sleep(0.5)
    owners = socket_owners(set(listening_sockets()) - set(before))
    pids = {pid for _, pid, _ in executor.map(tasks.sleep_then_where, [0.1] * 4)}
    assert not owners & family(pids)
    executor.submit(tasks.add, secret, "").result(timeout=30)
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read()
        assert secret.encode() not in argv and b"import os;b=b''" in argv
    for future in futures:
        future.result(timeout=30)
