"""The frame codec: round trips, every split of a stream, limits and malformed input."""

from __future__ import annotations

import dataclasses
import tracemalloc
from typing import Any, List

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshexec._wire import messages as msgs
from sshexec._wire import protocol as proto
from sshexec._wire.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER,
    MAX_FRAME_LIMIT,
    Ack,
    Beat,
    CloseInput,
    Configure,
    Data,
    Done,
    Exited,
    Failed,
    Fetch,
    Forget,
    FrameDecoder,
    FrameError,
    Hello,
    Init,
    Log,
    Message,
    Output,
    Ping,
    Pong,
    Ready,
    Revoke,
    Revoked,
    Run,
    Shutdown,
    Signal,
    Source,
    Spawn,
    Spawned,
    SpawnFailed,
    Store,
    StoreFailed,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the autouse leak check
)

SAMPLES: List[Message] = [
    Init("node1#3", b"", 1 << 30, True, 20),
    Init("nöde-ü#0", b"\x80\x04initializer\x00\xff", 1024, False, 0),
    Run(1, b"\x80\x05payload"),
    Run(2**63 - 1, b""),
    Run(3, b"\x80\x05stream" + b"B" * 9, (9).to_bytes(8, "big")),  # one out-of-band buffer
    Shutdown(),
    Hello(
        protocol=proto.PROTOCOL_VERSION,
        python="3.11.7",
        cloudpickle="3.1.2",
        msgpack="1.2.4",
        pid=4242,
        hostname="node1.example",
        cpus=8,
        executable="/usr/bin/python3",
    ),
    Ready(),
    Done(7, b"\x80\x05result" * 100),
    Done(0, b""),
    Failed(
        9, "ValueError", "boom", "host node1 (hostname n1), pid 1\nTraceback...", b"\x80", "run"
    ),
    Failed(10, "mod.Qual.Name", "", "", b"", "call"),
    Revoke(11),
    Revoked(2**40),
    Done(12, b"r", 0.25),
    Done(14, b"s" + b"B" * 20, 0.5, (8).to_bytes(8, "big") + (12).to_bytes(8, "big")),
    Failed(13, "KeyError", "k", "tb", b"", "result", 1e-6),
    Ping(1),
    Pong(2**40),
    Output(1, b"hello\n"),
    Output(2, b"\xff partial"),
    Log("my.mod", 20, "message \u00e9", "/p/m.py", 7, "fn", 1700000000.5, "", "MainThread"),
    Log("", 40, "", "", 0, "", 0.0, "Traceback...\nValueError", ""),
    Fetch("pkg.sub.mod"),
    Source("pkg", "source", "/src/pkg/__init__.py", "x = 1\n", True, ""),
    Source("numpy", "compiled", "numpy/core/_m.so", "", True, "numpy"),
    Source("nope", "missing", "", "", False, ""),
    # the agent protocol, on a host's one channel
    Configure(1 << 30, 30.0),
    Configure(1 << 20, 3.0, 1.0),
    Spawn(1),
    Data(1, 0, b"\x00\x00\x00\x05frame bytes"),
    Data(2**31, 2, b""),
    CloseInput(3),
    Signal(4, 9),
    Store(b"k" * 32, 1000, b"\x80\x05a pickled function" * 50),
    Store(b"k" * 32, 3 << 20, b""),
    Ack(1, 2 << 20),
    Ack(2**31, 0),
    Forget(b"k" * 32),
    Spawned(1, 31337),
    Exited(1, 0, 9),
    Exited(2, 7, 0),
    SpawnFailed(5, "OSError: [Errno 11] Resource temporarily unavailable"),
    StoreFailed(b"k" * 32, "/dev/shm: No space left on device; /tmp: No space left on device"),
    Beat(),
    # staged files
    msgs.StageDir("out/*.npz\0logs/**"),
    msgs.StageDir(""),
    msgs.StageOffer(1, msgpack.packb([["data/a.h5", "f", 0o644, 3, b"k" * 34, ""]]), False),
    msgs.StageOffer(2**31, b"", True),
    msgs.StageWant(1, b"k" * 34 * 3),
    msgs.StageWant(2, b""),
    msgs.StagePut(b"k" * 34, 5 << 20, b"\x00piece" * 100),
    msgs.StagePut(b"k" * 34, 0, b""),
    msgs.StageCommit(7),
    msgs.Staged(7, ""),
    msgs.Staged(8, "data/a.h5: No space left on device"),
    msgs.FileBack(3, "out/fit_17.npz", 0o644, 12, b"npz bytes..."),
    msgs.FileBack(2**40, "out/\u00e9.txt", 0o600, 0, b""),
    # task limits and kills
    msgs.Limits(2.5, 500 << 20),
    msgs.Limits(0.0, 0),
    msgs.Kill(3, 2**40),
    msgs.Stopped(3, 7, msgs.STOP_TIMEOUT, "ran 2.0 s, its limit"),
    msgs.Stopped(2**31, 2**40, msgs.STOP_MEMORY, "612 MB in 2 processes, over 500 MB"),
]


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> List[Message]:
    decoder = FrameDecoder(max_frame=max_frame)
    decoder.feed(data)
    out = list(decoder.messages())
    decoder.end()
    return out


