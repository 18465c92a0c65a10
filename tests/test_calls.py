"""Payloads: split calls, out-of-band buffers (pickle protocol 5) that skip copies, and
the pickler, whose by-value code keeps its file name."""

from __future__ import annotations

import copyreg
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import cloudpickle
import pytest

from sshexec import SSHPoolExecutor
from sshexec._wire import carried, shared
from sshexec._wire.calls import (
    KEY_SIZE,
    OUT_OF_BAND_MIN,
    STORE_MIN,
    STORED_CALL,
    blob_key,
    call_payload,
    carried_code,
    dumps,
    load_call,
    loads,
    serialize,
    shared_blobs,
    sharing,
    size,
    split_call,
    stored_call,
    stored_ref,
)
from sshexec._wire.shared import Sharing

from . import tasks

numpy = pytest.importorskip("numpy")  # in the test extra: this never skips in CI

BIG = OUT_OF_BAND_MIN * 4


def joined(payload: Any) -> bytearray:
    """The payload as the receiving decoder hands it over: one bytearray."""
    pieces, _ = payload
    return bytearray(b"".join(pieces))


@pytest.mark.parametrize(
    "args",
    [(2, 40), (1.5, "s", b"b", None, True), (lambda: 7, [1, 2]), ()],
    ids=["ints", "plain-types", "lambda-and-list", "no-args"],
)
def test_a_split_call_carries_the_function_pickled_once(args: Any) -> None:
    pickled_fn = cloudpickle.dumps(tasks.add)
    payload = split_call(pickled_fn, args)
    stream = payload[0][0]
    assert stream[:1] == b"S" and pickled_fn in stream and payload[1] == b""
    fn, loaded, kwargs = load_call(joined(payload))
    assert fn(2, b=40) == 42 and kwargs == {}  # tests.tasks travels by value: a copy
    assert [a() if callable(a) else a for a in loaded] == [a() if callable(a) else a for a in args]
    fn, loaded, kwargs = load_call(bytes(joined(call_payload(tasks.add, (1,), {"b": 2}))))
    assert fn(*loaded, **kwargs) == 3 and (loaded, kwargs) == ((1,), {"b": 2})  # one pickle


def test_a_big_array_argument_is_a_snapshot_outside_the_pickle() -> None:
    array = numpy.arange(BIG, dtype=numpy.uint8)
    pieces, sizes = call_payload(tasks.nbytes, (array,), {})
    assert len(pieces) == 2 and len(sizes) == 8
    assert isinstance(pieces[1], bytes) and len(pieces[1]) == array.nbytes
    assert len(pieces[0]) < 1000  # the stream holds no array data
    array[:] = 0  # the caller changes its array after submit: what was sent stays
    _fn, (sent,), _ = load_call(joined((pieces, sizes)), sizes)
    assert sent[1] == 1 and sent.sum() > 0
    assert size((pieces, sizes)) == len(pieces[0]) + array.nbytes


