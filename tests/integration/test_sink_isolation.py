"""Bad rows isolated in one PostgreSQL transaction (``PostgresSink.row_transaction``).

Delivery probes for the rows that fail on their own, writes the rest in one COPY, confirms
each found row alone and commits once (see ``kfast.delivery.isolation.Isolation``). These tests pin
the outcome (every good row in the table exactly once, every bad row dead-lettered once
with its headers and offsets) and the number of COPYs for k bad rows.
"""

from __future__ import annotations

import decimal
import math
import threading
import uuid
from typing import Any

import psycopg
import pytest
from _sink_helpers import (
    ORDER_SCHEMA,
    CapturingQueue,
    CountingSink,
    TxnProxy,
    avro_payloads,
    consume_all,
    make_batch,
)

from kfast.delivery import Delivery, DeliveryMetrics
from kfast.dlq import DeadLetterPolicy
from kfast.errors import PermanentSinkError, TransientSinkError
from kfast.retry import RetryPolicy

pytestmark = pytest.mark.integration

DDL = (
    'CREATE TABLE "{t}" (id bigint PRIMARY KEY, customer text, qty integer CHECK (qty >= 0), '
    "price numeric(12,2))"
)
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05, deadline=30)


def _orders(
    n: int, bad: set[int] | frozenset[int] = frozenset(), ids: list[int] | None = None
) -> list[dict[str, Any]]:
    return [
        {
            "id": ids[i] if ids is not None else i,
            "customer": f"c{i}",
            "qty": -1 if i in bad else i,
            "price": decimal.Decimal("1.25"),
        }
        for i in range(n)
    ]


def _table(dsn: str, name: str, ddl: str = DDL) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{name}"')
        c.execute(ddl.format(t=name))


def _ids(dsn: str, name: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [int(r[0]) for r in c.execute(f'SELECT id FROM "{name}" ORDER BY id').fetchall()]


def _delivery(sink: Any, policy: DeadLetterPolicy | None = None) -> tuple[Delivery, Any]:
    metrics = DeliveryMetrics()
    d = Delivery(
        sink,
        FAST_RETRY,
        policy or DeadLetterPolicy("unused.dlq"),
        {"bootstrap.servers": "127.0.0.1:9"},  # never contacted: the queue is replaced
        metrics,
    )
    queue = CapturingQueue()
    d.queue = queue  # type: ignore[assignment]
    return d, queue


def _log4(n: int) -> int:
    return math.ceil(math.log(n, 4))


def _check_dead(queue: CapturingQueue, bad: set[int], base: int = 0, cls: bytes = b"") -> None:
    offsets = [int(dict(r.headers)["kfast.original.offset"]) for r in queue.records]
    assert sorted(offsets) == sorted(base + i for i in bad)  # each bad row exactly once
    for rec in queue.records:
        h = dict(rec.headers)
        i = int(h["kfast.original.offset"]) - base
        assert rec.stage == "sink" and h["kfast.error.stage"] == b"sink"
        if cls:
            assert h["kfast.error.class"] == cls
        assert int(h["kfast.attempts"]) >= 2
        assert h["trace"] == f"t{i}".encode()  # the original headers travel along
        assert rec.key == f"k{base + i}".encode()
    assert queue.confirmed == len(queue.records)  # acknowledged before deliver returned


N = 200
PATTERNS = {
    "first": {0},
    "last": {N - 1},
    "adjacent": {50, 51, 52},
    "edges_and_pairs": {0, 1, 99, 100, N - 2, N - 1},
    "every_10th": set(range(5, N, 10)),
    "every_row": set(range(N)),
}


@pytest.mark.parametrize("mode", ["copy", "exactly_once"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_bad_row_patterns_in_one_transaction(
    pg_dsn: str, unique_group: str, mode: str, pattern: str
) -> None:
    table = "iso_patterns"
    _table(pg_dsn, table)
    bad = PATTERNS[pattern]
    sink = CountingSink(pg_dsn, table, mode=mode)
    order: list[str] = []

    class Recorder(TxnProxy):
        """Records when the transaction commits relative to DLQ confirmations."""

        def commit(self) -> None:
            order.append(f"commit:{queue.confirmed}/{len(queue.records)}")
            self.txn.commit()

    sink.wrap = Recorder
    d, queue = _delivery(sink)
    batch = make_batch(
        ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(N, bad)), group=unique_group
    )
    d.deliver(batch, threading.Event())
    assert _ids(pg_dsn, table) == [i for i in range(N) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")
    assert all(dict(r.headers)["kfast.sqlstate"] == b"23514" for r in queue.records)
    k = len(bad)
    assert len(sink.txns) == 1  # one transaction, one commit
    assert sink.copies <= 2 * k + 1 + k * _log4(N), sink.copies
    snap = d.metrics.snapshot()
    assert snap["located"] == k and snap["bisections"] == 0
    assert snap["rows_written"] == N - k and snap["dlq_records"] == k
    if mode == "exactly_once":
        # Dead letters are acknowledged before the commit stores the batch's offsets.
        assert order == [f"commit:{k}/{k}"]
        assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): N}
    sink.close()


def test_sparse_bad_rows_cost_about_two_copies_each(pg_dsn: str) -> None:
    """The demo's shape: 1 bad row in ~1000; the probe windows rarely find nothing."""
    table = "iso_sparse"
    _table(pg_dsn, table)
    n, bad = 6000, {300, 1500, 2222, 3100, 4999, 5800}
    sink = CountingSink(pg_dsn, table)
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad))), threading.Event()
    )
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")
    k = len(bad)
    assert sink.copies <= 2 * k + 1 + k * _log4(n)
    assert sink.copies <= 2 * k + 4, sink.copies  # what the bound is loose about
    sink.close()


