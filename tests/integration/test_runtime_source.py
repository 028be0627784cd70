"""Both Kafka sources (confluent-kafka's ``Source`` and the compiled one) against
the real broker: the same topic yields the same messages in the ring."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import pytest
from confluent_kafka import KafkaException, TopicPartition
from runtime_util import SCHEMA, Recorder, Runner, pipeline, produce_ids, wait_until

import kfast
from kfast._batch import Batch
from kfast.runtime.kafka import CompiledSource
from kfast.runtime.ring import Ring
from kfast.runtime.source import Source

pytestmark = pytest.mark.integration

PARTITIONS = 3
N = 3000
ARENA = 64 << 10  # bytes; message 7's value is larger (the oversized path)


def _messages() -> tuple[list[Any], list[Any], list[Any]]:
    """Values, keys and headers covering every shape a message can have."""
    values: list[Any] = []
    keys: list[Any] = []
    headers: list[Any] = []
    for i in range(N):
        r = i % 11
        values.append(None if r == 3 else b"" if r == 5 else (b"v%d-" % i) * (1 + i % 300))
        if i == 7:
            values[-1] = b"o" * (ARENA + 1000)
        keys.append(None if r in (1, 3) else b"" if r == 4 else b"k%d" % i)
        if r == 2:
            headers.append([("a", b"1"), ("b", None), ("a", b"dup"), ("\u00e9t\u00e9", b"")])
        elif r == 6:
            headers.append([("big", b"h" * 5000)])
        else:
            headers.append(None)
    return values, keys, headers


class _Hooks:
    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.errors: list[Any] = []

    def assign(self, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self.ring.assign(tp.topic, tp.partition)

    def revoke(self, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self.ring.revoke(tp.topic, tp.partition)


def _read_all(kind: str, conf: dict[str, Any], topic: str, total: int) -> tuple[dict, dict]:
    """Consume ``topic`` into a ring with one source; return rows per partition and stats.

    The ring is small (64 KiB): small batches are read out and released as they
    come, and the one value larger than the arena takes the oversized path."""
    ring = Ring(1000, ARENA, keep_headers=True)
    hooks = _Hooks(ring)
    cls = CompiledSource if kind == "compiled" else Source
    src: Any = cls(
        conf,
        [topic],
        on_assign=hooks.assign,
        on_revoke=hooks.revoke,
        on_lost=hooks.revoke,
        on_error=hooks.errors.append,
    )
    rows: dict[tuple[str, int], list[Any]] = collections.defaultdict(list)
    ends: dict[tuple[str, int], int] = {}
    decoder = kfast.AvroDecoder(SCHEMA)
    try:
        src.subscribe()
        deadline = time.monotonic() + 60
        while ring.head < total:
            assert time.monotonic() < deadline, f"{kind}: {ring.head} of {total} messages"
            if kind == "compiled":
                src.consume_into(ring, 20, 0.2)
            else:
                msgs = src.consume(20, 0.2)
                if msgs:
                    ring.push(msgs)
            assert not ring.rewinds(), "20 messages must fit the ring"
            view = ring.decode(decoder, ring.tail, ring.head - ring.tail, Batch())
            for i in range(len(view)):
                rows[(view.topic(i), view.partition(i))].append(
                    (view.offset(i), view.key(i), view.value(i), view.headers(i), view.timestamp(i))
                )
            ends.update(view.next_offsets())
            ring.release(ring.head)
        assert not ring.errors
        stats = ring.stats()
        stats.pop("used_bytes")
        # the consumer side of the interface: lag from the broker, statistics,
        # synchronous and asynchronous commits with their results
        ends = [(t, p, nxt) for (t, p), nxt in sorted(ends.items())]
        stats["lag_before_commit"] = src.query_lag(10)
        src.commit(ends[:1], asynchronous=False)
        src.commit(ends[1:], asynchronous=True)
        while src.async_commits_ok < 1 or src.stats_received < 1:
            assert time.monotonic() < deadline, f"{kind}: no commit result or statistics"
            assert not src.async_commits_failed
            src.consume(10, 0.1)
        with pytest.raises(KafkaException):  # a partition that does not exist
            src.commit([(topic, 99, 1)], asynchronous=False)
        src.consume(10, 0.3)
        # sync commits report by raising, never through the commit callback
        stats["async_commits_ok"] = src.async_commits_ok
        stats["async_commits_failed"] = src.async_commits_failed
        stats["lag_after_commit"] = src.query_lag(10)
        stats["stats_lag_partitions"] = len(src.lag)
        stats["take_commit_failures"] = src.take_commit_failures()
        return dict(rows), stats
    finally:
        src.close()


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_both_sources_fill_the_ring_identically(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group, protocol
):
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    values, keys, headers = _messages()
    for p in range(PARTITIONS):
        sel = range(p, N, PARTITIONS)
        kafka_broker.produce(
            unique_topic,
            [values[i] for i in sel],
            keys=[keys[i] for i in sel],
            headers=[headers[i] for i in sel],
            partition=p,
        )
    extra = {"group.protocol": protocol} if protocol == "consumer" else {}
    results = {}
    for kind in ("confluent", "compiled"):
        conf = kafka_consumer_config(
            f"{unique_group}-{kind}", **extra, **{"statistics.interval.ms": 200}
        )
        results[kind] = _read_all(kind, conf, unique_topic, N)
    rows_c, stats_c = results["confluent"]
    rows_k, stats_k = results["compiled"]
    assert sorted(rows_k) == sorted(rows_c) == [(unique_topic, p) for p in range(PARTITIONS)]
    for tp in rows_c:
        assert rows_k[tp] == rows_c[tp], f"{tp} differs"
    assert stats_k == stats_c
    assert stats_c["lag_before_commit"] == N  # nothing committed yet: the whole topic
    assert stats_c["lag_after_commit"] == 0
    assert stats_c["stats_lag_partitions"] == PARTITIONS
    assert stats_c["take_commit_failures"] == []
    assert (stats_c["async_commits_ok"], stats_c["async_commits_failed"]) == (1, 0)
    # the data really has every shape: tombstones, empty and absent keys, headers
    assert stats_c["tombstones"] == sum(v is None for v in values)
    assert stats_c["oversized"] == 1
    flat = [r for rs in rows_c.values() for r in rs]
    assert any(r[1] is None for r in flat) and any(r[1] == b"" for r in flat)
    assert any(r[2] == b"" for r in flat)
    assert any(r[3] and ("b", None) in r[3] for r in flat)
    assert all(r[4] > 0 for r in flat)


def test_compiled_source_routes_librdkafka_logs_to_logging(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group, caplog
):
    kafka_broker.create_topic(unique_topic, partitions=1)
    ring = Ring(1000, 1 << 20)
    hooks = _Hooks(ring)
    conf = kafka_consumer_config(unique_group, debug="cgrp")
    src = CompiledSource(
        conf,
        [unique_topic],
        on_assign=hooks.assign,
        on_revoke=hooks.revoke,
        on_lost=hooks.revoke,
        on_error=hooks.errors.append,
    )
    with caplog.at_level(logging.DEBUG, logger="kfast.kafka"):
        try:
            src.subscribe()
            deadline = time.monotonic() + 30
            while not src.assignment() and time.monotonic() < deadline:
                src.consume_into(ring, 100, 0.2)
        finally:
            src.close()
    lines = [r for r in caplog.records if r.name == "kfast.kafka"]
    assert lines, "no librdkafka log line reached logging"
    assert any("CGRP" in r.getMessage() for r in lines)


def test_compiled_source_survives_a_broker_restart(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    """The broker crashes and restarts under load: the compiled source reconnects, nothing is lost
    and the commits reach the end of the topic (the confluent source's proof is
    test_sink_broker_restart.py)."""
    if kafka_broker.external:
        pytest.fail("this test restarts the broker: unset KFAST_TEST_BOOTSTRAP")
    n1, n2, parts = 10_000, 2_000, 4
    kafka_broker.create_topic(unique_topic, partitions=parts)
    produce_ids(kafka_broker, unique_topic, 0, n1, parts)
    rec = Recorder(delay=0.005)
    pipe = pipeline(
        # reconnect within a second of the broker's return (the default backs off to 10 s)
        kafka_consumer_config(unique_group, **{"reconnect.backoff.max.ms": 1000}),
        unique_topic,
        rec,
        source="compiled",
        memory_limit="64MiB",
        buffer=kfast.BufferPolicy(max_messages=2_000),
        commit_interval=0.2,
    )
    r = Runner(pipe)
    try:
        wait_until(lambda: rec.count() >= 1_000 or not r.thread.is_alive(), 60, "first rows")
        assert len(set(rec.ids())) < n1, "everything was delivered before the restart"
        kafka_broker.kill()  # a crash: the quickest restart there is
        kafka_broker.start()
        produce_ids(kafka_broker, unique_topic, n1, n2, parts)
        wait_until(
            lambda: len(set(rec.ids())) >= n1 + n2 or not r.thread.is_alive(), 120, "all ids"
        )
        wait_until(
            lambda: (
                sum(
                    pipe.metrics()["commits"]["partitions"][k]["committed"]
                    for k in pipe.metrics()["commits"]["partitions"]
                )
                >= n1 + n2
                or not r.thread.is_alive()
            ),
            60,
            "commits at the end of the topic",
        )
    finally:
        r.stop()
    ids = rec.ids()
    assert set(ids) == set(range(n1 + n2)), f"lost {n1 + n2 - len(set(ids))} messages"
    assert pipe.metrics()["ring"]["gaps"] == 0


class _CloseSpy:
    """confluent-kafka's Consumer, noting when its close() starts."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self.closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def close(self) -> None:
        self.closing = True
        self._consumer.close()


