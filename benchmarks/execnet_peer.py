"""execnet over ssh behind the ``Executor`` interface, the way its users hand-roll a pool.

One gateway per worker (``ssh=`` spec: the system ``ssh`` client, with an ssh_config
written here for the loopback sshd), each running a loop that takes
``(function name, argument or chunk)`` messages and sends results back. execnet
serialises only built-in types and ships code as source, so tasks are named, not
pickled: the remote loop imports ``benchmarks.tasks`` (the loopback sshd puts the
repository on ``PYTHONPATH``). ``map`` sends every item first, round-robin over the
channels, then reads the results back in order: the pipelined pattern that makes
execnet fast. ``submit`` is a blocking call (send, then receive: execnet's lowest
latency); ``submit_pipelined`` is the hand-rolled asynchronous form, a second channel
per gateway whose results resolve Futures from execnet's receiver thread, in order.
No numpy: execnet cannot serialise arrays.
"""

from __future__ import annotations

import collections
import itertools
import sys
import threading
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Callable, Deque, Iterable, Iterator, List, Optional

from .sshd import ADDRESS, Client

WORKER_LOOP = """
from benchmarks import tasks
for name, argument, chunked in channel:
    fn = getattr(tasks, name)
    channel.send([fn(x) for x in argument] if chunked else fn(argument))
"""


def ssh_config(client: Client, port: int, path: Path) -> Path:
    path.write_text(
        f"Host sshexec-bench-{port}\n"
        f"  HostName {ADDRESS}\n  Port {port}\n  User {client.user}\n"
        f"  IdentityFile {client.key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {client.known_hosts}\n  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n  Ciphers aes128-gcm@openssh.com\n"
    )
    return path


class ExecnetExecutor(Executor):
    def __init__(self, client: Client, ports: List[int], workers: int, root: Path) -> None:
        import execnet

        self.group = execnet.Group()
        self.channels = []
        self.async_channels: List[Any] = []
        self.pending: List[Deque[Future[Any]]] = []
        for index in range(workers):
            port = ports[index % len(ports)]
            config = ssh_config(client, port, root / f"execnet-ssh-{port}.conf")
            spec = f"ssh=sshexec-bench-{port}//ssh_config={config}//python={sys.executable}"
            gateway = self.group.makegateway(spec)
            self.channels.append(gateway.remote_exec(WORKER_LOOP))
            waiting: Deque[Future[Any]] = collections.deque()
            side = gateway.remote_exec(WORKER_LOOP)
            side.setcallback(lambda result, waiting=waiting: waiting.popleft().set_result(result))
            self.async_channels.append(side)
            self.pending.append(waiting)
        self.lock = threading.Lock()  # one call or map at a time: channels are in order
        self.turn = itertools.cycle(range(workers))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        (argument,) = args
        with self.lock:
            channel = self.channels[next(self.turn)]
            channel.send((fn.__name__, argument, False))
            future.set_result(channel.receive())
        return future

    def submit_pipelined(self, fn: Callable[..., Any], argument: Any) -> Future[Any]:
        """Send now, resolve when the reply arrives: Futures over execnet by hand."""
        future: Future[Any] = Future()
        with self.lock:
            index = next(self.turn)
            self.pending[index].append(future)
            self.async_channels[index].send((fn.__name__, argument, False))
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
    ) -> Iterator[Any]:
        (items,) = iterables
        items = list(items)
        batches = (
            [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
            if chunksize > 1
            else items
        )
        count = len(self.channels)
        with self.lock:
            for index, batch in enumerate(batches):
                self.channels[index % count].send((fn.__name__, batch, chunksize > 1))
            results = [self.channels[i % count].receive(timeout) for i in range(len(batches))]
        return itertools.chain.from_iterable(results) if chunksize > 1 else iter(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for channel in self.channels + self.async_channels:
            channel.close()
        self.group.terminate(timeout=10)
