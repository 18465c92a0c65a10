"""The messages both ends exchange: frozen dataclasses with a ``TAG``.

Owns: the worker protocol (host -> worker commands ``Init``, ``Run``, ``Shutdown``,
``Revoke``, ``Ping``, ``Source``; worker -> host facts ``Hello``, ``Ready``, ``Done``,
``Failed``, ``Revoked``, ``Pong``, ``Output``, ``Log``, ``Fetch``) and the agent protocol
spoken on a host's one channel (``Configure``, ``Spawn``, ``Data``, ``CloseInput``,
``Signal``, ``Ack``, ``Store``, ``Forget`` / ``Spawned``, ``Exited``, ``SpawnFailed``,
``StoreFailed``; ``Hello``, ``Ping``, ``Pong`` and ``Shutdown`` serve there too), and
staged files (``StageDir``, ``StageOffer``, ``StagePut``, ``StageCommit`` / ``StageWant``,
``Staged``; the worker's ``FileBack``), and task limits (``Limits`` to a worker, ``Kill``
/ ``Stopped`` with the agent). A field named by a class's ``TAIL`` travels
raw after the msgpack head (see ``protocol``). Must not import: anything beyond the
stdlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final, Tuple, Union

Buffer = Union[bytes, bytearray, memoryview]
Pieces = Tuple[Buffer, ...]  # a tail given as buffers to write one after another
Tail = Union[bytes, bytearray, Pieces]  # received: bytes, or a bytearray when big


# ---- host -> worker: commands ---------------------------------------------------------


@dataclass(frozen=True)
class Init:
    TAG: ClassVar[int] = 1
    worker_id: str
    initializer: bytes  # cloudpickle of (initializer, initargs), or b"" for none
    max_frame: int  # the host's limit: a larger result fails on the worker, not the link
    forward_modules: bool  # ask the host for modules this interpreter cannot import
    log_level: int  # the root logger level on the worker (the client's, at construction)
    python: str = ""  # the client's Python ("3.11.7"): another minor loads calls portably


@dataclass(frozen=True)
class Run:
    TAG: ClassVar[int] = 2
    TAIL: ClassVar[str] = "payload"
    task_id: int
    # the pickled call, then its out-of-band buffers; opaque here (a bytearray when big).
    # To encode, it may also be a tuple of buffers (Pieces), written one after another.
    payload: Tail
    buffers: bytes = b""  # sizes of the out-of-band buffers ending the payload (BUFFER_SIZE)


@dataclass(frozen=True)
class Shutdown:
    TAG: ClassVar[int] = 3


@dataclass(frozen=True)
class Revoke:
    """Give a prefetched task back if it has not started (an idle worker will take it)."""

    TAG: ClassVar[int] = 4
    task_id: int


@dataclass(frozen=True)
class Ping:
    """Answered by the worker whoever reads next: its main thread between tasks, its watcher
    once a task is 5 ms old."""

    TAG: ClassVar[int] = 5
    nonce: int


@dataclass(frozen=True)
class Source:
    """The host's answer to ``Fetch``: a module's pure-Python source, or why there is none."""

    TAG: ClassVar[int] = 6
    name: str
    kind: str  # one of SOURCE_KINDS
    origin: str  # the file it came from on the client ("" when none)
    code: str  # the source ("" unless kind is "source")
    is_package: bool
    detail: str  # for "compiled": the distribution; for "missing": why, or ""


SOURCE_KINDS: Final = ("source", "missing", "compiled")


# ---- worker -> host: facts ------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    TAG: ClassVar[int] = 10
    protocol: int
    python: str  # "3.11.7"
    cloudpickle: str
    msgpack: str
    pid: int
    hostname: str
    cpus: int
    executable: str


@dataclass(frozen=True)
class Ready:
    TAG: ClassVar[int] = 11


@dataclass(frozen=True)
class Done:
    TAG: ClassVar[int] = 12
    TAIL: ClassVar[str] = "payload"
    task_id: int
    payload: Tail  # the pickled result, then its out-of-band buffers (as Run.payload)
    # time the worker spent on it (unpickle, call, pickle); metadata, not compared
    seconds: float = field(default=0.0, compare=False)
    buffers: bytes = b""  # sizes of the out-of-band buffers ending the payload


@dataclass(frozen=True)
class Failed:
    TAG: ClassVar[int] = 13
    task_id: int
    type_name: str  # "module.QualName" of the exception
    message: str  # str(exception)
    traceback: str  # remote traceback text, starting with host and pid
    exception: bytes  # cloudpickle of the exception, or b"" when it could not be pickled
    stage: str  # where it failed: one of STAGES
    seconds: float = field(default=0.0, compare=False)


STAGE_INIT, STAGE_CALL, STAGE_RUN, STAGE_RESULT = "init", "call", "run", "result"
STAGES: Final = (STAGE_INIT, STAGE_CALL, STAGE_RUN, STAGE_RESULT)  # call: unpickling it


@dataclass(frozen=True)
class Revoked:
    """The worker dropped a revoked task without running it."""

    TAG: ClassVar[int] = 14
    task_id: int


@dataclass(frozen=True)
class Pong:
    TAG: ClassVar[int] = 15
    nonce: int


@dataclass(frozen=True)
class Output:
    """A chunk a task wrote to ``sys.stdout`` (stream 1) or ``sys.stderr`` (stream 2)."""

    TAG: ClassVar[int] = 16
    stream: int
    data: bytes


@dataclass(frozen=True)
class Log:
    """A ``logging`` record from a task, already formatted into ``message``."""

    TAG: ClassVar[int] = 17
    name: str
    levelno: int
    message: str
    pathname: str
    lineno: int
    func: str
    created: float
    exc_text: str  # formatted traceback, or ""
    thread_name: str


@dataclass(frozen=True)
class Fetch:
    """The worker cannot import ``name``: the host may have its source."""

    TAG: ClassVar[int] = 18
    name: str


# ---- the agent protocol, on a host's one channel --------------------------------------
# Slot: the agent's number for one of its workers, chosen by the client (1, 2, ...).


@dataclass(frozen=True)
class Configure:
    """Client -> agent, first: its limits and deadline."""

    TAG: ClassVar[int] = 30
    max_frame: int  # the client's max_frame (frames from the client carry a CHUNK at most)
    silence_deadline: float  # seconds without a byte from the client before the agent quits
    beat_interval: float = 0.0  # seconds between the agent's Beats (0: none)


@dataclass(frozen=True)
class Spawn:
    """Client -> agent: start a worker in ``slot`` (fork, or spawn where fork is missing)."""

    TAG: ClassVar[int] = 31
    slot: int


@dataclass(frozen=True)
class Data:
    """Bytes of one worker's stream: client -> agent, its stdin (stream 0); agent ->
    client, its stdout (1: its frames) or stderr (2). Relayed, never decoded."""

    TAG: ClassVar[int] = 32
    TAIL: ClassVar[str] = "data"
    slot: int
    stream: int
    data: Tail


@dataclass(frozen=True)
class CloseInput:
    """Client -> agent: end that worker's stdin (it exits after its EOF grace)."""

    TAG: ClassVar[int] = 33
    slot: int