def decode_chunks(chunks: List[bytes]) -> List[Message]:
    decoder = FrameDecoder()
    out: List[Message] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder.messages())
    decoder.end()
    assert decoder.buffered == 0
    return out


def raw_frame(head: bytes, tail: bytes = b"") -> bytes:
    return HEADER.pack(len(head), len(tail)) + head + tail


def packed_frame(item: Any, tail: bytes = b"") -> bytes:
    return raw_frame(msgpack.packb(item, use_bin_type=True), tail)


def head_fields(message: Message) -> List[Any]:
    """What the head array holds: the tag, then every field but the tail."""
    tail = getattr(message, "TAIL", None)
    return [
        message.TAG,
        *(getattr(message, f.name) for f in dataclasses.fields(message) if f.name != tail),
    ]


BIG = proto.BIG_TAIL
BIG_RUN = Run(21, bytes(range(256)) * (BIG // 256) + b"end")
BIG_DONE = Done(22, b"\x00" * BIG, 0.5)
BIG_DONE_3 = Done(23, b"\xff" * (3 * BIG + 7))
BIG_SAMPLES: List[Message] = [BIG_RUN, Ready(), BIG_DONE, BIG_DONE_3, Pong(5)]


def first_error(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> FrameError:
    decoder = FrameDecoder(max_frame=max_frame)
    decoder.feed(data)
    with pytest.raises(FrameError) as info:
        list(decoder.messages())
    return info.value


# ---- round trips ----------------------------------------------------------------------


def test_samples_cover_every_message_class() -> None:
    assert {type(m) for m in SAMPLES} == set(proto._CLASSES)
    assert len({cls.TAG for cls in proto._CLASSES}) == len(proto._CLASSES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_each_message(message: Message) -> None:
    frame = proto.encode(message)
    head_size, tail_size = HEADER.unpack_from(frame)
    assert HEADER.size + head_size + tail_size == len(frame)
    head = msgpack.unpackb(frame[HEADER.size : HEADER.size + head_size], raw=False)
    assert head == head_fields(message)
    tail = getattr(message, getattr(message, "TAIL", ""), b"")
    assert frame[HEADER.size + head_size :] == tail
    (decoded,) = decode_all(frame)
    assert decoded == message
    assert type(decoded) is type(message)


def test_frames_coalesces_several_messages() -> None:
    data = proto.frames(SAMPLES)
    assert data == b"".join(proto.encode(m) for m in SAMPLES)
    assert decode_all(data) == SAMPLES
    assert len(proto.frame_pieces(SAMPLES)) == 1


def test_big_tails_are_written_as_they_are() -> None:
    pieces = proto.frame_pieces(BIG_SAMPLES)
    # head of the Run | its tail | Ready + Done's head | tail | head | tail | Pong
    assert len(pieces) == 7
    for at, message in ((1, BIG_RUN), (3, BIG_DONE), (5, BIG_DONE_3)):
        assert pieces[at] is message.payload
    assert b"".join(pieces) == b"".join(proto.encode(m) for m in BIG_SAMPLES)


def test_big_tails_in_chunks_of_every_size() -> None:
    stream = proto.frames(BIG_SAMPLES)
    for size in (1 << 20, BIG + 1, BIG, BIG - 1, 4096, 1000, 7, 1):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        decoded = decode_chunks(chunks)
        assert decoded == BIG_SAMPLES, f"chunks of {size}"
        assert [type(getattr(m, "payload", b"")) for m in decoded] == [
            bytearray,
            bytes,
            bytearray,
            bytearray,
            bytes,
        ]


def test_big_tail_split_around_its_edges() -> None:
    stream = proto.frames(BIG_SAMPLES[:3])
    first = len(proto.encode(BIG_SAMPLES[0]))
    head = first - len(BIG_RUN.payload)
    for edge in (HEADER.size, head, first):
        for cut in range(edge - 3, edge + 4):
            assert decode_chunks([stream[:cut], stream[cut:]]) == BIG_SAMPLES[:3], cut


def test_a_tail_on_a_message_without_one_is_refused() -> None:
    for tail in (b"x", b"x" * BIG):
        assert "has no tail" in str(first_error(packed_frame([Pong.TAG, 1], tail)))


def test_a_bad_head_before_a_big_tail_fails_at_once() -> None:
    decoder = FrameDecoder()
    decoder.feed(packed_frame([Run.TAG, "1", b""], b"x" * BIG)[: HEADER.size + 8])
    with pytest.raises(FrameError, match="field has type"):
        list(decoder.messages())


def test_messages_are_frozen() -> None:
    run = Run(1, b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.task_id = 2  # type: ignore[misc]


# ---- every split of a stream ----------------------------------------------------------


def test_every_split_point_of_a_stream() -> None:
    stream = proto.frames(SAMPLES)
    for cut in range(len(stream) + 1):
        assert decode_chunks([stream[:cut], stream[cut:]]) == SAMPLES, f"split at {cut}"


def test_every_pair_of_split_points_of_a_short_stream() -> None:
    messages: List[Message] = [Run(1, b"ab"), Shutdown(), Ready(), Done(1, b"c")]
    stream = proto.frames(messages)
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            chunks = [stream[:first], stream[first:second], stream[second:]]
            assert decode_chunks(chunks) == messages, f"split at {first}, {second}"


def test_byte_by_byte() -> None:
    stream = proto.frames(SAMPLES)
    decoder = FrameDecoder()
    out: List[Message] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        out.extend(decoder.messages())
        assert decoder.buffered < max(len(proto.encode(m)) for m in SAMPLES)
    decoder.end()
    assert out == SAMPLES


def test_messages_yields_only_complete_frames() -> None:
    frame = proto.encode(Run(5, b"payload"))
    decoder = FrameDecoder()
    decoder.feed(frame + frame[:-1])
    assert list(decoder.messages()) == [Run(5, b"payload")]
    assert decoder.buffered == len(frame) - 1
    assert list(decoder.messages()) == []
    decoder.feed(frame[-1:])
    assert list(decoder.messages()) == [Run(5, b"payload")]
    assert decoder.buffered == 0
    decoder.end()


# ---- limits ---------------------------------------------------------------------------


def test_max_frame_is_validated() -> None:
    for bad in (0, -1, MAX_FRAME_LIMIT + 1):
        with pytest.raises(ValueError, match="max_frame"):
            FrameDecoder(max_frame=bad)
    assert FrameDecoder(max_frame=MAX_FRAME_LIMIT).max_frame == MAX_FRAME_LIMIT
    assert FrameDecoder().max_frame == DEFAULT_MAX_FRAME


def test_max_frame_can_change_between_frames_of_one_chunk() -> None:
    small, big = proto.encode(Done(1, b"x" * 10)), proto.encode(Done(2, b"x" * BIG))
    limit = len(small) - HEADER.size  # the small frame fits exactly, the big one not
    decoder = FrameDecoder(max_frame=limit)
    decoder.feed(small + big + small)
    messages = decoder.messages()
    assert next(messages) == Done(1, b"x" * 10)
    decoder.max_frame = len(big) - HEADER.size  # raised: the next frame is checked on it
    assert next(messages) == Done(2, b"x" * BIG)
    decoder.max_frame = limit - 1  # lowered below the last frame
    with pytest.raises(FrameError, match=f"outside 1..{limit - 1}"):
        next(messages)
    for bad in (0, MAX_FRAME_LIMIT + 1, 2.0, "1"):
        with pytest.raises(ValueError, match="max_frame"):
            FrameDecoder().max_frame = bad  # type: ignore[assignment]


@pytest.mark.parametrize("tail", [50, BIG])
def test_frame_at_max_frame_is_accepted(tail: int) -> None:
    frame = proto.encode(Done(1, b"x" * tail))
    size = len(frame) - HEADER.size
    assert decode_all(frame, max_frame=size) == [Done(1, b"x" * tail)]
    error = first_error(frame, max_frame=size - 1)
    assert str(size) in str(error)


@pytest.mark.parametrize(
    "head, tail", [(DEFAULT_MAX_FRAME + 1, 0), (1, DEFAULT_MAX_FRAME), (MAX_FRAME_LIMIT, 0)]
)
def test_oversize_frame_is_refused_from_its_header_alone(head: int, tail: int) -> None:
    # Only the 8-byte header has arrived: the refusal must not wait for (or buffer) a body.
    claimed = head + tail
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(head, tail))
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match=str(claimed)):
            list(decoder.messages())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert decoder.buffered == HEADER.size


def test_oversize_frame_breaks_the_decoder() -> None:
    decoder = FrameDecoder(max_frame=16)
    decoder.feed(HEADER.pack(17, 0) + b"x" * 17)
    with pytest.raises(FrameError):
        list(decoder.messages())
    with pytest.raises(FrameError, match="already failed"):
        decoder.feed(proto.encode(Ready()))


@pytest.mark.parametrize("in_tail", [False, True])
def test_claimed_length_is_never_allocated_while_waiting(in_tail: bool) -> None:
    # A legal but huge claim (exactly max_frame) with a few body bytes: memory follows
    # what was received, not what was claimed, for a head as for a big tail.
    head = msgpack.packb([Done.TAG, 1, 0.0, b""])
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        if in_tail:
            data = HEADER.pack(len(head), DEFAULT_MAX_FRAME - len(head)) + head + b"\x00" * 1000
        else:
            data = HEADER.pack(DEFAULT_MAX_FRAME, 0) + b"\x00" * 1000
        decoder.feed(data)
        assert list(decoder.messages()) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert decoder.buffered == (1000 if in_tail else HEADER.size + 1000)
    with pytest.raises(FrameError, match="ended inside a frame"):
        decoder.end()


def test_zero_length_frame() -> None:
    error = first_error(HEADER.pack(0, 0))
    assert "0 bytes" in str(error)


# ---- malformed bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x02",  # array of 2 with one element: cut short inside the body
        b"\x91\x03\x90",  # extra data after a complete object
        b"\xdc\xff\xff",  # array16 header claiming 65535 items, nothing follows
        b"\x81\x01\x02",  # map with an int key (strict_map_key)
        b"\xd9\x02\xff\xfe",  # str8 that is not UTF-8
    ],
    ids=["reserved-byte", "truncated", "extra-data", "huge-array-claim", "int-map-key", "bad-utf8"],
)
def test_garbage_body(body: bytes) -> None:
    error = first_error(raw_frame(body) + proto.encode(Ready()))
    assert "not msgpack" in str(error)


@pytest.mark.parametrize(
    "item",
    [
        [],
        [99],
        [-1, 1, b""],
        ["2", 1, b""],
        [True],  # bool is not an int tag
        [2.0, 1, b""],
        {"tag": 2},
        2,
        "Run",
        b"\x02",
        None,
    ],
)
def test_wrong_tag_or_shape(item: Any) -> None:
    error = first_error(packed_frame(item))
    assert "tag" in str(error)


@pytest.mark.parametrize(
    "item",
    [
        [Run.TAG],
        [Run.TAG, 1, b"", b""],  # the payload travels as the tail, not in the head
        [Shutdown.TAG, 1],
        [Ready.TAG, None],
        [Hello.TAG, *dataclasses.astuple(SAMPLES[5])[:-1]],
        [Failed.TAG, 1, "T", "m", "tb"],
    ],
)
def test_wrong_field_count(item: Any) -> None:
    error = first_error(packed_frame(item))
    assert "fields" in str(error)


@pytest.mark.parametrize(
    "item",
    [
        [Run.TAG, "1", b""],
        [Init.TAG, "node#0", "init", 1, True, 20, ""],  # str where bytes belong (use_bin_type)
        [Run.TAG, True, b""],  # bool is not an int field
        [Run.TAG, 1.0, b""],
        [Run.TAG, None, b""],
        [Run.TAG, [1], b""],
        [Run.TAG, 1, "sizes"],
        [Init.TAG, b"node#0", b"", 1, True, 20, ""],
        [Init.TAG, "node#0", b"", 1, True, 20, b"3.11"],  # the client's Python is a str
        [Init.TAG, "node#0", b"", 1, 1, 20, ""],  # int is not a bool field
        [Done.TAG, {"k": 1}, 0.0, b""],
        [Done.TAG, 1, "0.5", b""],
        [Failed.TAG, 1, "T", "m", "tb", "not bytes", "run", 0.0],
        [Output.TAG, "1", b""],
        [Source.TAG, "m", "source", "", "", "yes", ""],
    ],
)
def test_wrong_field_types(item: Any) -> None:
    error = first_error(packed_frame(item))
    assert "field has type" in str(error)


def test_error_after_good_frames_keeps_the_good_ones() -> None:
    decoder = FrameDecoder()
    decoder.feed(proto.encode(Ready()) + proto.encode(Run(1, b"x")) + packed_frame([99]))
    seen: List[Message] = []
    with pytest.raises(FrameError):
        for message in decoder.messages():
            seen.append(message)
    assert seen == [Ready(), Run(1, b"x")]
    with pytest.raises(FrameError):
        decoder.feed(b"more")


# ---- end of stream --------------------------------------------------------------------


def test_end_on_a_clean_stream() -> None:
    decoder = FrameDecoder()
    decoder.end()  # nothing fed at all
    decoder.feed(proto.encode(Shutdown()))
    assert list(decoder.messages()) == [Shutdown()]
    decoder.end()


def test_end_on_a_truncated_stream_raises_at_every_cut() -> None:
    stream = proto.frames([Run(1, b"abc"), Done(1, b"def")])
    boundaries = {0, len(proto.encode(Run(1, b"abc"))), len(stream)}
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.feed(stream[:cut])
        list(decoder.messages())
        if cut in boundaries:
            decoder.end()
        else:
            with pytest.raises(FrameError, match="ended inside a frame"):
                decoder.end()


# ---- fuzzing --------------------------------------------------------------------------


def feed_and_collect(chunks: List[bytes]) -> List[Message]:
    """Either returns messages or raises FrameError; anything else fails the test."""
    decoder = FrameDecoder(max_frame=1 << 16)
    out: List[Message] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder.messages())
    decoder.end()
    return out


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_random_bytes(chunks: List[bytes]) -> None:
    try:
        out = feed_and_collect(chunks)
    except FrameError:
        return
    assert all(isinstance(m, proto._CLASSES) for m in out)


