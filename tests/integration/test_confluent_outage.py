"""A schema registry outage holds the pipeline back; it never makes dead letters.

Real Kafka, real Apicurio Registry, real PostgreSQL; payloads written by confluent-kafka's
``AvroSerializer``. The decoder's cache is cold for the id that arrives during the outage, so
the batch cannot be decoded until the registry answers again: the Pipeline's decoder thread
retries it under the ``RetryPolicy`` (health says why), then every good row reaches PostgreSQL
exactly once and the DLQ stays empty. Only an id the registry answers 404 for is dead-lettered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from _sink_helpers import consume_all
from runtime_util import Runner, wait_until

import kfast
from kfast.confluent import ConfluentDecoder
from kfast.dlq import DeadLetterPolicy
from kfast.retry import RetryPolicy
from kfast.sinks.postgres import PostgresSink
from kfast.testing.orders import ORDER_SCHEMA, ORDER_TABLE_DDL, make_order
from kfast.testing.registry import SchemaRegistry

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # authlib's httpx deprecation notice on import
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

pytestmark = pytest.mark.integration

ORDER_V2 = {
    **ORDER_SCHEMA,
    "fields": [
        *ORDER_SCHEMA["fields"],
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}
OUTAGE_S = 10.0


def _serialize(registry: SchemaRegistry, topic: str, schema: Any, orders: list[Any]) -> list[bytes]:
    client = registry.client()
    ser = AvroSerializer(client, json.dumps(schema), conf={"auto.register.schemas": True})
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [ser(o, ctx) for o in orders]


def _orders(start: int, n: int, v2: bool = False) -> list[dict[str, Any]]:
    rng = random.Random(start)
    out = [make_order(i, rng) for i in range(start, start + n)]
    if v2:
        for o in out:
            o["note"] = f"n{o['id']}"
    return out


def _table(pg_dsn: str, name: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {name}")
        c.execute(ORDER_TABLE_DDL.format(table=name))


def _ids(pg_dsn: str, table: str) -> list[int]:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        return [r[0] for r in c.execute(f"SELECT id FROM {table}")]


def _pipeline(
    kafka_broker: Any,
    pg_dsn: str,
    topic: str,
    group: str,
    decoder: Any,
    table: str,
    deadline: float = 180,
) -> Any:
    return kfast.Pipeline(
        kafka={
            "bootstrap.servers": kafka_broker.bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
        },
        topics=[topic],
        decoder=decoder,
        sink=PostgresSink(pg_dsn, table, mode="copy"),
        batch=kfast.BatchPolicy(max_rows=50, max_wait=0.05),
        # the deadline covers the outage and the registry's restart on a loaded machine
        retry=RetryPolicy(
            max_attempts=1000, initial_backoff=0.1, max_backoff=1.0, deadline=deadline
        ),
        dlq=DeadLetterPolicy(topic + ".dlq"),
        memory_limit="64MiB",
        install_signal_handlers=False,
    )


def _registry_outage_seen(pipe: Any) -> bool:
    h = pipe.health()
    return "schema registry" in (h.reason or "") + (h.last_error or "")


def test_registry_down_with_a_cold_cache_holds_back_then_every_row_once_no_dead_letters(
    schema_registry: SchemaRegistry,
    kafka_broker: Any,
    pg_dsn: str,
    unique_topic: str,
    unique_group: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = "orders_registry_outage"
    _table(pg_dsn, table)
    kafka_broker.create_topic(unique_topic, partitions=2)
    kafka_broker.create_topic(unique_topic + ".dlq")
    before = _serialize(schema_registry, unique_topic, ORDER_SCHEMA, _orders(0, 200))
    during = _serialize(schema_registry, unique_topic, ORDER_V2, _orders(200, 200, v2=True))
    assert during[0][1:5] != before[0][1:5]  # a new id the decoder has never seen
    decoder = ConfluentDecoder(
        {"url": schema_registry.url, "timeout": 1.0}, reader_schema=ORDER_SCHEMA
    )
    pipe = _pipeline(kafka_broker, pg_dsn, unique_topic, unique_group, decoder, table)
    caplog.set_level(logging.INFO, logger="kfast")
    runner = Runner(pipe)
    try:
        kafka_broker.produce(unique_topic, before)
        wait_until(lambda: len(_ids(pg_dsn, table)) == 200, 90, "the rows before the outage")
        schema_registry.stop()
        t_down = time.monotonic()
        kafka_broker.produce(unique_topic, during)
        wait_until(lambda: _registry_outage_seen(pipe), 60, "health to name the registry")
        assert len(_ids(pg_dsn, table)) == 200  # held back, not dead-lettered
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
        assert (pipe.metrics().get("delivery") or {}).get("dlq_records", 0) == 0
        schema_registry.start()
        wait_until(lambda: len(_ids(pg_dsn, table)) == 400, 120, "every row after the outage")
        wait_until(lambda: not _registry_outage_seen(pipe), 30, "health to recover")
    finally:
        runner.stop()
    ids = _ids(pg_dsn, table)
    assert sorted(ids) == list(range(400))  # every good row, exactly once
    assert consume_all(kafka_broker.bootstrap, unique_topic + ".dlq", expected=0) == []
    text = caplog.text
    assert "schema registry unavailable" in text and "reachable again" in text


class _HangingProxy:
    """A TCP endpoint that accepts and never answers until ``heal()``; then it forwards to
    ``target`` (host, port) byte for byte."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.healed = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._held: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self.healed.is_set():
                self._held.append(conn)  # accepted, never answered
                continue
            t = threading.Thread(target=self._forward, args=(conn,), daemon=True)
            t.start()

    def _forward(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.target, timeout=30) as up:
            pipes = [threading.Thread(target=_pump, args=(a, b), daemon=True)
                     for a, b in ((conn, up), (up, conn))]  # fmt: skip
            for p in pipes:
                p.start()
            for p in pipes:
                p.join(60)

    def heal(self) -> None:
        self.healed.set()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        for c in self._held:
            with contextlib.suppress(OSError):
                c.close()
        for t in self._threads:
            t.join(5)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def hanging_registry(schema_registry: SchemaRegistry) -> Iterator[_HangingProxy]:
    host_port = schema_registry.url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = _HangingProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_hung_registry_holds_back_then_every_row_once_no_dead_letters(
    schema_registry: SchemaRegistry,
    hanging_registry: _HangingProxy,
    kafka_broker: Any,
    pg_dsn: str,
    unique_topic: str,
    unique_group: str,
) -> None:
    table = "orders_registry_hung"
    _table(pg_dsn, table)
    kafka_broker.create_topic(unique_topic)
    kafka_broker.create_topic(unique_topic + ".dlq")
    values = _serialize(schema_registry, unique_topic, ORDER_V2, _orders(0, 150, v2=True))
    path = schema_registry.url.split("//", 1)[1].split("/", 1)[1]
    decoder = ConfluentDecoder(
        {"url": f"http://127.0.0.1:{hanging_registry.port}/{path}", "timeout": 1.0},
        reader_schema=ORDER_SCHEMA,
    )
    pipe = _pipeline(kafka_broker, pg_dsn, unique_topic, unique_group, decoder, table)
    runner = Runner(pipe)
    try:
        kafka_broker.produce(unique_topic, values)
        wait_until(lambda: _registry_outage_seen(pipe), 60, "health to name the registry")
        time.sleep(3)  # several 1 s timeouts in a row: still nothing written, nothing dead
        assert _ids(pg_dsn, table) == []
        assert (pipe.metrics().get("delivery") or {}).get("dlq_records", 0) == 0
        hanging_registry.heal()
        wait_until(lambda: len(_ids(pg_dsn, table)) == 150, 90, "every row once it answers")
    finally:
        runner.stop()
    assert sorted(_ids(pg_dsn, table)) == list(range(150))
    assert consume_all(kafka_broker.bootstrap, unique_topic + ".dlq", expected=0) == []