def test_bad_rows_reach_the_real_dlq_with_their_offsets(
    pg_dsn: str, kafka_broker: Any, unique_topic: str
) -> None:
    table = "iso_real_dlq"
    _table(pg_dsn, table)
    kafka_broker.create_topic(unique_topic)
    n, bad = 300, {0, 1, 150, 298, 299}
    sink = CountingSink(pg_dsn, table)
    d = Delivery(
        sink,
        FAST_RETRY,
        DeadLetterPolicy(unique_topic),
        {"bootstrap.servers": kafka_broker.bootstrap},
    )
    payloads = avro_payloads(ORDER_SCHEMA, _orders(n, bad))
    payloads[7] = b"\x02"  # and one undecodable payload
    d.deliver(make_batch(ORDER_SCHEMA, payloads, base_offset=1000), threading.Event())
    d.close()
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad and i != 7]
    dead = consume_all(kafka_broker.bootstrap, unique_topic, expected=len(bad) + 1)
    by_offset = {int(dict(m.headers())["kfast.original.offset"]): m for m in dead}
    assert sorted(by_offset) == sorted([1000 + i for i in bad] + [1007])
    for off, m in by_offset.items():
        h = dict(m.headers())
        assert m.value() == payloads[off - 1000]  # bytes untouched
        stage = b"decode" if off == 1007 else b"sink"
        assert h["kfast.error.stage"] == stage
    sink.close()