@dataclass(frozen=True)
class Signal:
    """Client -> agent: send ``signum`` to that worker's process group."""

    TAG: ClassVar[int] = 34
    slot: int
    signum: int


@dataclass(frozen=True)
class Store:
    """Client -> agent: keep a blob under ``key`` for this host's workers (a map's
    function, an initializer, a shared object): it crosses the network once per host,
    not once per task. It comes in pieces of at most ``CHUNK`` bytes, one frame each and
    back to back; ``size`` (the whole blob's, in every piece) says when it is complete.
    A piece arriving when no blob of that key is incomplete starts a new one."""

    TAG: ClassVar[int] = 35
    TAIL: ClassVar[str] = "data"
    key: bytes
    size: int
    data: Tail


@dataclass(frozen=True)
class Ack:
    """Client -> agent: ``count`` more bytes of the worker in ``slot`` (its stdout and
    stderr ``Data``) were taken by their consumer. The agent reads a worker only while
    less than ``WINDOW`` of its bytes are unacknowledged: a worker that outprints the
    client blocks on its full pipe, as a local process does."""

    TAG: ClassVar[int] = 36
    slot: int
    count: int


@dataclass(frozen=True)
class Forget:
    """Client -> agent: no task will name the blob ``key`` any more (until it is stored
    again): delete it."""

    TAG: ClassVar[int] = 37
    key: bytes


@dataclass(frozen=True)
class Spawned:
    """Agent -> client: the worker in ``slot`` runs as ``pid``."""

    TAG: ClassVar[int] = 40
    slot: int
    pid: int


@dataclass(frozen=True)
class Exited:
    """Agent -> client: the worker in ``slot`` ended, after the last byte of its stdout:
    ``status`` its exit status, or ``signum`` the signal that killed it (else 0)."""

    TAG: ClassVar[int] = 41
    slot: int
    status: int
    signum: int


@dataclass(frozen=True)
class SpawnFailed:
    """Agent -> client: no worker could be started in ``slot``."""

    TAG: ClassVar[int] = 42
    slot: int
    reason: str


@dataclass(frozen=True)
class StoreFailed:
    """Agent -> client: the blob ``key`` could not be kept (``reason``: where it was
    tried and why, "No space left on device" say); workers will not find it."""

    TAG: ClassVar[int] = 44
    key: bytes
    reason: str


CHUNK: Final = 4 << 20  # the most bytes of data one Data or Store frame carries
WINDOW: Final = 8 << 20  # unacknowledged bytes of one worker beyond which the agent waits


