"""The ``sshexec`` command (also ``python -m sshexec``): ``check``, ``demo``, ``map``, ``clean``.

Owns: argument parsing, turning the common host options into ``SSHPoolExecutor``
arguments (``check`` probes with the very same ones), and ``sshexec map``. The probe
is in ``check``, the demo in ``demo``, emptying the hosts' caches in ``clean``.
Must not import asyncssh at module level (only ``check`` needs it).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import itertools
import os
import sys
from typing import IO, Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .._errors import SSHExecError, TaskMemoryError, TaskTimeout
from .._hosts import FROM_ALLOCATION, HOSTS_ENV, TRANSPORTS, Allocation, allocation

DESCRIPTION = "Run Python functions on other machines over SSH."
EXAMPLES = """\
examples:
  sshexec check me@node1 node2:2222        can these hosts run workers? what to fix
  sshexec demo --hosts me@node1,node2      count primes on them, with per-host stats
  seq 100 | sshexec map mymod:square --hosts @hosts.txt
  ls runs | sshexec map fit:run --files data/ --return 'out/*.npz' --hosts node1,node2
  sshexec clean --hosts me@node1,node2     empty their caches of staged files
  sshexec demo --allocation                in a Slurm, PBS, LSF or SGE job: its nodes
"""


def _host_options(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    group = parser.add_argument_group("hosts and SSH")
    chosen = group.add_mutually_exclusive_group()
    chosen.add_argument(
        "--hosts",
        metavar="SPECS",
        help="comma-separated [user@]host[:port], or @FILE for a host file "
        f"(default: ${HOSTS_ENV}" + (", else local workers)" if workers else ")"),
    )
    chosen.add_argument(
        "--allocation",
        action="store_true",
        help="the nodes of the batch job this runs in (Slurm, PBS, LSF, SGE), with the "
        f"workers it was granted on each (also {HOSTS_ENV}={FROM_ALLOCATION})",
    )
    if workers:
        group.add_argument(
            "--workers", type=int, metavar="N", help="total workers (default: cores)"
        )
    group.add_argument(
        "--python", metavar="P", help="remote interpreter (default python3.X, python3)"
    )
    group.add_argument(
        "--known-hosts", metavar="FILE", help="known_hosts file to check keys against"
    )
    group.add_argument(
        "-i", "--identity", metavar="FILE", action="append", help="private key (repeatable)"
    )
    group.add_argument("-F", "--ssh-config", metavar="FILE", help="ssh config file to use")
    group.add_argument(
        "--transport",
        choices=TRANSPORTS,
        help="asyncssh (default), openssh: the ssh binary, with everything it honours, or "
        "srun: a Slurm job step on each node of the allocation (a host file's transport= wins)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshexec",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser("check", help="probe hosts and say what to fix")
    check.add_argument("host", nargs="*", help="[user@]host[:port] (default: --hosts)")
    check.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per-host limit (default 10)"
    )
    _host_options(check, workers=False)

    demo = sub.add_parser("demo", help="count primes over the hosts, with per-host stats")
    demo.add_argument("--limit", type=int, default=3_000_000, help="count primes below this")
    demo.add_argument("--block", type=int, default=50_000, help="numbers per task")
    demo.add_argument(
        "--no-serial",
        dest="serial",
        action="store_false",
        help="skip the one-process run used for the speedup",
    )
    _host_options(demo)

    run = sub.add_parser(
        "map",
        help="apply MODULE:FUNCTION to each line of stdin, results in order on stdout",
        description="Apply MODULE:FUNCTION (imported from the current directory, like "
        "python -m) to each line of stdin, newline stripped, across the workers; write "
        "str(result) per line to stdout, in input order, as results arrive.",
    )
    run.add_argument("target", metavar="MODULE:FUNCTION")
    run.add_argument("--chunksize", type=int, default=1, metavar="N", help="lines per task")
    run.add_argument(
        "--buffersize", type=int, default=1024, metavar="N", help="tasks in flight (default 1024)"
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds each task may run on its worker; a line past it fails (TaskTimeout)",
    )
    run.add_argument(
        "--memory",
        metavar="SIZE",
        help="memory each task may use with what it starts (500M, 2G); a line past it fails",
    )
    run.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failure print an empty line and go on (exit status is still 1)",
    )
    run.add_argument(
        "--files",
        action="append",
        metavar="PATH",
        help="a file or directory to put on every host first, at the same relative path "
        "in the workers' directory (repeatable)",
    )
    run.add_argument(
        "--return",
        dest="return_files",
        action="append",
        metavar="GLOB",
        help="files the tasks write that match (relative to their directory) come back "
        "here, same path (repeatable)",
    )
    _host_options(run)

    clean = sub.add_parser("clean", help="empty the hosts' caches of staged files (--files)")
    _host_options(clean, workers=False)
    return parser


def split_hosts(value: Optional[str]) -> Union[str, List[str], None]:
    """``--hosts``: None, a host file ``@path`` passed through unchanged, or a list."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("@"):
        return value
    return [h.strip() for h in value.split(",") if h.strip()]


