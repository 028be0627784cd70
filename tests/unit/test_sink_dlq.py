"""DeadLetterPolicy validation, DLQ producer settings, headers and circuit breaker (no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from kfast.dlq import (
    CircuitBreaker,
    CircuitBreakerOpen,
    DeadLetterPolicy,
    dlq_headers,
    producer_config,
)
from kfast.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"topic": ""}, "topic"),
        ({"topic": "x" * 250}, "topic"),
        ({"topic": "d", "max_ratio": 0}, "max_ratio"),
        ({"topic": "d", "max_ratio": 1.5}, "max_ratio"),
        ({"topic": "d", "max_consecutive": 0}, "max_consecutive"),
        ({"topic": "d", "window": 10}, "window"),
        ({"topic": "d", "producer": {"acks": "1"}}, r"producer\['acks'\]"),
        (
            {"topic": "d", "producer": {"enable.idempotence": "false"}},
            r"producer\['enable.idempotence'\]",
        ),
        ({"topic": "d", "producer": "bootstrap.servers=x"}, "producer"),
    ],
)
def test_policy_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"DeadLetterPolicy\.{field}"):
        DeadLetterPolicy(**kwargs)


def test_producer_config_is_separate_and_durable() -> None:
    consumer = {
        "bootstrap.servers": "b:9092",
        "group.id": "g",
        "fetch.max.bytes": "1000",
        "security.protocol": "SASL_SSL",
        "sasl.username": "u",
        "enable.auto.commit": "false",
        "queue.buffering.max.kbytes": "2048",  # the runtime's DLQ budget
    }
    conf = producer_config(
        DeadLetterPolicy("d", producer={"linger.ms": 20, "acks": "-1"}), consumer
    )
    assert conf["acks"] == "all" and conf["enable.idempotence"] == "true"
    assert conf["bootstrap.servers"] == "b:9092" and conf["sasl.username"] == "u"
    assert conf["linger.ms"] == "20" and conf["queue.buffering.max.kbytes"] == "2048"
    assert (
        "group.id" not in conf
        and "fetch.max.bytes" not in conf
        and "enable.auto.commit" not in conf
    )
    # The DLQ may live on another cluster.
    other = producer_config(DeadLetterPolicy("d", producer={"bootstrap.servers": "o:1"}), consumer)
    assert other["bootstrap.servers"] == "o:1"
    with pytest.raises(ConfigError, match="bootstrap.servers"):
        producer_config(DeadLetterPolicy("d"), {"group.id": "g"})


def test_headers_exactly_as_designed() -> None:
    h = dlq_headers(
        stage="sink",
        error_class="UniqueViolation",
        message="duplicate key",
        topic="orders",
        partition=2,
        offset=41,
        timestamp=1_700_000_000_000,
        attempts=4,
        first_failure=0.0,
        schema_id=7,
        sqlstate="23505",
        original=[("trace", b"abc"), ("kfast.error.stage", b"spoofed")],
    )
    assert h == [
        ("kfast.error.stage", b"sink"),
        ("kfast.error.class", b"UniqueViolation"),
        ("kfast.error.message", b"duplicate key"),
        ("kfast.original.topic", b"orders"),
        ("kfast.original.partition", b"2"),
        ("kfast.original.offset", b"41"),
        ("kfast.original.timestamp", b"1700000000000"),
        ("kfast.attempts", b"4"),
        ("kfast.first_failure", b"1970-01-01T00:00:00.000+00:00"),
        ("kfast.schema.id", b"7"),
        ("kfast.sqlstate", b"23505"),
        ("trace", b"abc"),
    ]
    short = dlq_headers(
        stage="decode",
        error_class="DecodeError",
        message="x" * 10_000,
        topic="t",
        partition=0,
        offset=0,
        timestamp=0,
        attempts=1,
        first_failure=0.0,
    )
    names = [k for k, _ in short]
    assert "kfast.schema.id" not in names and "kfast.sqlstate" not in names
    assert len(dict(short)["kfast.error.message"]) == 4096


def test_breaker_ratio_over_window() -> None:
    b = CircuitBreaker(DeadLetterPolicy("d", max_ratio=0.1, window=100, max_consecutive=None))
    b.record(50, list(range(0, 50, 5)))  # 10 dead, window not full yet
    b.record(50, [])  # 10 / 100 = 0.1: not above
    b.record(100, list(range(0, 100, 10)))  # last 100: 10
    with pytest.raises(CircuitBreakerOpen, match="max_ratio"):
        b.record(10, [0, 1])  # last 100: 11


def test_breaker_consecutive_spans_batches() -> None:
    b = CircuitBreaker(DeadLetterPolicy("d", max_consecutive=5))
    b.record(10, [7, 8, 9])
    b.record(1, [0])  # run 4
    with pytest.raises(CircuitBreakerOpen, match="5 consecutive"):
        b.record(3, [0, 2])  # run 5 at index 0
    b2 = CircuitBreaker(DeadLetterPolicy("d", max_consecutive=3))
    b2.record(10, [0, 1, 3, 4, 6, 7, 9])  # runs of 2 only


def test_breaker_matches_a_per_message_reference() -> None:
    """The sliced implementation equals a naive per-message window on random input."""
    import collections
    import random

    rng = random.Random(5)
    pol = DeadLetterPolicy("d", max_ratio=1.0, window=100, max_consecutive=None)
    b = CircuitBreaker(pol)
    ref: collections.deque[int] = collections.deque(maxlen=100)
    for _ in range(300):
        n = rng.choice([1, 7, 99, 100, 101, 250])
        dead = sorted(rng.sample(range(n), rng.randrange(0, min(n, 30))))
        b.record(n, dead)
        ds = set(dead)
        ref.extend(1 if i in ds else 0 for i in range(n))
        assert b._dead_in_window == sum(ref)


def test_kfast_replay_cli_is_wired(capsys: pytest.CaptureFixture[str]) -> None:
    from kfast import cli

    with pytest.raises(SystemExit) as ei:
        cli.main(["replay", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "--error-class" in out and "--to" in out and "--max-in-flight" in out


class _FakeProducer:
    """Calls delivery callbacks on flush(); the first ``fail`` records get an error."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.queued: list[tuple[bytes, Any]] = []
        self.produced: list[bytes] = []
        self.flushes = 0

    def produce(self, topic: str, value: bytes, key: Any, headers: Any, on_delivery: Any) -> None:
        self.queued.append((value, on_delivery))
        self.produced.append(value)

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        for value, cb in self.queued:
            if self.fail > 0:
                self.fail -= 1
                cb("broker down", None)
            else:
                cb(None, value)
        self.queued = []
        return 0


