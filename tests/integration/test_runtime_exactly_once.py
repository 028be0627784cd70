"""Exactly-once into PostgreSQL: on assignment the runtime starts from the offsets the
sink stored with the rows, not from Kafka's commits."""

from __future__ import annotations

import psycopg
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from runtime_util import Runner, pipeline, produce_ids, wait_until

from kfast.runtime.pipeline import SOURCES
from kfast.sinks.postgres import PostgresSink as _PostgresSink

pytestmark = pytest.mark.integration


class PostgresSink(_PostgresSink):
    """The contract's ``stores_offsets`` (docs/dev/runtime-contract.md), which
    PostgresSink does not expose yet: True in exactly_once mode."""

    stores_offsets = True


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
@pytest.mark.parametrize("source", SOURCES)
def test_restart_starts_from_offsets_stored_in_postgres(
    kafka_broker, kafka_consumer_config, pg_dsn, unique_topic, unique_group, protocol, source
):
    """Under both group protocols: KIP-848 (``consumer``) assigns incrementally, so the
    stored offsets go through ``incremental_assign``."""
    table = "rt_" + unique_topic.replace("-", "_")[-40:]
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"CREATE TABLE {table} (id bigint NOT NULL, name text NOT NULL)")

    def count() -> tuple[int, int]:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            row = c.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, 1000, 2)
    conf = kafka_consumer_config(unique_group, **{"group.protocol": protocol})
    sink = PostgresSink(pg_dsn, table, mode="exactly_once")
    r = Runner(pipeline(conf, unique_topic, sink, source=source))
    wait_until(lambda: count()[0] >= 1000, 60, "first 1000 rows")
    r.stop()
    # Kafka's commits go back to 0 (lost, reset by an operator, ...): PostgreSQL's stay.
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    reset = ConsumerGroupTopicPartitions(
        unique_group, [TopicPartition(unique_topic, p, 0) for p in range(2)]
    )
    for fut in admin.alter_consumer_group_offsets([reset]).values():
        fut.result(30)
    produce_ids(kafka_broker, unique_topic, 1000, 500, 2)
    sink2 = PostgresSink(pg_dsn, table, mode="exactly_once")
    r2 = Runner(pipeline(conf, unique_topic, sink2, source=source))
    wait_until(lambda: count()[0] >= 1500, 60, "next 500 rows")
    m = r2.pipe.metrics()
    r2.stop()
    assert count() == (1500, 1500)
    assert m["consumed"] == 500  # started at the stored offsets, not at Kafka's 0