# Frames that start out valid, then get a few bytes overwritten: this reaches the
# msgpack and schema checks far more often than uniformly random bytes do.
_messages = st.one_of(
    st.builds(
        Init,
        st.text(max_size=20),
        st.binary(max_size=40),
        st.integers(1, 2**32 - 1),
        st.booleans(),
        st.integers(0, 50),
    ),
    st.builds(Run, st.integers(-(2**63), 2**64 - 1), st.binary(max_size=40)),
    st.just(Shutdown()),
    st.builds(
        Hello,
        st.integers(0, 2**32),
        st.text(max_size=10),
        st.text(max_size=10),
        st.text(max_size=10),
        st.integers(0, 2**31),
        st.text(max_size=30),
        st.integers(1, 1024),
        st.text(max_size=30),
    ),
    st.just(Ready()),
    st.builds(Done, st.integers(0, 2**32), st.binary(max_size=40), st.floats(allow_nan=False)),
    st.builds(
        Failed,
        st.integers(0, 2**32),
        st.text(max_size=20),
        st.text(max_size=20),
        st.text(max_size=40),
        st.binary(max_size=20),
        st.sampled_from(proto.STAGES),
    ),
    st.builds(Revoke, st.integers(0, 2**63 - 1)),
    st.builds(Revoked, st.integers(0, 2**63 - 1)),
    st.builds(Ping, st.integers(0, 2**63 - 1)),
    st.builds(Pong, st.integers(0, 2**63 - 1)),
    st.builds(Output, st.sampled_from([1, 2]), st.binary(max_size=40)),
    st.builds(Fetch, st.text(max_size=30)),
    st.builds(
        Source,
        st.text(max_size=10),
        st.sampled_from(proto.SOURCE_KINDS),
        st.text(max_size=20),
        st.text(max_size=40),
        st.booleans(),
        st.text(max_size=10),
    ),
    st.builds(
        Log,
        st.text(max_size=10),
        st.integers(0, 50),
        st.text(max_size=30),
        st.text(max_size=20),
        st.integers(0, 10**6),
        st.text(max_size=10),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        st.text(max_size=10),
    ),
)


