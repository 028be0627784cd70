"""The sink's client-side check (``kfast.sinks.postgres.prescreen``) against a real PostgreSQL.

Differential: random rows against a table with several CHECK forms, NOT NULL, varchar(n) and
char(n); the rows the client flags are exactly the rows the server rejects for the rules it
evaluates (each row written alone by a server-only sink is the reference), with the same
SQLSTATE and constraint. Through the delivery layer: a batch with violations is written with
one COPY and its bad rows reach the DLQ (copy and exactly_once), a constraint dropped while
the sink runs is seen before any row is dead-lettered, and a table with a trigger is left to
the server.
"""

from __future__ import annotations

import math
import random
import threading
from typing import Any

import psycopg
import pytest
from _sink_helpers import CapturingQueue, CountingSink, TxnProxy, avro_payloads, make_batch

from kfast.delivery import Delivery
from kfast.dlq import DeadLetterPolicy
from kfast.errors import PermanentSinkError
from kfast.retry import RetryPolicy
from kfast.sinks.postgres import PostgresSink
from kfast.sinks.postgres.copy import CopyTiming

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "record",
    "name": "P",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "a", "type": ["null", "int"]},
        {"name": "b", "type": ["null", "long"]},
        {"name": "p", "type": ["null", "double"]},
        {"name": "r", "type": ["null", "float"]},
        {"name": "ok", "type": ["null", "boolean"]},
        {"name": "s", "type": ["null", "string"]},
        {"name": "c", "type": ["null", "string"]},
    ],
}
DDL = """
CREATE TABLE "{t}" (
    id bigint PRIMARY KEY,
    a integer NOT NULL,
    b bigint,
    p double precision,
    r real,
    ok boolean,
    s varchar(5),
    c char(3),
    CONSTRAINT c1_a_pos CHECK (a > 0),
    CONSTRAINT c2_b_range CHECK (b BETWEEN -10 AND 10),
    CONSTRAINT c3_p CHECK (p >= 0 OR p IS NULL),
    CONSTRAINT c4_a_num CHECK (a::numeric < 50.5),
    CONSTRAINT c5_ok CHECK (NOT (ok AND a > 40)),
    CONSTRAINT c6_r CHECK (r < 0.5::real),
    CONSTRAINT c7_p_nan CHECK (p <> 'NaN'::float8),
    CONSTRAINT c8_a_dbl CHECK (a::float8 <= 1e9),
    CONSTRAINT c9_s CHECK (s IS NOT NULL OR ok IS NOT NULL),
    CONSTRAINT z_mod CHECK (a % 7 <> 3)
)
"""
PARSED = [
    "c1_a_pos",
    "c2_b_range",
    "c3_p",
    "c4_a_num",
    "c5_ok",
    "c6_r",
    "c7_p_nan",
    "c8_a_dbl",
    "c9_s",
]
RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05, deadline=30)
NAN, INF = float("nan"), float("inf")

VALUES: dict[str, list[Any]] = {
    "a": [None, -2147483648, -1, 0, 1, 2, 3, 10, 40, 41, 50, 51, 2147483647],
    "b": [None, -(2**62), -11, -10, 0, 10, 11],
    "p": [None, -0.0, 0.0, -1e-300, 1.5, NAN, INF, -INF],
    "r": [None, 0.49999997, 0.5, 0.50000006, -1.0, NAN],
    "ok": [None, True, False],
    "s": [None, "", "abcde", "abcdef", "ééééé", "éééééé", "abcde   ", "abcd é", "ab   x"],
    "c": [None, "abc", "abcd", "ab ", "abc  ", "é", "abcdé"],
}