def test_a_big_result_leaves_from_where_it_lies_and_lands_without_a_copy() -> None:
    result = numpy.arange(BIG // 8, dtype=numpy.float64)
    pieces, sizes = dumps(result, copy=False)
    assert isinstance(pieces[1], memoryview)
    assert numpy.shares_memory(numpy.frombuffer(pieces[1], dtype=numpy.float64), result)
    received = joined((pieces, sizes))
    back = loads(received, sizes)
    assert numpy.array_equal(back, result) and back.flags.writeable
    back[0] = 42.0  # the array is a view of the received buffer: no copy was made
    assert (
        numpy.frombuffer(received, dtype=numpy.float64, offset=len(received) - result.nbytes)[0]
        == 42.0
    )


@pytest.mark.parametrize(
    "value",
    [
        numpy.arange(16, dtype=numpy.int64),  # small: copied into the stream
        numpy.arange(BIG, dtype=numpy.uint8)[::2],  # not contiguous: in the stream too
        numpy.asfortranarray(numpy.arange(BIG // 8, dtype=numpy.float64).reshape(-1, 4)),
        bytearray(BIG),
        [numpy.ones(BIG // 8), numpy.zeros(BIG // 8)],  # two buffers, in order
    ],
    ids=["small", "strided", "fortran-order", "bytearray", "two-arrays"],
)
def test_buffers_round_trip_in_and_out_of_band(value: Any) -> None:
    payload = dumps(value, copy=False)
    back = loads(joined(payload), payload[1])
    if isinstance(value, list):
        assert len(payload[1]) == 16
        assert all(numpy.array_equal(a, b) for a, b in zip(back, value))
    elif isinstance(value, bytearray):  # pickle writes it in band (only PickleBuffers go out)
        assert back == value and payload[1] == b"" and len(payload[0]) == 1
    else:
        assert numpy.array_equal(back, value)
        if not value.flags.c_contiguous and value.flags.f_contiguous:
            assert back.flags.f_contiguous  # Fortran order survives


def test_sizes_that_do_not_fit_the_payload_are_refused() -> None:
    with pytest.raises(ValueError, match="buffer sizes"):
        loads(b"x" * 10, b"\x00" * 7)
    with pytest.raises(ValueError, match="shorter"):
        loads(b"x" * 10, (100).to_bytes(8, "big"))


@pytest.mark.timeout(120)
def test_big_arrays_both_ways_through_a_pool(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    executor = make_executor(max_workers=1)
    array = numpy.random.default_rng(7).standard_normal(3 * BIG)
    assert executor.submit(tasks.nbytes, array).result(timeout=60) == array.nbytes
    doubled = executor.submit(numpy.multiply, array, 2.0).result(timeout=60)
    assert numpy.array_equal(doubled, array * 2.0) and doubled.flags.writeable
    results = list(executor.map(numpy.negative, [array, array[::3]]))
    assert numpy.array_equal(results[0], -array) and numpy.array_equal(results[1], -array[::3])


# ---- the pickler: code pickled by value keeps its file ---------------------------------

CELL = "/tmp/sshexec-notebook/cell_7.py"  # a notebook cell's name: in linecache, not on disk
CELL_SOURCE = textwrap.dedent(
    """\
    def cell_task(x):
        inner = lambda y: y + 1
        return inner(x)


    class CellShape:
        def area(self):
            return 4
    """
)


def code_files(code: types.CodeType) -> Iterator[str]:
    """``co_filename`` of ``code`` and of every code object nested in its constants."""
    yield code.co_filename
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from code_files(const)


def cell_namespace() -> Dict[str, Any]:
    namespace: Dict[str, Any] = {"__name__": "__main__"}  # as a notebook's: pickled by value
    exec(compile(CELL_SOURCE, CELL, "exec"), namespace)
    return namespace


def test_a_by_value_function_keeps_its_file_after_a_round_trip() -> None:
    cell = cell_namespace()
    for fn, where in [
        (tasks.log_things, tasks.__file__),  # a module registered by value (conftest)
        (cell["cell_task"], CELL),  # a notebook cell's function, with a nested lambda
        (cell["CellShape"].area, CELL),  # a method of a class pickled by value
        (lambda: 3, __file__),  # a lambda of this test module
    ]:
        copy = pickle.loads(serialize(fn))
        assert copy is not fn and copy.__code__ is not fn.__code__  # it did travel by value
        assert list(code_files(copy.__code__)) == list(code_files(fn.__code__))
        assert set(code_files(copy.__code__)) == {where}
    assert pickle.loads(serialize(cell["cell_task"]))(1) == 2


def test_every_payload_layout_keeps_the_file() -> None:
    fn = cell_namespace()["cell_task"]
    sent, _, _ = load_call(joined(call_payload(fn, (1,), {})))
    mapped, _, _ = load_call(joined(split_call(serialize(fn), (1,))))
    result = loads(joined(dumps([fn], copy=False)))[0]  # a result holding a function
    assert {sent.__code__.co_filename, mapped.__code__.co_filename} == {CELL}
    assert result.__code__.co_filename == CELL


def test_the_payload_of_a_function_is_deterministic(tmp_path: Path) -> None:
    cell = cell_namespace()
    assert serialize(cell["cell_task"]) == serialize(cell["cell_task"])
    assert serialize(tasks.log_things) == serialize(tasks.log_things)
    # and the same in two fresh interpreters with different string hashing (a function:
    # a class pickled by value carries a random tracker id, in cloudpickle's own payload too)
    script = textwrap.dedent(
        f"""\
        import sys
        from sshexec._wire.calls import serialize
        namespace = {{"__name__": "__main__"}}
        exec(compile({CELL_SOURCE!r}, {CELL!r}, "exec"), namespace)
        sys.stdout.buffer.write(serialize(namespace["cell_task"]))
        """
    )
    payloads: List[bytes] = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, env=env, timeout=60, check=True
        )
        payloads.append(run.stdout)
    assert payloads[0] == payloads[1]
    assert set(code_files(pickle.loads(payloads[0]).__code__)) == {CELL}


def test_the_pickler_is_cloudpickle_apart_from_the_file() -> None:
    fn = cell_namespace()["cell_task"]
    ours, theirs = pickle.loads(serialize(fn)), pickle.loads(cloudpickle.dumps(fn))
    assert ours.__code__.replace(co_filename="x") == theirs.__code__.replace(co_filename="x")
    assert ours.__code__.co_filename == CELL


class Registered:
    def __init__(self, value: int) -> None:
        self.value = value


def test_reducers_registered_with_copyreg_later_still_apply() -> None:
    copyreg.pickle(Registered, lambda obj: (Registered, (obj.value * 2,)))
    try:
        assert pickle.loads(serialize(Registered(21))).value == 42
    finally:
        del copyreg.dispatch_table[Registered]
    assert pickle.loads(serialize(Registered(21))).value == 21


# ---- functions stored once per host ---------------------------------------------------


def test_small_functions_travel_inline_big_ones_by_key() -> None:
    assert stored_ref(b"x" * (STORE_MIN - 1)) is None
    data = b"y" * STORE_MIN
    ref = stored_ref(data)
    assert ref is not None and ref == (STORED_CALL + blob_key(data), blob_key(data))
    assert len(blob_key(data)) == KEY_SIZE


def test_a_stored_call_names_its_function_and_carries_only_the_arguments() -> None:
    big = b"z" * (1 << 20)

    def fn(x: int, data: bytes = big) -> int:
        return len(data) + x

    pickled = serialize(fn)
    ref = stored_ref(pickled)
    assert ref is not None
    pieces, sizes = stored_call(ref[1], (5,))
    payload = b"".join(bytes(p) for p in pieces)
    assert len(payload) < 200  # the function is not in it
    asked = []

    def stored(key: bytes) -> object:
        asked.append(key)
        return pickle.loads(pickled)

    got_fn, args, kwargs = load_call(payload, sizes, stored)
    assert asked == [ref[1]] and (args, kwargs) == ((5,), {})
    assert got_fn(*args) == len(big) + 5
    with pytest.raises(LookupError, match="stored"):
        load_call(payload, sizes)  # a worker with no store says so


def test_a_shared_object_is_named_by_key_and_loaded_by_the_lookup() -> None:
    numpy = pytest.importorskip("numpy")
    big = numpy.arange(1 << 15, dtype=numpy.float64)  # 256 KiB: its buffer out of band
    scope = Sharing()
    entry = scope.check(big)
    key, blob = entry[1], entry[2]
    assert key == blob_key(blob)  # the key is the blob's SHA-256, as any stored blob's
    assert scope.check(big)[2] is blob  # unchanged: hashed again, not copied again
    with sharing([entry]):
        pieces, sizes = call_payload(tasks.add, (big, 1), {})
    assert shared_blobs() == ((key, blob),)
    payload = b"".join(bytes(p) for p in pieces)
    assert payload[:1] == b"P" and len(payload) < big.nbytes  # named, not carried
    seen = []

    def lookup(asked: bytes) -> object:
        seen.append(asked)
        return shared.load(blob)

    fn, args, kwargs = load_call(payload, sizes, shared=lookup)
    assert fn(2, b=3) == 5 and kwargs == {}
    assert seen == [key] and (args[0] == big).all() and args[1] == 1
    assert not args[0].flags.writeable  # a view of the blob: read-only, as a memmap
    with pytest.raises(LookupError, match="shared"):
        load_call(payload, sizes)


def test_a_shared_object_changed_in_place_is_a_new_blob_and_never_named_outside() -> None:
    """The stale-copy bug: shared by id for the object's lifetime, an array changed in
    place was named by its old key by every later call, ``submit`` included."""
    numpy = pytest.importorskip("numpy")
    big = numpy.zeros(1 << 15)
    scope = Sharing()
    before = scope.check(big)
    big[:] = 1
    after = scope.check(big)
    assert after[1] != before[1] and (shared.load(after[2]) == 1).all()
    with sharing([after]):
        call_payload(tasks.add, (big, 1), {})
    assert shared_blobs() == ((after[1], after[2]),)
    pieces, sizes = call_payload(tasks.add, (big, 1), {})  # outside: by value, as always
    assert shared_blobs() == () and bytes(pieces[0])[:1] != b"P"
    _, args, _ = load_call(b"".join(bytes(p) for p in pieces), sizes)
    assert (args[0] == 1).all()


def test_a_portable_reference_carries_the_globals_its_code_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For a node of another Python a by-value module's function goes by reference, with
    the values the globals it reads have now (tests.tasks is pickled by value)."""
    monkeypatch.setattr(tasks, "_GLOBAL", "set on the client")
    data = serialize((tasks.read_global, tasks.read_global), portable=True)
    assert not carried_code()
    carried.take()
    fn, again = pickle.loads(data)
    assert fn is again is tasks.read_global  # a reference, resolved once
    assert carried.take() == {tasks.__name__: {"_GLOBAL": "set on the client"}}
    pickle.loads(serialize(tasks.square, portable=True))  # reads no global: nothing carried
    assert carried.take() == {}
