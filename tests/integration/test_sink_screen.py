"""Set-based screening of bad rows (``kfast.sinks.postgres.screen``) through the delivery layer.

One test per constraint kind: the bad rows, and only them, reach the DLQ with the class and
SQLSTATE PostgreSQL gives that kind, every good row is in the table once, and the batch
takes a constant number of statements (no probe, no bisection) whatever the number of bad
rows. Also: order semantics of keys repeated in the batch, what the screen does not judge
(falls back to the probes), a constraint changed while the sink runs, exactly-once, a lost
connection during the screen, and a streak of bad batches screened before any plain write.
"""

from __future__ import annotations

import decimal
import threading
from typing import Any

import psycopg
import pytest
from _sink_helpers import CapturingQueue, CountingSink, TxnProxy, avro_payloads, make_batch

from kfast.delivery import Delivery
from kfast.dlq import DeadLetterPolicy
from kfast.retry import RetryPolicy

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "record",
    "name": "Row",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "name", "type": ["null", "string"]},
        {"name": "qty", "type": "int"},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
        },
        {"name": "code", "type": ["null", "string"]},
        {"name": "email", "type": ["null", "string"]},
    ],
}
DDL = """
CREATE TABLE "{t}" (
    id bigint PRIMARY KEY,
    name varchar(8) NOT NULL,
    qty integer CHECK (qty >= 0),
    price numeric(6, 2),
    code text REFERENCES "{t}_parent",
    email text UNIQUE
)
"""
N = 300
RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05, deadline=30)


def _rows(n: int = N, base: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "id": base + i,
            "name": f"n{i}",
            "qty": i,
            "price": decimal.Decimal("12.50"),
            "code": f"p{i % 10}" if i % 3 else None,  # NULL references nothing (MATCH SIMPLE)
            "email": f"e{base + i}@x",
        }
        for i in range(n)
    ]


def _setup(dsn: str, t: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{t}"')
        c.execute(f'DROP TABLE IF EXISTS "{t}_parent"')
        c.execute(f'CREATE TABLE "{t}_parent" (code text PRIMARY KEY)')
        c.execute(f"INSERT INTO \"{t}_parent\" SELECT 'p' || g FROM generate_series(0, 9) g")
        c.execute(DDL.format(t=t))


def _ids(dsn: str, t: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [int(r[0]) for r in c.execute(f'SELECT id FROM "{t}" ORDER BY id').fetchall()]


def _delivery(sink: Any) -> tuple[Delivery, CapturingQueue]:
    d = Delivery(sink, RETRY, DeadLetterPolicy("unused.dlq"), {"bootstrap.servers": "127.0.0.1:9"})
    q = CapturingQueue()
    d.queue = q  # type: ignore[assignment]
    return d, q


def _dead(q: CapturingQueue, base: int = 0) -> dict[int, dict[str, bytes]]:
    out = {}
    for r in q.records:
        h = dict(r.headers)
        out[int(h["kfast.original.offset"]) - base] = h
    assert len(out) == len(q.records)  # each dead letter once
    return out


def _bad_too_long(r: list[dict[str, Any]]) -> None:
    r[4]["name"] = "x" * 9
    r[200]["name"] = "toolong!" + " x"  # the excess holds a non-space
    r[6]["name"] = "exactly8" + "   "  # excess spaces only: the input function trims them


def _bad_overflow(r: list[dict[str, Any]]) -> None:
    r[4]["price"] = decimal.Decimal("10000.00")
    r[200]["price"] = decimal.Decimal("-12345678.90")
    r[6]["price"] = decimal.Decimal("9999.99")  # the largest numeric(6, 2): fine


def _bad_not_null(r: list[dict[str, Any]]) -> None:
    r[4]["name"] = None
    r[200]["name"] = None


def _bad_check(r: list[dict[str, Any]]) -> None:
    r[4]["qty"] = -1
    r[200]["qty"] = -5
    r[6]["qty"] = 0  # the CHECK's edge: fine


def _bad_fk(r: list[dict[str, Any]]) -> None:
    r[4]["code"] = "nope"
    r[200]["code"] = "p10"
    r[6]["code"] = None


def _bad_dup_in_batch(r: list[dict[str, Any]]) -> None:
    r[4]["id"] = r[2]["id"]  # the first occurrence wins, as writing in order would
    r[200]["email"] = r[100]["email"]  # a second unique index
    r[6]["id"] = r[250]["id"]  # an earlier row holding a later row's key: 6 is kept, 250 dies
    r[250]["name"] = "n250"


KINDS = {
    # kind: (mutation, bad rows, sqlstate, class)
    "value_too_long": (_bad_too_long, {4, 200}, b"22001", b"StringDataRightTruncation"),
    "numeric_overflow": (_bad_overflow, {4, 200}, b"22003", b"NumericValueOutOfRange"),
    "not_null": (_bad_not_null, {4, 200}, b"23502", b"NotNullViolation"),
    "check": (_bad_check, {4, 200}, b"23514", b"CheckViolation"),
    "foreign_key": (_bad_fk, {4, 200}, b"23503", b"ForeignKeyViolation"),
    "unique_in_batch": (_bad_dup_in_batch, {4, 200, 250}, b"23505", b"UniqueViolation"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_constraint_kind_is_screened(pg_dsn: str, kind: str) -> None:
    t = f"scr_{kind}"
    _setup(pg_dsn, t)
    mutate, bad, state, cls = KINDS[kind]
    rows = _rows()
    mutate(rows)
    sink = CountingSink(pg_dsn, t)
    d, q = _delivery(sink)
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows)), threading.Event())
    want = sorted(r["id"] for i, r in enumerate(rows) if i not in bad)
    assert _ids(pg_dsn, t) == want
    dead = _dead(q)
    assert set(dead) == bad
    for h in dead.values():
        assert h["kfast.sqlstate"] == state and h["kfast.error.class"] == cls
    snap = d.metrics.snapshot()
    assert snap["bisections"] == 0 and snap["located"] == len(bad)
    # The failed write, a screen (two for keys), one insert: however many rows are bad.
    assert sink.copies <= 4, sink.copies
    sink.close()


def test_keys_already_in_the_table(pg_dsn: str) -> None:
    t = "scr_unique_table"
    _setup(pg_dsn, t)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(
            f"INSERT INTO \"{t}\" (id, name, email) VALUES (7, 'old', 'a@x'), (1000, 'o', 'e77@x')"
        )
    rows = _rows()
    sink = CountingSink(pg_dsn, t)
    d, q = _delivery(sink)
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows)), threading.Event())
    assert set(_dead(q)) == {7, 77}  # the primary key, and the second unique index
    assert _ids(pg_dsn, t) == sorted({r["id"] for r in rows} - {77} | {1000})
    assert all(h["kfast.error.class"] == b"UniqueViolation" for h in _dead(q).values())
    assert d.metrics.snapshot()["bisections"] == 0 and sink.copies <= 4
    sink.close()


