"""The columnar Batch, exercised through the test-only PlainDecoder.

PlainDecoder speaks a trivial format (zigzag ints, LE floats, length-prefixed
binary, presence bytes, counted lists) through the same Batch protocol as the
real decoders, so these tests pin the Batch down independently of Avro.
"""

from __future__ import annotations

import datetime as dt
import gc
import struct
import sys
import uuid
from decimal import Decimal
from typing import Any

import pytest
from _wire import uvarint
from _wire import zigzag as zz
from fastavro import _logical_readers_py as fastavro_logical
from hypothesis import given, settings
from hypothesis import strategies as st

from kfast._layout import ListNode, MapNode, ObjectNode, RecordNode, ValueNode
from kfast._selftest import PlainDecoder

BOOL, INT32, INT64, FLOAT32, FLOAT64, BINARY, LIST, OBJECT, STRUCT = range(1, 10)


def enc(kind: int, value: Any, nullable: bool = False) -> bytes:
    if nullable:
        if value is None:
            return b"\0"
        return b"\1" + enc(kind, value)
    if kind in (INT32, INT64):
        return zz(value)
    if kind == FLOAT32:
        return struct.pack("<f", value)
    if kind == FLOAT64:
        return struct.pack("<d", value)
    if kind == BOOL:
        return b"\1" if value else b"\0"
    if kind in (BINARY, OBJECT):
        return uvarint(len(value)) + value
    raise AssertionError(kind)


ORDER_SPEC = [
    ("id", INT64, False),
    ("name", BINARY, True),
    ("price", FLOAT64, False),
    ("qty", INT32, True),
    ("ok", BOOL, False),
    ("tags", LIST, True),
    ("tags.item", INT32, False),
    ("attrs", LIST, False),
    ("attrs.key", BINARY, False),
    ("attrs.value", FLOAT32, True),
]
ORDER_LAYOUT = RecordNode(
    (
        ("id", ValueNode(0, "int")),
        ("name", ValueNode(1, "str")),
        ("price", ValueNode(2, "float")),
        ("qty", ValueNode(3, "int")),
        ("ok", ValueNode(4, "bool")),
        ("tags", ListNode(5, ValueNode(6, "int"))),
        ("attrs", MapNode(7, ValueNode(8, "str"), ValueNode(9, "float"))),
    )
)
ORDER_PROGRAM = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (7, 2)]


def order_payload(row: dict[str, Any]) -> bytes:
    out = enc(INT64, row["id"]) + enc(
        BINARY, None if row["name"] is None else row["name"].encode(), True
    )
    out += enc(FLOAT64, row["price"]) + enc(INT32, row["qty"], True) + enc(BOOL, row["ok"])
    if row["tags"] is None:
        out += b"\0"
    else:
        out += b"\1" + uvarint(len(row["tags"])) + b"".join(zz(t) for t in row["tags"])
    out += uvarint(len(row["attrs"]))
    for k, v in row["attrs"].items():
        out += enc(BINARY, k.encode()) + enc(FLOAT32, v, True)
    return out


f32 = st.floats(width=32, allow_nan=False)
rows = st.fixed_dictionaries(
    {
        "id": st.integers(-(2**63), 2**63 - 1),
        "name": st.none() | st.text(max_size=6),
        "price": st.floats(allow_nan=False),
        "qty": st.none() | st.integers(-(2**31), 2**31 - 1),
        "ok": st.booleans(),
        "tags": st.none() | st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
        "attrs": st.dictionaries(st.text(max_size=3), st.none() | f32, max_size=3),
    }
)


def order_decoder() -> PlainDecoder:
    return PlainDecoder(ORDER_SPEC, ORDER_LAYOUT, ORDER_PROGRAM)


@settings(max_examples=60, deadline=None)
@given(st.lists(rows, max_size=12), st.data())
def test_to_pylist_and_slice_match_the_input(data_rows: list[dict[str, Any]], data: Any) -> None:
    batch = order_decoder().decode([order_payload(r) for r in data_rows])
    assert batch.errors == []
    assert batch.num_rows == len(data_rows)
    assert batch.to_pylist() == data_rows
    start = data.draw(st.integers(0, len(data_rows)))
    stop = data.draw(st.integers(start, len(data_rows)))
    part = batch.slice(start, stop)
    assert part.to_pylist() == data_rows[start:stop]
    assert list(part.source_indices) == list(range(start, stop))


@settings(max_examples=40, deadline=None)
@given(st.lists(rows, min_size=1, max_size=8))
def test_to_arrow_matches_to_pylist(data_rows: list[dict[str, Any]]) -> None:
    batch = order_decoder().decode([order_payload(r) for r in data_rows])
    arrow = batch.to_arrow().to_pylist()
    for got, want in zip(arrow, data_rows):
        want = dict(want, attrs=list(want["attrs"].items()))
        assert got == want


