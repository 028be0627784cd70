"""The Arrow PyCapsule export of a Batch (kfast._arrow_c), differentially.

Oracle: ``batch.to_pylist()`` (itself checked against fastavro and google's
runtime elsewhere), mapped through the documented Arrow type mapping
(docs/batch.md), must equal what pyarrow, polars and DuckDB read from the
capsules. pyarrow's full validation checks every exported buffer.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import struct
import sys
import threading
import uuid
from decimal import Decimal
from typing import Any

import duckdb
import nanoarrow as na
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from _protobuf_support import compiled, payloads
from avro_helpers import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_avro_decode import ORDER, order
from test_avro_properties import schemas, values

from kfast.avro import AvroDecoder
from kfast.protobuf import ProtobufDecoder

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
UTC = dt.timezone.utc


# ---------------------------------------------------------------- the documented mapping


def _json_text(v: Any) -> str:
    def default(x: Any) -> Any:
        return x.decode("latin-1") if isinstance(x, bytes) else str(x)

    return json.dumps(v, default=default)


def documented(v: Any, t: pa.DataType) -> Any:
    """A ``to_pylist()`` value as Arrow holds it (docs/batch.md, type mapping)."""
    if v is None:
        return None
    if pa.types.is_dictionary(t):
        return str(v)  # an unknown enum number is a dictionary entry of its text
    if pa.types.is_string(t):
        if isinstance(v, uuid.UUID):
            return str(v)
        if not isinstance(v, str):
            return _json_text(v)  # recursive shapes
        return v
    if pa.types.is_struct(t):
        return {t.field(i).name: documented(v[t.field(i).name], t.field(i).type)
                for i in range(t.num_fields)}  # fmt: skip
    if pa.types.is_map(t):
        return {k: documented(x, t.item_type) for k, x in v.items()}
    if pa.types.is_list(t):
        return [documented(x, t.value_type) for x in v]
    if pa.types.is_union(t):
        for i in range(t.num_fields):
            f = t.field(i)
            try:
                if pa.array([documented(v, f.type)], type=f.type).to_pylist()[0] == v:
                    return documented(v, f.type)
            except (pa.ArrowException, TypeError, OverflowError, ValueError):
                continue
        return v
    return v


def norm(v: Any) -> Any:
    """NaN comparable, -0.0 distinct, aware datetimes by instant."""
    if isinstance(v, float):
        return ("nan",) if math.isnan(v) else ("f", struct.pack("<d", v))
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        return ("ts", v.astimezone(UTC))
    return v


def _has_union(t: pa.DataType) -> bool:
    if pa.types.is_union(t):
        return True
    return any(_has_union(t.field(i).type) for i in range(getattr(t, "num_fields", 0)))


def check(batch: Any) -> pa.Table:
    """pa.table(batch) == the documented form of batch.to_pylist()."""
    rows = batch.to_pylist()
    table = pa.table(batch)
    table.validate(full=True)
    assert table.num_rows == batch.num_rows == len(rows)
    if table.num_columns == 0:
        assert rows == [{}] * table.num_rows
        return table
    expected = [{f.name: documented(r[f.name], f.type) for f in table.schema} for r in rows]
    got = table.to_pylist(maps_as_pydicts="strict")
    assert norm(got) == norm(expected)
    if not any(_has_union(f.type) for f in table.schema):
        # pyarrow builds unions from no Python values; everything else round-trips
        rebuilt = pa.Table.from_pylist(expected, schema=table.schema)
        assert norm(rebuilt.to_pylist(maps_as_pydicts="strict")) == norm(got)
    # the record batch, the stream and the schema capsule agree
    assert norm(pa.record_batch(batch).to_pylist(maps_as_pydicts="strict")) == norm(got)
    assert batch.to_arrow().schema == table.schema
    assert pa.schema(batch) == table.schema
    return table


# ---------------------------------------------------------------- Avro


@SETTINGS
@given(st.data())
def test_random_avro_schemas(data: Any) -> None:
    schema = data.draw(schemas())
    records = data.draw(st.lists(values(schema), min_size=0, max_size=6))
    batch = AvroDecoder(schema).decode([encode(schema, r) for r in records])
    assert batch.errors == []
    check(batch)


MIXED = {
    "type": "record",
    "name": "Mixed",
    "fields": [
        {"name": "choice", "type": ["null", "int", "string", {"type": "array", "items": "long"}]},
        {"name": "many", "type": {"type": "array", "items": ["int", "string", "double"]}},
        {"name": "either", "type": ["long", {"type": "record", "name": "R", "fields": [
            {"name": "x", "type": ["null", "boolean", "bytes"]}]}]},
        {"name": "next", "type": ["null", "Mixed"], "default": None},
        {"name": "kv", "type": {"type": "map", "values": ["null", "float", "string"]}},
    ],
}  # fmt: skip


def test_multi_type_unions_are_dense_unions() -> None:
    recs = [
        {"choice": 5, "many": [1, "a", 2.5], "either": 7, "next": None, "kv": {"a": 1.5}},
        {"choice": "s", "many": [], "either": {"x": True}, "kv": {"b": None, "c": "t"},
         "next": {"choice": None, "many": ["z"], "either": {"x": b"\x00\xff"}, "next": None,
                  "kv": {}}},
        {"choice": [1, 2], "many": [3.0], "either": {"x": None}, "next": None, "kv": {}},
        {"choice": None, "many": ["only"], "either": -1, "next": None, "kv": {}},
    ]  # fmt: skip
    batch = AvroDecoder(MIXED).decode([encode(MIXED, r) for r in recs])
    table = check(batch)
    choice = table.schema.field("choice").type
    assert pa.types.is_union(choice) and choice.mode == "dense"
    assert [choice.field(i).name for i in range(choice.num_fields)] == [
        "null", "int", "string", "array"]  # fmt: skip
    assert table.column("choice").to_pylist() == [5, "s", [1, 2], None]
    assert pa.types.is_union(table.schema.field("many").type.value_type)
    assert pa.types.is_string(table.schema.field("next").type)  # recursive -> JSON text
    assert json.loads(table.column("next")[1].as_py())["many"] == ["z"]


ALL = {
    "type": "record",
    "name": "All",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "b", "type": "boolean"},
        {"name": "ob", "type": ["null", "boolean"]},
        {"name": "f", "type": "float"},
        {"name": "by", "type": "bytes"},
        {"name": "fx", "type": {"type": "fixed", "name": "F4", "size": 4}},
        {"name": "date", "type": {"type": "int", "logicalType": "date"}},
        {"name": "tms", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "tus", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "tsus", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "ltms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "dec", "type": {"type": "bytes", "logicalType": "decimal", "precision": 20,
                                 "scale": 3}},
        {"name": "big", "type": {"type": "bytes", "logicalType": "decimal", "precision": 60,
                                 "scale": 0}},
        {"name": "fdec", "type": {"type": "fixed", "name": "D8", "size": 8,
                                  "logicalType": "decimal", "precision": 18, "scale": 2}},
        {"name": "u", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "e", "type": ["null", {"type": "enum", "name": "E", "symbols": ["A", "B"]}]},
        {"name": "m", "type": {"type": "map", "values": ["null", "long"]}},
        {"name": "opt", "type": ["null", {"type": "record", "name": "O", "fields": [
            {"name": "k", "type": "string"}, {"name": "v", "type": ["null", "double"]}]}]},
        {"name": "ll", "type": {"type": "array", "items": {"type": "array", "items": "int"}}},
    ],
}  # fmt: skip


def all_record(i: int) -> dict[str, Any]:
    return {
        "n": None,
        "b": i % 3 == 0,
        "ob": None if i % 4 == 0 else i % 2 == 0,
        "f": float("nan") if i == 5 else i / 3,
        "by": bytes(range(i % 7)),
        "fx": struct.pack("<i", i),
        "date": dt.date(2024, 1, 1) + dt.timedelta(days=i),
        "tms": dt.time(1, 2, 3, (i % 1000) * 1000),
        "tus": dt.time(23, 59, 59, i % 1000000),
        "tsus": dt.datetime(2024, 5, 1, tzinfo=UTC) + dt.timedelta(microseconds=i * 7919),
        "ltms": dt.datetime(2001, 2, 3) + dt.timedelta(milliseconds=i),
        "dec": Decimal(i * 1000003 - 500000) / 1000,
        "big": Decimal(-(10**55) + i if i % 2 else 10**59 - i),
        "fdec": Decimal(-i * 12345) / 100,
        "u": uuid.UUID(int=i * 2**100 + i),
        "e": None if i % 5 == 0 else "AB"[i % 2],
        "m": {f"k{j}": (None if j == 1 else j * i) for j in range(i % 3)},
        "opt": None if i % 3 == 1 else {"k": f"k{i}", "v": None if i % 2 else i * 0.5},
        "ll": [[j] * j for j in range(i % 4)],
    }


def test_every_avro_type_maps_as_documented() -> None:
    batch = AvroDecoder(ALL).decode([encode(ALL, all_record(i)) for i in range(40)])
    table = check(batch)
    types = {f.name: f.type for f in table.schema}
    assert types["n"] == pa.null()
    assert types["b"] == pa.bool_() and types["ob"] == pa.bool_()
    assert types["fx"] == pa.binary()
    assert types["date"] == pa.date32() and types["tms"] == pa.time32("ms")
    assert types["tus"] == pa.time64("us") and types["tsus"] == pa.timestamp("us", tz="UTC")
    assert types["ltms"] == pa.timestamp("ms")
    assert types["dec"] == pa.decimal128(20, 3) and types["big"] == pa.decimal256(60, 0)
    assert types["fdec"] == pa.decimal128(18, 2)
    assert types["u"] == pa.string()
    assert types["e"] == pa.dictionary(pa.int32(), pa.string())
    assert types["m"] == pa.map_(pa.string(), pa.int64())
    assert pa.types.is_struct(types["opt"]) and table.column("opt").null_count == 13


def test_empty_batch_and_no_columns() -> None:
    table = check(AvroDecoder(ALL).decode([]))
    assert table.num_rows == 0 and table.num_columns == len(ALL["fields"])
    empty = {"type": "record", "name": "Z", "fields": []}
    assert check(AvroDecoder(empty).decode([b"", b""])).num_rows == 2


# ---------------------------------------------------------------- Protobuf

pb3 = compiled("kfpb3")
pb2 = compiled("kfpb2")
pbed = compiled("kfpbed")


@pytest.mark.parametrize(
    "cls",
    [pb3.Everything, pb3.Scalars, pb3.Optionals, pb3.Repeateds, pb3.Maps, pb3.Tree, pb3.Mid,
     pb2.P2, pbed.Ed],
    ids=lambda c: c.DESCRIPTOR.full_name,
)  # fmt: skip
def test_protobuf_test_types(cls: Any) -> None:
    dec = ProtobufDecoder(cls)

    @settings(SETTINGS, max_examples=10)
    @given(st.lists(payloads(cls.DESCRIPTOR), min_size=0, max_size=6))
    def run(blobs: list[bytes]) -> None:
        batch = dec.decode(blobs)
        check(batch)

    run()


def test_protobuf_unknown_enum_numbers_are_dictionary_text() -> None:
    m = pb3.Scalars(f_enum=pb3.GREEN)
    raw = m.SerializeToString()
    unknown = pb3.Scalars()
    unknown.ParseFromString(raw.replace(b"\x70\x02", b"\x70\x2a"))  # field 14 = 42
    batch = ProtobufDecoder(pb3.Scalars).decode([raw, unknown.SerializeToString(), b""])
    assert [r["f_enum"] for r in batch.to_pylist()] == ["GREEN", 42, "COLOR_UNSPECIFIED"]
    table = check(batch)
    assert table.column("f_enum").to_pylist() == ["GREEN", "42", "COLOR_UNSPECIFIED"]


# ---------------------------------------------------------------- other readers


def test_polars_and_duckdb_read_the_same_values() -> None:
    batch = AvroDecoder(ORDER).decode([encode(ORDER, order(i)) for i in range(50)])
    table = pa.table(batch)
    expected = table.to_pylist()

    frame = pl.DataFrame(batch)
    assert frame.columns == table.column_names
    assert frame.to_dicts() == expected

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        rel = con.sql("SELECT id, sku, price, qty, paid, epoch_ms(ts) AS ts, status::VARCHAR AS "
                      "status, note, tags, address FROM batch ORDER BY id")  # fmt: skip
        rows = rel.fetchall()
    finally:
        con.close()
    assert [
        {"id": r[0], "sku": r[1], "price": r[2], "qty": r[3], "paid": r[4], "status": r[6],
         "note": r[7], "tags": r[8], "address": r[9]} for r in rows
    ] == [{k: v for k, v in e.items() if k != "ts"} for e in expected]  # fmt: skip
    assert [r[5] for r in rows] == [int(e["ts"].timestamp() * 1000) for e in expected]


def test_nanoarrow_reads_the_same_values_over_both_interfaces() -> None:
    batch = AvroDecoder(ORDER).decode([encode(ORDER, order(i)) for i in range(50)])
    expected = pa.table(batch).to_pylist()

    def same_instant(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # nanoarrow gives datetime.timezone.utc, pyarrow zoneinfo UTC: compare the instant
        return [{**r, "ts": r["ts"].timestamp()} for r in rows]

    over_stream = [row for chunk in na.ArrayStream(batch) for row in chunk.iter_py()]
    over_array = list(na.Array(na.c_array(batch)).iter_py())
    assert same_instant(over_stream) == same_instant(expected)
    assert same_instant(over_array) == same_instant(expected)
    assert na.c_schema(batch).n_children == pa.table(batch).num_columns


# ---------------------------------------------------------------- zero copy, lifetime, memory


def test_buffers_are_shared_not_copied() -> None:
    batch = AvroDecoder(ORDER).decode([encode(ORDER, order(i)) for i in range(20)])
    rb = pa.record_batch(batch)
    ids = np.asarray(batch.column("id"))
    assert rb.column("id").buffers()[1].address == ids.ctypes.data
    sku = batch.column("sku")
    assert rb.column("sku").buffers()[2].address == np.frombuffer(sku.values, np.uint8).ctypes.data
    tags = batch.column("tags")
    assert (
        rb.column("tags").buffers()[1].address == np.frombuffer(tags.offsets, np.int32).ctypes.data
    )
    del ids, sku, tags


def test_recycling_refuses_while_an_export_is_alive() -> None:
    dec = AvroDecoder(ORDER)
    payloads = [encode(ORDER, order(i)) for i in range(10)]
    batch = dec.decode(payloads)
    for export in (
        lambda b: pa.table(b),
        lambda b: pl.DataFrame(b),
        lambda b: b.__arrow_c_stream__(),  # never consumed
        lambda b: b.__arrow_c_array__(),
        lambda b: pa.table(b).column("tags").chunk(0).values,  # a child outliving its parent
    ):
        held = export(batch)
        with pytest.raises(BufferError, match="Arrow arrays"):
            dec.decode(payloads, out=batch)
        del held
        gc.collect()
        assert dec.decode(payloads, out=batch) is batch


def test_an_export_keeps_its_batch_alive_and_releases_from_any_thread() -> None:
    dec = AvroDecoder(ORDER)
    table = pa.table(dec.decode([encode(ORDER, order(i)) for i in range(30)]))
    gc.collect()
    assert table.column("sku").to_pylist() == [f"SKU-{i:05d}" for i in range(30)]
    holder = [table]
    del table
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    assert holder == []


def _blocks_for_export(rows: int) -> int:
    recs = [all_record(i) for i in range(rows)]
    batch = AvroDecoder(ALL).decode([encode(ALL, r) for r in recs])
    gc.collect()
    before = sys.getallocatedblocks()
    rb = pa.record_batch(batch)
    stream = batch.__arrow_c_stream__()
    after = sys.getallocatedblocks()
    assert rb.num_rows == rows
    del rb, stream
    return after - before


def test_export_allocates_no_python_object_per_value() -> None:
    _blocks_for_export(10)  # warm up pyarrow's caches
    small = _blocks_for_export(10)
    large = _blocks_for_export(5000)
    assert abs(large - small) <= 5, (small, large)


def test_binary_columns_refuse_numpy_with_a_clear_error() -> None:
    batch = AvroDecoder(ORDER).decode([encode(ORDER, order(i)) for i in range(3)])
    for name in ("sku", "tags", "note"):
        with pytest.raises(TypeError, match="use .offsets"):
            np.asarray(batch.column(name))
    with pytest.raises(BufferError, match="use .offsets"):
        memoryview(batch.column("sku"))
    assert np.asarray(batch.column("price")).tolist() == [0.0, 1.25, 2.5]
    assert np.asarray(batch.column("qty"), dtype=np.int64).dtype == np.int64
    offsets = np.frombuffer(batch.column("sku").offsets, np.int32)
    assert bytes(batch.column("sku").values[offsets[1] : offsets[2]]) == b"SKU-00001"
