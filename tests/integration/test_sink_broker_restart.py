"""The Kafka broker restarts under a running Pipeline -> PostgresSink with a DLQ.

The ring holds at most 2,000 messages, so most of the first wave is still on the broker when
it goes down; dead letters that come due during the downtime wait under the RetryPolicy.
After the restart the pipeline must fetch the rest, take a second wave produced afterwards,
dead-letter every bad record and commit up to the end of the topic: nothing lost, no good
row dead-lettered, and duplicates (re-reads of an uncommitted tail after the group rejoins)
only of good rows.
"""

from __future__ import annotations

import random
from typing import Any

import psycopg
import pytest
from _sink_helpers import consume_all
from confluent_kafka import Consumer, TopicPartition
from runtime_util import Runner, wait_until

import kfast
from kfast.dlq import DeadLetterPolicy
from kfast.retry import RetryPolicy
from kfast.sinks.postgres import PostgresSink
from kfast.testing.orders import ORDER_SCHEMA, ORDER_TABLE_DDL, encode, make_order

pytestmark = pytest.mark.integration

PARTITIONS = 4


def _wave(start: int, n: int, rng: random.Random) -> tuple[list[bytes], set[int], set[int]]:
    """Orders ``start .. start + n``; about 1% corrupt and 0.5% violating the CHECK."""
    values: list[bytes] = []
    corrupt: set[int] = set()
    violate: set[int] = set()
    for i in range(start, start + n):
        r = rng.random()
        if r < 0.01:
            corrupt.add(i)
            values.append(b"\x03\x00")
        else:
            bad = r < 0.015
            if bad:
                violate.add(i)
            values.append(encode(make_order(i, rng, violate=bad)))
    return values, corrupt, violate


def _produce(kafka_broker: Any, topic: str, start: int, values: list[bytes]) -> None:
    keys = [str(start + k).encode() for k in range(len(values))]
    for p in range(PARTITIONS):
        kafka_broker.produce(topic, values[p::PARTITIONS], keys=keys[p::PARTITIONS], partition=p)


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def test_pipeline_survives_broker_restart(
    kafka_broker: Any, pg_dsn: str, unique_topic: str, unique_group: str
) -> None:
    if kafka_broker.external:
        pytest.fail("this test restarts the broker: unset KFAST_TEST_BOOTSTRAP")
    rng = random.Random(17)
    n1, n2 = 12_000, 4_000
    wave1, corrupt1, violate1 = _wave(0, n1, rng)
    wave2, corrupt2, violate2 = _wave(n1, n2, rng)
    bad = corrupt1 | violate1 | corrupt2 | violate2
    good = set(range(n1 + n2)) - bad
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    kafka_broker.create_topic(unique_topic + ".dlq")
    _produce(kafka_broker, unique_topic, 0, wave1)
    table = "orders_broker_restart"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        # no primary key: a re-read row shows up as a duplicate instead of a unique violation
        c.execute(ORDER_TABLE_DDL.format(table=table).replace(" PRIMARY KEY", ""))

    def table_ids() -> tuple[int, set[int]]:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            ids = [r[0] for r in c.execute(f"SELECT id FROM {table}").fetchall()]
        return len(ids), set(ids)

    pipe = kfast.Pipeline(
        kafka={
            "bootstrap.servers": kafka_broker.bootstrap,
            "group.id": unique_group,
            "auto.offset.reset": "earliest",
        },
        topics=[unique_topic],
        decoder=kfast.AvroDecoder(ORDER_SCHEMA),
        sink=PostgresSink(pg_dsn, table),
        batch=kfast.BatchPolicy(max_rows=200, max_wait=0.05),
        buffer=kfast.BufferPolicy(max_messages=2_000, max_bytes=4 << 20),
        retry=RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.5, deadline=120),
        dlq=DeadLetterPolicy(topic=unique_topic + ".dlq", max_ratio=0.5, max_consecutive=1000),
        commit_interval=0.2,
        memory_limit="64MiB",
        install_signal_handlers=False,
    )
    r = Runner(pipe)

    def or_pipeline_died(pred: Any) -> Any:
        return lambda: pred() or not r.thread.is_alive()  # a dead pipeline: fail below

    try:
        wait_until(or_pipeline_died(lambda: table_ids()[0] >= 1_000), 60, "rows before the restart")
        assert table_ids()[0] >= 1_000, "no rows before the restart"
        assert len(table_ids()[1]) < len(good), "everything was delivered before the restart"
        kafka_broker.restart(downtime=3.0)
        _produce(kafka_broker, unique_topic, n1, wave2)
        wait_until(or_pipeline_died(lambda: table_ids()[1] >= good), 120, "every good row")
        # the last dead letters and commits follow the last rows
        wait_until(
            or_pipeline_died(
                lambda: (
                    sum(
                        max(0, o)
                        for o in _committed(
                            kafka_broker.bootstrap, unique_group, unique_topic
                        ).values()
                    )
                    >= n1 + n2
                )
            ),
            60,
            "commits at the end of the topic",
        )
    finally:
        r.stop()  # joins the pipeline and re-raises its error

    count, ids = table_ids()
    assert ids == good, f"lost {len(good - ids)} good rows, {len(ids - good)} bad rows written"
    dead = consume_all(kafka_broker.bootstrap, unique_topic + ".dlq", expected=len(bad))
    dead_keys = {int(m.key()) for m in dead}
    assert dead_keys == bad, (len(bad - dead_keys), len(dead_keys - bad))
    committed = _committed(kafka_broker.bootstrap, unique_group, unique_topic)
    assert sum(committed.values()) == n1 + n2, committed
    print(
        f"broker restart: {len(good)} good rows, {count - len(ids)} duplicates; "
        f"{len(bad)} bad records, {len(dead) - len(dead_keys)} duplicate dead letters"
    )
