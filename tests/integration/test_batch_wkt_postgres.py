"""Protobuf well-known types from a Kafka topic into PostgreSQL as typed columns.

A Pipeline with ``create_table=True`` reads a topic of messages carrying a
Timestamp, a Duration, wrappers and a Struct; the table it creates has
timestamptz, interval, nullable bigint/text/boolean and jsonb columns holding
the values google's runtime gives for the same messages.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from runtime_util import Runner, wait_until

import kfast
from kfast.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

F = descriptor_pb2.FieldDescriptorProto
UTC = dt.timezone.utc


def _event_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    for mod in (timestamp_pb2, duration_pb2, wrappers_pb2, struct_pb2):
        pool.AddSerializedFile(mod.DESCRIPTOR.serialized_pb)
    fdp = descriptor_pb2.FileDescriptorProto(
        name="kfwkt_event.proto",
        package="kfwkt",
        syntax="proto3",
        dependency=[
            "google/protobuf/timestamp.proto",
            "google/protobuf/duration.proto",
            "google/protobuf/wrappers.proto",
            "google/protobuf/struct.proto",
        ],
    )
    m = fdp.message_type.add(name="Event")
    m.field.add(name="id", number=1, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    for name, num, wkt in [
        ("at", 2, "Timestamp"),
        ("took", 3, "Duration"),
        ("count", 4, "Int64Value"),
        ("label", 5, "StringValue"),
        ("attrs", 6, "Struct"),
        ("flag", 7, "BoolValue"),
    ]:
        m.field.add(name=name, number=num, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=f".google.protobuf.{wkt}")  # fmt: skip
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("kfwkt.Event"))


def _event(cls: Any, i: int) -> Any:
    e = cls(id=i)
    if i % 5:
        e.at.FromDatetime(dt.datetime(2024, 3, 1) + dt.timedelta(seconds=i, microseconds=i))
    if i % 3:
        e.took.FromTimedelta(dt.timedelta(hours=i, microseconds=-i))
    if i % 2:
        e.count.value = i * 10**10
        e.label.value = f"label {i}"
        e.flag.value = i % 4 == 1
    if i % 7:
        e.attrs.update({"i": i, "tags": ["x", i], "nested": {"ok": i % 2 == 0}})
    return e


def test_well_known_types_land_as_typed_columns(
    kafka_broker: Any, unique_topic: str, pg_dsn: str
) -> None:
    cls = _event_class()
    events = [_event(cls, i) for i in range(60)]
    kafka_broker.create_topic(unique_topic, partitions=1)
    kafka_broker.produce(unique_topic, [e.SerializeToString() for e in events], partition=0)
    table = "wkt_" + unique_topic.replace("-", "_").replace(".", "_")
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
    pipe = kfast.Pipeline(
        kafka={
            "bootstrap.servers": kafka_broker.bootstrap,
            "group.id": unique_topic,
            "auto.offset.reset": "earliest",
        },
        topics=[unique_topic],
        decoder=kfast.ProtobufDecoder(cls),
        sink=PostgresSink(pg_dsn, table, create_table=True),
        batch=kfast.BatchPolicy(max_rows=25, max_wait=0.05),
        install_signal_handlers=False,
    )

    def count() -> int:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            if c.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                return 0
            return int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    runner = Runner(pipe)
    try:
        wait_until(lambda: count() >= len(events), 90, "every event in PostgreSQL")
    finally:
        runner.stop()

    with psycopg.connect(pg_dsn, autocommit=True) as c:
        types = dict(c.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s", (table,)).fetchall())  # fmt: skip
        rows = c.execute(
            f"SELECT id, at, took, count, label, attrs, flag FROM {table} ORDER BY id"
        ).fetchall()
    assert types == {
        "id": "bigint",
        "at": "timestamp with time zone",
        "took": "interval",
        "count": "bigint",
        "label": "text",
        "attrs": "jsonb",
        "flag": "boolean",
    }
    assert len(rows) == len(events)
    for e, (id_, at, took, cnt, label, attrs, flag) in zip(events, rows):
        assert id_ == e.id
        assert at == (e.at.ToDatetime(tzinfo=UTC) if e.HasField("at") else None)
        assert took == (e.took.ToTimedelta() if e.HasField("took") else None)
        assert cnt == (e.count.value if e.HasField("count") else None)
        assert label == (e.label.value if e.HasField("label") else None)
        assert flag == (e.flag.value if e.HasField("flag") else None)
        want = json_format.MessageToDict(e.attrs) if e.HasField("attrs") else None
        assert (json.loads(attrs) if isinstance(attrs, str) else attrs) == want