@dataclass(frozen=True)
class Beat:
    """Agent -> client, every ``Configure.beat_interval`` on the agent's own clock: it
    is alive. Never queued behind the client's uploads (it travels the other way), and
    no user code can hold it back, as it could a reply to the client's ``Ping``."""

    TAG: ClassVar[int] = 43


# ---- staged files (``files=``, ``return_files=``) -------------------------------------
# A key names one file's content as the node's cache keeps it: the SHA-256 of its bytes,
# then its mode's read and execute bits (2 bytes, big-endian): ``STAGE_KEY`` bytes.


@dataclass(frozen=True)
class StageDir:
    """Client -> agent, before its first ``Spawn``: every worker gets a working directory
    of its own inside one per-client directory (removed when the agent ends), staged
    files are laid out in each, and files tasks write that match ``returns`` (glob
    patterns, NUL-separated) travel back."""

    TAG: ClassVar[int] = 50
    returns: str


@dataclass(frozen=True)
class StageOffer:
    """Client -> agent: part of a batch's manifest, ``entries`` a msgpack array of
    ``[path, kind ("f", "d" or "l"), mode, size, key or b"", symlink target or ""]``;
    ``last`` ends it. The agent answers ``StageWant``."""

    TAG: ClassVar[int] = 51
    batch: int
    entries: bytes
    last: bool


@dataclass(frozen=True)
class StageWant:
    """Agent -> client: the keys (back to back) of the batch's contents its cache lacks."""

    TAG: ClassVar[int] = 52
    batch: int
    keys: bytes


@dataclass(frozen=True)
class StagePut:
    """Client -> agent: a piece of one wanted content, as ``Store`` pieces are (at most
    ``CHUNK`` bytes a frame, back to back; ``size`` the whole file's)."""

    TAG: ClassVar[int] = 53
    TAIL: ClassVar[str] = "data"
    key: bytes
    size: int
    data: Tail


@dataclass(frozen=True)
class StageCommit:
    """Client -> agent: every wanted content of the batch was sent: lay it out."""

    TAG: ClassVar[int] = 54
    batch: int


@dataclass(frozen=True)
class Staged:
    """Agent -> client: the batch is laid out for every worker (``error`` empty), or
    why not (the file and the reason: "data/a.h5: No space left on device")."""

    TAG: ClassVar[int] = 55
    batch: int
    error: str


@dataclass(frozen=True)
class FileBack:
    """Worker -> host, before the task's reply: a piece of a file the task wrote that
    matches a return pattern (``path`` relative to the working directory). Pieces of a
    file come back to back, at most ``CHUNK`` bytes each; complete at ``size`` bytes."""

    TAG: ClassVar[int] = 56
    TAIL: ClassVar[str] = "data"
    task_id: int
    path: str
    mode: int
    size: int
    data: Tail


STAGE_KEY: Final = 34  # bytes of a staged content's key: SHA-256, then 2 bytes of mode


# ---- task limits and kills (the agent enforces them; see _node/limits.py) ---------------


@dataclass(frozen=True)
class Limits:
    """Client -> worker: the limits of every ``Run`` that follows on this worker's stream,
    until the next ``Limits`` (0: none; a worker starts with none). The agent enforces
    them while each of those tasks runs. Sent only when they change, so a ``map`` with
    limits adds one frame per worker, not one per task."""

    TAG: ClassVar[int] = 60
    seconds: float  # wall-clock time from a task's start on the worker
    memory: int  # bytes of resident memory of the worker's whole process tree


@dataclass(frozen=True)
class Kill:
    """Client -> agent: end the task ``task_id`` if the worker in ``slot`` runs it (now,
    or when it starts it): its worker's process group and descendants are killed."""

    TAG: ClassVar[int] = 61
    slot: int
    task_id: int


STOP_TIMEOUT, STOP_MEMORY, STOP_KILLED = "timeout", "memory", "killed"


@dataclass(frozen=True)
class Stopped:
    """Agent -> client, before that worker's ``Exited``: the agent killed the worker in
    ``slot`` because of the task it ran (``why``: one of ``STOP_*``; ``detail``: what it
    measured, "1.2 GB in 3 processes" say)."""

    TAG: ClassVar[int] = 62
    slot: int
    task_id: int
    why: str
    detail: str


Message = Union[
    Init,
    Run,
    Shutdown,
    Revoke,
    Ping,
    Source,
    Hello,
    Ready,
    Done,
    Failed,
    Revoked,
    Pong,
    Output,
    Log,
    Fetch,
    Configure,
    Spawn,
    Data,
    CloseInput,
    Signal,
    Store,
    Ack,
    Forget,
    Spawned,
    Exited,
    SpawnFailed,
    StoreFailed,
    Beat,
    StageDir,
    StageOffer,
    StageWant,
    StagePut,
    StageCommit,
    Staged,
    FileBack,
    Limits,
    Kill,
    Stopped,
]
