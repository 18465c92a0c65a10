"""The chaos run: a real client process driving real nodes while processes are killed.

``run_once`` starts a client (``benchmarks.chaos_client``) on one ``Target`` (local
workers, sshd hosts, a host behind the slow-link proxy, a host running another Python),
and while it works applies one ``kill``: nothing, ``kill -9`` of one or two workers, of a
host's agent, or of the client itself. Its tasks compute, sleep, flood output, leave
children behind (in the worker's group or in a session of their own), raise, pass
their time or memory limit (``TaskTimeout``, ``TaskMemoryError``) or are ``kill()``ed,
read staged inputs (``files=``, one sent by ``send_files`` mid-run) and write outputs
that come back (``return_files=``); two actors take calls (one ``restart=1``, one
``kill -9``ed by the client, then dropped); some done-callbacks block for longer than
three keepalive intervals; some Futures are
cancelled. Afterwards ``check`` lists every broken invariant:

- every Future ended, as ``as_completed`` and ``wait`` see it, and its callback ran once;
- actors' calls all ended, answered in call order, ``ActorDiedError`` only after a kill
  (``check_actors``), and no actor is left at shutdown;
- results are right; the only errors are the tasks' own, cancellations the client made,
  the limits and kills it set, and (only where something was killed) lost workers;
- no process of the job is left: no agent, worker, or child a task started, on any node,
  whatever was killed (processes seen during the run are tracked by pid and start time);
- every output of a task that returned is on the client, right; no per-executor
  directory is left in the hosts' cache but those of agents killed (the next agent on
  that host sweeps them);
- the client's peak memory and the node's (agents and workers together) stay bounded.

``tests/test_chaos.py`` runs a few short rounds in CI; ``python -m benchmarks.chaos``
runs many (``--rounds``), over local workers and loopback sshd hosts (one behind the
slow-link proxy), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import chaos_tasks

REPO = str(Path(__file__).resolve().parent.parent)
WORKER_SIGNATURE = b"os._exit(4)');exec(b)"  # the bootstrap loader on agents' and workers' cmdlines
KILLS = ("none", "worker", "agent", "client")
LOSSES = ("WorkerLostError", "BrokenPool", "BrokenProcessPool")
CLIENT_RSS_LIMIT_MB = 400.0
NODE_RSS_LIMIT_MB = 1500.0
GONE_WITHIN = 15.0  # seconds for the job's processes to end after the client did


@dataclass
class Target:
    """Where a round runs: ``executor`` is SSHPoolExecutor's keyword arguments (JSON);
    ``roots`` are the pids below which the job's node processes live (sshd listeners);
    none: local workers, below the client."""

    name: str
    executor: Dict[str, Any]
    roots: List[int] = field(default_factory=list)
    max_workers: Optional[int] = 2


@dataclass
class Round:
    target: str
    kill: str
    seed: int
    events: Dict[str, Dict[str, Any]]
    killed: List[str]
    left: List[str]
    node_peak_mb: float
    seconds: float
    returncode: Optional[int]
    stderr_tail: str
    problems: List[str] = field(default_factory=list)


def default_plan(seed: int, tag: str, tasks: int = 60) -> Dict[str, Any]:
    return {
        "seed": seed,
        "tag": tag,
        "tasks": tasks,
        "kinds": list(chaos_tasks.KINDS),
        "max_sleep": 0.6,
        "long_tasks": 2,  # the first two sleep this long: the job outlasts the first kill
        "long_sleep": 3.0,
        "flood_bytes": 2_000_000,
        "callback_block": 4.0,  # over 3 keepalive intervals of 1 s: must not look like silence
        "block_fraction": 0.03,
        "cancel_fraction": 0.15,
        "map_items": 200,
        "deadline": 120.0,
    }


def _stat(pid: int) -> Optional[List[bytes]]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _rss_mb(pid: int) -> float:
    fields = _stat(pid)
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20 if fields else 0.0


def job_processes(client: int, roots: List[int], tag: str) -> Dict[int, Tuple[str, int]]:
    """The job's live processes: sshexec's bootstrapped ones (agents, workers) below the
    client or the sshd roots, and anything carrying the round's tag: pid -> (what, start).
    One pass over /proc (the driver looks ten times a second, on the job's own cores)."""
    table: Dict[int, Tuple[List[bytes], bytes]] = {}  # pid -> (stat fields, cmdline)
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            fields = _stat(pid)
            if fields is not None:
                table[pid] = (fields, _cmdline(pid))
                children.setdefault(int(fields[1]), []).append(pid)
    below: set[int] = set()
    stack = [client, *roots]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in below:
                below.add(child)
                stack.append(child)
    found: Dict[int, Tuple[str, int]] = {}
    for pid, (fields, cmd) in table.items():
        if fields[0] == b"Z":
            continue
        if tag.encode() in cmd:
            found[pid] = ("task child", int(fields[19]))
        elif WORKER_SIGNATURE in cmd and pid in below:
            parent = table.get(int(fields[1]), ([], b""))[1]
            found[pid] = ("worker" if WORKER_SIGNATURE in parent else "agent", int(fields[19]))
    return found


def _still_alive(seen: Dict[int, Tuple[str, int]]) -> List[str]:
    left = []
    for pid, (what, started) in seen.items():
        fields = _stat(pid)
        if fields is not None and fields[0] != b"Z" and int(fields[19]) == started:
            parent, group, session = (int(f) for f in fields[1:4])
            left.append(
                f"{what} pid {pid} (parent {parent}, group {group}, session {session}): "
                f"{_cmdline(pid)[-60:]!r}"
            )
    return left


def _read_events(path: Path) -> Dict[str, Dict[str, Any]]:
    events: Dict[str, Dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events[event["event"]] = event
    return events


def run_once(
    target: Target, kill: str, seed: int, workdir: Path, plan: Optional[Dict[str, Any]] = None
) -> Round:
    """One round; never raises for what the job did (``check`` judges it)."""
    rng = random.Random(seed)
    tag = f"sshexec-chaos-{uuid.uuid4().hex[:12]}"
    plan = {**default_plan(seed, tag), **(plan or {}), "tag": tag, "seed": seed}
    plan["executor"] = target.executor
    plan["max_workers"] = target.max_workers
    out = workdir / f"{tag}.jsonl"
    if plan.get("files", True):
        plan["files_dir"] = str(_inputs(workdir / f"{tag}-files"))
        plan["cache"] = str(workdir / f"{tag}-cache")
    env = {
        **os.environ,
        "CHAOS_PLAN": json.dumps(plan),
        "CHAOS_OUT": str(out),
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }
    started = time.monotonic()
    with open(workdir / f"{tag}.stderr", "wb") as stderr:
        client = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.chaos_client"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the floods' prints: written, never read back
            stderr=stderr,
        )
        seen: Dict[int, Tuple[str, int]] = {}
        killed: List[str] = []
        node_peak = 0.0
        kills_left = {"none": 0, "worker": rng.choice((1, 2)), "agent": 1, "client": 1}[kill]
        next_kill: Optional[float] = None
        limit = started + plan["deadline"] + 120
        while client.poll() is None and time.monotonic() < limit:
            now = job_processes(client.pid, target.roots, tag)
            seen.update(now)
            node_peak = max(
                node_peak, sum(_rss_mb(p) for p, (w, _) in now.items() if w != "task child")
            )
            if next_kill is None and "started" in _read_events(out):
                next_kill = time.monotonic() + rng.uniform(0.2, 1.0)
            if kills_left and next_kill is not None and time.monotonic() >= next_kill:
                killed.extend(_kill(kill, client.pid, now, rng))
                kills_left -= 1
                next_kill = time.monotonic() + rng.uniform(0.3, 1.0)
            time.sleep(0.1)
        if client.poll() is None:
            killed.append("client (the round's time limit)")
            client.kill()
        client.wait(10)
    deadline = time.monotonic() + GONE_WITHIN
    while (left := _still_alive(seen)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, entry in job_processes(client.pid, target.roots, tag).items():
        seen.setdefault(pid, entry)  # one that appeared after the last look (a task's child)
    left = _still_alive(seen)
    for pid in seen:  # leave the machine clean for the next round, whatever happened
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if plan.get("cache"):
        left += _work_left(Path(plan["cache"]), killed)
    tail = (workdir / f"{tag}.stderr").read_bytes()[-3000:].decode(errors="replace")
    result = Round(
        target.name,
        kill,
        seed,
        _read_events(out),
        killed,
        left,
        node_peak,
        time.monotonic() - started,
        client.returncode,
        tail,
    )
    result.problems = check(result, plan)
    return result


def _inputs(root: Path) -> Path:
    """The staged tree: ``inputs/`` with ``chaos_tasks.INPUTS`` files and a symlink."""
    (root / "inputs").mkdir(parents=True)
    for k in range(chaos_tasks.INPUTS):
        (root / "inputs" / f"f{k}.dat").write_bytes(chaos_tasks.input_bytes(k))
    (root / "inputs" / "first").symlink_to("f0.dat")
    return root


def _work_left(cache: Path, killed: List[str]) -> List[str]:
    """Per-executor directories left in the hosts' cache (``<host>-<agent pid>-*``),
    but those of killed agents (swept by the next agent there, if one comes)."""
    work = cache / "sshexec" / "work"
    dead = {k.split()[-1] for k in killed if k.startswith("agent pid")}
    names = sorted(os.listdir(work)) if work.is_dir() else []
    return [f"the working directory {n}" for n in names if n.rsplit("-", 2)[-2] not in dead]


def _kill(kill: str, client: int, now: Dict[int, Tuple[str, int]], rng: random.Random) -> List[str]:
    if kill == "client":
        victims = [client]
    else:
        want = "worker" if kill == "worker" else "agent"
        pool = sorted(pid for pid, (what, _) in now.items() if what == want)
        victims = [rng.choice(pool)] if pool else []
    done = []
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
            done.append(f"{kill} pid {pid}")
        except OSError:
            pass
    return done


def check(result: Round, plan: Dict[str, Any]) -> List[str]:
    """Every broken invariant of a round, as sentences (empty: all held)."""
    problems = [f"left running after the job: {p}" for p in result.left]
    if result.node_peak_mb > NODE_RSS_LIMIT_MB:
        problems.append(f"the node's processes peaked at {result.node_peak_mb:.0f} MB")
    if result.kill == "client":
        if not any(k.startswith("client") for k in result.killed) and result.returncode != 0:
            problems.append(f"the client failed (exit {result.returncode}): {result.stderr_tail}")
        return problems
    if result.returncode != 0:
        problems.append(f"the client exited {result.returncode}: {result.stderr_tail}")
        return problems
    seen, ended = result.events.get("seen"), result.events.get("ended")
    if seen is None or ended is None:
        return [*problems, f"the client did not finish its report: {result.stderr_tail}"]
    n = seen.get("tasks", plan["tasks"])
    if seen["as_completed"] != n or seen["not_done"]:
        problems.append(
            f"as_completed yielded {seen['as_completed']} of {n}; wait() left {seen['not_done']}"
        )
    if not seen["map_ok"]:
        problems.append("map returned wrong results")
    problems += [f"a returned file: {bad}" for bad in seen.get("returned_bad", ())]
    if seen.get("late_error") and not (result.kill != "none" and result.killed):
        problems.append(f"send_files failed with nothing killed: {seen['late_error']}")
    cancelled = set(seen["cancelled"])
    lossy = result.kill in ("worker", "agent") and bool(result.killed)
    for key, (how, value) in seen["outcomes"].items():
        i = int(key)
        kind = seen["kinds"][i]
        count = ended["delivered"].get(key, 0)
        if count != 1:
            problems.append(f"task {i} ({kind}): its done-callback ran {count} times")
        if i in cancelled:
            if how != "cancelled":
                problems.append(f"task {i} was cancelled, yet ended as {how}")
            continue
        if how == "cancelled":
            problems.append(f"task {i} ({kind}) ended cancelled; the client did not cancel it")
        elif lossy and how in LOSSES:
            continue
        elif kind == "raise":
            if how != "ValueError" or value != str(i):
                problems.append(f"task {i} (raise) ended as {how}: {value}")
        elif kind in chaos_tasks.STOPPED:
            if how != chaos_tasks.STOPPED[kind]:
                problems.append(f"task {i} ({kind}) ended as {how}: {value}")
        elif how != "result" or value != chaos_tasks.expected(kind, i):
            problems.append(f"task {i} ({kind}) ended as {how}: {value!r}")
    problems.extend(check_actors(seen.get("actors"), lossy))
    if ended["peak_rss_mb"] > CLIENT_RSS_LIMIT_MB:
        problems.append(f"the client peaked at {ended['peak_rss_mb']:.0f} MB")
    return problems


def check_actors(actors: Optional[Dict[str, Any]], lossy: bool) -> List[str]:
    """The actors' invariants: every call ended; ``kept`` counted 1, 2, 3, ... in call
    order (restarting from 1 only after an ``ActorDiedError``, only where workers or
    agents were killed); ``doomed`` answered in order until the client killed it, and
    every call from the first one that failed on failed with ``ActorDiedError``."""
    if actors is None:
        return ["the client reported no actors"]
    problems = []
    if actors["completed"] != actors["calls"]:
        problems.append(
            f"actor calls: as_completed yielded {actors['completed']} of {actors['calls']}"
        )
    for name, outcomes in actors["outcomes"].items():
        expect, failed = 1, False
        for k, (how, value) in enumerate(outcomes):
            if how == "result" and value == expect and not (failed and name == "doomed"):
                expect += 1
            elif how == "ActorDiedError" and (lossy or name == "doomed"):
                failed, expect = True, 1 if name == "kept" else expect
            elif how == "result" and value == 1 and failed and name == "kept":
                expect = 2  # the fresh object's first call
            else:
                problems.append(f"actor {name} call {k}: {how} {value!r} (expected {expect})")
                break
        if name == "doomed" and actors["killed_at"] >= 0 and not failed:
            problems.append("actor doomed: killed, yet no call failed with ActorDiedError")
    if any(state not in ("closed", "dead") for state in actors["listed"]):
        problems.append(f"actors left at shutdown: {actors['listed']}")
    return problems


def describe(result: Round) -> str:
    head = f"{result.target} kill={result.kill} seed={result.seed} ({result.seconds:.1f} s)"
    if result.killed:
        head += f" killed: {', '.join(result.killed)}"
    if not result.problems:
        return head + ": ok"
    return head + ":\n  " + "\n  ".join(result.problems)


# ---- the long run ----------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    from . import sshd as loopback
    from .proxy import DelayProxy

    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--rounds", type=int, default=40, help="rounds per target")
    parser.add_argument("--tasks", type=int, default=200, help="tasks per round")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every round's outcome here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sshexec-chaos-"))
    client = loopback.Client(work / "client")
    servers = [loopback.Sshd(work, client, name).start() for name in ("alpha", "beta")]
    proxy = DelayProxy(servers[1].port, delay=0.01, rate=4e6)
    proxy_port = proxy.start()
    client.trust(proxy_port, servers[1].host_key)
    roots = [s.proc.pid for s in servers if s.proc is not None]
    targets = [
        Target("local", {"keepalive_interval": 1.0}),
        Target(
            "ssh+slow-link",
            client.executor_kwargs([servers[0].port, proxy_port], keepalive_interval=1.0),
            roots,
            max_workers=4,
        ),
    ]
    rounds: List[Round] = []
    rng = random.Random(args.seed)
    try:
        for index in range(args.rounds):
            for target in targets:
                kill = KILLS[index % len(KILLS)]
                result = run_once(target, kill, rng.randrange(1 << 30), work, {"tasks": args.tasks})
                rounds.append(result)
                print(describe(result), flush=True)
    finally:
        proxy.stop()
        for server in servers:
            server.stop()
    bad = [r for r in rounds if r.problems]
    print(f"\n{len(rounds) - len(bad)} of {len(rounds)} rounds held every invariant")
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "target": r.target,
                        "kill": r.kill,
                        "seed": r.seed,
                        "seconds": r.seconds,
                        "problems": r.problems,
                        "node_peak_mb": r.node_peak_mb,
                        "client_peak_mb": r.events.get("ended", {}).get("peak_rss_mb"),
                    }
                    for r in rounds
                ],
                indent=1,
            )
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
