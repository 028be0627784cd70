"""AvroDecoder: types, layout, buffers, bad input, resolution (example based)."""

from __future__ import annotations

import datetime as dt
import gc
import json
import sys
import uuid
from decimal import Decimal
from typing import Any

import pytest
from avro_helpers import encode, reference, zigzag

import kfast
from kfast.avro import AvroDecoder
from kfast.errors import ConfigError

UTC = dt.timezone.utc

ORDER = {
    "type": "record",
    "name": "Order",
    "namespace": "shop",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "sku", "type": "string"},
        {"name": "price", "type": "double"},
        {"name": "qty", "type": "int"},
        {"name": "paid", "type": "boolean"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "status",
            "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID", "SHIPPED"]},
        },
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "tags", "type": {"type": "array", "items": "int"}},
        {
            "name": "address",
            "type": {
                "type": "record",
                "name": "Address",
                "fields": [{"name": "city", "type": "string"}, {"name": "zip", "type": "int"}],
            },
        },
    ],
}


def order(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "sku": f"SKU-{i:05d}",
        "price": i * 1.25,
        "qty": i % 7,
        "paid": i % 2 == 0,
        "ts": dt.datetime(2024, 5, 1, tzinfo=UTC) + dt.timedelta(milliseconds=i),
        "status": ["NEW", "PAID", "SHIPPED"][i % 3],
        "note": None if i % 3 else f"note {i}",
        "tags": list(range(i % 4)),
        "address": {"city": "Baku", "zip": 1000 + i},
    }


def roundtrip(schema: Any, records: list[Any], writer: Any = None) -> kfast.Batch:
    payloads = [encode(writer or schema, r) for r in records]
    batch = AvroDecoder(schema, writer_schema=writer).decode(payloads)
    assert batch.errors == []
    expected = [reference(p, writer or schema, schema if writer else None) for p in payloads]
    assert batch.to_pylist() == expected
    return batch


def test_public_name_and_order_record() -> None:
    assert kfast.AvroDecoder is AvroDecoder
    batch = roundtrip(ORDER, [order(i) for i in range(50)])
    assert batch.num_rows == 50
    assert batch.column_names == [
        "id", "sku", "price", "qty", "paid", "ts", "status", "note", "tags",
        "address.city", "address.zip",
    ]  # fmt: skip


def test_schema_inputs_dict_json_and_path(tmp_path: Any) -> None:
    path = tmp_path / "order.avsc"
    path.write_text(json.dumps(ORDER))
    payload = encode(ORDER, order(3))
    for schema in (ORDER, json.dumps(ORDER), str(path), path):
        assert AvroDecoder(schema).decode([payload]).to_pylist() == [reference(payload, ORDER)]


def test_fixed_width_columns_support_the_buffer_protocol() -> None:
    batch = roundtrip(ORDER, [order(i) for i in range(10)])
    ids = memoryview(batch.column("id"))
    assert ids.format == "q" and ids.tolist() == list(range(10))
    assert memoryview(batch.column("price")).tolist() == [i * 1.25 for i in range(10)]
    assert memoryview(batch.column("qty")).format == "i"
    assert memoryview(batch.column("status")).tolist() == [i % 3 for i in range(10)]
    del ids
    note = batch.column("note")
    assert note.nullable and note.null_count == 6
    bits = bytes(note.validity)
    assert [bool(bits[i >> 3] >> (i & 7) & 1) for i in range(10)] == [i % 3 == 0 for i in range(10)]
    offsets = note.offsets.tolist()
    values = bytes(note.values)
    assert values[offsets[3] : offsets[4]] == b"note 3"
    tags = batch.column("tags")
    assert tags.kind == "list"
    assert tags.offsets.tolist()[:5] == [0, 0, 1, 3, 6]
    assert memoryview(batch.column("tags.item")).tolist()[:6] == [0, 0, 1, 0, 1, 2]
    assert not batch.column("id").nullable


