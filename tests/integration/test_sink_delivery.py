"""Delivery: retry, bisection, DLQ and circuit breaker against real PostgreSQL and Kafka."""

from __future__ import annotations

import decimal
import math
import threading
from typing import Any

import psycopg
import pytest
from _sink_helpers import ORDER_SCHEMA, avro_payloads, consume_all, make_batch

from kfast.cli.replay import main as replay_main
from kfast.delivery import Delivery, DeliveryMetrics
from kfast.dlq import CircuitBreakerOpen, DeadLetterPolicy
from kfast.errors import DecodeError, PermanentSinkError, RetryExhausted
from kfast.retry import RetryPolicy
from kfast.sinks import CallableSink
from kfast.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

DDL = (
    'CREATE TABLE "{t}" (id bigint PRIMARY KEY, customer text, qty integer CHECK (qty >= 0), '
    "price numeric(12,2))"
)
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05, deadline=30)


def _orders(n: int, bad: set[int] = frozenset(), base: int = 0) -> list[dict[str, Any]]:  # type: ignore[assignment]
    return [
        {
            "id": base + i,
            "customer": f"c{i}",
            "qty": -1 if i in bad else i,
            "price": decimal.Decimal("1.25"),
        }
        for i in range(n)
    ]


def _table(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{name}"')
        c.execute(DDL.format(t=name))


def _count(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f'SELECT count(*) FROM "{name}"').fetchone()
        assert row is not None
        return int(row[0])


class CountingSink:
    """Wraps a real sink and counts write calls (the bisection cost)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def stores_offsets(self) -> bool:
        return bool(getattr(self.inner, "stores_offsets", False))

    def write(self, batch: Any) -> None:
        self.calls += 1
        self.inner.write(batch)

    def close(self) -> None:
        self.inner.close()


def test_bad_rows_and_corrupt_payloads_go_to_dlq_with_headers(
    pg_dsn: str, kafka_broker: Any, unique_topic: str
) -> None:
    table = "dlv_mixed"
    _table(pg_dsn, table)
    dlq_topic = unique_topic + ".dlq"
    kafka_broker.create_topic(dlq_topic)
    n, bad = 64, {5, 40}
    payloads = avro_payloads(ORDER_SCHEMA, _orders(n, bad))
    payloads[10] = b"\x02"  # truncated: decode error
    payloads[33] = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
    batch = make_batch(ORDER_SCHEMA, payloads, topic="orders", partition=3, base_offset=1000)
    assert [e.index for e in batch.errors] == [10, 33]
    metrics = DeliveryMetrics()
    sink = PostgresSink(pg_dsn, table)
    d = Delivery(
        sink,
        FAST_RETRY,
        DeadLetterPolicy(dlq_topic),
        {"bootstrap.servers": kafka_broker.bootstrap},
        metrics,
    )
    d.deliver(batch, threading.Event())
    d.close()
    sink.close()
    assert _count(pg_dsn, table) == n - 2 - len(bad)
    msgs = consume_all(kafka_broker.bootstrap, dlq_topic, expected=4)
    assert len(msgs) == 4
    by_offset = {}
    for m in msgs:
        h = dict(m.headers())
        by_offset[int(h["kfast.original.offset"])] = (m, h)
    assert set(by_offset) == {1005, 1010, 1033, 1040}
    for off, (m, h) in by_offset.items():
        i = off - 1000
        assert m.value() == payloads[i] and m.key() == f"k{off}".encode()  # bytes untouched
        assert h["kfast.original.topic"] == b"orders" and h["kfast.original.partition"] == b"3"
        assert h["kfast.original.timestamp"] == str(1_700_000_000_000 + i).encode()
        assert h["trace"] == f"t{i}".encode()  # the original headers travel along
        assert int(h["kfast.attempts"]) >= 1 and h["kfast.first_failure"].endswith(b"+00:00")
        if i in bad:
            assert h["kfast.error.stage"] == b"sink"
            assert h["kfast.error.class"] == b"CheckViolation"
            assert h["kfast.sqlstate"] == b"23514"
            assert (
                b"qty" in h["kfast.error.message"] or b"check" in h["kfast.error.message"].lower()
            )
        else:
            assert h["kfast.error.stage"] == b"decode"
            assert h["kfast.error.class"] == b"DecodeError"
            assert "kfast.sqlstate" not in h
    snap = metrics.snapshot()
    assert snap["dlq_records_by_reason"] == {"decode/DecodeError": 2, "sink/CheckViolation": 2}
    assert snap["located"] + snap["bisections"] >= 1  # the COPY line locates them


@pytest.mark.parametrize(
    ("n", "bad"), [(512, {7}), (512, {3, 200, 511}), (1000, {0, 1, 2, 998, 999})]
)
def test_bisection_isolates_k_bad_rows_in_k_log_n_writes(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, n: int, bad: set[int]
) -> None:
    table = "dlv_bisect"
    _table(pg_dsn, table)
    kafka_broker.create_topic(unique_topic)
    sink = CountingSink(PostgresSink(pg_dsn, table))
    metrics = DeliveryMetrics()
    d = Delivery(
        sink,
        FAST_RETRY,
        DeadLetterPolicy(unique_topic),
        {"bootstrap.servers": kafka_broker.bootstrap},
        metrics,
    )
    d.deliver(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad))), threading.Event()
    )
    d.close()
    sink.close()
    assert _count(pg_dsn, table) == n - len(bad)
    k = len(bad)
    assert sink.calls <= 1 + 2 * k * math.ceil(math.log2(n)), sink.calls
    dead = consume_all(kafka_broker.bootstrap, unique_topic, expected=k)
    assert sorted(int(dict(m.headers())["kfast.original.offset"]) for m in dead) == sorted(bad)


def test_without_dlq_poison_pills_raise(pg_dsn: str) -> None:
    table = "dlv_nodlq"
    _table(pg_dsn, table)
    sink = PostgresSink(pg_dsn, table)
    d = Delivery(sink, FAST_RETRY, None, {})
    payloads = avro_payloads(ORDER_SCHEMA, _orders(4))
    payloads[1] = b"\x02"
    with pytest.raises(DecodeError, match="DeadLetterPolicy"):
        d.deliver(make_batch(ORDER_SCHEMA, payloads), threading.Event())
    with pytest.raises(PermanentSinkError, match="DeadLetterPolicy"):
        d.deliver(
            make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(4, {2}))),
            threading.Event(),
        )
    assert _count(pg_dsn, table) == 0
    sink.close()


def test_transient_errors_are_retried_then_exhausted(kafka_broker: Any) -> None:
    from kfast.errors import TransientSinkError

    calls = []

    def flaky(batch: Any) -> None:
        calls.append(batch.num_rows)
        if len(calls) < 3:
            raise TransientSinkError("connection reset", sqlstate="08006")

    metrics = DeliveryMetrics()
    d = Delivery(CallableSink(flaky), FAST_RETRY, None, {}, metrics)
    batch = make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(3)))
    d.deliver(batch, threading.Event())
    assert calls == [3, 3, 3] and metrics.retries == 2

    def down(batch: Any) -> None:
        raise TransientSinkError("connection refused")

    with pytest.raises(RetryExhausted) as ei:
        Delivery(CallableSink(down), FAST_RETRY, None, {}).deliver(batch, threading.Event())
    assert ei.value.attempts == 3


def test_dlq_topic_missing_retries_then_raises(kafka_broker: Any, unique_topic: str) -> None:
    """The DLQ producer refuses the topic (not created, auto-create off): retried, then raised."""
    ok = CallableSink(lambda b: None)
    policy = DeadLetterPolicy(unique_topic + ".missing", producer={"message.timeout.ms": "1000"})
    d = Delivery(ok, FAST_RETRY, policy, {"bootstrap.servers": kafka_broker.bootstrap})
    payloads = avro_payloads(ORDER_SCHEMA, _orders(3))
    payloads[1] = b"\x02"
    with pytest.raises(RetryExhausted):
        d.deliver(make_batch(ORDER_SCHEMA, payloads), threading.Event())
    d.close()


def test_dlq_broker_unavailable_retries_then_raises(pg_dsn: str) -> None:
    table = "dlv_dlqdown"
    _table(pg_dsn, table)
    policy = DeadLetterPolicy(
        "nowhere.dlq",
        producer={
            "bootstrap.servers": "127.0.0.1:9",
            "message.timeout.ms": "300",
            "socket.connection.setup.timeout.ms": "1000",
        },
    )
    sink = PostgresSink(pg_dsn, table)
    d = Delivery(sink, FAST_RETRY, policy, {"bootstrap.servers": "unused:1"})
    payloads = avro_payloads(ORDER_SCHEMA, _orders(4))
    payloads[2] = b"\x02"
    with pytest.raises(RetryExhausted) as ei:
        d.deliver(make_batch(ORDER_SCHEMA, payloads), threading.Event())
    assert ei.value.attempts == FAST_RETRY.max_attempts
    assert d.queue is not None and d.queue.retries == FAST_RETRY.max_attempts - 1
    sink.close()


def test_circuit_breaker_ratio_and_consecutive(kafka_broker: Any, unique_topic: str) -> None:
    kafka_broker.create_topic(unique_topic)
    conf = {"bootstrap.servers": kafka_broker.bootstrap}
    ok = CallableSink(lambda b: None)
    # Ratio: 30% corrupt over a window of 100 > max_ratio 0.2.
    d = Delivery(
        ok,
        FAST_RETRY,
        DeadLetterPolicy(unique_topic, max_ratio=0.2, window=100, max_consecutive=None),
        conf,
    )
    payloads = avro_payloads(ORDER_SCHEMA, _orders(100))
    for i in range(0, 100, 3):
        payloads[i] = b"\x02"
    with pytest.raises(CircuitBreakerOpen, match="max_ratio"):
        d.deliver(make_batch(ORDER_SCHEMA, payloads), threading.Event())
    d.close()
    # Consecutive: 5 in a row trips max_consecutive=5 even on a short stream.
    d = Delivery(ok, FAST_RETRY, DeadLetterPolicy(unique_topic, max_consecutive=5), conf)
    payloads = avro_payloads(ORDER_SCHEMA, _orders(10))
    d.deliver(make_batch(ORDER_SCHEMA, [b"\x02"] * 4 + payloads[4:]), threading.Event())
    with pytest.raises(CircuitBreakerOpen, match="max_consecutive"):
        d.deliver(make_batch(ORDER_SCHEMA, [b"\x02"] * 5 + payloads[5:]), threading.Event())
    d.close()


def test_exactly_once_with_bisection_stores_batch_offsets(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    table = "dlv_eo"
    _table(pg_dsn, table)
    kafka_broker.create_topic(unique_topic)
    sink = PostgresSink(pg_dsn, table, mode="exactly_once")
    seen: list[dict[tuple[str, int], int]] = []

    class Spy(CountingSink):
        def write(self, batch: Any) -> None:
            super().write(batch)
            seen.append(dict(batch.context.next_offsets))

    spy = Spy(sink)
    d = Delivery(
        spy,
        FAST_RETRY,
        DeadLetterPolicy(unique_topic),
        {"bootstrap.servers": kafka_broker.bootstrap},
    )
    payloads = avro_payloads(ORDER_SCHEMA, _orders(16, {9}))
    payloads[15] = b"\x02"  # the batch ends with a decode error
    d.deliver(
        make_batch(ORDER_SCHEMA, payloads, base_offset=50, group=unique_group), threading.Event()
    )
    assert _count(pg_dsn, table) == 14
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): 66}
    # Every successful write stored offsets that never pass a row not yet durable.
    assert all(o[("orders", 0)] <= 66 for o in seen) and seen[-1] == {("orders", 0): 66}
    assert sink.stores_offsets and any(o[("orders", 0)] < 66 for o in seen[:-1])
    d.close()
    sink.close()


def test_replay_republishes_filtered_records(kafka_broker: Any, unique_topic: str) -> None:
    dlq, target = unique_topic + ".dlq", unique_topic + ".replayed"
    kafka_broker.create_topic(dlq)
    kafka_broker.create_topic(target)
    kafka_broker.create_topic(unique_topic)
    conf = {"bootstrap.servers": kafka_broker.bootstrap}

    def reject_odd(batch: Any) -> None:
        if any(r["id"] % 2 for r in batch.to_pylist()):
            raise PermanentSinkError("odd ids are rejected", sqlstate="23514")

    d = Delivery(CallableSink(reject_odd), FAST_RETRY, DeadLetterPolicy(dlq), conf)
    payloads = avro_payloads(ORDER_SCHEMA, _orders(8))
    payloads[0] = b"\x02"
    d.deliver(make_batch(ORDER_SCHEMA, payloads, topic=unique_topic), threading.Event())
    d.close()
    # 4 odd rows (sink) + 1 decode error in the DLQ; replay only the sink ones to `target`.
    rc = replay_main(
        [dlq, "-b", kafka_broker.bootstrap, "--to", target, "--stage", "sink", "--timeout", "10"]
    )
    assert rc == 0
    got = consume_all(kafka_broker.bootstrap, target, expected=4)
    assert sorted(m.key() for m in got) == [b"k1", b"k3", b"k5", b"k7"]
    for m in got:
        i = int(m.key()[1:])
        assert m.value() == payloads[i]
        assert m.headers() == [("trace", f"t{i}".encode())]  # kfast.* headers stripped
    # Filter by class: the decode error goes back to its original topic.
    rc = replay_main(
        [dlq, "-b", kafka_broker.bootstrap, "--error-class", "DecodeError", "--timeout", "10"]
    )
    assert rc == 0
    back = consume_all(kafka_broker.bootstrap, unique_topic, expected=1)
    assert [m.value() for m in back] == [b"\x02"]


def _server_only(sink: PostgresSink) -> PostgresSink:
    """No client-side check: the server finds the CHECK violations (the locator tests)."""
    sink._client_check = False
    return sink


class HintSink(CountingSink):
    """Counts writes and rewrites the row locator of permanent errors (``shift`` or drop it)."""

    def __init__(self, inner: Any, shift: int | None = 0) -> None:
        super().__init__(inner)
        self.shift = shift
        self.hints: list[int | None] = []

    def write(self, batch: Any) -> None:
        try:
            super().write(batch)
        except PermanentSinkError as exc:
            self.hints.append(exc.row)
            if self.shift is None:
                exc.row = None
            elif exc.row is not None:
                exc.row = min(batch.num_rows - 1, max(0, exc.row + self.shift))
            raise


def _deliver_bad(
    pg_dsn: str, kafka_broker: Any, topic: str, sink: Any, n: int, bad: set[int], group: str = "g"
) -> DeliveryMetrics:
    kafka_broker.create_topic(topic)
    metrics = DeliveryMetrics()
    d = Delivery(
        sink,
        FAST_RETRY,
        DeadLetterPolicy(topic),
        {"bootstrap.servers": kafka_broker.bootstrap},
        metrics,
    )
    batch = make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(n, bad)), group=group)
    d.deliver(batch, threading.Event())
    d.close()
    dead = consume_all(kafka_broker.bootstrap, topic, expected=len(bad))
    offsets = [int(dict(m.headers())["kfast.original.offset"]) for m in dead]
    assert sorted(offsets) == sorted(bad)  # each bad row dead-lettered exactly once
    for m in dead:
        h = dict(m.headers())
        assert h["kfast.sqlstate"] == b"23514" and h["kfast.error.class"] == b"CheckViolation"
        assert int(h["kfast.attempts"]) >= 2
    return metrics


def _ids(dsn: str, name: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [int(r[0]) for r in c.execute(f'SELECT id FROM "{name}" ORDER BY id').fetchall()]


@pytest.mark.parametrize("mode", ["copy", "exactly_once"])
def test_copy_line_locates_bad_rows_in_3k_plus_1_writes(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, unique_group: str, mode: str
) -> None:
    table = "dlv_locate"
    _table(pg_dsn, table)
    n, bad = 3000, {0, 17, 18, 1203, 2500, 2999}
    inner = _server_only(PostgresSink(pg_dsn, table, mode=mode))
    sink = HintSink(inner)
    metrics = _deliver_bad(pg_dsn, kafka_broker, unique_topic, sink, n, bad, unique_group)
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    k = len(bad)
    # Each bad row: the failing write, the prefix before it (if any), its confirmation.
    extra = 1 if mode == "exactly_once" else 0  # the final offsets-only write
    assert sink.calls <= 3 * k + 1 + extra, sink.calls
    snap = metrics.snapshot()
    assert snap["located"] == k and snap["bisections"] == 0
    assert snap["dlq_records_by_reason"] == {"sink/CheckViolation": k}
    assert all(h is not None for h in sink.hints)  # PostgreSQL reported the COPY line
    if mode == "exactly_once":
        assert inner.stored_offsets(unique_group, ["orders"]) == {("orders", 0): n}
    sink.close()


@pytest.mark.parametrize("shift", [-1, 1])
def test_wrong_hint_still_writes_every_row_once(
    pg_dsn: str, kafka_broker: Any, unique_topic: str, shift: int
) -> None:
    table = "dlv_liar"
    _table(pg_dsn, table)
    n, bad = 1000, {5, 300, 301, 700, 999}
    sink = HintSink(_server_only(PostgresSink(pg_dsn, table)), shift=shift)
    metrics = _deliver_bad(pg_dsn, kafka_broker, unique_topic, sink, n, bad)
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    snap = metrics.snapshot()
    assert snap["located"] >= 1 and snap["bisections"] >= 1  # lied once, then bisected
    assert snap["dlq_records"] == len(bad)
    # Bounded by the bisection cost plus the located attempt.
    assert sink.calls <= 4 + 2 * len(bad) * math.ceil(math.log2(n)), sink.calls
    sink.close()


def test_without_locator_falls_back_to_bisection(
    pg_dsn: str, kafka_broker: Any, unique_topic: str
) -> None:
    table = "dlv_nohint"
    _table(pg_dsn, table)
    n, bad = 512, {3, 200, 511}
    sink = HintSink(_server_only(PostgresSink(pg_dsn, table)), shift=None)
    metrics = _deliver_bad(pg_dsn, kafka_broker, unique_topic, sink, n, bad)
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    snap = metrics.snapshot()
    assert snap["located"] == 0 and snap["bisections"] >= 1
    assert sink.calls <= 1 + 2 * len(bad) * math.ceil(math.log2(n)), sink.calls
    sink.close()


def test_upsert_constraint_error_has_no_copy_line_and_bisects(
    pg_dsn: str, kafka_broker: Any, unique_topic: str
) -> None:
    """upsert: the CHECK fails in INSERT ... SELECT from the staging table, not in the COPY."""
    table = "dlv_upsert_nohint"
    _table(pg_dsn, table)
    n, bad = 256, {10, 100}
    sink = HintSink(PostgresSink(pg_dsn, table, mode="upsert", key=("id",)))
    metrics = _deliver_bad(pg_dsn, kafka_broker, unique_topic, sink, n, bad)
    assert _ids(pg_dsn, table) == [i for i in range(n) if i not in bad]
    assert sink.hints and all(h is None for h in sink.hints)
    snap = metrics.snapshot()
    assert snap["located"] == 0 and snap["bisections"] >= 1
    sink.close()
