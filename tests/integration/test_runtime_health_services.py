"""Pipeline.health() against a real broker: unreachable, topic missing, normal, backpressure."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from runtime_util import Recorder, pipeline, produce_ids, wait_until

import kfast
from kfast.errors import ConfigError, StartupTimeout

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed


def test_unreachable_broker_is_visible_within_seconds(kafka_consumer_config, unique_group):
    conf = dict(kafka_consumer_config(unique_group))
    conf["bootstrap.servers"] = f"127.0.0.1:{_closed_port()}"
    pipe = pipeline(conf, "t-any", Recorder())
    t0 = time.monotonic()
    pipe.start()
    try:
        wait_until(lambda: pipe.health().broker_reachable is False, 15, "broker unreachable")
        seen = time.monotonic() - t0
        h = pipe.health()
        assert h.state == "joining" and h.reason.startswith("broker unreachable")
        assert h.live and not h.ready
        assert pipe.metrics()["kafka_errors"].get("_ALL_BROKERS_DOWN", 0) >= 1
    finally:
        pipe.close()
    assert seen < 10
    # with startup_timeout, start() fails and leaves nothing behind
    pipe = pipeline(conf, "t-any", Recorder(), startup_timeout=2)
    with pytest.raises(StartupTimeout, match="broker unreachable") as info:
        pipe.start()
    assert info.value.health.broker_reachable is False
    assert pipe.health().state == "stopped" and not pipe.running


def test_missing_topic_is_visible_and_fails_start(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    pipe = pipeline(kafka_consumer_config(unique_group), unique_topic, Recorder())
    pipe.start()
    try:
        wait_until(lambda: "missing" in pipe.health().reason, 15, "topic missing")
        h = pipe.health()
        assert h.state == "joining" and unique_topic in h.reason and not h.ready
        assert h.broker_reachable is True  # the broker answered: it is the topic
    finally:
        pipe.close()
    pipe = pipeline(
        kafka_consumer_config(unique_group), unique_topic, Recorder(), startup_timeout=5
    )
    with pytest.raises(ConfigError, match=unique_topic):
        pipe.start()
    assert not pipe.running


def test_normal_run_backpressure_and_early_lag(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, 4000, 2)
    gate = threading.Event()
    rec = Recorder(gate=gate)
    pipe = pipeline(
        kafka_consumer_config(unique_group),  # statistics every 5 s (the default)
        unique_topic,
        rec,
        buffer=kfast.BufferPolicy(max_messages=1000),
        batch=kfast.BatchPolicy(max_rows=200),
        commit_interval=0.1,
        startup_timeout=30,
    )
    pipe.start()  # returns once ready: sink open, partitions assigned
    try:
        h = pipe.health()
        assert h.ready and h.state in ("running", "backpressure")
        assert h.assigned_partitions == 2 and h.broker_reachable is True
        # lag is known before librdkafka's first statistics (asked from the broker)
        wait_until(lambda: pipe.health().lag is not None, 3, "lag")
        assert pipe.health().lag == 4000  # nothing committed yet: the sink is gated
        # the stalled sink fills the ring: backpressure, still ready
        wait_until(lambda: pipe.health().state == "backpressure", 30, "backpressure")
        assert pipe.health().ready and "paused" in pipe.health().reason
        gate.set()
        wait_until(lambda: rec.count() >= 4000, 60, "rows")
        wait_until(lambda: pipe.health().lag == 0, 30, "lag 0")
        h = pipe.health()
        assert h.state == "running" and h.last_batch_at and h.last_commit_at
        assert h.as_dict()["state"] == "running"
    finally:
        gate.set()
        pipe.close()
    pipe.join()
    assert pipe.health().state == "stopped"


def test_postgres_down_at_start_then_mid_run(
    pg_server, pg_dsn, kafka_broker, kafka_consumer_config, unique_topic, unique_group, caplog
):
    """PostgreSQL down at start is retried like a write (health 'starting'), then down
    mid-run ('retrying'); both are logged, nothing is lost."""
    import logging

    import psycopg

    from kfast.sinks.postgres import PostgresSink

    kafka_broker.create_topic(unique_topic, partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, 1000, 1)
    table = "health_events"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, name text)")

    def rows() -> int:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
            return int(row[0]) if row else 0

    caplog.set_level(logging.INFO, logger="kfast.retry")
    retry = kfast.RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2, deadline=60)
    pg_server.stop()
    pipe = pipeline(
        kafka_consumer_config(unique_group),
        unique_topic,
        PostgresSink(pg_dsn, table, mode="upsert", key="id"),
        retry=retry,
        commit_interval=0.1,
    )
    pipe.start()
    try:
        wait_until(lambda: "sink open" in pipe.health().reason, 30, "open retried")
        h = pipe.health()
        assert h.state == "starting" and "TransientSinkError" in h.reason and h.live
        pg_server.start()
        wait_until(lambda: pipe.health().ready, 60, "ready after PostgreSQL came up")
        wait_until(lambda: rows() == 1000, 60, "rows")
        pg_server.stop()
        produce_ids(kafka_broker, unique_topic, 1000, 1000, 1)
        wait_until(lambda: pipe.health().state == "retrying", 30, "retrying mid-run")
        assert "sink write" in pipe.health().reason and not pipe.health().ready
        pg_server.start()
        wait_until(lambda: pipe.health().state == "running", 60, "running again")
        wait_until(lambda: rows() == 2000, 60, "rows after the outage")
    finally:
        pipe.close()  # (a server left stopped is started again by kfast.testing)
    pipe.join()
    msgs = [r.getMessage() for r in caplog.records if r.name == "kfast.retry"]
    assert any(m.startswith("sink open failed") and "attempt 1" in m for m in msgs), msgs
    assert any(m.startswith("sink write failed") and "attempt 1" in m for m in msgs), msgs
    assert sum("succeeded again" in m for m in msgs) >= 2
    assert len(msgs) < 20  # rate-limited: a few lines per outage, not one per attempt