def _queue(producer: _FakeProducer, attempts: int = 3) -> Any:
    from kfast.dlq import DeadLetterQueue
    from kfast.retry import Retrier, RetryPolicy

    policy = RetryPolicy(max_attempts=attempts, initial_backoff=0.001, max_backoff=0.001)
    q = DeadLetterQueue(
        DeadLetterPolicy("d"),
        {"bootstrap.servers": "x:1"},
        policy,
        retrier=Retrier(policy, sleep=lambda _stop, _s: False),
    )
    q._producer = producer
    return q


def _letters(n: int) -> list[Any]:
    from kfast.dlq import DeadLetter

    return [DeadLetter(None, f"v{i}".encode(), [], "sink", "X") for i in range(n)]


def test_produce_does_not_wait_and_confirm_waits_once() -> None:
    fake = _FakeProducer()
    q = _queue(fake)
    q.produce(_letters(3))
    q.produce(_letters(2))
    assert fake.flushes == 0 and len(fake.produced) == 5  # in flight, nothing awaited yet
    q.confirm()
    assert fake.flushes == 1 and q.sent == 5
    q.confirm()  # nothing new: no wait
    assert fake.flushes == 1


def test_confirm_resends_only_failed_records() -> None:
    fake = _FakeProducer(fail=2)
    q = _queue(fake)
    q.produce(_letters(4))
    q.confirm()
    assert fake.produced == [b"v0", b"v1", b"v2", b"v3", b"v0", b"v1"]
    assert q.sent == 4 and q.retries == 1


def test_confirm_gives_up_under_the_retry_policy() -> None:
    from kfast.errors import RetryExhausted

    fake = _FakeProducer(fail=1000)
    q = _queue(fake, attempts=2)
    q.produce(_letters(2))
    with pytest.raises(RetryExhausted):
        q.confirm()
    assert q.sent == 0
    fake.fail = 0
    q.produce(_letters(1))  # a later batch starts clean
    q.confirm()
    assert q.sent == 1


