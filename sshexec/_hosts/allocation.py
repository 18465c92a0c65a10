"""The hosts of the batch allocation this program runs in.

Owns: reading the grant of Slurm, PBS/Torque, LSF and SGE/UGE from their variables and
files, and ``allocation()``: one ``Host`` per node with the workers the scheduler granted
there, the client's own node as local workers. The readers are pure functions of the
variables (and the files they name); the hostlist syntax is ``hostlist``'s. Must not
import: transports, asyncio, the pool."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from .hostlist import expand_counts, expand_hostlist
from .spec import LOCAL, TRANSPORTS, Host

ALLOCATION_VARIABLES = (
    ("SLURM_JOB_NODELIST", "Slurm"),
    ("PBS_NODEFILE", "PBS/Torque"),
    ("LSB_MCPU_HOSTS", "LSF"),
    ("PE_HOSTFILE", "SGE/UGE"),
)


# --- what each scheduler granted ---------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """What a scheduler granted: (node, workers) in its order, and the client's node."""

    scheduler: str
    job: str
    nodes: Tuple[Tuple[str, int], ...]
    this_node: Optional[str]  # the scheduler's name for the node the client runs on


def _merge(pairs: Iterable[Tuple[str, int]]) -> Tuple[Tuple[str, int], ...]:
    """One entry per node, in first-seen order, its counts summed (PBS lists a node once
    per slot, LSF and SGE may list a node twice for two queues)."""
    merged: Dict[str, int] = {}
    for name, count in pairs:
        merged[name] = merged.get(name, 0) + count
    return tuple(merged.items())


def _short(name: str) -> str:
    return name.split(".", 1)[0]


def _matching(nodes: Sequence[Tuple[str, int]], own_names: Set[str]) -> Optional[str]:
    """The node whose name is one of this machine's (full or short form)."""
    shorts = {_short(n) for n in own_names}
    for name, _ in nodes:
        if name in own_names or _short(name) in shorts:
            return name
    return None


