"""Where hosts come from in a batch job: hostlists (against the real ``scontrol``), the
grants of Slurm, PBS, LSF and SGE from recorded variables and files, ``allocation()``,
``max_workers`` within a grant, and real maps over an allocation's nodes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sshexec
from sshexec import Host, SSHPoolExecutor
from sshexec._hosts import (
    Allocation,
    build_transports,
    compress_hostlist,
    expand_hostlist,
    resolve_hosts,
    share_workers,
)
from sshexec._hosts.allocation import read_grant, read_slurm
from sshexec._hosts.hostlist import expand_counts

from . import tasks
from .sshd import Client, SSHServer, executor_kwargs

# --- hostlists, against the real scontrol ------------------------------------------

REAL_WORLD = [
    "nodes[006,011]",  # SCOOP's
    "nodes006",  # one node: still one name
    "c1001a-s[11,17]",  # PyTorch Ignite's
    "gpu-a100-[001-004],gpu-v100-[01-02]",  # commas inside and between brackets
    "n[1-3]",
    "n[01-10]",
    "n[001-10]",  # the low end sets the width
    "n[1-010]",
    "n[08-11]",
    "n[9-11]",
    "n[00-02]",
    "n[0-0]",
    "n[99999-100001]",
    "n[1-2,5-6,8]",
    "n[2,1]",  # order kept
    "n[1-3,2]",  # duplicates kept
    "n1,n1",
    "n[1-2],n[1-2]",
    "n1,n01",
    "n9,n10",
    "n[1-9],n010",
    "a[1-2]b[3-4]",  # several bracket groups
    "rack[1-2]-node[01-02]",  # a prefix, text between groups
    "a[1,2]b[1]c[3-4]",
    "a[1-2]b[1-2]c[1-2]",  # Slurm's own order for three groups
    "a[1-2]b[1-2]c[1-2]d[1-2]e[5-6]",
    "n[1-2]-[3-4]",
    "[1-3]",
    "foo",
    "login1,n[1-3]",
    "x[1-3],y",
    "n[1-3],,m",
    " n1, n2",
    "n[1-3] m[1-2]",
    "n[1-2]\tm1",
    "node-1a[1-2]",
    "a.b[1-2]",
    "nid0[0001-0003]",
    "n[01-3]",
    "",
]
REFUSED = [
    "n[1-3]x",  # text after the last bracket: 22.05 says "Invalid hostlist" (and exits 0)
    "gpu[0-1]-ib",
    "a[1-2]b",
    "n[1-2]a,",
    "n[3-1]",
    "n[a-c]",
    "n[1-2,]",
    "n[]",
    "n[1x2]",
    "n[1-70000]",
    "n[1-2]]",
]
REFUSED_ONLY_HERE = ["n[1-3", "n1]", "n[[1-2]"]  # scontrol prints garbage for these


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, str]]:
    """The environment to run the real ``scontrol`` in (a minimal slurm.conf: expanding
    a hostlist needs no controller). Skips without scontrol unless SSHEXEC_REQUIRE_SLURM."""
    if shutil.which("scontrol") is None:
        if os.environ.get("SSHEXEC_REQUIRE_SLURM"):
            pytest.fail("SSHEXEC_REQUIRE_SLURM is set but scontrol is missing (slurm-client)")
        pytest.skip("scontrol is not installed (Debian: apt-get install slurm-client)")
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text(
        "ClusterName=sshexec\nSlurmctldHost=localhost\n"
        "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=localhost\n"
    )
    yield {**os.environ, "SLURM_CONF": str(conf)}


def show_hostnames(env: Dict[str, str], text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["scontrol", "show", "hostnames", text],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def scontrol_names(env: Dict[str, str], text: str) -> List[str]:
    found = show_hostnames(env, text)
    assert found.returncode == 0 and "Invalid hostlist" not in found.stdout, found
    return found.stdout.split()


@pytest.mark.parametrize("text", REAL_WORLD)
def test_expand_hostlist_equals_scontrol(scontrol: Dict[str, str], text: str) -> None:
    assert expand_hostlist(text) == scontrol_names(scontrol, text)


@pytest.mark.parametrize("text", REFUSED)
def test_lists_scontrol_refuses_are_refused(scontrol: Dict[str, str], text: str) -> None:
    found = show_hostnames(scontrol, text)
    assert "Invalid hostlist" in found.stdout + found.stderr  # even where it exits 0
    with pytest.raises(ValueError, match="invalid hostlist"):
        expand_hostlist(text)


@pytest.mark.parametrize("text", REFUSED_ONLY_HERE)
def test_unpaired_brackets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid hostlist"):
        expand_hostlist(text)


def test_refusals_say_why() -> None:
    with pytest.raises(ValueError, match="text after the last bracket"):
        expand_hostlist("gpu[0-1]-ib")
    with pytest.raises(ValueError, match="runs backwards"):
        expand_hostlist("n[3-1]")
    with pytest.raises(TypeError):
        expand_hostlist(None)  # type: ignore[arg-type]


NAMES = st.lists(
    st.builds(
        lambda prefix, number, pad: prefix + str(number).zfill(pad),
        st.sampled_from(["n", "node-", "c1001a-s", "gpu", "x.y", "", "a1b"]),
        st.integers(0, 130),
        st.integers(0, 4),
    )
    | st.sampled_from(["login", "head-node", "n", "a1b"]),
    max_size=25,
)


@given(NAMES)
@settings(max_examples=300, deadline=None)
def test_compress_then_expand_gives_the_names_back(names: List[str]) -> None:
    assert expand_hostlist(compress_hostlist(names)) == names


def test_compress_hostlist_is_compact() -> None:
    names = expand_hostlist("n[1-3,05-07,9],m,n[10-11]")
    assert compress_hostlist(names) == "n[1-3,05-07,9],m,n[10-11]"
    assert compress_hostlist(["n007"]) == "n007"
    with pytest.raises(ValueError, match="cannot be in a hostlist"):
        compress_hostlist(["a,b"])


GROUP = st.lists(
    st.tuples(st.integers(0, 120), st.integers(0, 6), st.integers(1, 4)).map(
        lambda t: str(t[0]).zfill(t[2]) + ("" if t[1] == 0 else f"-{t[0] + t[1]}")
    ),
    min_size=1,
    max_size=3,
).map(lambda items: "[" + ",".join(items) + "]")
TOKEN = st.tuples(
    st.lists(st.tuples(st.sampled_from(["n", "rack-", "c1a-s", "", "x.y"]), GROUP), max_size=3),
    st.sampled_from(["", "login", "n7"]),
).map(lambda t: "".join(p + g for p, g in t[0]) or t[1] or "solo")


@given(st.lists(TOKEN, min_size=1, max_size=3).map(",".join))
@settings(max_examples=60, deadline=None)
def test_generated_hostlists_equal_scontrol(scontrol: Dict[str, str], text: str) -> None:
    assert expand_hostlist(text) == scontrol_names(scontrol, text)


def test_expand_counts() -> None:
    assert expand_counts("24(x2)") == [24, 24]  # OGGM's
    assert expand_counts("4(x2),2") == [4, 4, 2]
    assert expand_counts("72") == [72]
    assert expand_counts("2,4(x3),1") == [2, 4, 4, 4, 1]
    with pytest.raises(ValueError, match="N\\(xK\\)"):
        expand_counts("4(2)")


# --- Slurm, from recorded variables -------------------------------------------------

NOWHERE = {"not-a-node.example"}  # the client's names, for the schedulers matched by name


def test_slurm_mixed_grants_in_the_nodes_order() -> None:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "c1001a-s[11,17],gpu[01-02]",
        "SLURM_JOB_CPUS_PER_NODE": "4(x2),2(x2)",
        "SLURMD_NODENAME": "c1001a-s11",  # the batch script runs on the first node
    }
    hosts = sshexec.allocation(transport="ssh", environ=env)
    assert list(hosts) == [
        Host(":", workers=4),  # this node: local workers, not ssh to itself
        Host("c1001a-s17", workers=4),
        Host("gpu01", workers=2),
        Host("gpu02", workers=2),
    ]
    assert isinstance(hosts, Allocation) and hosts.job == "4242"
    assert hosts.description == "the Slurm job 4242 allocation (4 nodes, 12 workers)"


def test_slurm_hosts_default_to_the_srun_transport() -> None:
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "8(x2)"}
    assert list(sshexec.allocation(environ=env)) == [
        Host("n1", workers=8, transport="srun"),
        Host("n2", workers=8, transport="srun"),
    ]
    assert sshexec.allocation("openssh", environ=env)[0].transport == "openssh"


def test_slurm_cpus_per_task_divides_the_grant() -> None:
    env = {
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_JOB_CPUS_PER_NODE": "8,6,2",
        "SLURM_CPUS_PER_TASK": "2",
    }
    assert [h.workers for h in read_slurm_hosts(env)] == [4, 3, 1]
    env["SLURM_CPUS_PER_TASK"] = "4"
    with pytest.raises(ValueError, match="node n3: Slurm granted 2 CPUs there"):
        read_slurm(env)


def read_slurm_hosts(env: Dict[str, str]) -> List[Host]:
    return list(sshexec.allocation("ssh", environ=env))


def test_slurm_single_node_job_is_local_workers() -> None:
    env = {
        "SLURM_JOB_NODELIST": "nodes006",
        "SLURM_JOB_CPUS_PER_NODE": "4",
        "SLURMD_NODENAME": "nodes006",
    }
    assert read_slurm_hosts(env) == [Host(":", workers=4)]  # 4 granted, whatever the cores


def test_salloc_shell_has_no_local_node() -> None:
    """An salloc shell runs off the allocation: no SLURMD_NODENAME, every node remote
    (even one whose name is this machine's: several slurmd may share a hostname)."""
    env = {"SLURM_JOB_NODELIST": f"{socket.gethostname()},n2", "SLURM_JOB_CPUS_PER_NODE": "2(x2)"}
    assert [h.is_local for h in read_slurm_hosts(env)] == [False, False]
    env["SLURMD_NODENAME"] = "n2"
    assert [h.is_local for h in read_slurm_hosts(env)] == [False, True]


def test_slurm_older_and_inconsistent_variables() -> None:
    grant = read_slurm({"SLURM_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "3(x2)"})
    assert grant.nodes == (("n1", 3), ("n2", 3))
    with pytest.raises(ValueError, match="gives 1 counts for the 2 nodes"):
        read_slurm({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "3"})
    with pytest.raises(ValueError, match="SLURM_JOB_CPUS_PER_NODE is not"):
        read_slurm({"SLURM_JOB_NODELIST": "n[1-2]"})
    with pytest.raises(ValueError, match="invalid hostlist"):
        read_slurm({"SLURM_JOB_NODELIST": "n[1-2]x", "SLURM_JOB_CPUS_PER_NODE": "3"})


def test_no_allocation_names_every_variable_looked_for() -> None:
    with pytest.raises(ValueError) as caught:
        sshexec.allocation(environ={"HOME": "/root"})
    for name in ("SLURM_JOB_NODELIST", "PBS_NODEFILE", "LSB_MCPU_HOSTS", "PE_HOSTFILE"):
        assert name in str(caught.value)
    with pytest.raises(ValueError, match="transport must be"):
        sshexec.allocation("telnet", environ={})


# --- PBS, LSF, SGE, from recorded files and variables ---------------------------


def test_pbs_nodefile_one_line_per_slot(tmp_path: Path) -> None:
    nodefile = tmp_path / "aux" / "1234.pbs01"
    nodefile.parent.mkdir()
    nodefile.write_text(
        "cn017.cluster.example.org\n" * 4 + "cn018.cluster.example.org\n" * 4 + "cn019\n" * 2
    )
    env = {"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "1234.pbs01"}
    grant = read_grant(env, {"cn018", "cn018.cluster.example.org"})
    assert grant.scheduler == "PBS" and grant.job == "1234.pbs01"
    assert grant.this_node == "cn018.cluster.example.org"
    hosts = sshexec.allocation(environ=env)  # this machine is none of them
    assert list(hosts) == [
        Host("cn017.cluster.example.org", workers=4),
        Host("cn018.cluster.example.org", workers=4),
        Host("cn019", workers=2),
    ]
    missing = {"PBS_NODEFILE": str(tmp_path / "gone")}
    with pytest.raises(ValueError, match=r"PBS_NODEFILE=.*gone cannot be read"):
        read_grant(missing, NOWHERE)


def test_lsf_mcpu_hosts() -> None:
    env = {"LSB_MCPU_HOSTS": "hostA 8 hostB 4 hostC 1 ", "LSB_JOBID": "77"}
    grant = read_grant(env, {"hostB.example.org"})  # matched by the short name
    assert grant.nodes == (("hostA", 8), ("hostB", 4), ("hostC", 1))
    assert grant.this_node == "hostB" and grant.scheduler == "LSF"
    with pytest.raises(ValueError, match="pairs of host and slots"):
        read_grant({"LSB_MCPU_HOSTS": "hostA 8 hostB"}, NOWHERE)


def test_sge_pe_hostfile(tmp_path: Path) -> None:
    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text(
        "node01.cluster 16 all.q@node01.cluster UNDEFINED\n"
        "node02.cluster 8 all.q@node02.cluster UNDEFINED\n"
        "node02.cluster 4 long.q@node02.cluster UNDEFINED\n"  # a node in two queues
    )
    env = {"PE_HOSTFILE": str(hostfile), "JOB_ID": "9"}
    grant = read_grant(env, {"node01"})
    assert grant.nodes == (("node01.cluster", 16), ("node02.cluster", 12))
    assert grant.this_node == "node01.cluster" and grant.scheduler == "SGE"
    hostfile.write_text("node01 many all.q@node01 UNDEFINED\n")
    with pytest.raises(ValueError, match="pe_hostfile:1: expected 'host slots"):
        read_grant(env, NOWHERE)


def test_slurm_wins_over_the_others(tmp_path: Path) -> None:
    env = {
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_JOB_CPUS_PER_NODE": "2",
        "PBS_NODEFILE": str(tmp_path / "nope"),
    }
    assert read_grant(env, NOWHERE).scheduler == "Slurm"


# --- max_workers within the grant --------------------------------------------------


def granted() -> Allocation:
    return Allocation([Host(":", workers=4), Host("n2", workers=4), Host("n3", workers=2)], "PBS")


def test_max_workers_takes_part_of_the_grant_never_more() -> None:
    assert share_workers(None, granted()) == [4, 4, 2]
    assert share_workers(5, granted()) == [2, 2, 1]
    assert share_workers(9, granted()) == [4, 3, 2]
    assert share_workers(2, granted()) == [1, 1, 0]
    with pytest.raises(ValueError) as caught:
        share_workers(11, granted())
    assert "max_workers=11 is more than the PBS allocation (3 nodes, 10 workers) granted" in str(
        caught.value
    )
    assert "local 4, n2 4, n3 2" in str(caught.value)
    built = build_transports(granted(), 2, None, None, False, 5.0, 5.0, None, "openssh")
    assert [count for _, count, _ in built] == [1, 1]  # n3 gets none of two


def test_srun_hosts_build_the_srun_transport() -> None:
    from sshexec._transports.srun import SrunTransport

    hosts = Allocation([Host("n1", workers=2, transport="srun")], "Slurm")
    built = build_transports(hosts, None, None, None, False, 5.0, 5.0, None)
    assert [type(t) for t, _, _ in built] == [SrunTransport]
    assert [count for _, count, _ in built] == [2]


def test_sshexec_hosts_allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("cn1\ncn1\ncn2\n")
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    monkeypatch.setenv("SSHEXEC_HOSTS", "allocation")
    hosts = resolve_hosts(None)
    assert isinstance(hosts, Allocation)
    assert list(hosts) == [Host("cn1", workers=2), Host("cn2", workers=1)]
    assert resolve_hosts(hosts) is hosts  # an allocation stays one


# --- real maps over an allocation's nodes -------------------------------------------


def alias_config(tmp_path: Path, client: Client, aliases: Dict[str, SSHServer]) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text(
        "".join(
            f"Host {alias}\n  HostName {s.address}\n  Port {s.port}\n  User {client.user}\n"
            f"  IdentityFile {client.key}\n  UserKnownHostsFile {client.known_hosts}\n"
            for alias, s in aliases.items()
        )
    )
    return config


def test_executor_over_an_allocation(
    sshd_pair: List[SSHServer], ssh_client: Client, tmp_path: Path
) -> None:
    """A PBS job on this machine (local workers, as granted) and on node-alpha (an sshd,
    reached by the name in the node file through the ssh config): a real map."""
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{socket.gethostname()}\n" * 2 + "node-alpha\n" * 2)
    config = alias_config(tmp_path, ssh_client, {"node-alpha": sshd_pair[0]})
    hosts = sshexec.allocation(environ={"PBS_NODEFILE": str(nodefile)})
    assert list(hosts) == [Host(":", workers=2), Host("node-alpha", workers=2)]
    kwargs = executor_kwargs(sshd_pair[:1], hosts=hosts)
    kwargs["ssh_options"] = {"config": [str(config)], "agent_path": None}
    with SSHPoolExecutor(**kwargs) as executor:
        assert executor._max_workers == 4
        seen = list(executor.map(tasks.sleep_then_where, [0.2] * 16, timeout=120))
    assert {host for host, _, _ in seen} == {"local", "alpha"}


def test_cli_demo_and_check_over_an_allocation(
    sshd_pair: List[SSHServer], ssh_client: Client, tmp_path: Path
) -> None:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{socket.gethostname()}\nnode-beta\n")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    config = alias_config(tmp_path, ssh_client, {"node-beta": sshd_pair[1]})
    (home / ".ssh" / "config").write_text(config.read_text())
    env = {**os.environ, "HOME": str(home), "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "7"}
    env.pop("SSHEXEC_HOSTS", None)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    common = ["--allocation", "--python", sys.executable]
    demo = ["--limit", "2000", "--block", "200", "--no-serial"]
    run = [sys.executable, "-m", "sshexec"]
    result = subprocess.run(
        [*run, "demo", *demo, *common], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on the PBS job 7 allocation (2 nodes, 2 workers)" in result.stdout
    assert "303 primes below 2,000" in result.stdout
    assert "node-beta" in result.stdout and "local" in result.stdout  # the per-host table
    result = subprocess.run(
        [*run, "check", *common], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node-beta" in result.stdout and "srun: not probed" in result.stdout
    result = subprocess.run(
        [*run, "map", "builtins:len", *common],
        env=env,
        input="ab\nabc\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (0, "2\n3\n"), result.stderr
    env.pop("PBS_NODEFILE")
    result = subprocess.run(
        [*run, "demo", *demo, *common], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "no batch allocation found" in result.stderr and "PE_HOSTFILE" in result.stderr


def test_joblib_and_pool_through_an_allocation(tmp_path: Path) -> None:
    """A one-node PBS job on this machine: 3 slots granted, local workers; joblib with
    max_workers=2 takes two of them, Pool the three."""
    import joblib
    from joblib import Parallel, delayed, parallel_config

    import sshexec.joblib  # registers backend="sshexec"

    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{socket.gethostname()}\n" * 3)
    hosts = sshexec.allocation(environ={"PBS_NODEFILE": str(nodefile)})
    assert list(hosts) == [Host(":", workers=3)]
    with parallel_config(backend="sshexec", hosts=hosts, max_workers=2):
        assert joblib.effective_n_jobs(-1) == 2
        assert Parallel(n_jobs=-1)(delayed(tasks.square)(i) for i in range(6)) == [
            0,
            1,
            4,
            9,
            16,
            25,
        ]
    with sshexec.Pool(hosts=hosts) as pool:
        assert pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]
        assert pool._processes == 3


def test_sshexec_hosts_allocation_runs_the_unchanged_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{socket.gethostname()}\n" * 2)
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    monkeypatch.setenv("SSHEXEC_HOSTS", "allocation")
    with SSHPoolExecutor() as executor:  # as a ProcessPoolExecutor script has it
        assert executor._max_workers == 2  # the grant, not this machine's cores
        assert list(executor.map(tasks.square, range(4))) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="max_workers=3 is more than the PBS allocation"):
        SSHPoolExecutor(3)
