"""A short chaos run over real processes (``benchmarks.chaos``; the long one is
``python -m benchmarks.chaos``): a client process drives local workers, or two real
sshd hosts (one behind the slow-link proxy, one running another Python where pyenv has
one), while a worker, an agent or the client itself is killed with SIGKILL; tasks
flood output, leave children behind and raise, read staged inputs (one sent mid-run)
and write outputs that come back; two actors are called, one killed and dropped, one
closed; callbacks block past the keepalive
deadline; Futures are cancelled. Each round checks that every Future ended as
``as_completed``/``wait`` see it with its callback run once, results are right, every
output is on the client, nothing of the job is left in the process table or the hosts'
cache, and memory stayed bounded."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import pytest

from benchmarks.chaos import Target, describe, run_once
from benchmarks.proxy import DelayProxy
from sshexec import parse_host

from .sshd import SSHServer, executor_kwargs
from .test_versions import interpreter

StartServer = Callable[..., SSHServer]
ROUND_PLAN = {"tasks": 40, "deadline": 60.0}


@pytest.fixture(scope="module")
def remote_target(start_server: StartServer) -> Iterator[Target]:
    """Two sshd hosts: gamma directly, delta through a delaying, rate-capped proxy and,
    where pyenv has it, with workers of another Python version than the client's."""
    gamma, delta = start_server("chaos-gamma"), start_server("chaos-delta")
    proxy = DelayProxy(delta.port, delay=0.005, rate=8e6)
    port = proxy.start()
    with delta.client.known_hosts.open("a") as f:
        f.write(f"[127.0.0.1]:{port} {delta.host_key}\n")
    other = next((p for v in ("3.12", "3.10", "3.13") if (p := interpreter(v)) is not None), None)
    hosts = [
        dataclasses.replace(parse_host(gamma.spec), workers=2),
        dataclasses.replace(
            parse_host(f"{delta.client.user}@127.0.0.1:{port}"), workers=2, python=other
        ),
    ]
    kwargs = executor_kwargs([gamma, delta], hosts=hosts, keepalive_interval=1.0)
    kwargs["hosts"] = [dataclasses.asdict(h) for h in hosts]
    roots = [s.proc.pid for s in (gamma, delta) if s.proc is not None]
    yield Target("ssh", kwargs, roots, max_workers=None)
    proxy.stop()


def run_round(target: Target, kill: str, seed: int, tmp_path: Path) -> None:
    result = run_once(target, kill, seed, tmp_path, ROUND_PLAN)
    assert not result.problems, describe(result)
    if kill != "none":  # the round did what it says
        assert result.killed, f"nothing was killed: {describe(result)}"


@pytest.mark.parametrize("kill", ["none", "worker", "agent", "client"])
def test_chaos_local(kill: str, tmp_path: Path) -> None:
    run_round(Target("local", {"keepalive_interval": 1.0}), kill, 11, tmp_path)


@pytest.mark.ssh
@pytest.mark.parametrize("kill", ["worker", "agent", "client"])
def test_chaos_ssh(kill: str, remote_target: Target, tmp_path: Path) -> None:
    run_round(remote_target, kill, 23, tmp_path)


def test_kills_are_real(tmp_path: Path) -> None:
    """The harness itself: a round that kills a worker does kill one."""
    result = run_once(
        Target("local", {"keepalive_interval": 1.0}), "worker", 5, tmp_path, ROUND_PLAN
    )
    assert any(k.startswith("worker pid") for k in result.killed), describe(result)
    assert result.events.get("started"), describe(result)