def test_every_primitive_and_logical_type() -> None:
    schema = {
        "type": "record",
        "name": "All",
        "fields": [
            {"name": "n", "type": "null"},
            {"name": "b", "type": "boolean"},
            {"name": "i", "type": "int"},
            {"name": "l", "type": "long"},
            {"name": "f", "type": "float"},
            {"name": "d", "type": "double"},
            {"name": "by", "type": "bytes"},
            {"name": "s", "type": "string"},
            {"name": "fx", "type": {"type": "fixed", "name": "F4", "size": 4}},
            {"name": "date", "type": {"type": "int", "logicalType": "date"}},
            {"name": "tms", "type": {"type": "int", "logicalType": "time-millis"}},
            {"name": "tus", "type": {"type": "long", "logicalType": "time-micros"}},
            {"name": "tsms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "tsus", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "tsns", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
            {"name": "ltms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
            {"name": "ltus", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
            {"name": "ltns", "type": {"type": "long", "logicalType": "local-timestamp-nanos"}},
            {
                "name": "decb",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 3},
            },
            {
                "name": "decf",
                "type": {
                    "type": "fixed",
                    "name": "D8",
                    "size": 8,
                    "logicalType": "decimal",
                    "precision": 18,
                    "scale": 2,
                },
            },  # fmt: skip
            {"name": "u", "type": {"type": "string", "logicalType": "uuid"}},
            {
                "name": "uf",
                "type": {"type": "fixed", "name": "U16", "size": 16, "logicalType": "uuid"},
            },
            {
                "name": "dur",
                "type": {"type": "fixed", "name": "Dur", "size": 12, "logicalType": "duration"},
            },
            {"name": "unknown", "type": {"type": "string", "logicalType": "made-up"}},
        ],
    }
    rec = {
        "n": None,
        "b": True,
        "i": -(2**31),
        "l": 2**63 - 1,
        "f": 1.5,
        "d": -2.25e300,
        "by": b"\x00\xff",
        "s": "héllo ✓ 𝄞",
        "fx": b"abcd",
        "date": dt.date(2024, 2, 29),
        "tms": dt.time(13, 14, 15, 16000),
        "tus": dt.time(23, 59, 59, 999999),
        "tsms": dt.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        "tsus": dt.datetime(2262, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        "tsns": 1_700_000_000_123_456_789,
        "ltms": dt.datetime(2001, 9, 9, 1, 46, 40, 123000),
        "ltus": dt.datetime(1900, 1, 1, 0, 0, 0, 7),
        "ltns": -5,
        "decb": Decimal("-123456.789"),
        "decf": Decimal("1234567890123456.78"),
        "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "uf": uuid.UUID("12345678-1234-5678-1234-567812345678").bytes,
        "dur": b"\x01\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00",
        "unknown": "plain",
    }
    batch = roundtrip(schema, [rec])
    row = batch.to_pylist()[0]
    assert row["tsms"].tzinfo is not None and row["ltms"].tzinfo is None
    assert isinstance(row["decb"], Decimal) and isinstance(row["u"], uuid.UUID)


def test_nullable_and_nested_layout() -> None:
    addr = {
        "type": "record",
        "name": "Addr",
        "fields": [
            {"name": "city", "type": "string"},
            {"name": "geo", "type": {"type": "record", "name": "Geo", "fields": [
                {"name": "lat", "type": "double"}, {"name": "lon", "type": ["null", "double"]}]}},
        ],
    }  # fmt: skip
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "home", "type": ["null", addr]},
            {"name": "work", "type": ["Addr", "null"]},
            {"name": "scores", "type": ["null", {"type": "map", "values": ["null", "long"]}]},
            {"name": "names", "type": {"type": "array", "items": ["string", "null"]}},
        ],
    }
    geo = {"lat": 1.0, "lon": None}
    recs = [
        {"home": None, "work": {"city": "a", "geo": geo}, "scores": None, "names": []},
        {"home": {"city": "b", "geo": {"lat": 2.0, "lon": 3.0}}, "work": None,
         "scores": {"x": 1, "y": None}, "names": ["p", None, "q"]},
    ]  # fmt: skip
    batch = roundtrip(schema, recs)
    names = batch.names
    assert "home" in names and "home.geo.lat" in names and "scores.key" in names
    assert "names.item" in names
    home_lat = batch.column("home.geo.lat")
    assert home_lat.nullable and home_lat.null_count == 1
    assert batch.column("home").kind == "struct"


def test_object_fallback_shapes() -> None:
    schema = {
        "type": "record",
        "name": "Node",
        "fields": [
            {"name": "value", "type": "int"},
            {"name": "next", "type": ["null", "Node"], "default": None},
            {"name": "choice", "type": ["null", "int", "string", {"type": "array", "items": "long"}]},
            {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "It",
                "fields": [{"name": "k", "type": "string"}]}}},
            {"name": "nested", "type": {"type": "map", "values": {"type": "array", "items": "int"}}},
        ],
    }  # fmt: skip
    recs = [
        {"value": 1, "next": {"value": 2, "next": None, "choice": None, "items": [], "nested": {}},
         "choice": "s", "items": [{"k": "a"}, {"k": "b"}], "nested": {"a": [1, 2]}},
        {"value": 3, "next": None, "choice": [1, 2], "items": [], "nested": {}},
        {"value": 4, "next": None, "choice": 7, "items": [], "nested": {}},
    ]  # fmt: skip
    batch = roundtrip(schema, recs)
    assert batch.column("next").kind == "object"
    assert batch.column("choice").kind == "object"


