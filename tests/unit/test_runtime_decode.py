"""The decoder thread's loop (kfast.runtime.decode) without a broker: a ring filled locally."""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import Message

import kfast
from kfast.errors import RetryExhausted, SchemaRegistryUnavailable
from kfast.retry import Retrier, RetryPolicy
from kfast.runtime.channels import Channels
from kfast.runtime.decode import DecodeLoop
from kfast.runtime.health import HealthBoard
from kfast.runtime.policies import BatchPolicy
from kfast.runtime.ring import Ring
from kfast.runtime.stats import DecodeStats

SCHEMA = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}
DEC = kfast.AvroDecoder(SCHEMA)


def _msg(off: int) -> Message:
    z = (off << 1) ^ (off >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return Message(topic="t", partition=0, offset=off, value=bytes(out), timestamp=(1, 1))


class RegistryDown:
    """The ring's decode with a decoder whose registry fails the first ``failures`` calls."""

    def __init__(self, ring: Ring, failures: int) -> None:
        self.ring = ring
        self.failures = failures
        self.calls: list[tuple[int, int, int]] = []  # (start, count, id(batch))
        self.outage = threading.Event()  # set once a retry is under way
        self.go_on = threading.Event()  # the test lets the outage end
        self.go_on.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ring, name)

    def decode(self, decoder: Any, start: int, count: int, batch: Any, metadata: Any = None) -> Any:
        self.calls.append((start, count, id(batch)))
        if len(self.calls) <= self.failures:
            if len(self.calls) >= 2:
                self.outage.set()
            if len(self.calls) == self.failures:
                self.go_on.wait(10)
            raise SchemaRegistryUnavailable(
                "GET /schemas/ids/7: connection refused", url="http://registry"
            )
        return self.ring.decode(decoder, start, count, batch, metadata)


def _loop(ring: Any, policy: RetryPolicy) -> tuple[DecodeLoop, Channels, DecodeStats, HealthBoard]:
    ch = Channels()
    stats = DecodeStats()
    health = HealthBoard()
    health.phase = "running"
    health.broker_reachable = True
    loop = DecodeLoop(
        ring,
        DEC,
        BatchPolicy(max_rows=1000, max_wait=0.01),
        1,
        policy,
        ch,
        stats,
        health,
        retrier=Retrier(policy, rng=lambda: 1.0, step=0.001),
    )
    return loop, ch, stats, health


def _filled_ring(n: int) -> Ring:
    ring = Ring(1024, 1 << 20)
    ring.assign("t", 0)
    assert ring.push([_msg(i) for i in range(n)]) == n
    return ring


def test_a_registry_outage_retries_the_same_span_and_dead_letters_nothing(caplog):
    ring = _filled_ring(50)
    flaky = RegistryDown(ring, failures=4)
    flaky.go_on.clear()
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.001, max_backoff=0.002, deadline=30)
    loop, ch, stats, health = _loop(flaky, policy)
    caplog.set_level(logging.INFO, logger="kfast.runtime.decode")
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        assert flaky.outage.wait(10)
        # during the outage: health says why, nothing was handed to the worker
        h = health.snapshot()
        assert h.state == "retrying" and h.reason.startswith("schema registry unavailable:")
        assert h.ready is False and h.live is True
        assert ch.decoded.empty()
        flaky.go_on.set()
        item = ch.decoded.get(timeout=10)
    finally:
        ch.stop_workers.set()
        t.join(10)
    assert item is not None
    # the same span every time, each retry into a fresh batch
    assert [c[:2] for c in flaky.calls] == [(0, 50)] * 5
    assert all(a[2] != b[2] for a, b in zip(flaky.calls, flaky.calls[1:]))
    assert item.first == 0 and item.slots == 50
    assert item.batch.num_rows == 50 and not item.batch.errors
    assert memoryview(item.batch.column("id")).tolist() == list(range(50))
    assert stats.registry_retries == 4 and not ch.failure
    assert health.snapshot().state == "running"
    # rate-limited: one warning for the outage, one line when it ends
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "attempt 1" in warnings[0].getMessage()
    assert "SchemaRegistryUnavailable" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_an_outage_longer_than_the_policy_fails_the_pipeline_without_delivering():
    ring = _filled_ring(20)
    flaky = RegistryDown(ring, failures=100)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002, deadline=30)
    loop, ch, stats, health = _loop(flaky, policy)
    t = threading.Thread(target=loop.run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(ch.failure.error, RetryExhausted)
    assert isinstance(ch.failure.error.last_error, SchemaRegistryUnavailable)
    assert ch.failure.where == "decoder"
    # nothing decoded reached the worker: only the end marker; no slot was released
    assert ch.decoded.get_nowait() is None and ch.decoded.empty()
    assert ring.tail == 0 and ring.head == 20
    assert len(flaky.calls) == 3


def test_stop_during_an_outage_leaves_quietly():
    ring = _filled_ring(5)
    flaky = RegistryDown(ring, failures=1000)
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.05, deadline=600)
    loop, ch, _stats, _health = _loop(flaky, policy)
    t = threading.Thread(target=loop.run)
    t.start()
    assert flaky.outage.wait(10)
    ch.stop_workers.set()
    t.join(10)
    assert not t.is_alive()
    assert not ch.failure  # a shutdown, not an error: the span stays uncommitted
    assert ch.decoded.get_nowait() is None