def test_every_kind_at_once_in_one_transaction(pg_dsn: str) -> None:
    t = "scr_mixed"
    _setup(pg_dsn, t)
    rows = _rows()
    rows[10]["qty"] = -1
    rows[20]["name"] = None
    rows[30]["name"] = "far too long"
    rows[40]["price"] = decimal.Decimal("99999.00")
    rows[50]["code"] = "none"
    rows[60]["id"] = rows[59]["id"]
    rows[70]["qty"] = -1
    rows[71]["id"] = rows[70]["id"]  # its first occurrence is bad: this one is kept
    bad = {10, 20, 30, 40, 50, 60, 70}
    sink = CountingSink(pg_dsn, t)
    d, q = _delivery(sink)
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows)), threading.Event())
    dead = _dead(q)
    assert set(dead) == bad
    states = {i: h["kfast.sqlstate"] for i, h in dead.items()}
    assert states == {
        10: b"23514",
        20: b"23502",
        30: b"22001",
        40: b"22003",
        50: b"23503",
        60: b"23505",
        70: b"23514",
    }
    assert _ids(pg_dsn, t) == sorted(r["id"] for i, r in enumerate(rows) if i not in bad)
    assert len(sink.txns) == 1 and d.metrics.snapshot()["bisections"] == 0
    sink.close()


def test_what_the_screen_does_not_judge_falls_back_to_the_probes(pg_dsn: str) -> None:
    """A domain's CHECK is not screened: the insert after the screen fails, the screen's
    results are dropped (they could depend on that row) and the probes isolate every row."""
    t = "scr_domain"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{t}"')
        c.execute(f'DROP TABLE IF EXISTS "{t}_parent"')
        c.execute(f"DROP DOMAIN IF EXISTS {t}_qty")
        c.execute(f"CREATE DOMAIN {t}_qty AS integer CHECK (VALUE <> 13)")
        c.execute(f'CREATE TABLE "{t}_parent" (code text PRIMARY KEY)')
        c.execute(f"INSERT INTO \"{t}_parent\" SELECT 'p' || g FROM generate_series(0, 9) g")
        c.execute(DDL.format(t=t).replace("qty integer", f"qty {t}_qty"))
    rows = _rows()
    rows[80]["qty"] = -1  # CHECK of the table: screened
    rows[12]["id"] = rows[13]["id"]  # 13 (qty 13) fails the domain, so 12 keeps the key
    sink = CountingSink(pg_dsn, t)
    d, q = _delivery(sink)
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows)), threading.Event())
    assert set(_dead(q)) == {13, 80}
    assert _ids(pg_dsn, t) == sorted(r["id"] for i, r in enumerate(rows) if i not in {13, 80})
    sink.close()


def test_a_constraint_dropped_while_running_is_seen(pg_dsn: str) -> None:
    t = "scr_alter"
    _setup(pg_dsn, t)
    sink = CountingSink(pg_dsn, t)
    d, q = _delivery(sink)
    rows = _rows(100)
    rows[5]["qty"] = -1
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows)), threading.Event())
    assert set(_dead(q)) == {5}
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'ALTER TABLE "{t}" DROP CONSTRAINT "{t}_qty_check"')
        c.execute(f'ALTER TABLE "{t}" ADD CHECK (qty >= -1)')
    rows = _rows(100, base=100)
    rows[5]["qty"] = -1  # fine now
    rows[6]["qty"] = -2
    d2, q2 = _delivery(sink)
    d2.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows), base_offset=100), threading.Event())
    assert set(_dead(q2, base=100)) == {6}
    assert 105 in _ids(pg_dsn, t)
    sink.close()