def test_duplicate_keys_are_handled_in_order(pg_dsn: str) -> None:
    """Unique violations depend on other rows: no probing past them, in-order handling.

    In-batch duplicates keep the first occurrence (as writing the rows one by one would),
    a key already in the table loses, and CHECK violations are still probed.
    """
    table = "iso_dups"
    _table(pg_dsn, table)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"INSERT INTO \"{table}\" VALUES (10000, 'old', 1, 1)")
    n = 120
    ids = list(range(n))
    ids[30] = 3  # duplicate of row 3
    ids[31] = 3  # and again
    ids[80] = 10000  # already in the table
    check_bad = {10, 60, 119}
    sink = CountingSink(pg_dsn, table)
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, check_bad, ids))),
        threading.Event(),
    )
    dup_bad = {30, 31, 80}
    good = sorted({ids[i] for i in range(n) if i not in check_bad | dup_bad} | {10000})
    assert _ids(pg_dsn, table) == good
    _check_dead(queue, check_bad | dup_bad)
    classes = {
        int(dict(r.headers)["kfast.original.offset"]): dict(r.headers) for r in queue.records
    }
    for i in dup_bad:
        assert classes[i]["kfast.error.class"] == b"UniqueViolation"
    for i in check_bad:
        assert classes[i]["kfast.error.class"] == b"CheckViolation"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        row = c.execute(f'SELECT customer FROM "{table}" WHERE id = 3').fetchone()
    assert row == ("c3",)  # the first occurrence won
    k = len(check_bad | dup_bad)
    assert len(sink.txns) == 1
    assert sink.copies <= 3 * k + 2 + k * _log4(n), sink.copies
    sink.close()


class NoScreen(TxnProxy):
    """Hides the set-based screen: isolation runs on probes and locators (steps 1-3)."""

    def screen(self, ranges: Any, keys: bool = True) -> None:
        return None


class ShiftedProbes(NoScreen):
    """Probes blame the row after the one PostgreSQL reported (a lying locator)."""

    def __init__(self, txn: Any) -> None:
        super().__init__(txn)
        self.probes = 0

    def probe(self, ranges: Any) -> None:
        self.probes += 1
        try:
            self.txn.probe(ranges)
        except PermanentSinkError as exc:
            if exc.row is not None:
                exc.row = min(exc.row + 1, ranges[-1][1] - 1)
            raise


def test_lying_locator_rolls_back_and_bisects(pg_dsn: str) -> None:
    table = "iso_liar"
    _table(pg_dsn, table)
    n, bad = 400, {5, 120, 121, 260, 399}
    sink = CountingSink(pg_dsn, table, wrap=ShiftedProbes)
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad))), threading.Event()
    )
    # The blamed good row wrote fine alone: the transaction was rolled back, nothing of it
    # stayed, and the batch was bisected slice by slice instead.
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")
    snap = d.metrics.snapshot()
    assert snap["bisections"] >= 1 and snap["dlq_records"] == len(bad)
    sink.close()


def test_user_trigger_disables_probes(pg_dsn: str) -> None:
    """A trigger may make any error depend on other rows: everything is handled in order."""
    table = "iso_trigger"
    _table(pg_dsn, table)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(
            "CREATE OR REPLACE FUNCTION iso_touch() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN NEW.customer := upper(NEW.customer); RETURN NEW; END$$"
        )
        c.execute(
            f'CREATE TRIGGER iso_touch BEFORE INSERT ON "{table}" '
            "FOR EACH ROW EXECUTE FUNCTION iso_touch()"
        )
    n, bad = 300, {0, 77, 78, 299}
    probes: list[ShiftedProbes] = []

    def counting(txn: Any) -> Any:
        p = ShiftedProbes(txn)
        probes.append(p)
        return p

    sink = CountingSink(pg_dsn, table, wrap=counting)
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad))), threading.Event()
    )
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")
    assert probes and all(p.probes == 0 for p in probes)
    k = len(bad)
    assert sink.copies <= 3 * k + 2, sink.copies
    sink.close()


