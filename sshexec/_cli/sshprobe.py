"""``sshexec check --transport openssh``: one host probed through the ``ssh`` binary.

Owns: ``probe``: ``ssh -G`` for what the config makes of the host, then one ``ssh -v``
session running a small sh script (the remote Python the workers would get and its
cores, then ``cat`` for round trips and ``head -c`` for throughput), ssh's verbose
stderr read as it comes for the host key and the authentication that worked, and its
exit status 255 for what to fix (``ssh_command.diagnose``). The settings, the Python
probe and the round-trip and throughput sizes are ``probing``'s, shared with ``check``.
Must not import: ``check`` (which imports this), the executor or the pool.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import os
import re
import shlex
import statistics
import subprocess
import time
from typing import List, Optional

from .._bootstrap import client_version, interpreters
from .._transports.openssh import OpenSSHTransport, run
from .._transports.ssh_command import Finding, diagnose, parse_resolved, ssh_lines
from .probing import PY_PROBE, RTT_ROUNDS, THROUGHPUT_BUDGET, THROUGHPUT_BYTES, CheckSettings, home
from .report import HostReport

MARK, ECHO = "SSHEXEC-CHECK", "SSHEXEC-ECHO"  # lines the script prints around its facts
_HOST_KEY = re.compile(r"^debug1: Server host key: \S+ (\S+)")
_KNOWN = re.compile(r"^debug1: Host .* is known and matches")
_OFFERING = re.compile(r"^debug1: Offering public key: (.*)$")
_ACCEPTS = re.compile(r"^debug1: Server accepts key: (.*)$")
_AUTHENTICATED = re.compile(r'Authenticated to .* using "([^"]+)"')
_IDENTITY = re.compile(r"^(.*?) (\S+) (SHA256:\S+)(.*)$")  # path or comment, type, fingerprint


def _script(python: Optional[str]) -> str:
    """The remote side: the facts (Python found as the workers find it, cores), then
    ``cat`` for the round trips until stdin closes, then zeros for the throughput."""
    candidates = " ".join(shlex.quote(p) for p in interpreters(python))
    inner = (
        f"echo; echo {MARK}; found=; "
        f"for p in {candidates}; do "
        f'if out=$("$p" -c {shlex.quote(PY_PROBE)} 2>/dev/null); then '
        'echo "python $out"; found=1; break; fi; done; '
        '[ -n "$found" ] || echo "nopython $(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"; '
        f"echo {ECHO}; cat; head -c {THROUGHPUT_BYTES} /dev/zero"
    )
    return "exec /bin/sh -c " + shlex.quote(inner)


class _Verbose:
    """``ssh -v``'s stderr, read line by line as the connection goes."""

    def __init__(self, report: HostReport) -> None:
        self.report = report
        self.lines: List[str] = []
        self.offered: List[str] = []
        self.accepted = ""
        self.method = ""

    def label(self, identity: str) -> str:
        found = _IDENTITY.match(identity)
        if found is None:
            return identity
        name, flags = found.group(1), found.group(4).split()
        return f"agent: {name}" if "agent" in flags and "explicit" not in flags else home(name)

    def feed(self, line: str) -> None:
        self.lines.append(line)
        report = self.report
        if match := _HOST_KEY.match(line):  # the last one is the host's (hops come first)
            report.reachable, report.fingerprint, report.stage = "yes", match.group(1), "host key"
        elif _KNOWN.match(line):
            report.host_key, report.stage = "known", "authentication"
        elif match := _OFFERING.match(line):
            self.offered.append(self.label(match.group(1)))
        elif match := _ACCEPTS.match(line):
            self.accepted = self.label(match.group(1))
        elif match := _AUTHENTICATED.search(line):
            self.method, report.stage = match.group(1), "python"

    @property
    def auth(self) -> str:
        if self.method == "publickey" and self.accepted:
            return f"publickey ({self.accepted})"
        return self.method or "ssh's own"


async def probe(transport: OpenSSHTransport, settings: CheckSettings, report: HostReport) -> None:
    """Fill ``report`` through ``transport``'s own ssh command line (``check_host``
    bounds it in time and closes the transport)."""
    line, name = transport.command_line, transport.hostname
    status, out, err = await run(line.resolve_argv(), settings.timeout)
    if status != 0:
        report.failed(f"ssh -G says: {'; '.join(ssh_lines(err)[-2:]) or status}")
        return
    resolved = parse_resolved(out)
    address = resolved.get("hostname", name)
    port = int(resolved.get("port", "22") or 22)
    user = resolved.get("user", report.user)
    jumps = "" if resolved.get("proxyjump", "none") == "none" else resolved["proxyjump"]
    proxy = "" if resolved.get("proxycommand", "none") == "none" else resolved["proxycommand"]
    spec_user = report.user or getpass.getuser()
    configured = (address, port, user) != (name, report.port, spec_user) or jumps or proxy
    via = _config_files(line.config) or "the ssh config"
    report.resolved(address, port, user, jumps, proxy, via if configured else "")
    files = resolved.get("userknownhostsfile", "").split()
    report.known_hosts = [settings.known_hosts] if settings.known_hosts else files
    await _session(line.argv(_script(transport.python), "-v"), transport.python, settings, report)