def test_bad_payloads_leave_no_trace_and_keep_order() -> None:
    good = [
        {
            "id": i,
            "name": "n",
            "price": 1.5,
            "qty": None,
            "ok": True,
            "tags": [i],
            "attrs": {"a": 1.0},
        }
        for i in range(4)
    ]
    payloads = [order_payload(r) for r in good]
    bad = [payloads[1][:-1], payloads[2] + b"\0", b""]
    batch = order_decoder().decode([payloads[0], bad[0], payloads[1], bad[1], bad[2], payloads[3]])
    assert [e.index for e in batch.errors] == [1, 3, 4]
    assert [e.reason for e in batch.errors] == ["truncated", "trailing bytes", "truncated"]
    assert batch.to_pylist() == [good[0], good[1], good[3]]
    assert list(batch.source_indices) == [0, 2, 5]
    for name in batch.names:
        col = batch.column(name)
        if "." not in name:
            assert len(col) == 3, name


def test_columns_are_typed_buffers_with_validity() -> None:
    data_rows = [
        {"id": 7, "name": None, "price": 2.5, "qty": 3, "ok": False, "tags": None, "attrs": {}},
        {
            "id": -1,
            "name": "xy",
            "price": -0.0,
            "qty": None,
            "ok": True,
            "tags": [1, 2],
            "attrs": {},
        },
    ]
    batch = order_decoder().decode([order_payload(r) for r in data_rows])
    ids = memoryview(batch.column("id"))
    assert ids.format == "q" and ids.tolist() == [7, -1]
    assert memoryview(batch.column("price")).format == "d"
    assert memoryview(batch.column("qty")).format == "i"
    name = batch.column("name")
    assert name.kind == "binary" and name.nullable and name.null_count == 1
    assert name.offsets.tolist() == [0, 0, 2] and bytes(name.values) == b"xy"
    assert bytes(name.validity) == b"\x02"
    tags = batch.column("tags")
    assert tags.kind == "list" and tags.offsets.tolist() == [0, 0, 2]
    assert batch.column("tags.item").to_pylist() == [1, 2]
    with pytest.raises(BufferError):
        memoryview(name)
    with pytest.raises(KeyError, match="no column 'nope'"):
        batch.column("nope")
    assert batch.column_names == ["id", "name", "price", "qty", "ok", "tags", "attrs"]


def test_recycling_refuses_while_views_are_alive_then_reuses() -> None:
    dec = order_decoder()
    row = {"id": 1, "name": "a", "price": 1.0, "qty": 1, "ok": True, "tags": [], "attrs": {}}
    batch = dec.decode([order_payload(row)])
    view = memoryview(batch.column("id"))
    with pytest.raises(BufferError, match="still alive"):
        dec.decode([order_payload(row)], out=batch)
    view.release()
    arrow = batch.to_arrow()
    with pytest.raises(BufferError):
        dec.decode([order_payload(row)], out=batch)
    del arrow
    again = dec.decode([order_payload(row)] * 3, out=batch)
    assert again is batch and batch.num_rows == 3 and batch.errors == []


def test_recycled_decoding_allocates_no_python_objects_per_row() -> None:
    dec = order_decoder()
    row = {
        "id": 1,
        "name": "abc",
        "price": 1.0,
        "qty": 1,
        "ok": True,
        "tags": [1, 2],
        "attrs": {"k": 1.0},
    }
    payloads = [order_payload(row)] * 50_000
    batch = dec.decode(payloads)
    dec.decode(payloads, out=batch)
    before = sys.getallocatedblocks()
    for _ in range(3):
        dec.decode(payloads, out=batch)
    # O(1): a handful of blocks for the call itself, not one per row.
    assert sys.getallocatedblocks() - before < 50


def test_nested_record_presence_and_object_columns() -> None:
    spec = [("addr", STRUCT, True), ("addr.city", BINARY, True), ("blob", OBJECT, True)]
    layout = RecordNode(
        (
            ("addr", RecordNode((("city", ValueNode(1, "str")),), valid_col=0)),
            ("blob", ObjectNode(2)),
        )
    )
    dec = PlainDecoder(spec, layout, [(0, 0), (1, 0), (2, 0)], converters=[None, None, bytes.upper])
    p1 = b"\1" + enc(BINARY, b"Paris", True) + enc(OBJECT, b"xyz", True)
    p2 = b"\0" + b"\0" + b"\0"  # struct absent (city null), blob null
    batch = dec.decode([p1, p2])
    assert batch.to_pylist() == [
        {"addr": {"city": "Paris"}, "blob": b"XYZ"},
        {"addr": None, "blob": None},
    ]
    assert batch.slice(1, 2).to_pylist() == [{"addr": None, "blob": None}]
    assert batch.column("addr").to_pylist() == [True, False]


