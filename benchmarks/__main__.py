"""``python -m benchmarks``: sshexec beside ProcessPoolExecutor (and loky, Dask) in one run.

Starts its own loopback sshd processes, builds every contender once, warms them
up, then runs each workload for every contender in turn, repetition after
repetition (round-robin, the starting contender rotating), so that drift from
other load on the machine affects all of them alike. Prints markdown tables of
medians with min-max and ratios to ProcessPoolExecutor from this same run, and
writes benchmarks/results/latest.json. ``python -m benchmarks soak`` is the soak
test instead.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import contenders as cs
from . import driver, memory, rawssh, report, special
from . import sshd as loopback
from .workloads import WORKLOADS, Context, Sizes, rows

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
HARD_LIMIT = {"quick": 8 * 60, "full": 30 * 60, "soak": 45 * 60}  # then dump stacks and exit


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    names = [w.name for w in WORKLOADS] + list(driver.SPECIAL)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("mode", nargs="?", choices=("run", "soak"), default="run")
    parser.add_argument(
        "--quick", action="store_true", help="fewer reps, smaller sizes (smoke test)"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated workloads ({','.join(names)}) and/or contenders "
        "(sshexec-ssh,sshexec-openssh,sshexec-local,ppe,ppe-spawn,loky,dask,execnet,raw); soak: sshexec-local,sshexec-ssh",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 2)")
    parser.add_argument(
        "--sshd", type=int, choices=(1, 2), default=2, help="sshd processes for the 2 SSH workers"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    return parser.parse_args(argv)


LOGIN_LIMIT = 5.0  # seconds; slower SSH logins make every SSH row meaningless


def ssh_usable(client: loopback.Client, port: int, where: str, notes: List[str]) -> bool:
    """Can we log in at a sane speed? The login shell runs for every SSH session (here:
    ~/.bashrc); a stuck one (e.g. a stale ``pyenv rehash`` lock makes each login wait
    60 s) would turn every SSH row into timeouts, so those rows are skipped instead."""
    try:
        took: Optional[float] = rawssh.session(client.connect_options(port), 30.0)["startup"]
    except Exception as exc:
        took, why = None, f"failed: {type(exc).__name__}: {exc}"
    else:
        why = f"took {took:.1f} s"
    if took is not None and took <= LOGIN_LIMIT:
        return True
    notes.append(
        f"{where}: SSH rows skipped: logging in and running `true` {why} (limit "
        f"{LOGIN_LIMIT:g} s); check the login shell's start-up files (~/.bashrc)"
    )
    driver.say(f"  {notes[-1]}")
    return False


def git_state() -> Dict[str, Any]:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "sshexec")}


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.reps:
        sizes.reps = args.reps
    notes: List[str] = []
    errors: List[str] = []
    try:
        import numpy
    except ImportError:
        numpy = None
    load_before = report.load_average()
    sections: Dict[str, Dict[str, Any]] = {}
    hangs = driver.fork_exit_hangs()
    if hangs:
        notes.append(
            "sshexec bug: a process forked while an SSHPoolExecutor is alive hangs at exit "
            "(sshexec/_runtime.py _shutdown_at_exit waits on the parent's loop thread); "
            "ProcessPoolExecutor (fork) pools are therefore built before any SSHPoolExecutor"
        )
    with tempfile.TemporaryDirectory(prefix="sshexec-bench-") as tmp:
        root = Path(tmp)
        client: Optional[loopback.Client] = None
        servers: List[loopback.Sshd] = []
        try:
            if loopback.available():
                client = loopback.Client(root / "client")
                servers = [
                    loopback.Sshd(root, client, f"sshd{i}").start() for i in range(args.sshd)
                ]
                if not ssh_usable(client, servers[0].port, "main workloads", notes):
                    client = None
            ports = [s.port for s in servers] if client is not None else []
            everyone = cs.build(client, ports, numpy is not None, notes)
            chosen, players = driver.pick(args.only, everyone)
            workloads = [
                w
                for w in WORKLOADS
                if w.name in chosen and (numpy is not None or not w.needs_numpy)
            ]
            ctx = Context(sizes, client.connect_options(ports[0]) if client else None, root, numpy)
            ctx.prepare()
            driver.say(
                f"is_prime list: {len(ctx.primes):,} numbers, chunksize {ctx.prime_chunksize}"
            )
            samples = driver.run_workloads(workloads, players, ctx, errors)
            if (
                "many" in chosen
                and client is not None
                and ssh_usable(client, ports[0], "64 workers", notes)
            ):
                driver.say("64 sleeping workers")
                sections["many"] = special.many_workers(
                    root, client, sizes.many_tasks_per_worker, sizes.reps, errors
                )
            if (
                "slowlink" in chosen
                and client is not None
                and ssh_usable(client, ports[0], "slow link", notes)
            ):
                driver.say("slow link")
                sections["slowlink"] = special.slow_link(
                    servers[0], client, sizes.slow_tasks, sizes.reps, errors
                )
            if "memory" in chosen:
                driver.say("memory")
                ssh = client is not None and ssh_usable(client, ports[0], "memory", notes)
                ssh_kwargs = client.executor_kwargs(ports) if client is not None and ssh else None
                sections["memory"] = memory.run(
                    ssh_kwargs, sizes.memory_items, min(sizes.reps, 2), errors
                )
        finally:
            for server in servers:
                server.stop()
    elapsed = time.perf_counter() - began
    found = report.targets(samples, sections)
    text = render(args, sizes, everyone, players, samples, sections, found, notes, errors, elapsed)
    print(text)
    document = {
        "machine": report.machine(),
        "load_average": {"before": load_before, "after": report.load_average()},
        "openssh": loopback.openssh_version(),
        "git": git_state(),
        "versions": {
            m: cs.importable(m)
            for m in (
                "sshexec",
                "asyncssh",
                "cloudpickle",
                "msgpack",
                "loky",
                "distributed",
                "numpy",
            )
        },
        "config": {"quick": args.quick, "sizes": vars(sizes), "sshd": args.sshd, "only": args.only},
        "contenders": {c.name: {"label": c.label, "notes": c.notes} for c in players},
        "fork_exit_hangs": hangs,
        "results": report.summarize(samples),
        "sections": sections,
        "targets": [{"target": t, "measured": v, "met": m} for t, v, m in found],
        "notes": notes,
        "errors": errors,
        "runtime_seconds": elapsed,
        "markdown": text,
    }
    report.write_json(args.output, document)
    print(f"\nJSON: {args.output}")
    return 1 if errors else 0


def render(
    args: argparse.Namespace,
    sizes: Sizes,
    everyone: List[cs.Contender],
    players: List[cs.Contender],
    samples: report.Samples,
    sections: Dict[str, Dict[str, Any]],
    found: Any,
    notes: List[str],
    errors: List[str],
    elapsed: float,
) -> str:
    info = report.machine()
    out = [
        f"# sshexec benchmarks ({'quick' if args.quick else 'full'} run, {sizes.reps} reps, round-robin)\n",
        f"{info['cpu_count']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"{info['platform']}; {loopback.openssh_version()}\n",
    ]
    for c in players:
        extra = f" ({'; '.join(c.notes)})" if c.notes else ""
        out.append(f"- **{c.name}**: {c.label}{extra}")
    out.append("")
    out.append(report.main_table(rows(sizes), samples, [c.name for c in everyone]))
    out.append(
        "\n\u00d7 PPE: median / ProcessPoolExecutor's median in this run (↑ higher is better, "
        "↓ lower); \u00d7 raw: median / the raw asyncssh channel's (one-way up for arguments, "
        "down for results, 1-byte ping for round trips). MB = 10^6 bytes."
    )
    for name in driver.SPECIAL:
        if name in sections:
            out.append(f"\n## {sections[name]['title']}\n")
            out.append(report.section_table(sections[name]))
    if found:
        out.append("\n## Targets\n")
        out.append(report.targets_table(found))
    out.extend(f"\nNote: {note}" for note in notes)
    if errors:
        out.append("\n## Errors\n")
        out.extend(f"- {error}" for error in errors)
    out.append(f"\nTotal runtime: {elapsed:.0f} s")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    mode = "soak" if args.mode == "soak" else ("quick" if args.quick else "full")
    faulthandler.dump_traceback_later(HARD_LIMIT[mode], exit=True)
    # Local workers (sshexec's, loky's, Dask's) import benchmarks.tasks from the repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    try:
        if args.mode == "soak":
            from . import soak

            return soak.main(args)
        return run(args)
    finally:
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    sys.exit(main())
