"""The worker loop (kfast.runtime.deliver) and ObservedRetrier, without a broker."""

from __future__ import annotations

import logging
import threading

import pytest
from confluent_kafka import Message

import kfast
from kfast._batch import Batch
from kfast.delivery import DeliveryMetrics
from kfast.errors import RetryExhausted, TransientSinkError
from kfast.retry import RetryPolicy
from kfast.runtime.channels import Channels, Decoded
from kfast.runtime.deliver import DeliverLoop, ObservedRetrier
from kfast.runtime.health import HealthBoard
from kfast.runtime.offsets import OffsetTracker
from kfast.runtime.ring import Ring
from kfast.runtime.stats import DeliverStats

DEC = kfast.AvroDecoder({"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]})


def _msg(off: int) -> Message:
    return Message(topic="t", partition=0, offset=off, value=bytes([off << 1]), timestamp=(1, 1))


class DeadLettersTwo:
    """A Delivery stand-in: the sink takes every row but two, which go to the DLQ."""

    def __init__(self, metrics: DeliveryMetrics) -> None:
        self.metrics = metrics
        self.batches = 0

    def deliver(self, batch, stop):  # type: ignore[no-untyped-def]
        self.batches += 1
        assert batch.context is not None and batch.context.next_offsets == {("t", 0): 40}
        self.metrics.add("rows_written", batch.num_rows - 2)
        self.metrics.dead("sink", "PermanentSinkError")
        self.metrics.dead("sink", "PermanentSinkError")


def test_written_excludes_dead_lettered_rows_and_the_batch_is_marked_and_released():
    ring = Ring(64, 1 << 16)
    index = ring.assign("t", 0)
    ring.push([_msg(i) for i in range(40)])
    batch = Batch()
    view = ring.decode(DEC, 0, 40, batch)
    tracker = OffsetTracker()
    tracker.assign(index, "t", 0, ring.generation(index))
    dm = DeliveryMetrics()
    delivery = DeadLettersTwo(dm)
    ch = Channels()
    stats = DeliverStats()
    health = HealthBoard()
    loop = DeliverLoop(ring, delivery, dm, tracker, "g", ch, stats, health)  # type: ignore[arg-type]
    ch.decoded.put(Decoded(batch, view, 0, 40))
    ch.decoded.put(None)
    del view
    loop.run()
    assert not ch.failure
    snap = stats.snapshot()
    assert snap["decoded"] == 40 and snap["written"] == 38 and snap["batches"] == 1
    assert dm.snapshot()["dlq_records"] == 2
    assert tracker.pending() == [("t", 0, 40)]  # durable: the poll thread commits 40
    assert ring.tail == 40 and ring.used_messages == 0  # slots released
    assert ch.recycled.get_nowait() is batch and batch.context is None
    assert health.last_batch_at is not None
    assert snap["histograms"]["deliver"]["count"] == 1


def test_observed_retrier_reports_the_outage_in_health_and_logs_it_once(caplog):
    health = HealthBoard()
    health.phase = "running"
    health.broker_reachable = True
    retrier = ObservedRetrier(
        RetryPolicy(max_attempts=10, initial_backoff=0.001, max_backoff=0.001), health
    )
    calls = []
    during: list[str] = []

    def op() -> str:
        calls.append(1)
        if len(calls) > 1:
            during.append(health.snapshot().state + "|" + health.snapshot().reason)
        if len(calls) <= 5:
            raise TransientSinkError("connection refused")
        return "ok"

    caplog.set_level(logging.INFO, logger="kfast.retry")
    assert retrier.run(op, threading.Event(), what="sink write") == "ok"
    assert during[0] == "retrying|sink write: TransientSinkError: connection refused"
    assert health.snapshot().state == "running"  # recovered
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "attempt 1" in warnings[0] and "backoff" in warnings[0]
    assert "TransientSinkError" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("succeeded again" in m and "5 failed attempts" in m for m in infos)


def test_observed_retrier_exhausted_leaves_no_retrying_state():
    health = HealthBoard()
    health.phase = "running"
    retrier = ObservedRetrier(
        RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.001), health
    )

    def op() -> None:
        raise TransientSinkError("down")

    with pytest.raises(RetryExhausted):
        retrier.run(op, threading.Event(), what="sink write")
    assert not health.is_retrying("sink write")
