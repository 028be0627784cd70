"""ConfluentDecoder inside a real Pipeline gives the rows ``ConfluentDecoder.decode`` gives.

The ring hands the decoder spans of its arena (``decode_spans``), not Python payloads, so every
decision ``ConfluentDecoder`` makes (registry lookups, writer-schema resolution per id, Avro or
Protobuf per batch, per-row errors) must happen at that level too. Each test produces framed
values to a real broker (one partition: the pipeline sees them in order), runs a Pipeline with a
recording sink and a DLQ, and compares every message with a direct ``decode`` of all values by a
fresh decoder: good rows must be the same dicts, bad ones must be dead letters whose
``kfast.error.message`` is the same RowError reason and whose ``kfast.schema.id`` is the frame's.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from _sink_helpers import consume_all
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from runtime_util import Runner, wait_until

import kfast
from kfast.confluent import ConfluentDecoder
from kfast.sinks import CallableSink

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # authlib's httpx deprecation notice on import
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

pytestmark = pytest.mark.integration

V1 = {
    "type": "record",
    "name": "Order",
    "fields": [{"name": "id", "type": "long"}, {"name": "sku", "type": "string"}],
}
V2 = {
    "type": "record",
    "name": "Order",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "sku", "type": "string"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}
PROTO_V1 = """
syntax = "proto3";
package kfpipe;
message Order { int64 id = 1; string sku = 2; }
"""
PROTO_V2 = """
syntax = "proto3";
package kfpipe;
message Order { int64 id = 1; string sku = 2; double price = 3; }
"""
UNKNOWN_ID = 4_040_404


def _registry() -> Any:
    return SchemaRegistryClient.new_client({"url": f"mock://kfast-pipe-{uuid.uuid4().hex}"})


def _avro(schema_id: int, schema: Any, record: Any) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def _order_class(with_price: bool) -> Any:
    """kfpipe.Order (PROTO_V1 or PROTO_V2) as a generated class, for the writer side."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"kfpipe_{int(with_price)}.proto", package="kfpipe", syntax="proto3"
    )
    m = fdp.message_type.add(name="Order")
    m.field.add(name="id", number=1, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    m.field.add(name="sku", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    if with_price:
        m.field.add(name="price", number=3, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("kfpipe.Order"))


def _proto(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + b"\x00" + body  # path [0]: Order


class _Rows:
    """Recording sink: message key -> row dict, for every row written."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[bytes, dict[str, Any]] = {}
        self.columns: set[tuple[str, ...]] = set()

    def __call__(self, batch: Any) -> None:
        recs = batch.context.records
        src = memoryview(batch.source_indices).tolist()
        rows = batch.to_pylist()
        with self.lock:
            self.columns.add(tuple(batch.column_names))
            for j, row in zip(src, rows):
                self.rows[recs.key(j)] = row

    def count(self) -> int:
        with self.lock:
            return len(self.rows)


def _check_pipeline_matches_decode(
    kafka_broker: Any,
    topic: str,
    group: str,
    make_decoder: Callable[[], Any],
    values: list[bytes],
    max_rows: int = 40,
) -> tuple[dict[bytes, dict[str, Any]], dict[bytes, dict[str, bytes]]]:
    """Run ``values`` through a Pipeline and through ``make_decoder().decode``; assert
    both agree message by message; return (rows by key, DLQ headers by key)."""
    keys = [str(i).encode() for i in range(len(values))]
    direct = make_decoder().decode(values)
    want_rows = {keys[j]: row for j, row in zip(direct.source_indices, direct.to_pylist())}
    want_errors = {keys[e.index]: e.reason for e in direct.errors}
    assert len(want_rows) + len(want_errors) == len(values)

    dlq = topic + ".dlq"
    kafka_broker.create_topic(topic, partitions=1)
    kafka_broker.create_topic(dlq, partitions=1)
    kafka_broker.produce(topic, values, keys=keys, partition=0)
    sink = _Rows()
    pipe = kfast.Pipeline(
        kafka={
            "bootstrap.servers": kafka_broker.bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
        },
        topics=[topic],
        decoder=make_decoder(),
        sink=CallableSink(sink),
        batch=kfast.BatchPolicy(max_rows=max_rows, max_wait=0.05),
        dlq=kfast.DeadLetterPolicy(topic=dlq, max_ratio=1.0, max_consecutive=None),
        memory_limit="64MiB",
        install_signal_handlers=False,
        drain_timeout=20.0,
    )
    runner = Runner(pipe)
    try:
        wait_until(
            lambda: (
                sink.count() + (pipe.metrics().get("delivery") or {}).get("dlq_records", 0)
                >= len(values)
            ),
            90,
            "every message written or dead-lettered",
        )
    finally:
        runner.stop()
    dead = consume_all(kafka_broker.bootstrap, dlq, expected=len(want_errors))
    headers = {m.key(): dict(m.headers()) for m in dead}
    got_errors = {k: h["kfast.error.message"].decode() for k, h in headers.items()}
    assert got_errors == want_errors
    assert sink.rows == want_rows
    assert len(sink.columns) <= 1, sink.columns  # one column layout for the decoder's life
    for k, h in headers.items():
        assert h["kfast.error.stage"] == b"decode"
        assert h["kfast.error.class"] == b"DecodeError"
        assert h["kfast.original.topic"] == topic.encode()
        assert (h["kfast.original.partition"], h["kfast.original.offset"]) == (b"0", k)
        value = values[int(k)]
        framed = len(value) >= 5 and value[0] == 0
        want_id = str(int.from_bytes(value[1:5], "big")).encode() if framed else None
        assert h.get("kfast.schema.id") == want_id, (k, h)
    return sink.rows, headers


def test_avro_versions_unknown_ids_and_corrupt_frames(
    kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    reg = _registry()
    id1 = reg.register_schema(f"{unique_topic}-value", Schema(json.dumps(V1), "AVRO"))
    id2 = reg.register_schema(f"{unique_topic}-value", Schema(json.dumps(V2), "AVRO"))
    lookups: list[int] = []

    class Registry:
        def get_schema(self, schema_id: int) -> Any:
            lookups.append(schema_id)
            return reg.get_schema(schema_id)

        def get_latest_version(self, subject: str) -> Any:
            return reg.get_latest_version(subject)

    values = []
    for i in range(300):
        if i % 37 == 5:
            values.append(_avro(UNKNOWN_ID, V1, {"id": i, "sku": "u"}))
        elif i % 41 == 9:
            values.append(_avro(id1, V1, {"id": i, "sku": "x"})[:-2])  # truncated body
        elif i % 43 == 11:
            values.append(b"\x01" + _avro(id1, V1, {"id": i, "sku": "m"})[1:])  # wrong magic
        elif i % 47 == 13:
            values.append(b"\x00\x00")  # too short for the header
        elif i % 3 == 0:
            values.append(_avro(id2, V2, {"id": i, "sku": f"s{i}", "note": f"n{i}"}))
        else:
            values.append(_avro(id1, V1, {"id": i, "sku": f"s{i}"}))
    # no reader schema: the subject's newest version (V2) defines the columns
    rows, headers = _check_pipeline_matches_decode(
        kafka_broker,
        unique_topic,
        unique_group,
        lambda: ConfluentDecoder(Registry(), subject=f"{unique_topic}-value", max_cached_schemas=1),
        values,
    )
    assert len(rows) > 200 and rows[b"1"] == {"id": 1, "sku": "s1", "note": None}
    reasons = {h["kfast.error.message"].decode() for h in headers.values()}
    assert any(r.startswith(f"unknown schema id {UNKNOWN_ID}") for r in reasons)
    assert {id1, id2, UNKNOWN_ID} <= set(lookups)


def test_avro_reader_schema_resolves_every_version(
    kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    reg = _registry()
    id1 = reg.register_schema(f"{unique_topic}-value", Schema(json.dumps(V1), "AVRO"))
    id2 = reg.register_schema(f"{unique_topic}-value", Schema(json.dumps(V2), "AVRO"))
    values = [
        _avro(id2, V2, {"id": i, "sku": f"s{i}", "note": "n" if i % 4 == 1 else None})
        if i % 2
        else _avro(id1, V1, {"id": i, "sku": f"s{i}"})
        for i in range(120)
    ]
    rows, _ = _check_pipeline_matches_decode(
        kafka_broker, unique_topic, unique_group, lambda: ConfluentDecoder(reg, V2), values
    )
    assert rows[b"2"] == {"id": 2, "sku": "s2", "note": None}
    assert rows[b"5"] == {"id": 5, "sku": "s5", "note": "n"}


def test_protobuf_schemas_from_the_registry(
    kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    reg = _registry()
    id1 = reg.register_schema(f"{unique_topic}-value", Schema(PROTO_V1, "PROTOBUF"))
    id2 = reg.register_schema(f"{unique_topic}-value", Schema(PROTO_V2, "PROTOBUF"))
    assert id1 != id2
    o1, o2 = _order_class(False), _order_class(True)
    values = []
    for i in range(200):
        if i % 31 == 4:
            values.append(_proto(UNKNOWN_ID, o1(id=i).SerializeToString()))
        elif i % 37 == 6:
            values.append(_proto(id1, b"\x12\x05ab"))  # truncated string field
        elif i % 41 == 8:
            values.append(b"\x07" + _proto(id1, b"")[1:])  # wrong magic
        elif i % 2:
            values.append(_proto(id2, o2(id=i, sku=f"s{i}", price=i / 4).SerializeToString()))
        else:
            values.append(_proto(id1, o1(id=i, sku=f"s{i}").SerializeToString()))
    rows, headers = _check_pipeline_matches_decode(
        kafka_broker,
        unique_topic,
        unique_group,
        lambda: ConfluentDecoder(reg, subject=f"{unique_topic}-value"),
        values,
    )
    # the subject's newest version (V2) is the columns' message, whatever arrives first
    assert rows[b"2"] == {"id": 2, "sku": "s2", "price": 0.0}
    assert rows[b"3"] == {"id": 3, "sku": "s3", "price": 0.75}
    reasons = [h["kfast.error.message"].decode() for h in headers.values()]
    assert not any("decoded as Avro" in r for r in reasons), reasons
    assert headers[b"4"]["kfast.error.message"].startswith(
        f"unknown schema id {UNKNOWN_ID} (registry: ".encode()
    )


def test_protobuf_classes_without_registry(
    kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    class NoRegistry:
        def get_schema(self, schema_id: int) -> Any:
            raise AssertionError(f"registry asked for {schema_id}")

    o2 = _order_class(True)
    values = [_proto(3, o2(id=i, sku=f"s{i}", price=i / 2).SerializeToString()) for i in range(100)]
    values[17] = _proto(3, b"\x1a\x01")  # truncated double
    rows, headers = _check_pipeline_matches_decode(
        kafka_broker,
        unique_topic,
        unique_group,
        lambda: ConfluentDecoder(NoRegistry(), protobuf_classes={3: o2}),
        values,
        max_rows=25,
    )
    assert len(rows) == 99 and rows[b"4"] == {"id": 4, "sku": "s4", "price": 2.0}
    assert set(headers) == {b"17"}


def test_confluent_protobuf_decoder_is_a_pipeline_decoder(
    kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    """``ConfluentProtobufDecoder`` on its own (compiled: the ring hands it its spans):
    the rows and dead letters equal ``decode`` on the same values, bad frames included."""
    from kfast.confluent import ConfluentProtobufDecoder

    reg = _registry()
    id1 = reg.register_schema(f"{unique_topic}-value", Schema(PROTO_V1, "PROTOBUF"))
    id2 = reg.register_schema(f"{unique_topic}-value", Schema(PROTO_V2, "PROTOBUF"))
    lookups: list[int] = []

    class Registry:
        def get_schema(self, schema_id: int) -> Any:
            lookups.append(schema_id)
            return reg.get_schema(schema_id)

        def get_latest_version(self, subject: str) -> Any:
            return reg.get_latest_version(subject)

    o1, o2 = _order_class(False), _order_class(True)
    values = []
    for i in range(240):
        if i % 31 == 4:
            values.append(_proto(UNKNOWN_ID, o1(id=i).SerializeToString()))
        elif i % 37 == 6:
            values.append(_proto(id1, b"\x12\x05ab"))  # truncated string field
        elif i % 41 == 8:
            values.append(b"\x07" + _proto(id1, b"")[1:])  # wrong magic
        elif i % 43 == 10:
            values.append(b"\x00\x00\x01")  # too short for the header
        elif i % 47 == 12:
            values.append(_proto(id1, b"")[:5] + b"\x03")  # negative message-index count
        elif i % 59 == 14:
            values.append(_proto(id2, b"")[:5] + b"\x02\x02")  # path [1]: no such message
        elif i % 2:
            values.append(_proto(id2, o2(id=i, sku=f"s{i}", price=i / 4).SerializeToString()))
        else:
            values.append(_proto(id1, o1(id=i, sku=f"s{i}").SerializeToString()))
    rows, headers = _check_pipeline_matches_decode(
        kafka_broker,
        unique_topic,
        unique_group,
        lambda: ConfluentProtobufDecoder(Registry(), subject=f"{unique_topic}-value"),
        values,
        max_rows=32,
    )
    assert rows[b"2"] == {"id": 2, "sku": "s2", "price": 0.0}  # the newest version's columns
    assert rows[b"3"] == {"id": 3, "sku": "s3", "price": 0.75}
    reasons = {k: h["kfast.error.message"].decode() for k, h in headers.items()}
    assert reasons[b"4"].startswith(f"unknown schema id {UNKNOWN_ID} (registry: ")
    assert reasons[b"6"].startswith("length runs past the end of the message (field 2)")
    assert reasons[b"8"] == reasons[b"10"] == reasons[b"12"]
    assert reasons[b"8"].startswith("not Confluent Protobuf framing")
    assert "does not exist" in reasons[b"14"]
    assert {id1, id2, UNKNOWN_ID} <= set(lookups)
