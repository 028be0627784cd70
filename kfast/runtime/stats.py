"""Counters and latency samples, one object per thread that writes them.

Each loop owns its stats object and is its only writer: ``PollStats`` (poll
thread), ``DecodeStats`` (decoder thread), ``DeliverStats`` (worker thread).
``Pipeline.metrics()`` reads them from any thread through ``snapshot()``,
which takes the object's lock; a writer takes it only around updates that
must be read together.

``Pipeline.metrics()`` returns a dict with these keys (the Prometheus
collector in :mod:`kfast.prometheus` reads it):

* ``running`` (bool), ``uptime_s``;
* ``consumed`` (messages pushed into the ring), ``decoded`` (rows decoded),
  ``decode_errors`` (undecodable messages), ``written`` (rows the sink made
  durable; rows dead-lettered by the sink side are not counted, see
  ``delivery.dlq_records``), ``batches`` (delivered), ``batches_decoded``;
* ``rates``: ``consumed_per_s``, ``written_per_s`` (averages since start);
* ``ring``: the ring's counters (:meth:`kfast.runtime.ring.Ring.stats`) and
  ``fill`` (0..1); ``in_flight`` (messages in the ring);
* ``batch_size``: ``histogram`` (``{"<=1": n, ..., ">100000": n}``, per
  batch, not cumulative) and ``p50``/``p95``/``p99``/``count`` of recent batches;
* ``latency_s``: per stage (``poll``, ``decode``, ``deliver``,
  ``end_to_end``, ``sink_write``) ``p50``/``p95``/``p99``/``count`` over the
  last :data:`SAMPLES` samples, in seconds;
* ``latency_histograms``: per stage (``poll``, ``decode``, ``deliver``,
  ``end_to_end``) a cumulative histogram since start, Prometheus-style:
  ``{"buckets": [(le, cumulative count), ..., (inf, count)], "sum": s,
  "count": n}`` with the fixed bounds :data:`LATENCY_BOUNDS` (seconds);
* ``consumer_lag``: ``{"topic[partition]": lag}`` for assigned partitions;
  ``lag_total``;
* ``paused`` (bool), ``paused_partitions``, ``pauses``, ``resumes``,
  ``seeks``, ``seek_errors``;
* ``rebalances``: ``assigned`` (partitions), ``assign_callbacks``,
  ``revoked`` (partitions), ``revoke_callbacks``, ``revoked_at_close``
  (partitions), ``lost`` (partitions), ``revoke_timeouts``;
* ``commits``: ``submitted``, ``failed``, ``sync_failed``, ``async_ok``,
  ``async_failed``, ``partitions`` (per partition: committed offset and
  pending state, see :meth:`kfast.runtime.offsets.OffsetTracker.snapshot`);
* ``decode_retries`` (schema registry outages retried by the decoder thread);
* ``kafka_errors`` (consumer error events, by librdkafka error name);
* ``rss_bytes``, ``peak_rss_bytes``, ``gc`` (``collections``, ``counts``);
* ``memory_plan`` (:meth:`kfast.runtime.memory.MemoryPlan.as_dict`);
* ``delivery`` (:meth:`kfast.delivery.DeliveryMetrics.snapshot`: retries,
  sink errors, ``dlq_records``, ``dlq_records_by_reason``, ...);
* ``health`` (:meth:`kfast.runtime.health.Health.as_dict`).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BOUNDS",
    "SAMPLES",
    "DecodeStats",
    "DeliverStats",
    "Latency",
    "PollStats",
    "percentiles",
]

SAMPLES = 2048  # latency / batch-size samples kept per stage (bounded reservoir)
BATCH_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000)
# seconds; fixed so that a histogram is comparable across runs and processes
LATENCY_BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "count": 0}
    s = sorted(samples)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, int(p * n))]

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "count": n}


class Latency:
    """Recent samples (for percentiles) plus a cumulative histogram since start."""

    __slots__ = ("samples", "counts", "sum", "count")

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=SAMPLES)
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)  # last: above every bound
        self.sum = 0.0
        self.count = 0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self.counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def percentiles(self) -> dict[str, float]:
        return percentiles(list(self.samples))

    def histogram(self) -> dict[str, Any]:
        buckets: list[tuple[float, int]] = []
        total = 0
        for le, n in zip((*LATENCY_BOUNDS, math.inf), self.counts):
            total += n
            buckets.append((le, total))
        return {"buckets": buckets, "sum": self.sum, "count": self.count}


class PollStats:
    """Written by the poll thread only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.consume_calls = 0
        self.pauses = 0
        self.resumes = 0
        self.seeks = 0
        self.seek_errors = 0
        self.assign_callbacks = 0
        self.assigned = 0  # partitions
        self.revoke_callbacks = 0
        self.revoked = 0  # partitions
        self.revoked_at_close = 0  # partitions
        self.lost = 0  # partitions
        self.revoke_timeouts = 0
        self.sync_commit_failures = 0
        self.kafka_errors: Counter[str] = Counter()
        self.poll = Latency()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "pauses": self.pauses,
                "resumes": self.resumes,
                "seeks": self.seeks,
                "seek_errors": self.seek_errors,
                "rebalances": {
                    "assigned": self.assigned,
                    "assign_callbacks": self.assign_callbacks,
                    "revoked": self.revoked,
                    "revoke_callbacks": self.revoke_callbacks,
                    "revoked_at_close": self.revoked_at_close,
                    "lost": self.lost,
                    "revoke_timeouts": self.revoke_timeouts,
                },
                "sync_commit_failures": self.sync_commit_failures,
                "kafka_errors": dict(self.kafka_errors),
                "latency": {"poll": self.poll.percentiles()},
                "histograms": {"poll": self.poll.histogram()},
            }


