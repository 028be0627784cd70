"""The test bed is real: Apache Kafka and PostgreSQL started by kfast.testing do real work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, TopicPartition

from kfast.testing import KafkaBroker, PostgresServer

pytestmark = pytest.mark.integration

N = 10_000
PARTITIONS = 4


def consume_exactly(consumer: Consumer, n: int, timeout: float = 60.0) -> list[Any]:
    """Consume until ``n`` messages arrived (fails on errors and after ``timeout``)."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"got {len(out)} of {n} messages in {timeout} s"
        for msg in consumer.consume(num_messages=min(5000, n - len(out)), timeout=0.5):
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise AssertionError(f"consume error: {err}")
            if err is None:
                out.append(msg)
    return out


def test_produce_consume_10k_across_4_partitions(
    kafka_broker: KafkaBroker,
    unique_topic: str,
    unique_group: str,
    kafka_consumer_config: Callable[..., dict[str, Any]],
) -> None:
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    keys = [f"k{i % 97}".encode() for i in range(N)]
    values = [f"{i}".encode() for i in range(N)]
    headers = [[("seq", str(i).encode())] if i % 1000 == 0 else None for i in range(N)]
    assert kafka_broker.produce(unique_topic, values, keys=keys, headers=headers) == N

    consumer = Consumer(kafka_consumer_config(unique_group))
    try:
        consumer.subscribe([unique_topic])
        msgs = consume_exactly(consumer, N)
        # Nothing beyond the N messages.
        assert consumer.consume(num_messages=10, timeout=1.0) == []
    finally:
        consumer.close()

    assert sorted(int(m.value()) for m in msgs) == list(range(N))
    per_partition: dict[int, list[Any]] = {}
    for m in msgs:
        assert m.topic() == unique_topic
        per_partition.setdefault(m.partition(), []).append(m)
    assert set(per_partition) == set(range(PARTITIONS)), "the keys spread over all partitions"
    for part, ms in per_partition.items():
        offsets = [m.offset() for m in ms]
        assert offsets == list(range(len(ms))), f"partition {part}: offsets in order, no gaps"
        seq = [int(m.value()) for m in ms]
        assert seq == sorted(seq), f"partition {part}: production order kept"
        key_set = {m.key() for m in ms}
        for other, oms in per_partition.items():
            if other != part:
                assert key_set.isdisjoint({m.key() for m in oms}), "a key maps to one partition"
    with_headers = [m for m in msgs if m.headers()]
    assert sorted(int(m.value()) for m in with_headers) == list(range(0, N, 1000))
    assert all(m.headers() == [("seq", m.value())] for m in with_headers)


def test_commit_and_read_back_committed_offsets(
    kafka_broker: KafkaBroker,
    unique_topic: str,
    unique_group: str,
    kafka_consumer_config: Callable[..., dict[str, Any]],
) -> None:
    kafka_broker.create_topic(unique_topic, partitions=2)
    kafka_broker.produce(unique_topic, [b"a"] * 30, partition=0)
    kafka_broker.produce(unique_topic, [b"b"] * 20, partition=1)

    consumer = Consumer(kafka_consumer_config(unique_group))
    try:
        consumer.assign([TopicPartition(unique_topic, 0, 0), TopicPartition(unique_topic, 1, 0)])
        consume_exactly(consumer, 50)
        tps = [TopicPartition(unique_topic, 0), TopicPartition(unique_topic, 1)]
        before = consumer.committed(tps, timeout=10)
        assert [tp.offset for tp in before] == [OFFSET_INVALID, OFFSET_INVALID]
        consumer.commit(
            offsets=[TopicPartition(unique_topic, 0, 25), TopicPartition(unique_topic, 1, 20)],
            asynchronous=False,
        )
        after = consumer.committed(tps, timeout=10)
        assert [(tp.partition, tp.offset) for tp in after] == [(0, 25), (1, 20)]
    finally:
        consumer.close()

    # A new member of the same group resumes from the committed offsets.
    consumer = Consumer(kafka_consumer_config(unique_group))
    try:
        consumer.subscribe([unique_topic])
        rest = consume_exactly(consumer, 5)
        assert {(m.partition(), m.offset()) for m in rest} == {(0, o) for o in range(25, 30)}
        assert consumer.consume(num_messages=10, timeout=1.0) == []
    finally:
        consumer.close()


