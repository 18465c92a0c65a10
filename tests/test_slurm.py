"""transport="srun" against a real Slurm started by the suite (tests/slurm.py): clients
run inside real allocations (``salloc``, ``sbatch``) with different grants per node,
each host a job step on its node, with no ssh anywhere."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from sshexec import Host, SSHPoolExecutor, WorkerStartupError

from .slurm import Cluster

ROOT = Path(__file__).resolve().parent.parent


def no_ssh(folder: Path) -> Path:
    """A PATH folder whose ``ssh`` only records that it was called, and fails."""
    folder.mkdir(exist_ok=True)
    fake = folder / "ssh"
    fake.write_text(f"#!/bin/sh\ntouch {folder / 'ssh-was-called'}\nexit 255\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return folder


def run_client(
    slurm: Cluster, tmp: Path, how: str, options: str, scenario: str, *args: str
) -> Dict[str, Any]:
    """``tests.slurm_client SCENARIO`` inside a new allocation (``salloc`` or ``sbatch``)."""
    out = tmp / f"{scenario}.json"
    env = dict(slurm.env)
    env["PATH"] = f"{no_ssh(tmp / 'bin')}:{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    client = [sys.executable, "-m", "tests.slurm_client", scenario, str(out), *args]
    if how == "salloc":
        argv = ["salloc", *options.split(), *client]
    else:  # the client in the batch step, on the allocation's first node
        script = tmp / "batch.sh"
        script.write_text("#!/bin/sh\nexec " + " ".join(client) + "\n")
        argv = ["sbatch", "--wait", f"--output={tmp / 'batch.out'}", *options.split(), str(script)]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    if how == "sbatch" and (tmp / "batch.out").exists():
        said += (tmp / "batch.out").read_text()
    assert done.returncode == 0 and out.exists(), f"{argv} failed:\n{said}\n{slurm.logs()}"
    assert not (tmp / "bin" / "ssh-was-called").exists(), "ssh was run"
    found: Dict[str, Any] = json.loads(out.read_text())
    found["output"] = said
    return found


@pytest.fixture(scope="module")
def served(slurm: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """One pool run inside ``salloc -N3 -n5`` (node1 2 CPUs, node2 2, node3 1)."""
    return run_client(slurm, tmp_path_factory.mktemp("salloc"), "salloc", "-N3 -n5", "serve")


def test_worker_counts_equal_the_grant(served: Dict[str, Any]) -> None:
    assert served["grant"] == {"node1": 2, "node2": 2, "node3": 1}
    assert served["workers"] == served["grant"]
    assert served["pids"] == served["grant"]  # every worker ran tasks


def test_every_node_serves_tasks_with_no_ssh(served: Dict[str, Any]) -> None:
    """SLURMD_NODENAME inside the tasks: each node's agent is a step on that node; the
    fake ssh on PATH was never run (run_client checks), and no sshd serves node1..3."""
    assert served["served"] == ["node1", "node2", "node3"]
    assert served["echoed"]  # every byte value through the step's pty, both ways


def test_one_step_per_node_and_none_after_shutdown(served: Dict[str, Any]) -> None:
    assert len(served["steps"]) == 3
    assert served["steps_after"] == []


def test_batch_step_client_with_its_own_grant(slurm: Cluster, tmp_path: Path) -> None:
    """The client in an sbatch script (on node1, SLURMD_NODENAME set), grant 2 + 1."""
    found = run_client(slurm, tmp_path, "sbatch", "-N2 -n3 -w node[1-2]", "serve")
    assert found["client_node"] == "node1"
    assert found["grant"] == {"node1": 2, "node2": 1}
    assert found["workers"] == found["grant"]
    assert found["served"] == ["node1", "node2"]
    assert found["steps_after"] == []


def test_allocation_in_salloc_is_the_grant_over_srun(slurm: Cluster, tmp_path: Path) -> None:
    """``SSHPoolExecutor(hosts=sshexec.allocation())`` in an salloc shell (no
    SLURMD_NODENAME: every node is remote): one srun host per node, sized by the grant."""
    found = run_client(slurm, tmp_path, "salloc", "-N3 -n5", "allocation")
    assert found["hosts"] == {"node1": [2, "srun"], "node2": [2, "srun"], "node3": [1, "srun"]}
    assert found["workers"] == {"node1": 2, "node2": 2, "node3": 1}
    assert found["served"] == ["node1", "node2", "node3"]
    assert found["steps_after"] == []


def test_allocation_in_a_batch_step_serves_its_own_node_locally(
    slurm: Cluster, tmp_path: Path
) -> None:
    """In an sbatch script the client's node (SLURMD_NODENAME) gets local workers."""
    found = run_client(slurm, tmp_path, "sbatch", "-N2 -n3 -w node[1-2]", "allocation")
    assert found["hosts"] == {":": [2, None], "node2": [1, "srun"]}
    assert sorted(found["workers"].values()) == [1, 2]
    assert found["served"] == ["node1", "node2"]
    assert found["steps_after"] == []


