"""Dead letters of Confluent-framed input carry ``kfast.schema.id`` (real Kafka + PostgreSQL).

The header comes from the payload's frame (``ConfluentDecoder.schema_id_of``, read by the ring's
``RingView.schema_id``) for both decode and sink failures; unframed decoders never set it.
"""

from __future__ import annotations

import json
import random
import uuid
import warnings
from typing import Any

import fastavro
import psycopg
import pytest
from _sink_helpers import consume_all
from test_sink_pipeline import _run_until

import kfast
from kfast.confluent import ConfluentDecoder
from kfast.dlq import DeadLetterPolicy
from kfast.retry import RetryPolicy
from kfast.sinks.postgres import PostgresSink
from kfast.testing.orders import ORDER_SCHEMA, ORDER_TABLE_DDL, encode, make_order

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # authlib's httpx deprecation notice on import
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

pytestmark = pytest.mark.integration

# A later writer version: one more optional field, resolved away by the reader (ORDER_SCHEMA).
ORDER_V2 = {
    **ORDER_SCHEMA,
    "fields": [
        *ORDER_SCHEMA["fields"],
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}
UNKNOWN_ID = 987_654


def frame(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def _table(pg_dsn: str, name: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {name}")
        c.execute(ORDER_TABLE_DDL.format(table=name))


def _rows(pg_dsn: str, table: str) -> set[int]:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        return {r[0] for r in c.execute(f"SELECT id FROM {table}")}


def _run(
    kafka_broker: Any,
    pg_dsn: str,
    topic: str,
    group: str,
    decoder: Any,
    table: str,
    good: int,
    dead: int,
) -> None:
    """Run a pipeline until ``good`` rows are in ``table`` and ``dead`` records in the DLQ."""
    sink = PostgresSink(pg_dsn, table, mode="copy")
    pipe = kfast.Pipeline(
        kafka={
            "bootstrap.servers": kafka_broker.bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
        },
        topics=[topic],
        decoder=decoder,
        sink=sink,
        batch=kfast.BatchPolicy(max_rows=100, max_wait=0.05),
        retry=RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.5, deadline=30),
        dlq=DeadLetterPolicy(topic + ".dlq"),
        memory_limit="64MiB",
        install_signal_handlers=False,
    )
    _run_until(
        pipe,
        lambda: (
            (pipe.metrics().get("delivery") or {}).get("dlq_records", 0) >= dead
            and len(_rows(pg_dsn, table)) >= good
        ),
    )
    sink.close()


def _load(
    kafka_broker: Any,
    pg_dsn: str,
    topic: str,
    group: str,
    decoder: Any,
    table: str,
    values: list[bytes],
    dead_keys: set[int],
    partitions: int = 1,
) -> dict[int, dict[str, bytes]]:
    """Produce ``values`` (key = index), load them with ``decoder``, check that exactly the
    rows outside ``dead_keys`` reached ``table``; return each dead letter's headers by key."""
    n = len(values)
    kafka_broker.create_topic(topic, partitions=partitions)
    kafka_broker.produce(topic, values, keys=[str(i).encode() for i in range(n)])
    kafka_broker.create_topic(topic + ".dlq")
    _table(pg_dsn, table)
    _run(kafka_broker, pg_dsn, topic, group, decoder, table, n - len(dead_keys), len(dead_keys))
    assert _rows(pg_dsn, table) == set(range(n)) - dead_keys
    dead = consume_all(kafka_broker.bootstrap, topic + ".dlq", expected=len(dead_keys))
    by_key = {int(m.key()): dict(m.headers()) for m in dead}
    assert len(dead) == len(by_key) and set(by_key) == dead_keys
    return by_key


def test_dead_letters_carry_the_writer_schema_id(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    reg = SchemaRegistryClient.new_client({"url": f"mock://kfast-dlq-{uuid.uuid4().hex}"})
    id1 = reg.register_schema(f"{unique_topic}-value", Schema(json.dumps(ORDER_SCHEMA), "AVRO"))
    id2 = reg.register_schema(f"{unique_topic}-value", Schema(json.dumps(ORDER_V2), "AVRO"))
    assert id1 != id2
    writers = {id1: fastavro.parse_schema(ORDER_SCHEMA), id2: fastavro.parse_schema(ORDER_V2)}

    n = 400  # odd i: writer id1, even i: writer id2
    rng = random.Random(5)
    violate = {10, 11, 250, 251, 398}  # CHECK (quantity > 0): sink stage
    corrupt = {20, 21, 300, 301}  # framed, undecodable body: decode stage
    unknown = {1, 2}  # framed with an id the registry does not know: decode stage
    unframed = {3, 4}  # wrong magic byte: decode stage, no schema id
    special = corrupt | unknown | unframed
    expect_id: dict[int, int | None] = {}
    values = []
    for i in range(n):
        sid = id1 if i % 2 else id2
        if i in unframed:
            values.append(b"\x01" + encode(make_order(i, rng), writers[id1]))
            expect_id[i] = None
        elif i in unknown:
            values.append(frame(UNKNOWN_ID, encode(make_order(i, rng), writers[id1])))
            expect_id[i] = UNKNOWN_ID
        elif i in corrupt:
            values.append(frame(sid, b"\x03\x00"))
            expect_id[i] = sid
        else:
            record = make_order(i, rng, violate=i in violate)
            values.append(frame(sid, encode(record, writers[sid])))
            expect_id[i] = sid
    by_key = _load(
        kafka_broker,
        pg_dsn,
        unique_topic,
        unique_group,
        ConfluentDecoder(reg, reader_schema=ORDER_SCHEMA),
        "orders_dlq_schema_id",
        values,
        violate | special,
        partitions=2,
    )
    for k, h in by_key.items():
        stage = b"sink" if k in violate else b"decode"
        assert h["kfast.error.stage"] == stage, (k, h)
        sid = h.get("kfast.schema.id")
        assert sid == (None if expect_id[k] is None else str(expect_id[k]).encode()), (k, h)
    # both writer versions were dead-lettered at both stages
    stages = {(h["kfast.error.stage"], h.get("kfast.schema.id")) for h in by_key.values()}
    for sid in (id1, id2):
        assert (b"sink", str(sid).encode()) in stages
        assert (b"decode", str(sid).encode()) in stages


def test_unframed_decoder_sets_no_schema_id(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    n = 200
    rng = random.Random(9)
    violate = {10, 50, 120}
    corrupt = {20, 130}
    values = [
        b"\x03\x00" if i in corrupt else encode(make_order(i, rng, violate=i in violate))
        for i in range(n)
    ]
    # A payload that looks Confluent-framed gets no header from an unframed decoder either.
    values[30] = frame(7, b"")
    corrupt.add(30)
    by_key = _load(
        kafka_broker,
        pg_dsn,
        unique_topic,
        unique_group,
        kfast.AvroDecoder(ORDER_SCHEMA),
        "orders_dlq_no_schema_id",
        values,
        violate | corrupt,
    )
    for k, h in by_key.items():
        assert h["kfast.error.stage"] == (b"sink" if k in violate else b"decode")
        assert "kfast.schema.id" not in h, (k, h)


class _FailingSchemaIds(kfast.AvroDecoder):
    """A decoder whose schema_id_of (user code) raises."""

    def schema_id_of(self, value: bytes) -> int | None:
        raise RuntimeError("schema id lookup broke")


def test_failing_schema_id_of_does_not_stop_dead_lettering(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    n = 100
    rng = random.Random(11)
    violate = {5, 60}
    corrupt = {7, 70}
    values = [
        b"\x03\x00" if i in corrupt else encode(make_order(i, rng, violate=i in violate))
        for i in range(n)
    ]
    by_key = _load(
        kafka_broker,
        pg_dsn,
        unique_topic,
        unique_group,
        _FailingSchemaIds(ORDER_SCHEMA),
        "orders_dlq_failing_schema_id",
        values,
        violate | corrupt,
    )
    assert all("kfast.schema.id" not in h for h in by_key.values())