def _rows(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": i}
        for k, vs in VALUES.items():
            # mostly good values, so that each rule is often the only one broken
            row[k] = vs[rng.randrange(len(vs))] if rng.random() < 0.3 else _good(k, rng)
        rows.append(row)
    return rows


def _good(k: str, rng: random.Random) -> Any:
    return {
        "a": rng.choice([1, 2, 5, 8, 9, 12]),
        "b": rng.randint(-10, 10),
        "p": rng.choice([0.0, 2.5, None]),
        "r": rng.choice([0.25, -3.0, None]),
        "ok": rng.choice([False, None]),
        "s": rng.choice(["x", "hello"]),
        "c": rng.choice(["ab", "abc"]),
    }[k]


def _setup(dsn: str, t: str, ddl: str = DDL) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{t}"')
        c.execute(ddl.format(t=t))


def _constraint(exc: PermanentSinkError) -> str | None:
    cause = exc.__cause__
    diag = getattr(cause, "diag", None)
    name = getattr(diag, "constraint_name", None) if diag is not None else None
    if name:
        return str(name)
    # kfast's own errors name the constraint or column in the message, as PostgreSQL does
    msg = str(exc)
    for n in [*PARSED, "z_mod", "a", "s", "c"]:
        if f'"{n}"' in msg or f"'{n}'" in msg:
            return n
    return None


def _server_verdicts(dsn: str, t: str, batch: Any) -> dict[int, PermanentSinkError]:
    """Each row written alone by a sink that leaves every rule to the server."""
    sink = PostgresSink(dsn, t)
    sink._client_check = False
    out = {}
    try:
        for i in range(batch.num_rows):
            try:
                sink.write(batch.slice(i, i + 1))
            except PermanentSinkError as exc:
                out[i] = exc
    finally:
        sink.close()
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_client_flags_exactly_what_the_server_rejects(pg_dsn: str, seed: int) -> None:
    t = f"pre_diff_{seed}"
    _setup(pg_dsn, t)
    rows = _rows(seed, 400)
    batch = make_batch(SCHEMA, avro_payloads(SCHEMA, rows))
    sink = PostgresSink(pg_dsn, t)
    sink._ensure_plan(batch)
    conn = sink._conns.get(0)
    client = sink._build_client(conn, sink._plan)  # type: ignore[arg-type]
    conn.rollback()
    assert client is not None
    assert client.checks == PARSED and client.refused == ["z_mod"]
    flagged = client.run(batch)
    sink.close()
    truth = _server_verdicts(pg_dsn, t, batch)
    assert flagged and set(flagged) <= set(truth)
    for row, exc in truth.items():
        if row not in flagged:
            # only what the client does not evaluate
            assert exc.sqlstate == "23514" and _constraint(exc) == "z_mod", (row, rows[row], exc)
            continue
        mine = flagged[row]
        # the constraint or column named (PostgreSQL does not name the column of 22001)
        same = mine.sqlstate == "22001" or _constraint(mine) == _constraint(exc)
        assert mine.sqlstate == exc.sqlstate and same, (
            row,
            rows[row],
            mine,
            exc,
        )
        assert type(mine.__cause__) is type(exc.__cause__)
    # every kind was met
    assert {e.sqlstate for e in flagged.values()} == {"22001", "23502", "23514"}


def _delivery(sink: Any) -> tuple[Delivery, CapturingQueue]:
    d = Delivery(sink, RETRY, DeadLetterPolicy("unused.dlq"), {"bootstrap.servers": "127.0.0.1:9"})
    q = CapturingQueue()
    d.queue = q  # type: ignore[assignment]
    return d, q


def _ids(dsn: str, t: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [int(r[0]) for r in c.execute(f'SELECT id FROM "{t}" ORDER BY id').fetchall()]


def _simple_rows(n: int, bad: set[int], base: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "id": base + i,
            "a": -5 if i in bad else 5,
            "b": 0,
            "p": 1.0,
            "r": 0.0,
            "ok": False,
            "s": "x",
            "c": "abc",
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("mode", ["copy", "exactly_once"])
def test_a_batch_with_violations_is_one_copy(pg_dsn: str, mode: str) -> None:
    t = f"pre_one_{mode}"
    _setup(pg_dsn, t)
    sink = PostgresSink(pg_dsn, t, mode=mode)
    sink._timing = CopyTiming()
    d, q = _delivery(sink)
    produced_at_copy: list[int] = []
    copy_ranges = sink._copy_ranges

    def spy(*args: Any, **kwargs: Any) -> None:
        produced_at_copy.append(len(q.records))
        copy_ranges(*args, **kwargs)

    sink._copy_ranges = spy  # type: ignore[method-assign]
    n, bad = 500, {0, 17, 18, 250, 499}
    for k, base in enumerate((0, 1000)):
        payloads = avro_payloads(SCHEMA, _simple_rows(n, bad, base))
        payloads[100] = b"\x02"  # a decode error too
        batch = make_batch(SCHEMA, payloads, base_offset=base)
        d.deliver(batch, threading.Event())
        assert sink._timing.copies == k + 1  # one COPY per batch, nothing else written
        assert d.dirty is False  # the server found nothing: the next batch is not screened
        # The bad rows' dead letters were on their way before the COPY, with the decode one.
        assert produced_at_copy[k] == (k + 1) * (len(bad) + 1)
    want = [b + i for b in (0, 1000) for i in range(n) if i not in bad and i != 100]
    assert _ids(pg_dsn, t) == want
    dead = {int(dict(r.headers)["kfast.original.offset"]): dict(r.headers) for r in q.records}
    assert set(dead) == {b + i for b in (0, 1000) for i in bad | {100}}
    for off, h in dead.items():
        if off % 1000 == 100:
            assert h["kfast.error.stage"] == b"decode"
            continue
        assert h["kfast.error.stage"] == b"sink"
        assert h["kfast.sqlstate"] == b"23514" and h["kfast.error.class"] == b"CheckViolation"
        assert b"c1_a_pos" in h["kfast.error.message"]
    if mode == "exactly_once":
        assert sink.stored_offsets("g", ["orders"]) == {("orders", 0): 1000 + n}
    m = d.metrics.snapshot()
    assert m["bisections"] == 0 and m["dlq_records"] == 2 * (len(bad) + 1)
    sink.close()


def test_a_constraint_dropped_while_running_is_seen(pg_dsn: str) -> None:
    t = "pre_alter"
    _setup(pg_dsn, t)
    sink = PostgresSink(pg_dsn, t)
    d, q = _delivery(sink)
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, _simple_rows(10, {3}))), threading.Event())
    assert len(q.records) == 1
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'ALTER TABLE "{t}" DROP CONSTRAINT c1_a_pos')
    # The write's check still has the old rule; the transaction reads the new one.
    rows = _simple_rows(10, {4}, base=100)
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows), base_offset=100), threading.Event())
    assert len(q.records) == 1 and 104 in _ids(pg_dsn, t)
    # And the next write's check has the new rule too.
    rows = _simple_rows(10, {5}, base=200)
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows), base_offset=200), threading.Event())
    assert len(q.records) == 1 and len(_ids(pg_dsn, t)) == 29
    sink.close()