GROUP_PROTOCOLS = {
    # classic protocol, client-side cooperative assignor
    "classic": {"partition.assignment.strategy": "cooperative-sticky"},
    # KIP-848: the broker assigns; session/heartbeat settings are the broker's then
    "consumer": {"group.protocol": "consumer"},
}


@pytest.mark.parametrize("protocol", sorted(GROUP_PROTOCOLS))
def test_consumer_group_of_two_splits_partitions(
    kafka_broker: KafkaBroker,
    unique_topic: str,
    unique_group: str,
    kafka_consumer_config: Callable[..., dict[str, Any]],
    protocol: str,
) -> None:
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    kafka_broker.produce(unique_topic, [str(i).encode() for i in range(400)])
    conf = kafka_consumer_config(unique_group, **GROUP_PROTOCOLS[protocol])
    members = [Consumer(conf) for _ in range(2)]
    try:
        for c in members:
            c.subscribe([unique_topic])
        # Poll both until each owns exactly 2 partitions and the split has been stable for a
        # few rounds (cooperative rebalancing converges in two rounds).
        deadline = time.monotonic() + 60
        stable_rounds = 0
        seen: dict[int, set[int]] = {0: set(), 1: set()}
        while stable_rounds < 5:
            assert time.monotonic() < deadline, f"assignment never settled: {seen}"
            for i, c in enumerate(members):
                for m in c.consume(num_messages=100, timeout=0.2):
                    part = m.partition()
                    if m.error() is None and part is not None:
                        seen[i].add(part)
            a = [{tp.partition for tp in c.assignment()} for c in members]
            if len(a[0]) == 2 and len(a[1]) == 2 and a[0].isdisjoint(a[1]):
                stable_rounds += 1
            else:
                stable_rounds = 0
        assert a[0] | a[1] == set(range(PARTITIONS))
        assert all(c.assignment()[0].topic == unique_topic for c in members)
    finally:
        for c in members:
            c.close()


def test_broker_restart_same_port_keeps_data(
    kafka_broker: KafkaBroker,
    unique_topic: str,
    unique_group: str,
    kafka_consumer_config: Callable[..., dict[str, Any]],
) -> None:
    if kafka_broker.external:
        pytest.fail("this test restarts the broker: unset KFAST_TEST_BOOTSTRAP")
    kafka_broker.create_topic(unique_topic, partitions=2)
    kafka_broker.produce(unique_topic, [b"before-%d" % i for i in range(100)])
    bootstrap, pid = kafka_broker.bootstrap, kafka_broker.pid

    kafka_broker.restart()
    assert kafka_broker.bootstrap == bootstrap
    assert kafka_broker.pid != pid

    kafka_broker.produce(unique_topic, [b"after-%d" % i for i in range(100)])
    consumer = Consumer(kafka_consumer_config(unique_group))
    try:
        consumer.subscribe([unique_topic])
        values = sorted(m.value() for m in consume_exactly(consumer, 200))
    finally:
        consumer.close()
    assert values == sorted(
        [b"before-%d" % i for i in range(100)] + [b"after-%d" % i for i in range(100)]
    )