def test_probes_use_the_table_without_temp_privilege(pg_server: Any, pg_dsn: str) -> None:
    """No TEMP privilege: no probe table; probes COPY into the table itself (rolled back)."""
    db, role = "kfast_notemp", "kfast_notemp_user"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {db}")
        c.execute(f"CREATE DATABASE {db}")
        c.execute(f"DROP ROLE IF EXISTS {role}")
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC")
    admin = psycopg.conninfo.make_conninfo(pg_dsn, dbname=db)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(DDL.format(t="iso_notemp"))
        c.execute(f"GRANT SELECT, INSERT ON iso_notemp TO {role}")
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, dbname=db, user=role)
    n, bad = 200, {3, 100, 199}
    sink = CountingSink(dsn, "iso_notemp")
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad))), threading.Event()
    )
    assert False in sink._conns.probe_tables.values()  # it tried, and fell back to the table
    assert _ids(admin, "iso_notemp") == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")
    k = len(bad)
    assert sink.copies <= 2 * k + 1 + k * _log4(n)
    sink.close()
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"DROP DATABASE {db}")
        c.execute(f"DROP ROLE {role}")


def test_connection_lost_mid_transaction_starts_it_over(pg_dsn: str) -> None:
    table = "iso_lost"
    _table(pg_dsn, table)
    n, bad = 300, {10, 150, 151, 290}
    killed: list[int] = []

    class KillOnce(ShiftedProbes):
        def probe(self, ranges: Any) -> None:
            if not killed:
                pid = self.txn._conn.info.backend_pid
                with psycopg.connect(pg_dsn, autocommit=True) as c:
                    c.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed.append(pid)
            self.txn.probe(ranges)

    sink = CountingSink(pg_dsn, table, wrap=KillOnce)
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad))), threading.Event()
    )
    assert killed and len(sink.txns) == 2  # lost, then done again from the start
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")  # not twice: only the committed attempt
    assert d.metrics.snapshot()["retries"] == 1
    sink.close()


def test_transaction_lost_for_good_raises_without_dead_letters(pg_dsn: str) -> None:
    table = "iso_down"
    _table(pg_dsn, table)

    class AlwaysLost(ShiftedProbes):
        def probe(self, ranges: Any) -> None:
            pid = self.txn._conn.info.backend_pid
            with psycopg.connect(pg_dsn, autocommit=True) as c:
                c.execute("SELECT pg_terminate_backend(%s)", (pid,))
            self.txn.probe(ranges)

    sink = CountingSink(pg_dsn, table, wrap=AlwaysLost)
    d, queue = _delivery(sink)
    from kfast.errors import RetryExhausted

    with pytest.raises(RetryExhausted) as ei:
        d.deliver(
            make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(50, {5, 20}))),
            threading.Event(),
        )
    assert isinstance(ei.value.last_error, TransientSinkError)
    assert _ids(pg_dsn, table) == [] and queue.records == []  # nothing committed or dead
    sink.close()


def test_exactly_once_redelivery_is_fenced(pg_dsn: str, unique_group: str) -> None:
    """Rows whose offsets are already stored are skipped inside the transaction too."""
    table = "iso_eo_fence"
    _table(pg_dsn, table)
    sink = CountingSink(pg_dsn, table, mode="exactly_once")
    d, queue = _delivery(sink)
    first = _orders(100, {10, 60})
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, first), group=unique_group),
        threading.Event(),
    )
    _check_dead(queue, {10, 60})
    # Offsets 50..149 again (a crash before the Kafka commit): 50..99 are stored already.
    ids = list(range(50, 150))
    again = _orders(100, {10, 70}, ids)  # rows 10 and 70 are offsets 60 and 120
    d2, queue2 = _delivery(sink)
    d2.deliver(
        make_batch(
            ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, again), base_offset=50, group=unique_group
        ),
        threading.Event(),
    )
    assert _ids(pg_dsn, table) == [i for i in range(150) if i not in {10, 60, 120}]
    assert [int(dict(r.headers)["kfast.original.offset"]) for r in queue2.records] == [120]
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): 150}
    assert sink.fenced_rows >= 50
    sink.close()


