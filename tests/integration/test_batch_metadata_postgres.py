"""Kafka coordinate columns in PostgreSQL: typed like any column, headers as jsonb."""

from __future__ import annotations

import base64
import datetime as dt
import json

import psycopg
import pytest
from confluent_kafka import Message

import kfast
from kfast._batch import Batch
from kfast._layout import metadata_plan
from kfast.runtime.ring import Ring
from kfast.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

SCHEMA = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}


def test_coordinates_and_headers_land_as_columns(pg_dsn: str) -> None:
    ring = Ring(100, 1 << 16, keep_headers=True)
    ring.assign("events", 2)
    msgs = [
        Message(topic="events", partition=2, offset=40 + i, key=b"k%d" % i if i % 2 else None,
                value=bytes([i * 2]), timestamp=(1, 1_700_000_000_000 + i),
                headers=[("trace", b"t%d" % i), ("x", None)] if i % 3 else None)
        for i in range(6)
    ]  # fmt: skip
    assert ring.push(msgs) == 6
    batch = Batch()
    fields = ["topic", "partition", "offset", "timestamp", "key", "headers"]
    ring.decode(kfast.AvroDecoder(SCHEMA), 0, 6, batch, metadata_plan(fields))
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS meta_cols")
    sink = PostgresSink(pg_dsn, "meta_cols", create_table=True)
    sink.write(batch)
    sink.close()
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        types = dict(c.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'meta_cols'").fetchall())  # fmt: skip
        rows = c.execute("SELECT * FROM meta_cols ORDER BY kafka_offset").fetchall()
    assert types == {
        "id": "bigint",
        "kafka_topic": "text",
        "kafka_partition": "integer",
        "kafka_offset": "bigint",
        "kafka_timestamp": "timestamp with time zone",
        "kafka_key": "bytea",
        "kafka_headers": "jsonb",
    }
    for i, (id_, topic, part, off, ts, key, headers) in enumerate(rows):
        assert (id_, topic, part, off) == (i, "events", 2, 40 + i)
        assert ts == dt.datetime.fromtimestamp(1_700_000_000 + i / 1000, dt.timezone.utc)
        assert key == (b"k%d" % i if i % 2 else None)
        headers = json.loads(headers) if isinstance(headers, str) else headers
        want = [["trace", b"t%d" % i], ["x", None]] if i % 3 else []
        assert [[h["key"], h["value"]] for h in headers] == [
            [k, None if v is None else base64.b64encode(v).decode()] for k, v in want
        ]
