"""PostgresSink with Protobuf batches: the same contract as Avro (layout -> columns -> COPY)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import kfast
from kfast.errors import PermanentSinkError
from kfast.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

F = descriptor_pb2.FieldDescriptorProto


def _order_class() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(name="kfsink.proto", package="kfsink", syntax="proto3")
    en = fdp.enum_type.add(name="Status")
    en.value.add(name="NEW", number=0)
    en.value.add(name="PAID", number=1)
    en.value.add(name="REFUNDED", number=9)
    addr = fdp.message_type.add(name="Address")
    addr.field.add(name="city", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    m = fdp.message_type.add(name="Order")
    for name, num, typ in [
        ("id", 1, F.TYPE_INT64),
        ("qty", 2, F.TYPE_SINT32),
        ("name", 3, F.TYPE_STRING),
        ("price", 4, F.TYPE_DOUBLE),
        ("ok", 5, F.TYPE_BOOL),
        ("raw", 9, F.TYPE_BYTES),
        ("f", 10, F.TYPE_FLOAT),
        ("big", 11, F.TYPE_UINT64),
        ("small", 12, F.TYPE_FIXED32),
    ]:
        m.field.add(name=name, number=num, type=typ, label=F.LABEL_OPTIONAL)
    m.field.add(name="items", number=6, type=F.TYPE_INT32, label=F.LABEL_REPEATED)
    m.field.add(
        name="status",
        number=7,
        type=F.TYPE_ENUM,
        type_name=".kfsink.Status",
        label=F.LABEL_OPTIONAL,
    )
    m.field.add(
        name="address",
        number=8,
        type=F.TYPE_MESSAGE,
        type_name=".kfsink.Address",
        label=F.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("kfsink.Order"))


DDL = (
    "CREATE TABLE {t} (id bigint, qty integer, name text, price float8, ok boolean, raw bytea, "
    "f real, big numeric, small bigint, items integer[], status text, address_city text)"
)


def test_protobuf_batch_round_trips(pg_dsn: str) -> None:
    Order = _order_class()
    msgs = []
    for i in range(50):
        o = Order(
            id=i * 10**12,
            qty=-i,
            name=f"n{i} ü",
            price=i / 3,
            ok=i % 2 == 0,
            raw=bytes([i]),
            f=i / 4,
            big=2**64 - 1 - i if i % 2 else i,
            small=2**32 - 1 - i,
            items=list(range(i % 5)),
            status=[0, 1, 9, 7][i % 4],  # 7: an unknown number (open enum)
        )
        if i % 3:
            o.address.city = f"city{i}"
        msgs.append(o.SerializeToString())
    batch = kfast.ProtobufDecoder(Order).decode(msgs)
    assert batch.num_rows == 50
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS pb_orders")
        c.execute(DDL.format(t="pb_orders"))
        sink = PostgresSink(pg_dsn, "pb_orders")
        sink.write(batch)
        sink.close()
        cur = c.execute("SELECT * FROM pb_orders ORDER BY id")
        names = [d.name for d in cur.description]
        got = [dict(zip(names, r)) for r in cur.fetchall()]
    want = batch.to_pylist()
    for g, w in zip(got, want):
        addr = w.pop("address")
        w["address_city"] = None if addr is None else addr["city"]
        w["status"] = str(w["status"])  # unknown numbers are written as their digits
        for k, v in w.items():
            assert g[k] == v, (k, g[k], v)


def test_uint64_above_bigint_range_is_permanent(pg_dsn: str) -> None:
    Order = _order_class()
    batch = kfast.ProtobufDecoder(Order).decode(
        [Order(id=1, big=5).SerializeToString(), Order(id=2, big=2**63).SerializeToString()]
    )
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS pb_big")
        c.execute("CREATE TABLE pb_big (id bigint, big bigint)")
    cols: dict[str, str | None] = {
        k: None
        for k in (
            "qty",
            "name",
            "price",
            "ok",
            "raw",
            "f",
            "small",
            "items",
            "status",
            "address.city",
        )
    }
    sink = PostgresSink(pg_dsn, "pb_big", columns=cols)
    with pytest.raises(PermanentSinkError, match="'big'"):
        sink.write(batch)
    sink.write(batch.slice(0, 1))
    sink.close()