def test_exactly_once_with_the_screen(pg_dsn: str, unique_group: str) -> None:
    t = "scr_eo"
    _setup(pg_dsn, t)
    sink = CountingSink(pg_dsn, t, mode="exactly_once")
    rows = _rows()
    rows[3]["qty"] = -1
    rows[150]["code"] = "nope"
    payloads = avro_payloads(SCHEMA, rows)
    d, q = _delivery(sink)
    d.deliver(make_batch(SCHEMA, payloads, group=unique_group), threading.Event())
    assert set(_dead(q)) == {3, 150}
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): N}
    # Redelivered after a crash (the Kafka commit lagged): fenced, nothing twice, whether
    # the batch is screened first (the last one had bad rows) or written plainly first.
    assert d.dirty
    d.deliver(make_batch(SCHEMA, payloads, group=unique_group), threading.Event())
    assert len(q.records) == 2
    d2, q2 = _delivery(sink)
    d2.deliver(make_batch(SCHEMA, payloads, group=unique_group), threading.Event())
    assert q2.records == []
    assert _ids(pg_dsn, t) == sorted(r["id"] for i, r in enumerate(rows) if i not in {3, 150})
    sink.close()


def test_connection_lost_during_the_screen_starts_over(pg_dsn: str) -> None:
    t = "scr_lost"
    _setup(pg_dsn, t)
    killed: list[int] = []

    class KillOnce(TxnProxy):
        def screen(self, ranges: Any, keys: bool = True) -> Any:
            if not killed:
                pid = self.txn._conn.info.backend_pid
                with psycopg.connect(pg_dsn, autocommit=True) as c:
                    c.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed.append(pid)
            return self.txn.screen(ranges, keys)

    sink = CountingSink(pg_dsn, t, wrap=KillOnce)
    d, q = _delivery(sink)
    rows = _rows()
    rows[9]["qty"] = -1
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows)), threading.Event())
    assert killed and len(sink.txns) == 2 and d.metrics.snapshot()["retries"] == 1
    assert set(_dead(q)) == {9}
    assert _ids(pg_dsn, t) == sorted(r["id"] for i, r in enumerate(rows) if i != 9)
    sink.close()


def test_after_a_bad_batch_the_next_is_screened_before_any_plain_write(pg_dsn: str) -> None:
    t = "scr_streak"
    _setup(pg_dsn, t)
    sink = CountingSink(pg_dsn, t)
    d, q = _delivery(sink)
    metrics = d.metrics
    base = 0
    for bad in ({5}, {7, 8}, set()):
        rows = _rows(100, base=base)
        for i in bad:
            rows[i]["qty"] = -1
        writes = sink.writes
        d.deliver(
            make_batch(SCHEMA, avro_payloads(SCHEMA, rows), base_offset=base), threading.Event()
        )
        if base:
            assert sink.writes == writes  # screened and written in the transaction
        base += 100
    assert {int(dict(r.headers)["kfast.original.offset"]) for r in q.records} == {5, 107, 108}
    assert len(_ids(pg_dsn, t)) == 297 and metrics.snapshot()["bisections"] == 0
    # The clean batch after a bad one went the same way; the one after it is a plain write.
    rows = _rows(100, base=300)
    writes = sink.writes
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows), base_offset=300), threading.Event())
    assert sink.writes == writes + 1 and len(_ids(pg_dsn, t)) == 397
    sink.close()


def test_exactly_once_decode_errors_are_acknowledged_while_the_rows_are_written(
    pg_dsn: str, unique_group: str
) -> None:
    """The rows go in a row transaction (no plain write); the dead letters of the decode
    errors are acknowledged after the rows are written and before the commit that stores
    the batch's offsets."""
    t = "scr_eo_decode"
    _setup(pg_dsn, t)
    sink = CountingSink(pg_dsn, t, mode="exactly_once")
    order: list[str] = []

    class Recorder(TxnProxy):
        def copy(self, ranges: Any, keep: bool) -> None:
            order.append(f"copy:{q.confirmed}")
            self.txn.copy(ranges, keep)

        def commit(self) -> None:
            order.append(f"commit:{q.confirmed}/{len(q.records)}")
            self.txn.commit()

    sink.wrap = Recorder
    d, q = _delivery(sink)
    payloads = avro_payloads(SCHEMA, _rows())
    payloads[10] = payloads[20] = b"\x03"  # undecodable
    d.deliver(make_batch(SCHEMA, payloads, group=unique_group), threading.Event())
    assert sink.writes == 0 and order == ["copy:0", "commit:2/2"]
    assert set(_dead(q)) == {10, 20}
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): N}
    assert len(_ids(pg_dsn, t)) == N - 2 and not d.dirty  # decode errors are not the sink's
    sink.close()