def _config_files(private: List[str]) -> str:
    """The ssh config files the private config includes and that exist (ssh skips the
    others), as the report names them."""
    found = []
    for text in private:
        if text.startswith("Include "):
            path = os.path.expanduser(shlex.split(text)[1])
            found += [home(path)] if os.path.isfile(path) else []
    return ", ".join(found)


async def _session(
    argv: List[str], python: Optional[str], settings: CheckSettings, report: HostReport
) -> None:
    verbose = _Verbose(report)
    # Popen, reaped by polling, as the transports do: asyncio's child watcher races
    # Popen.kill()'s own poll() for an ssh that has just exited ("Unknown child process").
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    loop = asyncio.get_running_loop()
    pipes: List[asyncio.BaseTransport] = []
    watching: Optional[asyncio.Future[None]] = None
    try:
        stdout, err = asyncio.StreamReader(limit=1 << 20), asyncio.StreamReader()
        for reader, source in ((stdout, proc.stdout), (err, proc.stderr)):
            reading, _ = await loop.connect_read_pipe(
                functools.partial(asyncio.StreamReaderProtocol, reader), source
            )
            pipes.append(reading)
        writing, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, proc.stdin
        )
        pipes.append(writing)
        stdin = asyncio.StreamWriter(writing, protocol, None, loop)
        watching = asyncio.ensure_future(_watch(err, verbose))
        try:
            facts = await stdout.readuntil(f"\n{ECHO}\n".encode())
        except asyncio.IncompleteReadError:
            await asyncio.wait([watching], timeout=2.0)
            _failed(await _status(proc, 2.0), verbose, report, settings)
            return
        report.auth = verbose.auth
        _facts(facts.decode("utf-8", "replace"), python, report)
        report.stage = "round trips"
        times: List[float] = []
        for _ in range(RTT_ROUNDS):
            started = time.perf_counter()
            stdin.write(b"ping\n")
            await stdin.drain()
            await stdout.readexactly(5)
            times.append(time.perf_counter() - started)
        report.rtt_ms = statistics.median(times[1:]) * 1000
        report.stage = "throughput"
        stdin.close()  # cat ends, head starts
        received, started = 0, time.perf_counter()
        while time.perf_counter() - started < THROUGHPUT_BUDGET:
            chunk = await stdout.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        report.mb_per_s = received / 1e6 / max(time.perf_counter() - started, 1e-9)
    finally:
        if watching is not None:
            watching.cancel()
        for piped in pipes:
            piped.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(1.0)  # SIGKILL: immediate
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def _status(proc: subprocess.Popen[bytes], timeout: float) -> Optional[int]:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return proc.poll()


async def _watch(stream: asyncio.StreamReader, verbose: _Verbose) -> None:
    while line := await stream.readline():
        verbose.feed(line.decode("utf-8", "replace").rstrip("\r\n"))


def _facts(text: str, python: Optional[str], report: HostReport) -> None:
    wanted = client_version()
    words = text.split(MARK, 1)[-1].split()
    if words[:1] == ["python"] and len(words) >= 6:
        major, minor, version, path, cores = words[1:6]
        report.python = f"{version} {path}"
        report.python_found(int(major), int(minor), wanted)
        report.cores = cores
    else:
        report.python_missing(interpreters(python), wanted)
        report.cores = words[1] if words[:1] == ["nopython"] and len(words) > 1 else "-"


def _failed(
    status: Optional[int], verbose: _Verbose, report: HostReport, settings: CheckSettings
) -> None:
    """ssh ended before the script's facts: what it said, as check's fixes."""
    text = "\n".join(verbose.lines)
    if status != 255:
        said = ssh_lines(text)
        report.failed(f"the session ended with status {status}: {said[-1] if said else ''}")
        return
    finding = diagnose(text)
    if finding.kind == "refused":
        report.refused()
    elif finding.kind == "resolve":
        report.unknown_name(finding.line)
    elif finding.kind == "unreachable":
        report.unreachable(finding.line)
    elif finding.kind == "timeout":
        report.timed_out(settings.timeout)
    elif finding.kind in ("unknown", "changed"):
        _host_key(finding, report)
    elif finding.kind == "host key":
        report.host_key = "REFUSED"
        report.problem(f"host key not accepted: {finding.line}", "check the known_hosts entries")
    elif finding.kind == "authentication":
        identity = settings.identities[0] if len(settings.identities) == 1 else ""
        report.auth_refused(finding.line, verbose.offered, identity)
    else:
        report.failed(finding.line or "ssh exited with status 255")


def _host_key(finding: Finding, report: HostReport) -> None:
    name, port = finding.target_parts()
    if (name, port) == (report.hostname, report.port):
        if finding.kind == "changed":
            report.host_key_changed()
        else:
            report.host_key_unknown()
        return
    report.host_key = "CHANGED" if finding.kind == "changed" else "UNKNOWN"
    path = report.known_hosts[0] if report.known_hosts else "~/.ssh/known_hosts"
    report.problem(
        f"the host key of jump host {finding.target} is "
        + ("not the one recorded" if finding.kind == "changed" else "not")
        + f" in {path} ({finding.line})",
        f"verify its fingerprint, then: ssh-keyscan -p {port} {name} >> {path}",
    )
