"""Protobuf well-known types as real columns: Timestamp, Duration, wrappers, Struct/Value."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa
from _protobuf_support import compiled
from google.protobuf import json_format
from test_arrow_export import check

from kfast.protobuf import ProtobufDecoder

wkt = compiled("kfwkt")
UTC = dt.timezone.utc
WRAPPERS = ("count", "label", "flag", "score", "blob", "u32", "f32", "i32", "u64")


def _msg(i: int) -> Any:
    m = wkt.Wkt()
    if i % 4 != 3:
        m.created.FromDatetime(dt.datetime(2024, 1, 1) + dt.timedelta(seconds=i * 3601))
        m.created.nanos = i * 1234567 % 1000000000
    if i % 3:
        m.took.seconds = -i if i % 2 else i
        m.took.nanos = -(i * 999) if i % 2 else i * 999
    if i % 2:
        m.count.value = i * 10**12
        m.label.value = f"l{i}"
        m.flag.value = i % 3 == 0
        m.score.value = i / 7
        m.blob.value = bytes([i])
        m.u32.value = 2**32 - i
        m.f32.value = 0.5 * i
        m.i32.value = -i
        m.u64.value = 2**64 - i
    elif i % 4 == 0:
        m.count.value = 0  # present, default value: still not null
    if i % 5 != 4:
        m.attrs.update({"n": i, "tags": ["a", i], "sub": {"x": None}})
        m.any_value.number_value = i
        m.items.extend([i, "s", True])
    for k in range(i % 3):
        m.times.add(seconds=10**9 + k, nanos=k * 1000)
        m.stamps[f"k{k}"].seconds = k
        m.holders.add(note=f"h{k}").at.seconds = k * 60
    if i % 2:
        m.holder.note = "n"
        m.holder.at.seconds = i
    return m


def _ts(t: Any) -> dt.datetime:
    return t.ToDatetime(tzinfo=UTC)


def expected(m: Any) -> dict[str, Any]:
    """The documented to_pylist() form, from google's own conversions."""

    def has(name: str) -> bool:
        return m.HasField(name)

    row: dict[str, Any] = {
        "created": _ts(m.created) if has("created") else None,
        "took": m.took.ToTimedelta() if has("took") else None,
    }
    for name in WRAPPERS[:8]:
        row[name] = getattr(m, name).value if has(name) else None
    row["attrs"] = json_format.MessageToDict(m.attrs) if has("attrs") else None
    row["any_value"] = json_format.MessageToDict(m.any_value) if has("any_value") else None
    row["items"] = json_format.MessageToDict(m.items) if has("items") else None
    row["times"] = [_ts(t) for t in m.times]
    row["holder"] = {"at": _ts(m.holder.at) if m.holder.HasField("at") else None,
                     "note": m.holder.note} if has("holder") else None  # fmt: skip
    row["stamps"] = {k: _ts(v) for k, v in m.stamps.items()}
    row["u64"] = m.u64.value if has("u64") else None
    row["holders"] = [{"at": _ts(h.at) if h.HasField("at") else None, "note": h.note}
                      for h in m.holders]  # fmt: skip
    order = [f.name for f in wkt.Wkt.DESCRIPTOR.fields]
    return {k: row[k] for k in order}


def test_well_known_types_are_typed_columns() -> None:
    msgs = [_msg(i) for i in range(24)]
    batch = ProtobufDecoder(wkt.Wkt).decode([m.SerializeToString() for m in msgs] + [b"\x0a"])
    assert len(batch.errors) == 1
    assert batch.to_pylist() == [expected(m) for m in msgs]
    assert batch.column("created").kind == "int64"
    assert batch.column("took").kind == "int64"
    assert batch.column("label").kind == "binary" and batch.column("label").nullable
    assert batch.column("count").to_pylist()[:4] == [0, 10**12, None, 3 * 10**12]
    assert batch.column("times.item").kind == "int64"
    assert "created.seconds" not in batch.column_names
    assert {"created", "took", "attrs", "times", "holder.at"} <= set(batch.column_names)

    table = pa.table(batch)
    types = {f.name: f.type for f in table.schema}
    assert types["created"] == pa.timestamp("us", tz="UTC")
    assert types["took"] == pa.duration("us")
    assert types["count"] == pa.int64() and types["u64"] == pa.uint64()
    assert types["label"] == pa.string() and types["blob"] == pa.binary()
    assert types["attrs"] == pa.string()  # JSON text
    assert types["stamps"] == pa.map_(pa.string(), pa.timestamp("us", tz="UTC"))
    assert json.loads(table.column("attrs")[0].as_py()) == {
        "n": 0,
        "tags": ["a", 0],
        "sub": {"x": None},
    }
    assert table.column("any_value")[1].as_py() == "1.0"
    # everything but the JSON-valued columns follows the general mapping
    check(batch)


def test_slices_and_recycling_keep_derived_columns() -> None:
    dec = ProtobufDecoder(wkt.Wkt)
    msgs = [_msg(i) for i in range(12)]
    batch = dec.decode([m.SerializeToString() for m in msgs])
    assert batch.slice(5, 9).to_pylist() == [expected(m) for m in msgs[5:9]]
    batch = dec.decode([m.SerializeToString() for m in msgs[:3]], out=batch)
    assert batch.to_pylist() == [expected(m) for m in msgs[:3]]


def test_negative_durations_round_toward_zero() -> None:
    m = wkt.Wkt()
    m.took.seconds = -1
    m.took.nanos = -500000001
    m.created.seconds = -1
    m.created.nanos = 999999999
    row = ProtobufDecoder(wkt.Wkt).decode([m.SerializeToString()]).to_pylist()[0]
    assert row["took"] == m.took.ToTimedelta() == -dt.timedelta(microseconds=1500000)
    assert row["created"] == dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