def test_check_allocation_probes_srun_on_every_node(slurm: Cluster, tmp_path: Path) -> None:
    """No sshd serves node1..3 here: ssh fails for each, srun starts the agent on each."""
    found = run_client(slurm, tmp_path, "salloc", "-N3 -n5", "check")
    lines = [line for line in found["stdout"].splitlines() if line.startswith("srun ")]
    assert len(lines) == 3, found
    assert all(": ok: agent up in" in line for line in lines), found
    assert found["returncode"] == 1  # ssh cannot reach them: that is reported too


def test_scancel_of_a_step_mid_map_loses_nothing(slurm: Cluster, tmp_path: Path) -> None:
    found = run_client(slurm, tmp_path, "salloc", "-N3 -n5", "cancel", "node2")
    assert found["step"] is not None and found["scancel"] == ""
    assert found["unfinished"] == 0 and found["errors"] == []
    assert found["numbers"] == list(range(60))
    assert "node2" in found["output"] and "CANCELLED" in found["output"]  # the lost host, named
    assert found["steps_after"] == []


def test_a_node_outside_the_allocation_is_refused_by_name(slurm: Cluster, tmp_path: Path) -> None:
    found = run_client(slurm, tmp_path, "salloc", "-N1 -n1 -w node1", "refused", "node2")
    assert found["error"] == "WorkerStartupError" and found["host"] == "node2"
    assert "srun could not start a step on node2" in found["message"]
    assert "Unable to create step" in found["message"]  # srun's own words


@pytest.fixture
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """PATH holds only a folder of our own (and python's), no Slurm variables."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:{Path(sys.executable).parent}")
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    yield folder


def start(hosts: Any) -> WorkerStartupError:
    """The error of a pool on ``hosts``, raised by its construction or its first task."""
    with pytest.raises(WorkerStartupError) as caught:
        with SSHPoolExecutor(hosts=hosts) as executor:
            executor.submit(os.getpid).result(timeout=60)
    return caught.value


def test_no_srun_on_path_names_the_host_and_the_cause(
    bare_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    error = start([Host("node2", transport="srun")])
    assert error.host == "node2" and "no 'srun' on PATH" in str(error)


def test_outside_an_allocation_is_a_clear_error(bare_path: Path) -> None:
    fake = bare_path / "srun"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    error = start([Host("node3", transport="srun")])
    assert error.host == "node3" and error.stage == "allocation"
    assert "no Slurm allocation found (SLURM_JOB_ID is not set)" in str(error)


def test_srun_options_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="options 'port_forward' do not apply to transport='srun'"):
        SSHPoolExecutor(hosts=[Host("n", transport="srun", options={"port_forward": 1})])
    with pytest.raises(ValueError, match="host me@n: transport='srun' runs as the job's user"):
        SSHPoolExecutor(hosts=[Host("n", user="me", transport="srun")])