def test_an_id_the_registry_does_not_have_dead_letters_only_its_rows(
    schema_registry: SchemaRegistry,
    kafka_broker: Any,
    pg_dsn: str,
    unique_topic: str,
    unique_group: str,
) -> None:
    table = "orders_registry_404"
    _table(pg_dsn, table)
    kafka_broker.create_topic(unique_topic)
    kafka_broker.create_topic(unique_topic + ".dlq")
    values = _serialize(schema_registry, unique_topic, ORDER_SCHEMA, _orders(0, 100))
    missing = 2_000_000_007
    unknown = {5, 6, 50}
    for k in unknown:  # the same body behind an id the registry answers 404 for
        values[k] = b"\x00" + missing.to_bytes(4, "big") + values[k][5:]
    decoder = ConfluentDecoder(schema_registry.url, reader_schema=ORDER_SCHEMA)
    pipe = _pipeline(kafka_broker, pg_dsn, unique_topic, unique_group, decoder, table)
    runner = Runner(pipe)
    try:
        kafka_broker.produce(unique_topic, values, keys=[str(i).encode() for i in range(100)])
        wait_until(
            lambda: (
                len(_ids(pg_dsn, table)) == 97
                and (pipe.metrics().get("delivery") or {}).get("dlq_records", 0) == 3
            ),
            90,
            "the good rows and the dead letters",
        )
    finally:
        runner.stop()
    assert sorted(_ids(pg_dsn, table)) == sorted(set(range(100)) - unknown)
    dead = consume_all(kafka_broker.bootstrap, unique_topic + ".dlq", expected=3)
    assert {int(m.key()) for m in dead} == unknown
    for m in dead:
        h = dict(m.headers())
        assert h["kfast.schema.id"] == str(missing).encode()
        assert h["kfast.error.message"].startswith(f"unknown schema id {missing}".encode())