def test_a_table_with_a_trigger_is_left_to_the_server(pg_dsn: str) -> None:
    t = "pre_trigger"
    _setup(pg_dsn, t)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(
            f"CREATE OR REPLACE FUNCTION {t}_fix() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.a := abs(NEW.a); RETURN NEW; END $$"
        )
        c.execute(
            f'CREATE TRIGGER fix BEFORE INSERT ON "{t}" FOR EACH ROW EXECUTE FUNCTION {t}_fix()'
        )
    sink = PostgresSink(pg_dsn, t)
    d, q = _delivery(sink)
    rows = _simple_rows(20, {2, 9})  # a = -5: the trigger makes it 5
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, rows)), threading.Event())
    assert not q.records and _ids(pg_dsn, t) == list(range(20))
    sink.close()


def test_floats_round_trip_through_the_catalog(pg_dsn: str) -> None:
    """A constant that needs 17 digits is read back exactly whatever the session's
    extra_float_digits."""
    t = "pre_float"
    ddl = (
        'CREATE TABLE "{t}" (id bigint, p double precision, '
        "CHECK (p < '0.30000000000000004'::float8))"
    )
    _setup(pg_dsn, t, ddl)
    schema = {
        "type": "record",
        "name": "F",
        "fields": [{"name": "id", "type": "long"}, {"name": "p", "type": "double"}],
    }
    sep = "&" if "?" in pg_dsn else "?"
    sink = PostgresSink(pg_dsn + sep + "options=-c%20extra_float_digits%3D0", t)
    try:
        rows = [{"id": 0, "p": 0.3}, {"id": 1, "p": 0.30000000000000004}, {"id": 2, "p": 0.1 + 0.2}]
        batch = make_batch(schema, avro_payloads(schema, rows))
        with pytest.raises(PermanentSinkError) as info:
            sink.write(batch)
        assert info.value.row == 1 and info.value.sqlstate == "23514"
        assert math.isclose(rows[1]["p"], 0.30000000000000004)
        with sink._conns.get(0).execute("SHOW extra_float_digits") as cur:
            assert cur.fetchone() == ("0",)  # the session printed floats with 15 digits
    finally:
        sink.close()


def test_a_lost_transaction_does_not_dead_letter_twice(pg_dsn: str) -> None:
    """The dead letters of the rows found on the client are produced before the COPY; the
    connection is then killed, the isolation starts over, and each is produced once."""
    t = "pre_lost"
    _setup(pg_dsn, t)
    killed: list[int] = []

    class KillOnce(TxnProxy):
        def copy(self, ranges: Any, keep: bool) -> Any:
            if not killed:
                pid = self.txn._conn.info.backend_pid
                with psycopg.connect(pg_dsn, autocommit=True) as c:
                    c.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed.append(pid)
            return self.txn.copy(ranges, keep)

    sink = CountingSink(pg_dsn, t, wrap=KillOnce, client_check=True)
    d, q = _delivery(sink)
    bad = {3, 30, 31}
    d.deliver(make_batch(SCHEMA, avro_payloads(SCHEMA, _simple_rows(50, bad))), threading.Event())
    assert killed and len(sink.txns) == 2 and d.metrics.snapshot()["retries"] == 1
    offsets = sorted(int(dict(r.headers)["kfast.original.offset"]) for r in q.records)
    assert offsets == sorted(bad)
    assert _ids(pg_dsn, t) == [i for i in range(50) if i not in bad]
    assert d.dirty is False
    sink.close()