@FUZZ
@given(st.lists(_messages, min_size=1, max_size=6), st.data())
def test_fuzz_valid_streams_in_random_chunks(messages: List[Message], data: st.DataObject) -> None:
    stream = proto.frames(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert feed_and_collect(chunks) == messages


@FUZZ
@given(
    st.lists(_messages, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_fuzz_corrupted_frames(messages: List[Message], edits: List[Any]) -> None:
    stream = bytearray(proto.frames(messages))
    for where, value in edits:
        stream[where % len(stream)] = value
    try:
        out = feed_and_collect([bytes(stream)])
    except FrameError:
        return
    assert all(isinstance(m, proto._CLASSES) for m in out)


def test_an_int_is_accepted_where_a_float_belongs() -> None:
    # msgpack writes 0.0 as a float, but a peer that sends 0 for a duration is harmless
    (message,) = decode_all(packed_frame([Done.TAG, 5, 2, b""], b"r"))
    assert message == Done(5, b"r", 2.0)
    assert type(message.seconds) is float


# The wire as both ends of PROTOCOL_VERSION 9 agree on it: any change to this table is a
# wire change, which must bump PROTOCOL_VERSION (nodes keep cached bundles of the old one).
WIRE_9 = {
    1: (
        "Init",
        ("worker_id", "initializer", "max_frame", "forward_modules", "log_level", "python"),
    ),
    2: ("Run", ("task_id", "payload", "buffers")),
    3: ("Shutdown", ()),
    4: ("Revoke", ("task_id",)),
    5: ("Ping", ("nonce",)),
    6: ("Source", ("name", "kind", "origin", "code", "is_package", "detail")),
    10: (
        "Hello",
        ("protocol", "python", "cloudpickle", "msgpack", "pid", "hostname", "cpus", "executable"),
    ),
    11: ("Ready", ()),
    12: ("Done", ("task_id", "payload", "seconds", "buffers")),
    13: (
        "Failed",
        ("task_id", "type_name", "message", "traceback", "exception", "stage", "seconds"),
    ),
    14: ("Revoked", ("task_id",)),
    15: ("Pong", ("nonce",)),
    16: ("Output", ("stream", "data")),
    17: (
        "Log",
        (
            "name",
            "levelno",
            "message",
            "pathname",
            "lineno",
            "func",
            "created",
            "exc_text",
            "thread_name",
        ),
    ),
    18: ("Fetch", ("name",)),
    30: ("Configure", ("max_frame", "silence_deadline", "beat_interval")),
    31: ("Spawn", ("slot",)),
    32: ("Data", ("slot", "stream", "data")),
    33: ("CloseInput", ("slot",)),
    34: ("Signal", ("slot", "signum")),
    35: ("Store", ("key", "size", "data")),
    36: ("Ack", ("slot", "count")),
    37: ("Forget", ("key",)),
    40: ("Spawned", ("slot", "pid")),
    41: ("Exited", ("slot", "status", "signum")),
    42: ("SpawnFailed", ("slot", "reason")),
    43: ("Beat", ()),
    44: ("StoreFailed", ("key", "reason")),
    50: ("StageDir", ("returns",)),
    51: ("StageOffer", ("batch", "entries", "last")),
    52: ("StageWant", ("batch", "keys")),
    53: ("StagePut", ("key", "size", "data")),
    54: ("StageCommit", ("batch",)),
    55: ("Staged", ("batch", "error")),
    56: ("FileBack", ("task_id", "path", "mode", "size", "data")),
    60: ("Limits", ("seconds", "memory")),
    61: ("Kill", ("slot", "task_id")),
    62: ("Stopped", ("slot", "task_id", "why", "detail")),
}


def test_the_wire_is_protocol_7() -> None:
    """Version 7: flow control (Ack), blobs in pieces with a lifecycle (Store.size, Forget,
    StoreFailed) and the agent's own heartbeat (Beat, Configure.beat_interval)."""
    assert proto.PROTOCOL_VERSION == 9
    found = {
        cls.TAG: (cls.__name__, tuple(f.name for f in dataclasses.fields(cls)))
        for cls in proto._CLASSES
    }
    assert found == WIRE_9