def test_values_kfast_cannot_encode_are_probed(pg_dsn: str) -> None:
    """An EncodeError (a string that is not a UUID into a uuid column) fails on its own."""
    schema = {
        "type": "record",
        "name": "U",
        "fields": [{"name": "id", "type": "long"}, {"name": "u", "type": "string"}],
    }
    table = "iso_uuid"
    _table(pg_dsn, table, 'CREATE TABLE "{t}" (id bigint PRIMARY KEY, u uuid)')
    n, bad = 150, {0, 40, 41, 149}
    recs = [{"id": i, "u": "nope" if i in bad else str(uuid.UUID(int=i))} for i in range(n)]
    sink = CountingSink(pg_dsn, table)
    d, queue = _delivery(sink)
    d.deliver(make_batch(schema, avro_payloads(schema, recs)), threading.Event())
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"EncodeError")
    k = len(bad)
    assert d.metrics.snapshot()["located"] == k
    assert sink.copies <= 2 * k + 1 + k * _log4(n), sink.copies
    sink.close()


def test_upsert_has_no_row_transaction(pg_dsn: str) -> None:
    """upsert's constraint errors have no COPY line: slice by slice, as before."""
    table = "iso_upsert"
    _table(pg_dsn, table)
    n, bad = 64, {3, 40}
    sink = CountingSink(pg_dsn, table, mode="upsert", key="id")
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad))), threading.Event()
    )
    assert sink.txns == []
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")
    sink.close()


def test_failure_without_locator_goes_slice_by_slice(pg_dsn: str) -> None:
    """Without the screen, a foreign key violation has no COPY line: the transaction is
    given up and bisected."""
    table, parent = "iso_fk", "iso_fk_parent"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{table}"')
        c.execute(f'DROP TABLE IF EXISTS "{parent}"')
        c.execute(f'CREATE TABLE "{parent}" (customer text PRIMARY KEY)')
        c.execute(f"INSERT INTO \"{parent}\" SELECT 'c' || g FROM generate_series(0, 999) g")
    _table(
        pg_dsn,
        table,
        'CREATE TABLE "{t}" (id bigint PRIMARY KEY, customer text REFERENCES '
        f'"{parent}", qty integer CHECK (qty >= 0), price numeric(12,2))',
    )
    n, check_bad = 200, {3, 150}
    recs = _orders(n, check_bad)
    recs[90]["customer"] = "nobody"  # no such parent row
    sink = CountingSink(pg_dsn, table, wrap=NoScreen)
    d, queue = _delivery(sink)
    d.deliver(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, recs)), threading.Event())
    bad = check_bad | {90}
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad)
    classes = {
        int(dict(r.headers)["kfast.original.offset"]): dict(r.headers) for r in queue.records
    }
    assert classes[90]["kfast.error.class"] == b"ForeignKeyViolation"
    assert len(sink.txns) == 1 and d.metrics.snapshot()["bisections"] >= 1
    sink.close()


def test_probe_table_dropped_under_the_sink(pg_dsn: str) -> None:
    """E.g. a pooler that hands the next transaction another server session."""
    table = "iso_probe_gone"
    _table(pg_dsn, table)
    sink = CountingSink(pg_dsn, table, wrap=NoScreen)
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(100, {5, 50}))),
        threading.Event(),
    )
    conn = sink._conns.get(0)
    assert sink._conns.probe_tables == {id(conn): True}
    conn.execute("DROP TABLE pg_temp.kfast_probe")
    conn.commit()
    batch = make_batch(
        ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(100, {20, 70})), base_offset=100
    )
    d2, queue2 = _delivery(sink)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'TRUNCATE "{table}"')
    d2.deliver(batch, threading.Event())
    assert sink._conns.probe_tables == {id(conn): False}  # probes went to the table itself
    assert _ids(pg_dsn, table) == [i for i in range(100) if i not in {20, 70}]
    _check_dead(queue2, {20, 70}, base=100, cls=b"CheckViolation")
    sink.close()


