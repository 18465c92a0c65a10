"""``OpenSSHTransport``: workers on one host, reached through the ``ssh`` binary.

A channel is one ``ssh -T`` subprocess running the bootstrap, then the host's agent: its
stdin and stdout are the byte pipe (a ``PipeChannel``, as for local workers), its stderr
is ssh's own messages and then the agent's. Being ``ssh``, it honours everything ssh does
(``~/.ssh/config``, ``Match exec``, ProxyJump/ProxyCommand, certificates, GSSAPI,
hardware keys, the agent), and encryption runs in the ``ssh`` process, outside this
one's GIL. The command line is ``ssh_command``'s.

Owns: ``OpenSSHChannel`` (a ``CommandChannel``: ssh's exit status 255 before the remote
command has written its first byte becomes a ``WorkerStartupError`` naming host, stage
and fix instead of worker output; tells a lost connection from the agent's own end), ``OpenSSHTransport`` (the private config's
life, at most ``STARTS_AT_ONCE`` handshakes at a time for sshd's ``MaxStartups``).
Killing the local ssh is enough to end a host's workers: the agent ends them when its
channel closes. Must not
import: asyncssh, the pool, or know about tasks, Futures or message contents.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .. import _bootstrap
from .._errors import WorkerStartupError
from .._logs import logger
from .base import READ_SIZE, Channel, StderrSink
from .command import CommandChannel
from .local import launch
from .ssh_command import DEFAULT_KNOWN_HOSTS, CommandLine, Finding, diagnose, parse_resolved

log = logger("sshexec.ssh")

STARTS_AT_ONCE = 8  # ssh handshakes in flight per host: below sshd's MaxStartups (10:30:100)


class OpenSSHChannel(CommandChannel):
    """The ``ssh`` process running one worker on ``host``."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        on_stderr: StderrSink,
        transport: OpenSSHTransport,
        on_started: Callable[[], None],
    ) -> None:
        super().__init__(proc, on_stderr, on_started)
        self.transport = transport

    def startup_failure(self, status: Optional[int], said: str) -> Optional[WorkerStartupError]:
        """ssh itself failed (exit 255) before the remote command wrote anything: no
        connection, host key, login."""
        return self.transport.startup_error(diagnose(said)) if status == 255 else None

    async def exit_reason(self, timeout: float) -> str:
        how = await super().exit_reason(timeout)
        if self.proc.poll() == 255:
            return f"the SSH connection to {self.transport.host} was lost (ssh exit status 255)"
        return how


