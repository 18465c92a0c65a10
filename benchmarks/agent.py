"""``python -m benchmarks.agent``: the node agent (this checkout) against the commit before
it (900196b, one SSH channel and bootstrap per worker), in one run.

Both versions run every measurement in the same run, interleaved rep by rep, each
in a fresh probe process (``benchmarks.agent_probe``) whose ``PYTHONPATH`` puts that
version's ``sshexec`` first. Rows: start-up (1 x 16 and 4 x 8 workers, both
transports), scale (up to 32 loopback sshd x 8 sleeping workers), a capped link
(2 hosts behind 100 Mbit/s proxies, a map of a function closing over 20 MB), and
clean-up after a silent partition (an sshd in a network namespace; root only).
Prints markdown tables (median, min-max, agent/before) and writes
benchmarks/results/agent.json.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import agent_report, agent_rows, report
from . import sshd as loopback
from .agent_run import before_tree, this_tree

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("startup", "scale", "bandwidth", "partition")
HARD_LIMIT = {"quick": 8 * 60, "full": 60 * 60}  # then dump stacks and exit
HOSTS = 32


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1-2 reps, fewer tasks (smoke test)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 2)")
    parser.add_argument("--only", default="", help=f"comma-separated rows: {','.join(ROWS)}")
    parser.add_argument("--output", type=Path, default=RESULTS / "agent.json")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    chosen = [r for r in args.only.split(",") if r] or list(ROWS)
    unknown = set(chosen) - set(ROWS)
    if unknown:
        print(f"unknown rows: {', '.join(sorted(unknown))} (choose from {', '.join(ROWS)})")
        return 2
    reps = args.reps or (2 if args.quick else 5)
    load_before = report.load_average()
    sections: Dict[str, Dict[str, Any]] = {}
    errors: List[str] = []
    with tempfile.TemporaryDirectory(prefix="sshexec-agentbench-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        versions = [before_tree(root / "before"), this_tree()]
        client = loopback.Client(root / "client")
        count = HOSTS if "scale" in chosen else 4
        servers: List[loopback.Sshd] = []
        try:
            say(f"starting {count} sshd")
            servers = [loopback.Sshd(root, client, f"sshd{i}").start() for i in range(count)]
            for name in chosen:
                say(name)
                try:
                    sections[name] = measure(
                        name, args, reps, root, client, servers, versions, logs
                    )
                except Exception as exc:  # one broken row must not cost the others
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    say(f"  {errors[-1]}")
        finally:
            for server in servers:
                server.stop()
    elapsed = time.perf_counter() - began
    text = render(args, reps, versions, sections, errors, elapsed)
    print(text)
    document = {
        "machine": report.machine(),
        "load_average": {"before": load_before, "after": report.load_average()},
        "openssh": loopback.openssh_version(),
        "versions": {v.name: {"commit": v.commit, "tree": str(v.tree)} for v in versions},
        "config": {"quick": args.quick, "reps": reps, "only": chosen},
        "sections": sections,
        "errors": errors,
        "runtime_seconds": elapsed,
        "markdown": text,
    }
    report.write_json(args.output, document)
    print(f"\nJSON: {args.output}")
    return 1 if errors else 0


def measure(
    name: str,
    args: argparse.Namespace,
    reps: int,
    root: Path,
    client: loopback.Client,
    servers: List[loopback.Sshd],
    versions: List[Any],
    logs: Path,
) -> Dict[str, Any]:
    quick = args.quick
    if name == "startup":
        return agent_rows.startup(client, servers, versions, reps, logs)
    if name == "scale":
        per_worker = 10 if quick else 40
        return agent_rows.scale(
            client, servers, versions, 1 if quick else reps, per_worker, logs, True
        )
    if name == "bandwidth":
        return agent_rows.bandwidth(client, servers, versions, reps, 8 if quick else 16, logs)
    return agent_rows.partition(root, client, versions, 1 if quick else reps, not quick, logs)


def render(
    args: argparse.Namespace,
    reps: int,
    versions: List[Any],
    sections: Dict[str, Dict[str, Any]],
    errors: List[str],
    elapsed: float,
) -> str:
    info = report.machine()
    load = report.load_average()
    out = [
        f"# Node agent vs before ({'quick' if args.quick else 'full'} run, {reps} reps, "
        "interleaved)\n",
        f"{info['cpu_count']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"{info['platform']}; {loopback.openssh_version()}; load average now "
        f"{', '.join(f'{x:.2f}' for x in load) if load else '?'}\n",
    ]
    for v in versions:
        out.append(f"- **{v.name}**: {v.commit[:12]} ({v.tree})")
    for name in ROWS:
        if name not in sections:
            continue
        section = sections[name]
        out.append(f"\n## {section['title']}\n")
        out.append(agent_report.table(section))
        if name == "partition":
            out.extend(["", *agent_report.partition_lines(section)])
        out.extend(f"\nNote: {note}" for note in section.get("notes", []))
    if errors:
        out.append("\n## Errors\n")
        out.extend(f"- {error}" for error in errors)
    out.append(f"\nTotal runtime: {elapsed:.0f} s")
    return "\n".join(out)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    faulthandler.dump_traceback_later(HARD_LIMIT["quick" if args.quick else "full"], exit=True)
    try:
        return run(args)
    finally:
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    sys.exit(main())