def test_stale_probe_table_is_made_again(pg_dsn: str) -> None:
    """The table lost its CHECK after the probe table was made: the probes blame rows the
    table accepts; the batch goes slice by slice and the probe table is made again."""
    table = "iso_stale"
    _table(pg_dsn, table)
    sink = CountingSink(pg_dsn, table, wrap=NoScreen)
    d, queue = _delivery(sink)
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(100, {5, 50}))),
        threading.Event(),
    )
    _check_dead(queue, {5, 50})
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'TRUNCATE "{table}"')
        c.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{table}_qty_check"')
        c.execute(f'ALTER TABLE "{table}" ADD CHECK (qty >= -1)')  # -1 is fine now
    recs = _orders(100, {10, 60})  # qty -1: the stale probe table rejects them
    recs[5]["qty"] = -2  # still bad: the batch's first write fails here, probes follow
    d2, queue2 = _delivery(sink)
    d2.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, recs), base_offset=100),
        threading.Event(),
    )
    assert _ids(pg_dsn, table) == [i for i in range(100) if i != 5]
    _check_dead(queue2, {5}, base=100, cls=b"CheckViolation")
    assert d2.metrics.snapshot()["bisections"] >= 1  # given up, then slice by slice
    conn = sink._conns.get(0)
    assert id(conn) not in sink._conns.probe_tables  # made again by the next row transaction
    d3, queue3 = _delivery(sink)
    recs = _orders(50, set(), list(range(1000, 1050)))
    recs[7]["qty"] = -2
    d3.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, recs), base_offset=200),
        threading.Event(),
    )
    assert sink._conns.probe_tables == {id(conn): True}
    _check_dead(queue3, {7}, base=200, cls=b"CheckViolation")
    assert len(sink.txns) == 3 and d3.metrics.snapshot()["bisections"] == 0
    sink.close()


@pytest.mark.parametrize("bad", [set(), {4, 30}])
def test_exactly_once_offsets_never_pass_an_unconfirmed_dead_letter(
    pg_dsn: str, unique_group: str, bad: set[int]
) -> None:
    """Every write or commit that stores offsets comes after the DLQ acknowledged every
    dead letter produced so far (decode errors included)."""
    table = "iso_eo_order"
    _table(pg_dsn, table)
    seen: list[tuple[int, int]] = []

    class Checked(CountingSink):
        def write(self, batch: Any) -> None:
            seen.append((queue.confirmed, len(queue.records)))
            super().write(batch)

    def recorder(txn: Any) -> Any:
        class Rec(ShiftedProbes):
            def probe(self, ranges: Any) -> None:
                self.txn.probe(ranges)

            def commit(self) -> None:
                seen.append((queue.confirmed, len(queue.records)))
                self.txn.commit()

        return Rec(txn)

    sink = Checked(pg_dsn, table, mode="exactly_once", wrap=recorder)
    d, queue = _delivery(sink)
    payloads = avro_payloads(ORDER_SCHEMA, _orders(40, bad))
    payloads[12] = b"\x02"  # undecodable
    d.deliver(make_batch(ORDER_SCHEMA, payloads, group=unique_group), threading.Event())
    assert seen and all(confirmed == produced for confirmed, produced in seen), seen
    # With a decode error the batch goes in one row transaction: its commit stores the
    # offsets once, after the decode error and the bad rows were acknowledged.
    assert seen == [(1 + len(bad), 1 + len(bad))], seen
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): 40}
    assert _ids(pg_dsn, table) == [i for i in range(40) if i not in bad and i != 12]
    sink.close()


# ------------------------------------------------------------ circuit breaker mid-batch


def _breaker_batch(n: int, bad: set[int], decode_bad: frozenset[int] = frozenset()) -> Any:
    payloads = avro_payloads(ORDER_SCHEMA, _orders(n, bad))
    for i in decode_bad:
        payloads[i] = b"\x02"  # undecodable
    return make_batch(ORDER_SCHEMA, payloads)