class OpenSSHTransport:
    """Workers on one host, each through its own ``ssh`` process. Loop thread only.

    Host keys are checked (``StrictHostKeyChecking=yes``; against ``known_hosts`` when
    given, else ssh's own files) and nothing ever prompts (``BatchMode=yes``), on the
    host and on every ProxyJump hop. ``unsafe_skip_host_key_check`` accepts any key:
    UNSAFE, anyone on the path can impersonate the node and run code on, or read data
    from, your job. ``shared_options`` (the executor's ``ssh_options``) apply to every
    hop, ``options`` (``Host(options=...)``) to this host only; both are asyncssh
    keywords, translated where ssh has an equivalent.

    Raises:
        ValueError: At construction, an option with no ssh equivalent (named).
    """

    kind = "openssh"

    def __init__(
        self,
        host: str,
        hostname: str,
        *,
        port: Optional[int] = None,
        username: Optional[str] = None,
        python: Optional[str] = None,
        known_hosts: Optional[str] = None,
        unsafe_skip_host_key_check: bool = False,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 10.0,
        options: Optional[Mapping[str, Any]] = None,
        shared_options: Optional[Mapping[str, Any]] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        ssh: str = "ssh",
    ) -> None:
        self.host, self.hostname, self.python = host, hostname, python
        self.env, self.cwd = dict(env or {}), cwd
        self.known_hosts, self.connect_timeout = known_hosts, connect_timeout
        self.command_line = CommandLine.build(
            host,
            hostname,
            port=port,
            username=username,
            known_hosts=known_hosts,
            unsafe=unsafe_skip_host_key_check,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
            shared_options=shared_options or {},
            host_options=options or {},
            ssh=ssh,
        )
        self.resolved: Dict[str, str] = {}  # ssh -G: what the config makes of the host
        self._starts: Optional[asyncio.Semaphore] = None  # made on the loop thread (3.9)
        self._closed = False  # aclose() removed the private config: no new ssh after it

    def __repr__(self) -> str:
        return f"OpenSSHTransport({self.host!r})"

    async def connect(self) -> None:
        """Check the ssh binary and what the config makes of the host (``ssh -G``: no
        network). Reachability, host key and login are proven by the first channel, whose
        ssh errors are translated the same way at construction and on every reconnect."""
        if self.resolved:
            return
        if shutil.which(self.command_line.ssh) is None:
            raise WorkerStartupError(
                self.host,
                "connect",
                f"no {self.command_line.ssh!r} on PATH for transport='openssh'",
                "Install the OpenSSH client (apt-get install openssh-client), or use "
                "transport='asyncssh'.",
            )
        status, out, err = await run(self.command_line.resolve_argv(), self.connect_timeout)
        if status != 0:
            said = "; ".join(line.strip() for line in err.splitlines()[-3:] if line.strip())
            raise WorkerStartupError(
                self.host,
                "connect",
                "ssh rejects its options or config: "
                + (said or f"`ssh -G` ended with status {status}"),
                "Fix the ssh config file or the option it names.",
            )
        self.resolved = parse_resolved(out)

    async def open_channel(self, on_stderr: StderrSink) -> Channel:
        if self._closed:
            raise WorkerStartupError(self.host, "session", "the transport is closed")
        await self.connect()
        command = _bootstrap.remote_command(self.python, self.env, self.cwd)
        if self._starts is None:
            self._starts = asyncio.Semaphore(STARTS_AT_ONCE)
        starts = self._starts
        await starts.acquire()  # released once the remote command has answered, or failed
        try:
            return await launch(
                self.command_line.argv(command),
                self.host,
                lambda proc: OpenSSHChannel(proc, on_stderr, self, starts.release),
            )
        except WorkerStartupError:  # ssh did not run: no channel releases the slot
            starts.release()
            raise

    def startup_error(self, finding: Finding) -> WorkerStartupError:
        """ssh's exit 255 before the remote command started, named for this host."""
        address = self.resolved.get("hostname", self.hostname)
        port = int(self.resolved.get("port", "22") or 22)
        files = self.resolved.get("userknownhostsfile", "").split()
        path = self.known_hosts or (files[0] if files else DEFAULT_KNOWN_HOSTS)
        if finding.kind in ("changed", "unknown"):
            name, key_port = finding.target_parts()
            alias = self.resolved.get("hostkeyalias", "")
            is_host = (name, key_port) == (address, port) or finding.target in ("", alias)
            hop = "" if is_host else " (a jump host on the way)"
            if finding.kind == "changed":
                recorded = finding.path or path
                option = "" if recorded.endswith("/.ssh/known_hosts") else f" -f {recorded}"
                return WorkerStartupError(
                    self.host,
                    "host key",
                    f"the host key of {finding.target}{hop} does NOT match the one recorded in "
                    f"{recorded}: it has changed, and someone could be intercepting the "
                    "connection (refused, as OpenSSH does)",
                    f"If the node was reinstalled, remove the old key with `ssh-keygen -R "
                    f"'{finding.target}'{option}` and verify the new one before connecting again.",
                )
            return WorkerStartupError(
                self.host,
                "host key",
                f"{finding.target}{hop} is not in {path} ({finding.line})",
                f"Verify its fingerprint and add it, e.g. `ssh -p {key_port} {name}` once, or "
                f"`ssh-keyscan -p {key_port} {name} >> {path}` after checking the key.",
            )
        if finding.kind == "host key":
            return WorkerStartupError(
                self.host,
                "host key",
                f"ssh could not verify the host key ({finding.line})",
                f"Run `ssh {self.hostname}` once to see why, and check known_hosts.",
            )
        if finding.kind == "authentication":
            return WorkerStartupError(
                self.host,
                "authentication",
                f"the server refused every key offered ({finding.line})",
                "Check that your public key is in the node's ~/.ssh/authorized_keys, that "
                "ssh-agent holds the key or IdentityFile in ~/.ssh/config names it, and the "
                "user name.",
            )
        reasons = {
            "resolve": (
                f"cannot resolve {finding.name} ({finding.line})",
                "Check the host name, DNS or /etc/hosts, or the HostName in your ssh config.",
            ),
            "refused": (
                f"cannot reach {finding.name} port {finding.port}: connection refused",
                "Check the host name and port, and that sshd runs there.",
            ),
            "unreachable": (
                f"cannot reach {finding.name} port {finding.port} ({finding.line})",
                "Check the host name and port, and the network route to it.",
            ),
            "timeout": (
                f"no answer within {self.connect_timeout:g} s ({finding.line})",
                "Check that the host is up and the port is right (does `ssh` reach it?).",
            ),
        }
        reason, fix = reasons.get(
            finding.kind,
            (
                f"ssh exited with status 255: {finding.line or '(nothing on stderr)'}",
                f"Run `ssh -v {self.hostname}` to see why.",
            ),
        )
        return WorkerStartupError(self.host, "connect", reason, fix)

    async def aclose(self) -> None:
        self._closed = True
        self.command_line.remove()


async def run(argv: List[str], timeout: float) -> Tuple[Optional[int], str, str]:
    """Run a short ssh command with no input: (its exit status, or None when it was still
    running at ``timeout`` and killed; stdout; stderr)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    readers = [asyncio.ensure_future(_read_all(pipe)) for pipe in (proc.stdout, proc.stderr)]
    try:
        await asyncio.wait(readers, timeout=timeout)
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
    finally:
        status = proc.poll()
        if status is None:
            proc.kill()
            proc.wait(1.0)  # SIGKILL: immediate
        for reader in readers:
            reader.cancel()
        await asyncio.wait(readers, timeout=1.0)
        proc.stdout.close()
        proc.stderr.close()
    out, err = (r.result() if r.done() and not r.cancelled() else b"" for r in readers)
    return status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


async def _read_all(pipe: Any) -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return await reader.read()
    finally:
        transport.close()