def _read(path: str, variable: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as exc:
        raise ValueError(f"{variable}={path} cannot be read: {exc.strerror or exc}") from None


def read_slurm(env: Mapping[str, str]) -> Grant:
    """``SLURM_JOB_NODELIST`` with ``SLURM_JOB_CPUS_PER_NODE`` (divided by
    ``SLURM_CPUS_PER_TASK`` when set); the client's node is ``SLURMD_NODENAME`` (set in
    batch steps; several slurmd on one machine share its hostname, so never by name)."""
    listed = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    names = expand_hostlist(listed)
    if not names:
        raise ValueError(f"SLURM_JOB_NODELIST={listed!r} names no node")
    cpus_text = env.get("SLURM_JOB_CPUS_PER_NODE", "")
    if not cpus_text:
        raise ValueError(
            "SLURM_JOB_NODELIST is set but SLURM_JOB_CPUS_PER_NODE is not: the grant per "
            "node is unknown"
        )
    cpus = expand_counts(cpus_text)
    if len(cpus) != len(names):
        raise ValueError(
            f"SLURM_JOB_CPUS_PER_NODE={cpus_text} gives {len(cpus)} counts for the "
            f"{len(names)} nodes of SLURM_JOB_NODELIST={listed}"
        )
    per_task_text = env.get("SLURM_CPUS_PER_TASK", "").strip()
    per_task = 1
    if per_task_text:
        if not per_task_text.isdigit() or int(per_task_text) == 0:
            raise ValueError(f"SLURM_CPUS_PER_TASK={per_task_text!r} is not a positive number")
        per_task = int(per_task_text)
    nodes: List[Tuple[str, int]] = []
    for name, count in zip(names, cpus):
        if count < per_task:
            raise ValueError(
                f"node {name}: Slurm granted {count} CPUs there, fewer than "
                f"SLURM_CPUS_PER_TASK={per_task}: not one worker fits"
            )
        nodes.append((name, count // per_task))
    this_node = env.get("SLURMD_NODENAME") or None
    merged = _merge(nodes)
    if this_node is not None and this_node not in dict(merged):
        this_node = None  # a step of another job, or a login node
    job = env.get("SLURM_JOB_ID", "") or env.get("SLURM_JOBID", "")
    return Grant("Slurm", job, merged, this_node)


def read_pbs(env: Mapping[str, str], own_names: Set[str]) -> Grant:
    """``PBS_NODEFILE``: one line per granted slot."""
    lines = [s.strip() for s in _read(env["PBS_NODEFILE"], "PBS_NODEFILE")]
    nodes = _merge((line, 1) for line in lines if line and not line.startswith("#"))
    if not nodes:
        raise ValueError(f"PBS_NODEFILE={env['PBS_NODEFILE']} lists no node")
    return Grant("PBS", env.get("PBS_JOBID", ""), nodes, _matching(nodes, own_names))


def read_lsf(env: Mapping[str, str], own_names: Set[str]) -> Grant:
    """``LSB_MCPU_HOSTS``: ``host1 4 host2 2``."""
    text = env["LSB_MCPU_HOSTS"]
    words = text.split()
    if not words or len(words) % 2 or not all(w.isdigit() for w in words[1::2]):
        raise ValueError(f"LSB_MCPU_HOSTS={text!r}: expected pairs of host and slots")
    nodes = _merge((n, int(c)) for n, c in zip(words[0::2], words[1::2]) if int(c) > 0)
    return Grant("LSF", env.get("LSB_JOBID", ""), nodes, _matching(nodes, own_names))


def read_sge(env: Mapping[str, str], own_names: Set[str]) -> Grant:
    """``PE_HOSTFILE``: ``host slots queue processors`` per line."""
    path = env["PE_HOSTFILE"]
    pairs: List[Tuple[str, int]] = []
    for number, line in enumerate(_read(path, "PE_HOSTFILE"), 1):
        words = line.split()
        if not words:
            continue
        if len(words) < 2 or not words[1].isdigit():
            raise ValueError(
                f"PE_HOSTFILE {path}:{number}: expected 'host slots ...', got {line!r}"
            )
        pairs.append((words[0], int(words[1])))
    nodes = _merge(p for p in pairs if p[1] > 0)
    if not nodes:
        raise ValueError(f"PE_HOSTFILE={path} lists no node")
    return Grant("SGE", env.get("JOB_ID", ""), nodes, _matching(nodes, own_names))


def read_grant(env: Mapping[str, str], own_names: Set[str]) -> Grant:
    """The first allocation found: Slurm, PBS/Torque, LSF, then SGE/UGE.

    Raises:
        ValueError: None is found (naming every variable looked for), or what the
            scheduler wrote cannot be read (naming the variable, file or node).
    """
    if env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"):
        return read_slurm(env)
    if env.get("PBS_NODEFILE"):
        return read_pbs(env, own_names)
    if env.get("LSB_MCPU_HOSTS"):
        return read_lsf(env, own_names)
    if env.get("PE_HOSTFILE"):
        return read_sge(env, own_names)
    looked = ", ".join(f"{name} ({what})" for name, what in ALLOCATION_VARIABLES)
    raise ValueError(
        f"no batch allocation found: none of {looked} is set. Run inside a job (sbatch, "
        "salloc, qsub, bsub, qrsh -pe), or give the hosts yourself"
    )


# --- the hosts -------------------------------------------------------------------


class Allocation(List[Host]):
    """The hosts of a batch allocation: a list of ``Host``, each with the workers the
    scheduler granted there, that remembers it is a grant (so ``max_workers`` may take
    fewer workers than granted, never more)."""

    def __init__(self, hosts: Iterable[Host], scheduler: str, job: str = "") -> None:
        super().__init__(hosts)
        self.scheduler = scheduler
        self.job = job

    @property
    def description(self) -> str:
        """``Slurm job 42: 2 nodes, 12 workers`` for logs and the CLI."""
        job = f" job {self.job}" if self.job else ""
        workers = sum(h.workers or 0 for h in self)
        nodes = f"{len(self)} node{'s' if len(self) != 1 else ''}"
        return f"the {self.scheduler}{job} allocation ({nodes}, {workers} workers)"

    def fit(self, total: int) -> List[int]:
        """Worker counts per host for ``max_workers=total``: round-robin within each
        node's grant.

        Raises:
            ValueError: ``total`` is more than the allocation granted (naming each node).
        """
        grants = [h.workers or 0 for h in self]
        if total > sum(grants):
            each = ", ".join(f"{h.label} {h.workers}" for h in self)
            raise ValueError(
                f"max_workers={total} is more than {self.description} granted ({each}): "
                "ask the scheduler for more CPUs, or lower max_workers"
            )
        counts = [0] * len(grants)
        left = total
        while left:
            for index, grant in enumerate(grants):
                if left and counts[index] < grant:
                    counts[index] += 1
                    left -= 1
        return counts


def own_names() -> Set[str]:
    """This machine's names: its hostname and fully qualified name."""
    names = {socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError:  # a resolver that fails: the hostname alone
        pass
    return {n for n in names if n}


def hosts_of(grant: Grant, transport: Optional[str]) -> Allocation:
    """One ``Host`` per node: the client's node as local workers (``":"``)."""
    hosts = [
        Host(LOCAL, workers=count)
        if name == grant.this_node
        else Host(name, workers=count, transport=transport)
        for name, count in grant.nodes
    ]
    return Allocation(hosts, grant.scheduler, grant.job)


def allocation(
    transport: Optional[str] = None, *, environ: Optional[Mapping[str, str]] = None
) -> Allocation:
    """The hosts of the batch allocation this program runs in, with what was granted.

    Reads Slurm (``SLURM_JOB_NODELIST``, ``SLURM_JOB_CPUS_PER_NODE`` with its ``N(xK)``
    repeats, divided by ``SLURM_CPUS_PER_TASK`` when set), PBS/Torque (``PBS_NODEFILE``),
    LSF (``LSB_MCPU_HOSTS``) or SGE/UGE (``PE_HOSTFILE``), in that order. Each node
    becomes a ``Host`` whose ``workers`` is what the scheduler granted on it, not its
    core count. The node this program runs on is served by local workers (``":"``),
    not by SSH to itself: under Slurm the node named by ``SLURMD_NODENAME`` (set in a
    batch script, not in an ``salloc`` shell, which runs off the allocation), elsewhere
    the node whose name is this machine's hostname.

    ``SSHPoolExecutor(hosts=allocation())`` uses the whole grant; ``max_workers`` may
    ask for fewer workers (spread over the nodes), never more. ``SSHEXEC_HOSTS=allocation``
    and ``sshexec demo|check|map --allocation`` do the same.

    Args:
        transport: What reaches the other nodes: ``"srun"`` (a Slurm job step; the
            default under Slurm), ``"ssh"`` (the executor's own SSH ``transport=``; the
            default elsewhere), ``"asyncssh"`` or ``"openssh"``.
        environ: The variables to read (default ``os.environ``).

    Returns:
        A list of ``Host`` in the scheduler's order (a list subclass that remembers
        it is a grant).

    Raises:
        ValueError: No allocation is found (the message names every variable looked
            for), or what the scheduler wrote cannot be read (naming the variable, file
            or node and the cause).

    Thread-safe (reads the environment and, for PBS and SGE, a file).
    """
    if transport is not None and transport != "ssh" and transport not in TRANSPORTS:
        raise ValueError(
            f"transport must be 'ssh' or one of {', '.join(TRANSPORTS)}, got {transport!r}"
        )
    env = os.environ if environ is None else environ
    grant = read_grant(env, own_names())
    if transport is None:
        transport = "srun" if grant.scheduler == "Slurm" else None
    return hosts_of(grant, None if transport == "ssh" else transport)