@pytest.mark.parametrize("mode", ["copy", "exactly_once"])
def test_all_bad_batch_trips_the_breaker_mid_isolation(
    pg_dsn: str, unique_group: str, mode: str
) -> None:
    """20,000 rows that all fail: the breaker (max_consecutive=100) trips once 100 rows are
    found and confirmed, long before the isolation has probed every row. Nothing is
    committed, no dead letter of the batch is produced."""
    from kfast.dlq import CircuitBreakerOpen

    table = "iso_breaker_all_bad"
    _table(pg_dsn, table)
    n, m = 20_000, 100
    sink = CountingSink(pg_dsn, table, mode=mode)
    d, queue = _delivery(sink, DeadLetterPolicy("unused.dlq", max_consecutive=m))
    payloads = avro_payloads(ORDER_SCHEMA, _orders(n, set(range(n))))
    batch = make_batch(ORDER_SCHEMA, payloads, group=unique_group)
    with pytest.raises(CircuitBreakerOpen, match=f"{m} consecutive"):
        d.deliver(batch, threading.Event())
    # The batch's write, m - 1 probes that each find the next row, m rows confirmed alone.
    assert sink.copies <= 2 * m, sink.copies
    assert len(sink.txns) == 1
    assert _ids(pg_dsn, table) == [] and queue.records == []
    if mode == "exactly_once":
        assert sink.stored_offsets(unique_group, ["orders"]) == {}
    sink.close()


def test_decode_errors_count_toward_the_mid_batch_trip(pg_dsn: str) -> None:
    """Inputs 0..39 undecodable (produced at once, as today), the rows after them all bad:
    the run of 100 is reached after 60 rows, counting the decode errors."""
    from kfast.dlq import CircuitBreakerOpen

    table = "iso_breaker_decode"
    _table(pg_dsn, table)
    n, m, k = 2000, 100, 40
    sink = CountingSink(pg_dsn, table)
    d, queue = _delivery(sink, DeadLetterPolicy("unused.dlq", max_consecutive=m))
    batch = _breaker_batch(n, set(range(n)), frozenset(range(k)))
    with pytest.raises(CircuitBreakerOpen, match=f"{m} consecutive"):
        d.deliver(batch, threading.Event())
    assert sink.copies <= 2 * (m - k), sink.copies
    assert [r.stage for r in queue.records] == ["decode"] * k  # no sink dead letter
    assert _ids(pg_dsn, table) == []
    sink.close()


def test_run_from_the_previous_batch_counts(pg_dsn: str) -> None:
    """The previous batch ended with 30 dead letters in a row: 70 more at the start of this
    one trip the breaker (max_consecutive=100)."""
    from kfast.dlq import CircuitBreakerOpen

    table = "iso_breaker_carry"
    _table(pg_dsn, table)
    m = 100
    sink = CountingSink(pg_dsn, table)
    d, queue = _delivery(sink, DeadLetterPolicy("unused.dlq", max_consecutive=m))
    d.deliver(_breaker_batch(200, set(range(170, 200))), threading.Event())
    assert len(queue.records) == 30
    before = sink.copies
    with pytest.raises(CircuitBreakerOpen, match=f"{m} consecutive"):
        d.deliver(_breaker_batch(1000, set(range(1000))), threading.Event())
    assert sink.copies - before <= 2 * (m - 30), sink.copies - before
    assert len(queue.records) == 30 and len(_ids(pg_dsn, table)) == 170
    sink.close()