@pytest.mark.parametrize(
    "extra",
    [{}, {"partition.assignment.strategy": "cooperative-sticky"}, {"group.protocol": "consumer"}],
    ids=["eager", "cooperative", "consumer-protocol"],
)
@pytest.mark.parametrize("kind", ["confluent", "compiled"])
def test_close_revokes_before_consumer_close(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group, extra, kind
):
    """close() leaves the group itself (unsubscribe, the revoke served like any
    rebalance) before librdkafka's consumer_close: a rebalance callback inside
    consumer_close can wait forever for librdkafka (rebalance_protocol() or
    assign() get no reply), and the close hangs."""
    kafka_broker.create_topic(unique_topic, partitions=2)
    ring = Ring(1000, 1 << 20)
    hooks = _Hooks(ring)
    revoked: list[tuple[int, bool]] = []

    def before_consumer_close() -> bool:
        return bool(src.consumer.leaving) if kind == "compiled" else not spy.closing

    def revoke(parts: list[TopicPartition]) -> None:
        revoked.append((len(parts), before_consumer_close()))
        hooks.revoke(parts)

    cls = CompiledSource if kind == "compiled" else Source
    src: Any = cls(
        kafka_consumer_config(unique_group, **extra),
        [unique_topic],
        on_assign=hooks.assign,
        on_revoke=revoke,
        on_lost=hooks.revoke,
        on_error=hooks.errors.append,
    )
    if kind == "confluent":
        spy = src.consumer = _CloseSpy(src.consumer)
    try:
        src.subscribe()
        deadline = time.monotonic() + 30
        while len(src.assignment()) < 2:
            assert time.monotonic() < deadline, "no assignment"
            src.consume_into(ring, 100, 0.2)
    finally:
        src.close()
    assert revoked == [(2, True)]
    if kind == "compiled":
        assert src.consumer.left, "close() gave up waiting for the revoke to take effect"
        assert src.consumer.closed and not src.consumer.leaving