def test_recursive_object_span_is_validated() -> None:
    schema = {
        "type": "record",
        "name": "L",
        "fields": [{"name": "v", "type": "string"}, {"name": "next", "type": ["null", "L"]}],
    }
    good = encode(schema, {"v": "a", "next": {"v": "b", "next": None}})
    # corrupt the inner string with invalid UTF-8: the skipper must reject it
    bad = good.replace(b"b", b"\xff")
    batch = AvroDecoder(schema).decode([good, bad])
    assert batch.num_rows == 1
    assert batch.errors[0].index == 1 and "invalid UTF-8" in batch.errors[0].reason


def test_top_level_non_record_schema() -> None:
    for schema, values in (
        ("long", [1, -2, 2**40]),
        ({"type": "array", "items": "string"}, [["a"], []]),
        (["null", "int"], [None, 5]),
    ):
        roundtrip(schema, values)


# ---------------------------------------------------------------- bad input

SIMPLE = {
    "type": "record",
    "name": "S",
    "fields": [
        {"name": "x", "type": "long"},
        {"name": "name", "type": "string"},
        {"name": "u", "type": ["null", "int"]},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
        {"name": "d", "type": "double"},
    ],
}


def _reasons(payloads: list[bytes]) -> list[str]:
    good = encode(SIMPLE, {"x": 1, "name": "ok", "u": 2, "e": "B", "d": 0.5})
    batch = AvroDecoder(SIMPLE).decode([good, *payloads, good])
    assert batch.num_rows == 2 and list(batch.source_indices) == [0, len(payloads) + 1]
    assert [e.index for e in batch.errors] == list(range(1, len(payloads) + 1))
    assert batch.to_pylist() == [reference(good, SIMPLE)] * 2
    return [e.reason for e in batch.errors]


def test_corrupt_inputs_are_row_errors_with_precise_reasons() -> None:
    reasons = _reasons(
        [
            b"\x80" * 11,  # overlong varint
            zigzag(1) + zigzag(-3),  # negative string length
            zigzag(1) + zigzag(50) + b"abc",  # length past the end
            zigzag(1) + zigzag(2) + b"\xc3\x28",  # invalid UTF-8
            zigzag(1) + zigzag(0) + zigzag(5),  # union index out of range
            zigzag(1) + zigzag(0) + zigzag(0) + zigzag(9),  # enum index out of range
            zigzag(1) + zigzag(0) + zigzag(0) + zigzag(0) + b"\0" * 8 + b"zz",  # trailing
            zigzag(1) + zigzag(0) + zigzag(0) + zigzag(0) + b"\0" * 5,  # truncated double
        ]
    )
    assert reasons[0].startswith("overlong varint at byte 0")
    assert reasons[1] == "negative length -3 at byte 1 in field 'name'"
    assert reasons[2] == "truncated payload: needed 50 bytes at byte 2 in field 'name'"
    assert reasons[3] == "invalid UTF-8 in field 'name' at byte 2"
    assert reasons[4] == "union branch 5 out of range for field 'u' at byte 2"
    assert reasons[5] == "enum index 9 out of range for field 'e' at byte 3"
    assert reasons[6] == "2 trailing bytes after record"
    assert reasons[7] == "truncated payload: needed 8 bytes at byte 4 in field 'd'"


def test_every_strict_prefix_is_an_error() -> None:
    payload = encode(ORDER, order(5))
    prefixes = [payload[:k] for k in range(len(payload))]
    batch = AvroDecoder(ORDER).decode(prefixes + [payload])
    assert batch.num_rows == 1 and len(batch.errors) == len(prefixes)
    assert all(e.reason.startswith("truncated payload") for e in batch.errors)


def test_huge_block_counts_do_not_allocate_or_spin() -> None:
    schema = {"type": "array", "items": "null"}
    arr = {"type": "array", "items": "long"}
    batch = AvroDecoder(schema).decode([zigzag(2**62) + zigzag(0)])
    assert "block count" in batch.errors[0].reason
    batch = AvroDecoder(arr).decode([zigzag(2**40) + zigzag(1), zigzag(-(2**63))])
    assert len(batch.errors) == 2 and batch.num_rows == 0