def test_ratio_trips_mid_isolation(pg_dsn: str) -> None:
    """Every 5th row bad, max_ratio=0.1 of a 1000 window, batch of 1000: the ratio check
    after the batch is certain to trip once 101 rows are found; they are confirmed, the
    breaker trips, the rest of the batch is never probed."""
    from kfast.dlq import CircuitBreakerOpen

    table = "iso_breaker_ratio"
    _table(pg_dsn, table)
    n, w = 1000, 1000
    limit = int(0.1 * w) + 1  # dead letters that make the ratio above 0.1
    sink = CountingSink(pg_dsn, table)
    pol = DeadLetterPolicy("unused.dlq", max_ratio=0.1, window=w, max_consecutive=None)
    d, queue = _delivery(sink, pol)
    with pytest.raises(CircuitBreakerOpen, match="max_ratio"):
        d.deliver(_breaker_batch(n, set(range(0, n, 5))), threading.Event())
    # The write, at most 2 probes per row found (one that finds it, one that finds nothing
    # while the window settles), each found row confirmed alone.
    assert sink.copies <= 3 * limit + 1, sink.copies
    assert queue.records == [] and _ids(pg_dsn, table) == []
    sink.close()


@pytest.mark.parametrize("mode", ["copy", "exactly_once"])
def test_sparse_bad_rows_under_the_breaker_go_through(
    pg_dsn: str, unique_group: str, mode: str
) -> None:
    """Bad rows under both thresholds: same table, dead letters and COPYs as without the
    mid-batch check (the bound of test_sparse_bad_rows_cost_about_two_copies_each)."""
    table = "iso_breaker_sparse"
    _table(pg_dsn, table)
    n = 6000
    bad = set(range(37, n, 200)) | {1000, 1001}  # 32 rows, a run of 2
    sink = CountingSink(pg_dsn, table, mode=mode)
    pol = DeadLetterPolicy("unused.dlq", max_ratio=0.01, window=1000, max_consecutive=3)
    d, queue = _delivery(sink, pol)
    payloads = avro_payloads(ORDER_SCHEMA, _orders(n, bad))
    d.deliver(make_batch(ORDER_SCHEMA, payloads, group=unique_group), threading.Event())
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    _check_dead(queue, bad, cls=b"CheckViolation")
    k = len(bad)
    assert sink.copies <= 2 * k + 1 + k * _log4(n), sink.copies
    assert len(sink.txns) == 1 and d.metrics.snapshot()["bisections"] == 0
    if mode == "exactly_once":
        assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): n}
    sink.close()


def test_slice_by_slice_trips_as_rows_are_found(pg_dsn: str) -> None:
    """A failure without a COPY line (foreign key) goes slice by slice: there the breaker
    counts each row as it is confirmed dead and trips before the rest of the batch is
    bisected. Slices written before stay (their own commits, as on any crash slice by
    slice); no dead letter of the batch is produced."""
    from kfast.dlq import CircuitBreakerOpen

    table, parent = "iso_breaker_fk", "iso_breaker_fk_parent"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{table}"')
        c.execute(f'DROP TABLE IF EXISTS "{parent}"')
        c.execute(f'CREATE TABLE "{parent}" (customer text PRIMARY KEY)')
        c.execute(f"INSERT INTO \"{parent}\" SELECT 'c' || g FROM generate_series(0, 9999) g")
    _table(
        pg_dsn,
        table,
        'CREATE TABLE "{t}" (id bigint PRIMARY KEY, customer text REFERENCES '
        f'"{parent}", qty integer CHECK (qty >= 0), price numeric(12,2))',
    )
    n, m = 4000, 20
    recs = _orders(n)
    for r in recs[100:]:
        r["customer"] = "nobody"  # no such parent row
    sink = CountingSink(pg_dsn, table, wrap=NoScreen)
    d, queue = _delivery(sink, DeadLetterPolicy("unused.dlq", max_consecutive=m))
    with pytest.raises(CircuitBreakerOpen, match=f"{m} consecutive"):
        d.deliver(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, recs)), threading.Event())
    assert queue.records == []
    assert _ids(pg_dsn, table) == list(range(100))
    # Bisection down to single rows: about log2(n) writes per row found.
    assert sink.copies <= 2 * m * math.ceil(math.log2(n)), sink.copies
    sink.close()