def test_an_outage_past_the_retry_deadline_stops_without_committing(
    schema_registry: SchemaRegistry,
    kafka_broker: Any,
    pg_dsn: str,
    unique_topic: str,
    unique_group: str,
) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from kfast.errors import RetryExhausted

    table = "orders_registry_deadline"
    _table(pg_dsn, table)
    kafka_broker.create_topic(unique_topic)
    kafka_broker.create_topic(unique_topic + ".dlq")
    values = _serialize(schema_registry, unique_topic, ORDER_SCHEMA, _orders(0, 60))
    kafka_broker.produce(unique_topic, values)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there: a registry that stays down
    down = ConfluentDecoder(f"http://127.0.0.1:{closed}", reader_schema=ORDER_SCHEMA)
    pipe = _pipeline(kafka_broker, pg_dsn, unique_topic, unique_group, down, table, deadline=3)
    runner = Runner(pipe)
    runner.thread.join(90)
    assert not runner.thread.is_alive(), "the pipeline did not stop at the retry deadline"
    assert isinstance(runner.error, RetryExhausted)
    assert _ids(pg_dsn, table) == []
    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": unique_group})
    try:
        committed = c.committed([TopicPartition(unique_topic, 0)], timeout=10)
    finally:
        c.close()
    assert committed[0].offset < 0  # nothing committed: the next run reads every record again
    assert consume_all(kafka_broker.bootstrap, unique_topic + ".dlq", expected=0) == []
    up = ConfluentDecoder(schema_registry.url, reader_schema=ORDER_SCHEMA)
    pipe = _pipeline(kafka_broker, pg_dsn, unique_topic, unique_group, up, table)
    runner = Runner(pipe)
    try:
        wait_until(lambda: len(_ids(pg_dsn, table)) == 60, 90, "every row on the next run")
    finally:
        runner.stop()
    assert sorted(_ids(pg_dsn, table)) == list(range(60))
