"""Exactly-once into PostgreSQL under kill -9 at random moments (area: sink).

Each round starts the pipeline in a child process and SIGKILLs it at a random moment; a final
round runs to the end. Every good row must be in the table exactly once (the table has no
primary key, so a duplicate would show), every bad message in the DLQ (at least once: the DLQ
is at-least-once by design). ``KFAST_KILL_ROUNDS`` sets the number of kills (default 4; the
proof in the issue uses 10).
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
from _sink_helpers import consume_all

from kfast.testing.orders import ORDER_TABLE_DDL, encode, make_order

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("sink_eo_child.py")


def _count(dsn: str, table: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def test_exactly_once_under_kill_9(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    rounds = int(os.environ.get("KFAST_KILL_ROUNDS", "4"))
    n = max(30_000, 9_000 * rounds)
    rng = random.Random(1234)
    violate = set(rng.sample(range(n), n // 1000))  # 0.1% constraint violations
    corrupt = set(rng.sample(sorted(set(range(n)) - violate), n // 200))  # 0.5% corrupt payloads
    values = [
        b"\x03\x00" if i in corrupt else encode(make_order(i, rng, violate=i in violate))
        for i in range(n)
    ]
    kafka_broker.create_topic(unique_topic, partitions=3)
    dlq = unique_topic + ".dlq"
    kafka_broker.create_topic(dlq)
    kafka_broker.produce(unique_topic, values, keys=[str(i).encode() for i in range(n)])
    table = "eo_kill"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        # No primary key: a duplicate row must be visible, not turned into a DLQ record.
        c.execute(
            ORDER_TABLE_DDL.format(table=table).replace(
                "id bigint PRIMARY KEY", "id bigint NOT NULL"
            )
        )
    good = n - len(violate) - len(corrupt)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [
        sys.executable,
        str(CHILD),
        kafka_broker.bootstrap,
        unique_group,
        unique_topic,
        pg_dsn,
        table,
        dlq,
    ]
    kills = 0
    for _ in range(rounds):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            before = _count(pg_dsn, table)[0]
            deadline = time.monotonic() + 60
            # Let it make some progress, then kill at a random moment of its work.
            while (
                _count(pg_dsn, table)[0] == before
                and time.monotonic() < deadline
                and proc.poll() is None
            ):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.8))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(30)
        if _count(pg_dsn, table)[0] >= good:
            break
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while (
            _count(pg_dsn, table)[0] < good and time.monotonic() < deadline and proc.poll() is None
        ):
            time.sleep(0.2)
        time.sleep(1.0)  # anything extra (a duplicate) would land now
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    print(f"kill -9 rounds: {kills}")
    assert kills >= 1
    total, distinct = _count(pg_dsn, table)
    assert (total, distinct) == (good, good), out.decode(errors="replace")[-3000:]
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        ids = {r[0] for r in c.execute(f"SELECT id FROM {table}")}
    assert ids == set(range(n)) - violate - corrupt
    dead = consume_all(
        kafka_broker.bootstrap, dlq, expected=len(violate) + len(corrupt), timeout=60
    )
    keys = {int(m.key()) for m in dead}
    assert keys == violate | corrupt  # each bad message at least once
