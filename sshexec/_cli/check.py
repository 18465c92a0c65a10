"""``sshexec check``: probe hosts over SSH and say exactly what to fix.

Owns: one probe per host, all hosts in parallel, each bounded by a timeout, made
through the transport the executor builds for that host from the same options (its
``Route``: the ssh config, the ProxyJump hops; or its ssh command line), so the probe
goes where the workers would: through asyncssh here (reachability, host key status looked up in known_hosts, which
authentication worked, remote Python, cores, round-trip time, channel throughput), or
through the ``ssh`` binary (``sshprobe``) for hosts whose transport is ``openssh``. What
both probes share is in ``probing``, the report and its fixes in ``report``. Must not
import: the executor or the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import os
import shlex
import socket
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._bootstrap import client_version, interpreters
from .._errors import WorkerStartupError
from .._hosts import Host
from .._transports.asyncssh import SSHTransport
from .._transports.base import handshake
from .._transports.openssh import OpenSSHTransport
from .._transports.sshlib import asyncssh
from .._wire import protocol as proto
from . import sshprobe
from .probing import (
    PY_PROBE,
    RTT_ROUNDS,
    THROUGHPUT_BUDGET,
    THROUGHPUT_BYTES,
    CheckSettings,
    home,
    transport_for,
)
from .report import HostReport

# asyncssh.connect keywords that get_server_host_key takes: where and how to reach the host
_HOST_KEY_FETCH = (
    "port",
    "tunnel",
    "proxy_command",
    "family",
    "local_addr",
    "config",
    "kex_algs",
    "server_host_key_algs",
)


class _AuthTracker(asyncssh.SSHClient):
    """Offers the keys one by one, so the last one offered is the one that worked."""

    def __init__(self, keys: List[Tuple[asyncssh.SSHKeyPair, str]]) -> None:
        self._keys = list(keys)
        self.offered: Optional[str] = None

    def public_key_auth_requested(self) -> Optional[asyncssh.SSHKeyPair]:
        if not self._keys:
            return None
        key, self.offered = self._keys.pop(0)
        return key


async def check_hosts(hosts: Sequence[Host], settings: CheckSettings) -> List[HostReport]:
    """Probe every host at once; each report is complete within ``settings.timeout``."""
    return list(await asyncio.gather(*(check_host(h, settings) for h in hosts)))


async def check_host(host: Host, settings: CheckSettings) -> HostReport:
    kind = host.transport or settings.transport
    report = HostReport(host.label, host.hostname, host.port or 22, host.user, kind)
    try:
        await asyncio.wait_for(_probe_with(host, settings, report), settings.timeout)
    except asyncio.TimeoutError:
        report.timed_out(settings.timeout)
    except WorkerStartupError as exc:  # the ssh config, or a jump host on the way
        report.not_started(exc.stage, exc.reason, exc.fix)
    except Exception as exc:  # an unforeseen asyncssh or OS error is reported, not raised
        report.failed(f"{type(exc).__name__}: {exc}")
    return report


async def _probe_with(host: Host, settings: CheckSettings, report: HostReport) -> None:
    """Through the transport the executor would build for ``host``, so the probe goes
    where the workers go."""
    transport = transport_for(host, settings)
    try:
        if isinstance(transport, SSHTransport):
            await _probe(transport, settings, report)
        else:
            assert isinstance(transport, OpenSSHTransport)
            await sshprobe.probe(transport, settings, report)
    finally:
        await transport.aclose()


async def _probe(transport: SSHTransport, settings: CheckSettings, report: HostReport) -> None:
    name, route, kwargs = transport.hostname, transport.route, transport.connect_kwargs
    where = route.resolve(name, kwargs)
    via = ", ".join(home(path) for path in where.config) if where.configured else ""
    report.resolved(where.address, where.port, where.user, where.jumps, where.proxy_command, via)
    # asyncssh.connect reads ~/.ssh/config when given no config=; the options alone do not
    options = asyncssh.SSHClientConnectionOptions(
        host=name, **{"config": (), **kwargs, "tunnel": ()}
    )
    report.stage = "connect"
    tunnel = await route.open_tunnel(name, kwargs)  # the executor's hops, its options
    try:
        await _probe_through(transport, tunnel, options, settings, report)
    finally:
        if tunnel is not None:
            tunnel.close()


async def _probe_through(
    transport: SSHTransport,
    tunnel: Optional[asyncssh.SSHClientConnection],
    options: Any,
    settings: CheckSettings,
    report: HostReport,
) -> None:
    name, kwargs = transport.hostname, transport.connect_kwargs
    if tunnel is not None:
        kwargs["tunnel"] = tunnel
    fetch = {k: kwargs[k] for k in _HOST_KEY_FETCH if k in kwargs}
    try:
        server_key = await asyncssh.get_server_host_key(name, **fetch)
    except socket.gaierror as exc:
        report.unknown_name(str(exc.strerror or exc))
        return
    except ConnectionRefusedError:
        report.refused()
        return
    except OSError as exc:
        report.unreachable(str(exc.strerror or exc))
        return
    except asyncssh.ChannelOpenError as exc:  # the last jump host could not reach it
        report.unreachable(f"{exc.reason} (from jump host {report.jumps})")
        return
    report.reachable = "yes"
    if server_key is not None:
        report.fingerprint = server_key.get_fingerprint("sha256")
    report.known_hosts = _known_hosts_path(settings, options)
    if not _host_key_known(report, server_key, options):
        return
    report.stage = "authentication"
    keys = await _client_keys(options, settings)
    tracker = _AuthTracker(keys)
    try:
        conn = await asyncssh.connect(
            name,
            **{**kwargs, "client_keys": None, "agent_path": None},
            client_factory=lambda: tracker,
        )
    except asyncssh.PermissionDenied as exc:
        identities = settings.identities
        identity = identities[0] if len(identities) == 1 else ""
        report.auth_refused(exc.reason, [label for _, label in keys], identity)
        return
    except asyncssh.HostKeyNotVerifiable as exc:
        report.host_key = "REFUSED"
        report.problem(f"host key not accepted: {exc.reason}", "check the known_hosts entries")
        return
    try:
        report.auth = f"publickey ({tracker.offered})" if tracker.offered else "none"
        await _probe_session(conn, transport.python, report)
    finally:
        conn.close()


def _known_hosts_path(settings: CheckSettings, options: Any) -> List[str]:
    if settings.known_hosts is not None:
        return [settings.known_hosts]
    configured = options.known_hosts
    if isinstance(configured, (list, tuple)) and configured:
        return [os.path.expanduser(str(p)) for p in configured]
    return [os.path.expanduser("~/.ssh/known_hosts")]


def _host_key_known(report: HostReport, server_key: Any, options: Any) -> bool:
    trusted: List[bytes] = []
    for path in report.known_hosts:
        try:
            entries = asyncssh.read_known_hosts(path)
        except (OSError, ValueError, asyncssh.Error):
            continue
        names = [options.host_key_alias or options.host]
        for name in names:
            matched = entries.match(name, "", options.port)
            trusted += [k.public_data for k in matched[0]]
    if server_key is not None and server_key.public_data in trusted:
        report.host_key = "known"
        return True
    if trusted:
        report.host_key_changed()
    else:
        report.host_key_unknown()
    return False


async def _client_keys(options: Any, settings: CheckSettings) -> List[Tuple[Any, str]]:
    """The keys asyncssh would offer, agent first, each with a label for the table."""
    keys: List[Tuple[Any, str]] = []
    if options.agent_path:
        try:
            agent = await asyncssh.connect_agent(options.agent_path)
            for key in await agent.get_keys(options.agent_identities):
                fingerprint = asyncssh.import_public_key(key.public_data).get_fingerprint()
                keys.append((key, f"agent: {key.get_comment() or fingerprint}"))
        except (OSError, ValueError, asyncssh.Error):
            pass  # no agent running: files only, as ssh does
    configured = options.config.get("IdentityFile") or ()  # the host's, from the ssh config
    paths = _key_paths([*settings.identities, *(str(p) for p in configured)])
    for pair in options.client_keys or ():
        label = paths.get(pair.public_data) or pair.get_comment() or "key"
        keys.append((pair, label))
    return keys


def _key_paths(identities: Sequence[str]) -> Dict[bytes, str]:
    """Public key -> the file it came from: -i files and ~/.ssh/id_*, read from their
    ``.pub`` files (no passphrase needed)."""
    found = [os.path.expanduser(p) for p in identities]
    found += sorted(
        p for p in glob.glob(os.path.expanduser("~/.ssh/id_*")) if not p.endswith(".pub")
    )
    paths: Dict[bytes, str] = {}
    for path in found:
        try:
            public = asyncssh.read_public_key(path + ".pub").public_data
        except (OSError, ValueError, asyncssh.Error):
            continue
        paths.setdefault(public, home(path))
    return paths


async def _probe_session(
    conn: asyncssh.SSHClientConnection, python: Optional[str], report: HostReport
) -> None:
    report.stage = "python"
    wanted = client_version()
    for candidate in interpreters(python):
        command = f"{shlex.quote(candidate)} -c {shlex.quote(PY_PROBE)}"
        result = await conn.run(command, check=False)
        words = str(result.stdout or "").split()
        if result.exit_status == 0 and len(words) == 5:
            report.python = f"{words[2]} {words[3]}"
            report.python_found(int(words[0]), int(words[1]), wanted)
            report.cores = words[4]
            break
    else:
        report.python_missing(interpreters(python), wanted)
        result = await conn.run("nproc || getconf _NPROCESSORS_ONLN", check=False)
        report.cores = str(result.stdout or "").strip() or "-"
    report.stage = "round trips"
    report.rtt_ms = await _round_trip_ms(conn)
    report.stage = "throughput"
    report.mb_per_s = await _throughput(conn)


async def _round_trip_ms(conn: asyncssh.SSHClientConnection) -> float:
    process = await conn.create_process("cat", encoding=None)
    times: List[float] = []
    try:
        for _ in range(RTT_ROUNDS):
            started = time.perf_counter()
            process.stdin.write(b"ping\n")
            await process.stdout.readexactly(5)
            times.append(time.perf_counter() - started)
    finally:
        process.close()
    return statistics.median(times[1:]) * 1000


async def _throughput(conn: asyncssh.SSHClientConnection) -> float:
    """MB/s received from the node: ``head -c 16MiB /dev/zero``, for at most a few seconds."""
    process = await conn.create_process(f"head -c {THROUGHPUT_BYTES} /dev/zero", encoding=None)
    received = 0
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < THROUGHPUT_BUDGET:
            chunk = await process.stdout.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    finally:
        process.close()
    return received / 1e6 / max(time.perf_counter() - started, 1e-9)


def probe_srun(granted: Sequence[Host], settings: CheckSettings) -> Optional[bool]:
    """``sshexec check --allocation``'s second probe: can ``srun`` start the agent on
    each node of the allocation (a job step, as ``transport="srun"`` starts it)? Prints a
    line per node; returns whether every node can, or None when nothing is probed (no
    node but this one, or not a Slurm allocation)."""
    nodes = [h for h in granted if not h.is_local]
    if not nodes or getattr(granted, "scheduler", "Slurm") != "Slurm":
        print("srun: not probed (no Slurm node to reach)")
        return None
    results = asyncio.run(_srun_all(nodes, settings))
    for host, (ok, detail) in zip(nodes, results):
        print(f"srun {host.hostname}: {'ok' if ok else 'FAILED'}: {detail}")
    return all(ok for ok, _ in results)


async def _srun_all(nodes: Sequence[Host], settings: CheckSettings) -> List[Tuple[bool, str]]:
    return list(await asyncio.gather(*(_srun_agent(h, settings) for h in nodes)))


async def _srun_agent(host: Host, settings: CheckSettings) -> Tuple[bool, str]:
    """Start the agent on ``host`` as a step, read its Hello, end it: (ok, what was seen)."""
    started = time.perf_counter()
    node = dataclasses.replace(host, transport="srun", workers=None)
    python = " or ".join(interpreters(node.python or settings.python))
    try:
        transport = transport_for(node, settings)
        await transport.connect()
        pipe = await transport.open_channel(lambda line: None)
    except (WorkerStartupError, ValueError, OSError) as exc:
        return False, str(exc)
    try:
        decoder = proto.FrameDecoder()
        decoder.feed(await asyncio.wait_for(handshake(pipe, node.label, python), settings.timeout))
        while (hello := next(decoder.messages(), None)) is None:
            chunk = await asyncio.wait_for(pipe.read(), settings.timeout)
            if not chunk:
                tail = pipe.stderr_tail().strip().splitlines()[-1:]
                return False, "the agent ended before saying Hello" + (
                    f" ({tail[0]})" if tail else ""
                )
            decoder.feed(chunk)
        if not isinstance(hello, proto.Hello):
            return False, f"expected the agent's Hello, got {type(hello).__name__}"
        seconds = time.perf_counter() - started
        return True, f"agent up in {seconds:.2f} s, Python {hello.python}, {hello.cpus} CPUs"
    except (WorkerStartupError, proto.FrameError, asyncio.TimeoutError) as exc:
        return False, str(exc) or f"no answer within {settings.timeout:g} s"
    finally:
        await pipe.aclose(1.0)
        await transport.aclose()
