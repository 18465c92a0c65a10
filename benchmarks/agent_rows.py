"""The four rows of ``benchmarks.agent``: start-up, scale, a capped link, a silent partition.

Each row runs its probes for both versions interleaved rep by rep and returns a
section: ``{"title", "entries", "notes"}``, where an entry is ``(labels, samples by
version)`` and ``agent_report`` turns it into a markdown table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from .agent_run import Island, Sample, Version, interleave, netns_available, probe
from .proxy import DelayProxy
from .sshd import ADDRESS, Client, Sshd

Entry = Tuple[Dict[str, Any], Dict[str, List[Sample]]]
LINK_RATE = 100e6 / 8  # bytes per second, each direction
PAYLOAD = 20_000_000


def each(
    args: Dict[str, Any], logs: Path, timeout: float = 240.0
) -> Callable[[Version, int], Sample]:
    """A probe of ``args`` for ``interleave``: the same measurement for every rep."""

    def run(version: Version, rep: int) -> Sample:
        return probe(version, args, logs, timeout=timeout)

    return run


def kwargs_for(client: Client, servers: List[Sshd], transport: str) -> Dict[str, Any]:
    return client.executor_kwargs([s.port for s in servers], transport=transport)


def startup(
    client: Client, servers: List[Sshd], versions: List[Version], reps: int, logs: Path
) -> Dict[str, Any]:
    entries: List[Entry] = []
    for hosts, per_host in ((1, 16), (4, 8)):
        for transport in ("asyncssh", "openssh"):
            args = {
                "kind": "startup",
                "workers": hosts * per_host,
                "kwargs": kwargs_for(client, servers[:hosts], transport),
            }
            samples = interleave(versions, reps, each(args, logs))
            entries.append(
                ({"hosts x workers": f"{hosts} x {per_host}", "transport": transport}, samples)
            )
    return {
        "title": "Start-up: construction (= first worker up) and all workers up; "
        "sshd MaxSessions default (10)",
        "metrics": [
            ("construct", "construct s", False),
            ("first", "first up s", False),
            ("all", "all up s", False),
            ("all/first", "all/first", False),
        ],
        "entries": entries,
        "notes": [],
    }


def scale(
    client: Client,
    servers: List[Sshd],
    versions: List[Version],
    reps: int,
    tasks_per_worker: int,
    logs: Path,
    openssh_at_256: bool,
) -> Dict[str, Any]:
    entries: List[Entry] = []
    points = [(2, "asyncssh"), (8, "asyncssh"), (16, "asyncssh"), (32, "asyncssh")]
    if openssh_at_256:
        points.append((32, "openssh"))
    notes = []
    for hosts, transport in points:
        if hosts > len(servers):
            notes.append(f"{hosts * 8} workers skipped: only {len(servers)} sshd")
            continue
        workers = hosts * 8
        args = {
            "kind": "scale",
            "workers": workers,
            "tasks_per_worker": tasks_per_worker,
            "ready_timeout": 180,
            "kwargs": kwargs_for(client, servers[:hosts], transport),
        }
        chosen = [
            v for v in versions if v.name == "agent" or (workers <= 64 and transport == "asyncssh")
        ]
        samples = interleave(chosen, reps, each(args, logs, timeout=300))
        for v in versions:
            samples.setdefault(v.name, [])
        entries.append(({"workers": f"{workers} ({hosts} x 8)", "transport": transport}, samples))
    return {
        "title": f"Scale: 50 ms time.sleep tasks, {tasks_per_worker} per worker; "
        "% of ideal (workers / 0.05 s) and client CPU per task",
        "metrics": [
            ("of_ideal", "% of ideal", True),
            ("cpu_ms_per_task", "client CPU ms/task", False),
            ("children_cpu_ms_per_task", "ssh children CPU ms/task", False),
            ("all", "all up s", False),
        ],
        "entries": entries,
        "notes": [*notes, "before: measured at 16 and 64 workers only"],
    }


def bandwidth(
    client: Client, servers: List[Sshd], versions: List[Version], reps: int, items: int, logs: Path
) -> Dict[str, Any]:
    proxies = [DelayProxy(s.port, 0.0, rate=LINK_RATE) for s in servers[:2]]
    try:
        for proxy, server in zip(proxies, servers):
            client.trust(proxy.start(), server.host_key)
        moved: Dict[str, int] = {}

        def total() -> int:
            return sum(p.moved["up"] + p.moved["down"] for p in proxies)

        def on_mark(name: str) -> None:
            moved[name] = total()

        def run(version: Version, _: int) -> Sample:
            moved.clear()
            start = total()
            args = {
                "kind": "bandwidth",
                "workers": 4,
                "items": items,
                "size": PAYLOAD,
                "kwargs": client.executor_kwargs([p.port for p in proxies], transport="asyncssh"),
            }
            got = probe(version, args, logs, on_mark, timeout=400)
            if "map" in moved and "mapped" in moved:
                got["map_MB"] = (moved["mapped"] - moved["map"]) / 1e6
            got["probe_MB"] = (total() - start) / 1e6
            if got.get("stats_saved") is not None:
                got["saved_MB"] = got["stats_saved"] / 1e6
            return got

        samples = interleave(versions, reps, run)
    finally:
        for proxy in proxies:
            proxy.stop()
    return {
        "title": f"Capped link: 2 hosts, each behind its own {LINK_RATE * 8 / 1e6:g} Mbit/s "
        f"(each way) proxy, 2 workers per host; map(chunksize=1) of a function closing "
        f"over {PAYLOAD / 1e6:g} MB of random bytes, {items} items",
        "metrics": [
            ("seconds", "map s", False),
            ("map_MB", "MB through proxies (map)", False),
            ("probe_MB", "MB through proxies (whole run)", False),
            ("saved_MB", "stats() MB saved", True),
        ],
        "entries": [
            ({"items": items, "expected": f"before ≈ {items} x 20 MB, agent ≈ 2 x 20 MB"}, samples)
        ],
        "notes": [
            "before has no stats() bytes_saved (\u2014); the agent counts a save per task "
            "dispatch, so a prefetched task that is stolen and sent again counts twice"
        ],
    }


def partition(
    root: Path, client: Client, versions: List[Version], reps: int, default_rep: bool, logs: Path
) -> Dict[str, Any]:
    why = netns_available()
    section: Dict[str, Any] = {
        "title": "Silent partition: 2 workers in 60 s tasks on an sshd in a network namespace; "
        "the link is cut (inner veth down); seconds until no job process is left on the node",
        "metrics": [
            ("clean", "clean after s", False),
            ("left", "left at the cap", False),
            ("waited", "waited s", False),
            ("shutdown", "client shutdown s", False),
            ("futures_pending", "futures unresolved 15 s later", False),
        ],
        "entries": [],
        "notes": [
            "job processes: the agent, workers and shells below the sshd listener, recorded "
            "before the cut; sshd's own per-connection processes are not counted (in both "
            "versions they wait for TCP to time out)"
        ],
    }
    if why is not None:
        section["notes"].append(f"skipped: {why}")
        return section
    runs = [(2.0, reps)] + ([(10.0, 1)] if default_rep else [])
    with Island(root, client) as island:
        assert island.sshd is not None and island.sshd.proc is not None
        sshd_pid = island.sshd.proc.pid
        kwargs = client.executor_kwargs([island.sshd.port], connect_timeout=5.0)
        kwargs["hosts"] = [h.replace(ADDRESS, island.address) for h in kwargs["hosts"]]
        for keepalive, count in runs:
            args = {
                "kind": "partition",
                "workers": 2,
                "keepalive": keepalive,
                "grace": 30.0,
                "sshd_pid": sshd_pid,
                "kwargs": kwargs,
            }

            def run(version: Version, _: int, a: Dict[str, Any] = args) -> Sample:
                try:
                    return probe(version, a, logs, lambda _name: island.cut(), timeout=200)
                finally:
                    island.heal()

            samples = interleave(versions, count, run)
            deadline = 3 * keepalive
            label = {
                "keepalive_interval": f"{keepalive:g} s",
                "deadline": f"{deadline:g} s",
                "target": f"≤ {deadline + 5:g} s",
            }
            section["entries"].append((label, samples))
    return section
