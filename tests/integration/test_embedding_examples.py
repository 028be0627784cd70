"""docs/examples/ run as their users run them, against the real broker and PostgreSQL.

Each example is a subprocess (uvicorn serving the Starlette app, a plain asyncio service, a
worker-thread service) stopped with the signal an operator would send. The checks are what an
embedding must guarantee: the stop drains and commits (every committed offset is in the table,
nothing in flight is lost or written twice), exit status 0, nothing dead-lettered.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from runtime_util import encode, wait_until

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
PARTITIONS = 2


def _produce(broker: Any, topic: str, start: int, n: int) -> None:
    """ids [start, start+n), id % PARTITIONS picks the partition."""
    for p in range(PARTITIONS):
        ids = range(start + ((p - start) % PARTITIONS), start + n, PARTITIONS)
        broker.produce(topic, [encode(i) for i in ids], keys=[b"%d" % i for i in ids], partition=p)


def _table(dsn: str, topic: str) -> str:
    name = "t_" + topic.replace("-", "_").replace(".", "_")[-50:].lower()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id bigint NOT NULL, name text NOT NULL)")
    return name


def _ids(dsn: str, table: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM {table}")]


def _committed(broker: Any, topic: str, group: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        parts = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30)
        return {tp.partition: tp.offset for tp in parts}
    finally:
        c.close()


def _end_offsets(broker: Any, topic: str, partitions: int = PARTITIONS) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "watermarks"})
    try:
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in range(partitions)
        }
    finally:
        c.close()


def _env(broker: Any, dsn: str, topic: str, group: str, table: str, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        KFAST_BOOTSTRAP=broker.bootstrap,
        KFAST_DSN=dsn,
        KFAST_TOPIC=topic,
        KFAST_GROUP=group,
        KFAST_TABLE=table,
        **extra,
    )
    return env


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=EXAMPLES
    )
    proc.log = out  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, log: Path, sig: int | None = None) -> str:
    """Send ``sig``, wait for the exit; return the output (exit status checked by the caller)."""
    try:
        if sig is not None:
            proc.send_signal(sig)
        proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log.close()  # type: ignore[attr-defined]
    return log.read_text(errors="replace")


def _assert_drained(broker: Any, dsn: str, topic: str, group: str, table: str) -> list[int]:
    """Every committed offset is in the table, nothing twice: the stop drained and committed."""
    ids = _ids(dsn, table)
    dup = [i for i, n in Counter(ids).items() if n > 1]
    assert not dup, f"written twice: {dup[:10]}"
    per_part = Counter(i % PARTITIONS for i in ids)
    committed = _committed(broker, topic, group)
    for p in range(PARTITIONS):
        # ids of partition p are p, p+2, ...: its rows are offsets 0..k-1, all committed
        assert committed[p] == per_part[p], (p, committed, per_part)
    return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _check_serving(proc: subprocess.Popen, log: Path, url: str, states: set[str]) -> None:
    """Wait for /readyz 200 (noting the states seen on the way), then check /healthz."""

    def ready() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            status, body = _get(url + "/readyz")
        except OSError:
            return False  # not listening yet
        states.add(body["state"])
        return status == 200

    wait_until(ready, 60, "/readyz 200")
    status, body = _get(url + "/healthz")
    assert status == 200 and body["live"] is True
    assert body["state"] in ("running", "backpressure")
    assert body["assigned_partitions"] == PARTITIONS
    # the app's own registry, with kfast's collector in it
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    assert fams["kfast_rows_written"].type == "counter"
    assert [s.value for s in fams["kfast_ready"].samples] == [1.0]


def test_starlette_app_under_uvicorn_sigterm(
    kafka_broker, pg_dsn, unique_topic, unique_group, tmp_path
):
    """The proof: uvicorn serves the app, health over HTTP, SIGTERM drains, a restart ends the
    topic with every row exactly once and nothing dead-lettered."""
    n1, n2 = 20_000, 20_000
    dlq_topic = unique_topic + ".dlq"
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    kafka_broker.create_topic(dlq_topic, partitions=1)
    table = _table(pg_dsn, unique_topic)
    env = _env(kafka_broker, pg_dsn, unique_topic, unique_group, table, KFAST_DLQ_TOPIC=dlq_topic)
    _produce(kafka_broker, unique_topic, 0, n1)

    seen_states: set[str] = set()
    for run in (1, 2):
        port = _free_port()
        log = tmp_path / f"uvicorn{run}.log"
        proc = _start(["starlette_app.py", "--port", str(port)], env, log)
        try:
            _check_serving(proc, log, f"http://127.0.0.1:{port}", seen_states)
            if run == 1:
                # more rows arrive while the first SIGTERM lands: whatever was in flight is
                # either written and committed, or neither
                wait_until(lambda: len(_ids(pg_dsn, table)) > 0, 60, "first rows")
                _produce(kafka_broker, unique_topic, n1, n2)
            else:
                wait_until(lambda: len(_ids(pg_dsn, table)) >= n1 + n2, 120, "every row")
                health = f"http://127.0.0.1:{port}/healthz"
                wait_until(lambda h=health: _get(h)[1]["lag"] == 0, 60, "lag 0 in /healthz")
        except BaseException:
            _finish(proc, log, signal.SIGKILL)
            raise
        out = _finish(proc, log, signal.SIGTERM)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
        _assert_drained(kafka_broker, pg_dsn, unique_topic, unique_group, table)

    assert sorted(_ids(pg_dsn, table)) == list(range(n1 + n2))  # every row exactly once
    assert _committed(kafka_broker, unique_topic, unique_group) == _end_offsets(
        kafka_broker, unique_topic
    )
    assert _end_offsets(kafka_broker, dlq_topic, 1) == {0: 0}  # nothing dead-lettered
    assert "running" in seen_states


@pytest.mark.parametrize(
    ("script", "sig"),
    [("asyncio_service.py", signal.SIGINT), ("thread_service.py", signal.SIGTERM)],
    ids=["asyncio-ctrl-c", "thread-sigterm"],
)
def test_service_example_stops_on_a_signal_drained(
    kafka_broker, pg_dsn, unique_topic, unique_group, tmp_path, script, sig
):
    """Ctrl-C of the asyncio host (its loop runs the async sink) and SIGTERM of the
    worker-thread host: both drain, commit and exit 0 while rows are still arriving."""
    n1, n2 = 10_000, 20_000
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    table = _table(pg_dsn, unique_topic)
    env = _env(kafka_broker, pg_dsn, unique_topic, unique_group, table)
    _produce(kafka_broker, unique_topic, 0, n1)
    log = tmp_path / "service.log"
    proc = _start([script], env, log)
    try:

        def some_rows() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")
            return len(_ids(pg_dsn, table)) > 0

        wait_until(some_rows, 60, "first rows")
        _produce(kafka_broker, unique_topic, n1, n2)
    except BaseException:
        _finish(proc, log, signal.SIGKILL)
        raise
    out = _finish(proc, log, sig)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert "stopped" in out or "interrupted" in out, out
    ids = _assert_drained(kafka_broker, pg_dsn, unique_topic, unique_group, table)
    assert len(ids) > 0