class DecodeStats:
    """Written by the decoder thread only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches_decoded = 0
        self.registry_retries = 0
        self.decode = Latency()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "batches_decoded": self.batches_decoded,
                "decode_retries": self.registry_retries,
                "latency": {"decode": self.decode.percentiles()},
                "histograms": {"decode": self.decode.histogram()},
            }


class DeliverStats:
    """Written by the worker thread only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches = 0
        self.decoded_rows = 0
        self.decode_errors = 0
        self.written_rows = 0
        self.batch_hist = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_rows: deque[int] = deque(maxlen=SAMPLES)
        self.deliver = Latency()
        self.end_to_end = Latency()

    def record(
        self, *, messages: int, rows: int, errors: int, written: int, seconds: float, ts_ms: int
    ) -> None:
        """One delivered batch of ``messages`` ring slots; ``ts_ms`` is its first timestamp."""
        import time

        with self.lock:
            self.batches += 1
            self.decoded_rows += rows
            self.decode_errors += errors
            self.written_rows += written
            self.batch_rows.append(messages)
            self.batch_hist[bisect.bisect_left(BATCH_BUCKETS, messages)] += 1
            self.deliver.add(seconds)
            if ts_ms > 0:
                self.end_to_end.add(max(0.0, time.time() - ts_ms / 1000.0))

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            hist = {
                (f"<={b}" if i < len(BATCH_BUCKETS) else f">{BATCH_BUCKETS[-1]}"): self.batch_hist[
                    i
                ]
                for i, b in enumerate((*BATCH_BUCKETS, BATCH_BUCKETS[-1]))
            }
            return {
                "batches": self.batches,
                "decoded": self.decoded_rows,
                "decode_errors": self.decode_errors,
                "written": self.written_rows,
                "batch_size": {
                    "histogram": hist,
                    **percentiles([float(x) for x in self.batch_rows]),
                },
                "latency": {
                    "deliver": self.deliver.percentiles(),
                    "end_to_end": self.end_to_end.percentiles(),
                },
                "histograms": {
                    "deliver": self.deliver.histogram(),
                    "end_to_end": self.end_to_end.histogram(),
                },
            }