def test_postgres_copy_binary_and_text(pg_dsn: str) -> None:
    rows = [
        (i, f"name {i}\twith tab", i * 1.5, None if i % 7 == 0 else b"\x00\x01")
        for i in range(5000)
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS testbed_copy")
        conn.execute(
            "CREATE TABLE testbed_copy (id bigint PRIMARY KEY, name text, price float8, blob bytea)"
        )
        with conn.cursor() as cur:
            with cur.copy(
                "COPY testbed_copy (id, name, price, blob) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "text", "float8", "bytea"])
                for row in rows[:2500]:
                    copy.write_row(row)
            with cur.copy("COPY testbed_copy (id, name, price, blob) FROM STDIN") as copy:
                for row in rows[2500:]:
                    copy.write_row(row)
            got = cur.execute(
                "SELECT id, name, price, blob FROM testbed_copy ORDER BY id"
            ).fetchall()
        assert got == rows

        with conn.cursor() as cur:
            with cur.copy(
                "COPY (SELECT id, name FROM testbed_copy ORDER BY id) TO STDOUT WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "text"])
                out_binary = list(copy.rows())
            with cur.copy("COPY (SELECT id, name FROM testbed_copy ORDER BY id) TO STDOUT") as copy:
                out_text = list(copy.rows())
        assert out_binary == [(r[0], r[1]) for r in rows]
        assert out_text == [(str(r[0]), r[1]) for r in rows]
        conn.execute("DROP TABLE testbed_copy")


def test_postgres_stop_start_keeps_data(pg_server: PostgresServer) -> None:
    if pg_server.external:
        pytest.fail("this test stops the server: unset KFAST_TEST_PG_DSN")
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS testbed_durable")
        conn.execute("CREATE TABLE testbed_durable (v int)")
        conn.execute("INSERT INTO testbed_durable SELECT generate_series(1, 1000)")
    port = pg_server.port

    pg_server.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_server.dsn, connect_timeout=2).close()
    pg_server.start()

    assert pg_server.port == port
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), sum(v) FROM testbed_durable").fetchone() == (
            1000,
            500500,
        )
        conn.execute("DROP TABLE testbed_durable")


def test_postgres_started_from_a_short_lived_thread_keeps_running(
    pg_server: PostgresServer,
) -> None:
    if pg_server.external:
        pytest.fail("this test stops the server: unset KFAST_TEST_PG_DSN")
    pg_server.stop()
    restarter = threading.Timer(0.2, pg_server.start)  # an outage ended by a timer thread
    restarter.start()
    restarter.join()
    time.sleep(0.5)
    assert pg_server.running
    with psycopg.connect(pg_server.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_kill_keeps_acknowledged_commits(pg_server: PostgresServer) -> None:
    if pg_server.external:
        pytest.fail("this test kills the server: unset KFAST_TEST_PG_DSN")
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS testbed_crash")
        conn.execute("CREATE TABLE testbed_crash (v int)")
        for i in range(500):  # 500 small asynchronous commits, the last ones still in WAL buffers
            conn.execute("INSERT INTO testbed_crash VALUES (%s)", (i,))
        pg_server.kill()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    pg_server.start()
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM testbed_crash").fetchone() == (500,)
        conn.execute("DROP TABLE testbed_crash")


def test_create_delete_topic_and_topic_config(kafka_broker: KafkaBroker, unique_topic: str) -> None:
    from confluent_kafka.admin import ConfigResource

    kafka_broker.create_topic(unique_topic, partitions=3, config={"cleanup.policy": "compact"})
    admin = kafka_broker.admin()
    md = admin.list_topics(topic=unique_topic, timeout=10).topics[unique_topic]
    assert sorted(md.partitions) == [0, 1, 2]
    resource = ConfigResource(ConfigResource.Type.TOPIC, unique_topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["cleanup.policy"].value == "compact"

    kafka_broker.delete_topic(unique_topic)
    assert unique_topic not in admin.list_topics(timeout=10).topics
    # The name can be used again right away (deletion is complete, not just requested).
    kafka_broker.create_topic(unique_topic, partitions=1)
    assert kafka_broker.produce(unique_topic, [b"again"]) == 1