def allocation_of(args: argparse.Namespace) -> Allocation:
    """``--allocation``: the job's nodes; ``--transport`` reaches them if given."""
    return allocation(args.transport)


def executor_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    hosts: Any = allocation_of(args) if args.allocation else split_hosts(args.hosts)
    kwargs: Dict[str, Any] = {"hosts": hosts}
    if getattr(args, "workers", None) is not None:
        kwargs["max_workers"] = args.workers
    if args.python:
        kwargs["python"] = args.python
    if args.known_hosts:
        kwargs["known_hosts"] = args.known_hosts
    if args.transport:
        kwargs["transport"] = args.transport
    ssh_options: Dict[str, Any] = {}
    if args.identity:
        ssh_options["client_keys"] = list(args.identity)
    if args.ssh_config:
        ssh_options["config"] = [args.ssh_config]
    if ssh_options:
        kwargs["ssh_options"] = ssh_options
    return kwargs


def where(args: argparse.Namespace, hosts: Any = None) -> str:
    if isinstance(hosts, Allocation):
        return hosts.description
    return args.hosts or os.environ.get(HOSTS_ENV, "").strip() or "local workers"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sshexec`` console script and ``python -m sshexec``.

    Returns:
        The exit status: 0 on success, 1 when a host is unusable or a task failed,
        2 for a usage error, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _check(parser, args)
        if args.command == "demo":
            from .demo import run_demo

            kwargs = executor_kwargs(args)
            place = where(args, kwargs["hosts"])
            return run_demo(kwargs, place, args.limit, args.block, args.serial)
        if args.command == "clean":
            from .clean import run_clean

            kwargs = executor_kwargs(args)
            return run_clean(kwargs, where(args, kwargs["hosts"]))
        return run_map(args)
    except KeyboardInterrupt:
        print("sshexec: interrupted", file=sys.stderr)
        return 130
    except (SSHExecError, ValueError, TypeError, OSError) as exc:
        print(f"sshexec {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import asyncio

    from .._hosts import resolve_hosts
    from .check import check_hosts, probe_srun
    from .probing import CheckSettings
    from .report import render

    if args.allocation and args.host:
        parser.error("check: give hosts or --allocation, not both")
    given: Union[str, List[str], None] = list(args.host) or args.hosts
    granted = allocation_of(args) if args.allocation else None
    hosts = [h for h in (granted or resolve_hosts(given) or []) if not h.is_local]  # ":" too
    if granted is not None and not hosts:
        print(f"nothing to check: {granted.description} is this node only (local workers)")
        return 0
    if not hosts:
        parser.error(f"check: give hosts to check (arguments, --hosts or ${HOSTS_ENV})")
    if granted is not None:  # ssh reaches each node; the srun probe is srun's own
        hosts = [
            dataclasses.replace(h, transport=None) if h.transport == "srun" else h for h in hosts
        ]
    if args.timeout <= 0:
        parser.error("check: --timeout must be > 0")
    given_to_executor = executor_kwargs(args)  # what demo and map would pass on
    settings = CheckSettings(
        timeout=args.timeout,
        python=given_to_executor.get("python"),
        known_hosts=given_to_executor.get("known_hosts"),
        ssh_options=given_to_executor.get("ssh_options", {}),
        transport=given_to_executor.get("transport", "asyncssh"),
    )
    reports = asyncio.run(check_hosts(hosts, settings))
    print(render(reports))
    usable = all(r.is_usable for r in reports)
    if granted is not None:
        print(f"{granted.description}, over ssh (BatchMode: keys only, no prompts)")
        srun_usable = probe_srun(granted, settings)
        usable = usable and srun_usable is not False
    return 0 if usable else 1


def load_function(target: str) -> Callable[[str], object]:
    """``MODULE:FUNCTION`` (FUNCTION may be dotted), imported with the current directory
    first on ``sys.path``, as ``python -m`` does."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNCTION, got {target!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


def _limited(
    executor: Any, fn: Any, lines: Iterator[str], window: int
) -> Iterator[Tuple[bool, str]]:
    """As ``map`` of ``call_line``, in order, but a line whose task passed its limit is a
    failed line (its text the error), not the end of the run."""
    from . import mapcall

    pending: Deque[Any] = collections.deque()

    def outcome(future: Any) -> Tuple[bool, str]:
        try:
            return future.result()  # type: ignore[no-any-return]
        except (TaskTimeout, TaskMemoryError) as exc:
            return False, f"{type(exc).__name__}: {exc}\n"

    try:
        for line in lines:
            pending.append(executor.submit(mapcall.call_line, fn, line))
            if len(pending) >= window:
                yield outcome(pending.popleft())
        while pending:
            yield outcome(pending.popleft())
    finally:
        for future in pending:
            future.cancel()


def run_map(args: argparse.Namespace, stdin: Optional[IO[str]] = None) -> int:
    import cloudpickle

    from .._executor import SSHPoolExecutor
    from . import mapcall

    if args.chunksize < 1 or args.buffersize < 1:
        raise ValueError("--chunksize and --buffersize must be >= 1")
    fn = load_function(args.target)
    cloudpickle.register_pickle_by_value(mapcall)  # nodes need no sshexec install
    source = stdin if stdin is not None else sys.stdin
    lines = (line[:-1] if line.endswith("\n") else line for line in source)
    out, failures, number = sys.stdout, 0, 0
    kwargs = executor_kwargs(args)
    if args.files:
        kwargs["files"] = list(args.files)
    if args.return_files:
        kwargs["return_files"] = list(args.return_files)
    if args.timeout is not None:
        kwargs["task_timeout"] = args.timeout
    if args.memory is not None:
        kwargs["task_memory"] = args.memory
    with SSHPoolExecutor(**kwargs) as executor:
        results: Iterator[Tuple[bool, str]]
        if (args.timeout is not None or args.memory is not None) and args.chunksize == 1:
            results = _limited(executor, fn, lines, args.buffersize)  # a line past goes on
        else:
            results = executor.map(
                mapcall.call_line,
                itertools.repeat(fn),
                lines,
                chunksize=args.chunksize,
                buffersize=args.buffersize,
            )
        try:
            for number, (ok, text) in enumerate(results, 1):
                if ok:
                    out.write(text + "\n")
                else:
                    failures += 1
                    print(f"sshexec map: line {number} failed {text}", file=sys.stderr, end="")
                    if not args.keep_going:
                        break
                    out.write("\n")
                out.flush()
        except Exception as exc:  # the call could not run at all (lost worker, no module)
            cause = exc.__cause__
            detail = f"\n{cause}" if cause is not None else ""
            print(
                f"sshexec map: line {number + 1}: {type(exc).__name__}: {exc}{detail}",
                file=sys.stderr,
            )
            failures += 1
        finally:
            getattr(results, "close", lambda: None)()  # cancels what was submitted ahead
            executor.shutdown(wait=True, cancel_futures=True)
    if failures and args.keep_going:
        print(f"sshexec map: {failures} of {number} lines failed", file=sys.stderr)
    return 1 if failures else 0