def test_bad_schemas_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        AvroDecoder({"type": "record", "name": "x"})
    with pytest.raises(ConfigError):
        AvroDecoder("{not json")
    with pytest.raises(ConfigError):
        AvroDecoder("/no/such/file.avsc")


# ---------------------------------------------------------------- resolution


def test_resolution_rules() -> None:
    writer = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "a", "type": "int"},
            {"name": "gone", "type": {"type": "array", "items": "string"}},
            {"name": "b", "type": "long"},
            {"name": "old_name", "type": "string"},
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y", "Z"]}},
            {"name": "s", "type": "string"},
            {"name": "u", "type": ["null", "int"]},
            {"name": "f", "type": "float"},
        ],
    }
    reader = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "f", "type": "double"},
            {"name": "b", "type": "double"},
            {"name": "a", "type": "long"},
            {"name": "new_name", "type": "string", "aliases": ["old_name"]},
            {
                "name": "e",
                "type": {"type": "enum", "name": "E", "symbols": ["Z", "X", "OTHER"], "default": "OTHER"},
            },
            {"name": "s", "type": "bytes"},
            {"name": "u", "type": ["null", "long"]},
            {"name": "added", "type": "int", "default": 42},
            {"name": "added_rec", "type": {"type": "record", "name": "Sub", "fields": [
                {"name": "p", "type": "string"}]}, "default": {"p": "dflt"}},
            {"name": "added_opt", "type": ["null", "string"], "default": None},
        ],
    }  # fmt: skip
    recs = [
        {"a": 1, "gone": ["x"], "b": 2, "old_name": "n", "e": "Y", "s": "s", "u": None, "f": 0.5},
        {"a": -1, "gone": [], "b": 2**40, "old_name": "m", "e": "Z", "s": "t", "u": 7, "f": 1.5},
    ]
    roundtrip(reader, recs, writer=writer)


def test_enum_without_default_is_row_error() -> None:
    w = {"type": "enum", "name": "E", "symbols": ["A", "B"]}
    r = {"type": "enum", "name": "E", "symbols": ["A"]}
    batch = AvroDecoder(r, writer_schema=w).decode([zigzag(0), zigzag(1)])
    assert batch.to_pylist() == ["A"]
    assert "not in the reader schema" in batch.errors[0].reason


def test_unresolvable_pairs_are_config_errors_naming_the_field() -> None:
    w = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "string"}]}
    r = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}
    with pytest.raises(ConfigError, match="'a'"):
        AvroDecoder(r, writer_schema=w)
    r2 = {"type": "record", "name": "R", "fields": [{"name": "b", "type": "int"}]}
    with pytest.raises(ConfigError, match="'b'"):
        AvroDecoder(r2, writer_schema=w)


def test_writer_union_branch_not_in_reader_is_row_error() -> None:
    w = ["null", "string", "int"]
    r = ["null", "string"]
    payloads = [zigzag(0), zigzag(1) + zigzag(1) + b"a", zigzag(2) + zigzag(3)]
    batch = AvroDecoder(r, writer_schema=w).decode(payloads)
    assert batch.to_pylist() == [None, "a"]
    assert "matches no type of the reader schema" in batch.errors[0].reason


# ---------------------------------------------------------------- recycling


def test_recycled_batches_allocate_o1_python_objects() -> None:
    payloads = [encode(ORDER, order(i)) for i in range(20_000)]
    dec = AvroDecoder(ORDER)
    batch = dec.decode(payloads)
    dec.decode(payloads, out=batch)
    gc.collect()
    before = sys.getallocatedblocks()
    for _ in range(3):
        dec.decode(payloads, out=batch)
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert batch.num_rows == 20_000
    assert grown < 200, grown  # O(1), not O(rows)


def test_recycling_refuses_while_a_view_is_alive() -> None:
    dec = AvroDecoder(ORDER)
    batch = dec.decode([encode(ORDER, order(1))])
    view = memoryview(batch.column("id"))
    with pytest.raises(BufferError):
        dec.decode([encode(ORDER, order(2))], out=batch)
    view.release()
    assert dec.decode([encode(ORDER, order(2))], out=batch).to_pylist()[0]["id"] == 2