def _decode_one(kind: int, conv: str, value: int | bytes, arg: Any = None) -> Any:
    dec = PlainDecoder(
        [("v", kind, False)], RecordNode((("v", ValueNode(0, conv, arg)),)), [(0, 0)]
    )
    batch = dec.decode([enc(kind, value)])
    assert batch.errors == []
    return batch.to_pylist()[0]["v"]


@given(st.integers(-(2**31), 2**31 - 1))
def test_date_matches_fastavro(days: int) -> None:
    try:
        want = fastavro_logical.read_date(days)
    except (ValueError, OverflowError) as exc:
        with pytest.raises(type(exc)):
            _decode_one(INT32, "date", days)
    else:
        assert _decode_one(INT32, "date", days) == want


@given(st.integers(-(2**63) // 1000, 2**63 // 1000))
def test_timestamps_match_fastavro(value: int) -> None:
    cases = [
        ("timestamp-millis", fastavro_logical.read_timestamp_millis),
        ("timestamp-micros", fastavro_logical.read_timestamp_micros),
        ("local-timestamp-millis", fastavro_logical.read_local_timestamp_millis),
        ("local-timestamp-micros", fastavro_logical.read_local_timestamp_micros),
    ]
    for conv, reference in cases:
        try:
            want = reference(value)
        except (ValueError, OverflowError) as exc:
            with pytest.raises(type(exc)):
                _decode_one(INT64, conv, value)
        else:
            got = _decode_one(INT64, conv, value)
            assert got == want and got.tzinfo == want.tzinfo


@given(st.integers(0, 86_400_000 - 1), st.integers(0, 86_400_000_000 - 1))
def test_times_match_fastavro(millis: int, micros: int) -> None:
    assert _decode_one(INT32, "time-millis", millis) == fastavro_logical.read_time_millis(millis)
    assert _decode_one(INT64, "time-micros", micros) == fastavro_logical.read_time_micros(micros)


@given(st.binary(min_size=1, max_size=20), st.integers(1, 40), st.integers(0, 10))
def test_decimal_matches_fastavro(raw: bytes, precision: int, scale: int) -> None:
    want = fastavro_logical.read_decimal(raw, {"precision": precision, "scale": scale})
    got = _decode_one(BINARY, "decimal", raw, (precision, scale))
    assert isinstance(got, Decimal) and str(got) == str(want)


def test_other_conversions() -> None:
    u = uuid.uuid4()
    assert _decode_one(BINARY, "uuid", str(u).encode()) == u
    assert _decode_one(BINARY, "uuid-bytes", u.bytes) == u
    assert _decode_one(BINARY, "bytes", b"\xff\x00") == b"\xff\x00"
    assert _decode_one(INT32, "enum", 1, ("A", "B")) == "B"
    assert _decode_one(INT32, "enum", 5, ("A", "B")) == 5
    assert _decode_one(INT32, "enum", -3, {-3: "NEG"}) == "NEG"
    assert _decode_one(INT32, "uint32", -1) == 2**32 - 1
    assert _decode_one(INT64, "uint64", -1) == 2**64 - 1
    assert _decode_one(INT64, "timestamp-nanos", 5) == 5
    assert _decode_one(INT64, "timestamp-micros", 0) == dt.datetime(
        1970, 1, 1, tzinfo=dt.timezone.utc
    )


def test_tombstones_and_non_buffers_are_type_errors() -> None:
    with pytest.raises(TypeError, match="payload 1 is None"):
        order_decoder().decode([b"", None])
    with pytest.raises(TypeError):
        order_decoder().decode([object()])


def test_any_bytes_like_payload() -> None:
    row = {"id": 3, "name": "q", "price": 0.5, "qty": 2, "ok": True, "tags": [9], "attrs": {}}
    p = order_payload(row)
    batch = order_decoder().decode([bytearray(p), memoryview(p), p])
    assert batch.to_pylist() == [row] * 3


@pytest.mark.parametrize(
    "export",
    [lambda b: memoryview(b.column("id")), lambda b: b.column("id").values],
    ids=["column", "values"],
)
def test_views_freed_by_the_garbage_collector_release_their_batch(export: Any) -> None:
    # A view in a reference cycle is freed by the collector, which may clear
    # the exporting object before the memoryview releases it.
    dec = order_decoder()
    row = {"id": 1, "name": "a", "price": 1.0, "qty": 1, "ok": True, "tags": [], "attrs": {}}
    batch = dec.decode([order_payload(row)])
    none_flags = type(None).__flags__
    for _ in range(3):
        cycle: list[Any] = [export(batch)]
        cycle.append(cycle)
        del cycle
        gc.collect()
    assert type(None).__flags__ == none_flags
    again = dec.decode([order_payload(row)] * 2, out=batch)
    assert again is batch and batch.num_rows == 2
