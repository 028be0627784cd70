"""Kafka coordinates as columns make at-least-once loading idempotent (kill -9).

A Pipeline with ``metadata=["topic", "partition", "offset"]`` writes into a
table whose primary key is (kafka_topic, kafka_partition, kafka_offset), with
``PostgresSink(mode="upsert", key=[...])`` and Kafka-committed offsets (no
offsets table). It is SIGKILLed a few times mid-run, so batches are delivered
again; the final run drains the topic. Every record is in the table exactly
once, at its coordinates. ``KFAST_KILL_ROUNDS`` sets the number of kills
(default 5).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kfast.testing.orders import ORDER_TABLE_DDL, encode, make_order

pytestmark = pytest.mark.integration

CHILD = """
import sys
import kfast
from kfast.retry import RetryPolicy
from kfast.sinks.postgres import PostgresSink
from kfast.testing.orders import ORDER_SCHEMA

bootstrap, group, topic, dsn, table = sys.argv[1:6]
kfast.Pipeline(
    kafka={"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
           "session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"},
    topics=[topic],
    decoder=kfast.AvroDecoder(ORDER_SCHEMA),
    sink=PostgresSink(dsn, table, mode="upsert",
                      key=["kafka_topic", "kafka_partition", "kafka_offset"]),
    metadata=["topic", "partition", "offset"],
    batch=kfast.BatchPolicy(max_rows=400, max_wait=0.02),
    retry=RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.5, deadline=60),
    commit_interval=0.2,
    memory_limit="64MiB",
).run()
"""


def _count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_coordinates_as_key_make_upserts_idempotent_under_kill_9(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    rounds = int(os.environ.get("KFAST_KILL_ROUNDS", "5"))
    n = 20_000
    rng = random.Random(99)
    kafka_broker.create_topic(unique_topic, partitions=3)
    # the order id repeats (i % 5000): the coordinates, not the id, identify a record
    values = [encode(make_order(i % 5000, rng)) for i in range(n)]
    for part in range(3):  # explicitly: keyless records may all land on fewer partitions
        kafka_broker.produce(unique_topic, values[part::3], partition=part)
    table = "meta_kill"
    ddl = ORDER_TABLE_DDL.format(table=table).replace("id bigint PRIMARY KEY", "id bigint NOT NULL")
    ddl = ddl.rstrip().rstrip(")") + (
        ", kafka_topic text NOT NULL, kafka_partition integer NOT NULL, "
        "kafka_offset bigint NOT NULL, PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset))"
    )
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(ddl)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, "-c", CHILD, kafka_broker.bootstrap, unique_group, unique_topic,
            pg_dsn, table]  # fmt: skip
    kills = 0
    for _ in range(rounds):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            before = _count(pg_dsn, table)
            deadline = time.monotonic() + 60
            while (
                _count(pg_dsn, table) == before
                and time.monotonic() < deadline
                and proc.poll() is None
            ):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(30)
        if _count(pg_dsn, table) >= n:
            break
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _count(pg_dsn, table) < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert kills >= 1
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        rows = c.execute(
            f"SELECT kafka_topic, kafka_partition, kafka_offset, id FROM {table}"
        ).fetchall()
    assert len(rows) == n, out.decode(errors="replace")[-3000:]
    assert {r[0] for r in rows} == {unique_topic}
    per_part: dict[int, list[int]] = {}
    for _, part, off, _ in rows:
        per_part.setdefault(part, []).append(off)
    # every offset of every partition, once: nothing lost, nothing doubled
    assert sorted(per_part) == [0, 1, 2]
    for offs in per_part.values():
        assert sorted(offs) == list(range(len(offs)))
    assert sorted(r[3] for r in rows) == sorted(i % 5000 for i in range(n))