def test_namespaces_and_named_references_in_object_columns() -> None:
    schema = {
        "type": "record",
        "name": "Outer",
        "namespace": "a.b",
        "fields": [
            {
                "name": "inner",
                "type": {
                    "type": "record",
                    "name": "Inner",
                    "namespace": "c",
                    "fields": [{"name": "x", "type": "int"}],
                },
            },
            {"name": "lst", "type": {"type": "array", "items": "c.Inner"}},
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
            {"name": "u", "type": ["null", "E", "c.Inner", "Outer"]},
            {
                "name": "plain",
                "type": {
                    "type": "record",
                    "name": "Plain",
                    "namespace": "",
                    "fields": [{"name": "p", "type": "a.b.E"}],
                },
            },
            {"name": "u2", "type": ["null", {"type": "array", "items": "c.Inner"}, "string"]},
        ],
    }
    inner = {"inner": {"x": 3}, "lst": [], "e": "A", "u": None, "plain": {"p": "A"}, "u2": None}
    recs = [
        {"inner": {"x": 1}, "lst": [{"x": 2}], "e": "B", "u": inner, "plain": {"p": "B"},
         "u2": [{"x": 5}]},
        {"inner": {"x": 1}, "lst": [], "e": "A", "u": "B", "plain": {"p": "B"}, "u2": "s"},
    ]  # fmt: skip
    roundtrip(schema, recs)


def test_to_arrow_matches_to_pylist() -> None:
    pa = pytest.importorskip("pyarrow")
    batch = roundtrip(ORDER, [order(i) for i in range(6)])
    table = batch.to_arrow()
    assert isinstance(table, pa.RecordBatch) and table.num_rows == 6
    assert table.column("id").to_pylist() == list(range(6))
    assert table.column("address").to_pylist()[2] == {"city": "Baku", "zip": 1002}
    assert table.column("status").to_pylist()[:3] == ["NEW", "PAID", "SHIPPED"]


def test_nested_zero_size_items_share_one_budget() -> None:
    schema = {"type": "array", "items": {"type": "array", "items": "null"}}
    # 3 outer items of 2^23 empty items each: over the per-payload budget of 2^24
    payload = zigzag(3) + (zigzag(2**23) + zigzag(0)) * 3 + zigzag(0)
    batch = AvroDecoder(schema).decode([payload])
    assert batch.num_rows == 0 and "block count" in batch.errors[0].reason


def test_reader_only_defaults_of_every_shape() -> None:
    writer = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}
    reader = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "a", "type": "int"},
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y"]}, "default": "Y"},
            {"name": "fx", "type": {"type": "fixed", "name": "F", "size": 2}, "default": "\u00ff\u0001"},
            {"name": "by", "type": "bytes", "default": "\u0000a"},
            {"name": "arr", "type": {"type": "array", "items": "long"}, "default": [1, 2]},
            {"name": "m", "type": {"type": "map", "values": "string"}, "default": {"k": "v"}},
            {"name": "rec", "type": {"type": "record", "name": "S", "fields": [
                {"name": "x", "type": "double", "default": 0.5}, {"name": "y", "type": "string"}]},
             "default": {"y": "why"}},
            {"name": "u", "type": ["string", "null"], "default": "first branch"},
            {"name": "obj", "type": ["null", "int", "string"], "default": None},
            {"name": "f", "type": "float", "default": 1},
        ],
    }  # fmt: skip
    batch = AvroDecoder(reader, writer_schema=writer).decode([zigzag(5)])
    assert batch.errors == []
    assert batch.to_pylist() == [
        {
            "a": 5, "e": "Y", "fx": b"\xff\x01", "by": b"\x00a", "arr": [1, 2], "m": {"k": "v"},
            "rec": {"x": 0.5, "y": "why"}, "u": "first branch", "obj": None, "f": 1.0,
        }
    ]  # fmt: skip


def test_one_decoder_from_several_threads() -> None:
    import threading

    dec = AvroDecoder(ORDER)
    good = [encode(ORDER, order(i)) for i in range(2000)]
    payloads = [p if i % 50 else p[:-1] for i, p in enumerate(good)]  # some bad rows
    expected = dec.decode(payloads).to_pylist()
    results: list[Any] = []

    def work() -> None:
        batch = None
        for _ in range(20):
            batch = dec.decode(payloads, out=batch)
        results.append((batch.to_pylist(), len(batch.errors)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(expected, 40)] * 4


def test_object_value_fastavro_cannot_convert_does_not_fail_the_batch() -> None:
    # a uuid string that is not a UUID, inside a general union (OBJECT column)
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "u", "type": ["null", "int", {"type": "string", "logicalType": "uuid"}]}
        ],
    }
    payload = zigzag(2) + zigzag(3) + b"xyz"
    batch = AvroDecoder(schema).decode([payload, zigzag(1) + zigzag(4)])
    assert batch.to_pylist() == [{"u": "xyz"}, {"u": 4}]