def _record_trips(b: CircuitBreaker, n: int, dead: list[int]) -> bool:
    import copy

    try:
        copy.deepcopy(b).record(n, sorted(dead))
    except CircuitBreakerOpen:
        return True
    return False


def test_batch_check_trips_only_when_record_would() -> None:
    """BatchCheck, fed a batch's dead inputs in any order, trips at the first point where
    record() is certain to raise: never before (the known dead alone trip record), and by
    the end exactly when record() raises. Random histories, both thresholds."""
    import random

    rng = random.Random(11)
    for trial in range(300):
        pol = DeadLetterPolicy(
            "d",
            max_ratio=rng.choice([0.05, 0.2, 0.5, 1.0]),
            window=rng.choice([100, 150]),
            max_consecutive=rng.choice([None, 1, 3, 8, 40]),
        )
        b = CircuitBreaker(pol)
        for _ in range(rng.randrange(1, 6)):
            n = rng.choice([1, 5, 60, 100, 170, 400])
            dense = rng.random()
            dead = [i for i in range(n) if rng.random() < dense * 0.3]
            order = dead[:]
            rng.shuffle(order)
            check = b.batch(n)
            at = None
            for j, i in enumerate(order):
                if check.add(i):
                    at = j
                    assert check.error is not None
                    break
            if at is not None:  # the known dead alone trip record(): never wrongly early
                assert _record_trips(b, n, order[: at + 1]), (trial, pol)
                assert at == 0 or not _record_trips(b, n, order[:at])
            assert (at is not None) == _record_trips(b, n, dead), (trial, pol, n)
            if at is not None:
                break
            b.record(n, dead)


def test_batch_check_counts_the_previous_run_and_copies_apart() -> None:
    b = CircuitBreaker(DeadLetterPolicy("d", max_consecutive=6, max_ratio=1.0))
    b.record(10, [7, 8, 9])  # run of 3 carried into the next batch
    check = b.batch(10)
    assert not check.add(1) and not check.add(3)
    c2 = check.copy()
    assert not c2.add(0)  # 0, 1: run 3 + 2
    assert c2.add(2)  # 0..3 after the previous 3: 7 >= 6
    assert c2.error is not None and "7 consecutive" in str(c2.error)
    assert check.error is None and not check.add(5)  # the original is untouched
    assert not check.add(1)  # already known: no change


def test_dlq_outage_logs_through_python_logging_not_stderr(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """librdkafka's lines of the DLQ producer go to the kfast.kafka logger, its error events
    to kfast.dlq: nothing reaches the process's stderr while the DLQ cluster is unreachable."""
    import logging
    import socket

    from kfast.dlq import DeadLetter, DeadLetterQueue
    from kfast.errors import RetryExhausted
    from kfast.retry import RetryPolicy

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = DeadLetterPolicy(
        "dlq", producer={"message.timeout.ms": "1500", "reconnect.backoff.ms": "50"}
    )
    q = DeadLetterQueue(
        policy,
        {"bootstrap.servers": f"127.0.0.1:{port}"},
        RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01, deadline=10),
    )
    caplog.set_level(logging.DEBUG, logger="kfast")
    with pytest.raises(RetryExhausted):
        q.send([DeadLetter(b"k", b"v", [], "sink", "X")])
    q._producer = None  # no flush on close: the cluster is gone
    assert capfd.readouterr().err == ""
    names = {r.name for r in caplog.records}
    assert "kfast.kafka" in names or "kfast.dlq" in names


def test_queue_start_makes_the_producer_before_any_dead_letter() -> None:
    from kfast.dlq.queue import DeadLetterQueue
    from kfast.retry import RetryPolicy

    q = DeadLetterQueue(DeadLetterPolicy("d"), {"bootstrap.servers": "127.0.0.1:9"}, RetryPolicy())
    assert q._producer is None
    q.start()
    assert q._producer is not None
    q.close()
    assert q._producer is None
    # a setting librdkafka refuses fails the start, not the first batch with bad rows
    bad = DeadLetterQueue(
        DeadLetterPolicy("d", producer={"no.such.setting": "1"}),
        {"bootstrap.servers": "127.0.0.1:9"},
        RetryPolicy(),
    )
    with pytest.raises(ConfigError, match="DeadLetterPolicy.producer"):
        bad.start()
