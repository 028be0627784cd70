"""Delivery: make every input message of a batch durable, or fail loudly.

``Delivery.deliver(batch, stop_event)`` (see docs/dev/runtime-contract.md):

1. decode errors (``batch.errors``) become dead letters (stage ``decode``);
2. the rows are written with ``sink.write``; a ``TransientSinkError`` is
   retried under the RetryPolicy (interruptible backoff); a
   ``PermanentSinkError`` bisects the rows: both halves are written
   separately, recursively, until the failing rows are isolated (k bad rows
   among n cost O(k log n) writes); good halves land in the sink, each bad
   row becomes a dead letter (stage ``sink``). When the error carries a row
   locator (``PermanentSinkError.row``, e.g. the COPY line PostgreSQL
   reported) the rows before it are written as one write, the located row is
   confirmed by writing it alone (dead-lettered only if that fails too) and
   the rest continues: k bad rows cost about 3k+1 writes. A located row that
   writes fine alone disables locators for the rest of the batch (bisection
   bounds the cost of a sink that points at wrong rows);
3. every dead letter is confirmed by the DLQ broker before ``deliver``
   returns; the circuit breaker then looks at the batch's DLQ share.

Without a DeadLetterPolicy a decode error or a permanently failing row
raises: a poison pill is never dropped silently.

Exactly-once sinks (``sink.stores_offsets``) store ``batch.context
.next_offsets`` with the rows. When bisecting, each slice carries the
offsets of its own rows only (locating writes the same in-order slices),
pending dead letters are confirmed before the next write, and a final empty
write stores the whole batch's offsets, so a crash at any moment resumes
exactly after what is durable.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kfast.dlq import CircuitBreaker, DeadLetter, DeadLetterPolicy, DeadLetterQueue, dlq_headers
from kfast.errors import DecodeError, KfastError, PermanentSinkError
from kfast.retry import Retrier, RetryPolicy

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch
    from kfast.sinks import Sink

__all__ = ["Delivery", "DeliveryMetrics"]


class DeliveryMetrics:
    """Counters the runtime reads into ``pipe.metrics()`` (thread-safe snapshot)."""

    def __init__(self, latency_samples: int = 4096) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.sink_errors = 0
        self.bisections = 0
        self.located = 0
        self.writes = 0
        self.rows_written = 0
        self.dlq_records: collections.Counter[tuple[str, str]] = collections.Counter()
        self.write_latency: collections.deque[float] = collections.deque(maxlen=latency_samples)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def dead(self, stage: str, error_class: str) -> None:
        with self._lock:
            self.dlq_records[(stage, error_class)] += 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.write_latency.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self.write_latency)
            by = {f"{s}/{c}": n for (s, c), n in sorted(self.dlq_records.items())}

        def q(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

        return {
            "retries": self.retries,
            "sink_errors": self.sink_errors,
            "bisections": self.bisections,
            "located": self.located,
            "writes": self.writes,
            "rows_written": self.rows_written,
            "dlq_records": sum(by.values()),
            "dlq_records_by_reason": by,
            "write_latency_p50": q(0.50),
            "write_latency_p95": q(0.95),
            "write_latency_p99": q(0.99),
        }


def _error_class(exc: BaseException) -> str:
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, KfastError):
        return type(cause).__name__
    return type(exc).__name__


class Delivery:
    def __init__(
        self,
        sink: Sink,
        retry: RetryPolicy,
        dlq: DeadLetterPolicy | None,
        kafka_config: Mapping[str, Any],
        metrics: DeliveryMetrics | None = None,
        *,
        retrier: Retrier | None = None,
        clock: Any = time.time,
    ) -> None:
        self.sink = sink
        self.retry = retry
        self.policy = dlq
        self.metrics = metrics if metrics is not None else DeliveryMetrics()
        self.retrier = retrier or Retrier(retry)
        self.queue = (
            DeadLetterQueue(dlq, kafka_config, retry, retrier=self.retrier) if dlq else None
        )
        self.breaker = CircuitBreaker(dlq) if dlq else None
        self.clock = clock

    # ------------------------------------------------------------ public

    def deliver(self, batch: Batch, stop_event: threading.Event) -> None:
        run = _Run(self, batch, stop_event)
        run.go()

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    # ------------------------------------------------------------ helpers

    def _write(self, batch: Batch, stop: threading.Event) -> int:
        """One sink write under the retry policy; returns attempts made."""
        attempts = 0

        def op() -> None:
            nonlocal attempts
            attempts += 1
            t0 = time.perf_counter()
            self.sink.write(batch)
            self.metrics.latency(time.perf_counter() - t0)

        def on_retry(_attempt: int, _exc: BaseException, _delay: float) -> None:
            self.metrics.add("retries")
            self.metrics.add("sink_errors")

        self.retrier.run(op, stop, on_retry=on_retry, what="sink write")
        self.metrics.add("writes")
        self.metrics.add("rows_written", batch.num_rows)
        return attempts


class _Run:
    """State of one ``deliver`` call."""

    def __init__(self, d: Delivery, batch: Batch, stop: threading.Event) -> None:
        self.d = d
        self.batch = batch
        self.stop = stop
        self.ctx = getattr(batch, "context", None)
        self.first_failure: float | None = None
        self.pending: list[DeadLetter] = []
        self.dead_inputs: list[int] = []
        self.bisected = False  # the batch was written in slices
        self.hints = True  # follow PermanentSinkError.row locators
        self.eo = bool(getattr(d.sink, "stores_offsets", False))

    def go(self) -> None:
        d, batch = self.d, self.batch
        if batch.errors:
            if d.queue is None:
                e = batch.errors[0]
                raise DecodeError(
                    f"{len(batch.errors)} payload(s) could not be decoded (first: input {e.index}: "
                    f"{e.reason}) and no DeadLetterPolicy is configured"
                )
            now = d.clock()
            self.first_failure = now
            for e in batch.errors:
                self._dead(e.index, "decode", "DecodeError", e.reason, 1, None)
        if batch.num_rows:
            self._write_range(0, batch.num_rows, 0)
        if self.eo and (self.bisected or batch.num_rows == 0):
            self._flush()
            d._write(batch.slice(0, 0), self.stop)  # the whole batch's offsets, no rows
        self._flush()
        if d.breaker is not None:
            n = batch.num_rows + len(batch.errors)
            d.breaker.record(n, sorted(self.dead_inputs))

    def _flush(self) -> None:
        if self.pending:
            assert self.d.queue is not None
            self.d.queue.send(self.pending, self.stop)
            for rec in self.pending:
                self.d.metrics.dead(rec.stage, rec.error_class)
            self.pending = []

    def _records(self) -> Any:
        if self.ctx is None:
            raise KfastError(
                "batch.context is not set: the delivery layer needs it to dead-letter records "
                "(kfast.Pipeline sets it; tests set a kfast.sinks.BatchContext)"
            )
        return self.ctx.records

    def _dead(
        self, index: int, stage: str, cls: str, message: str, attempts: int, sqlstate: str | None
    ) -> None:
        recs = self._records()
        schema_id = None
        get_sid = getattr(recs, "schema_id", None)
        if callable(get_sid):
            schema_id = get_sid(index)
        assert self.first_failure is not None
        headers = dlq_headers(
            stage=stage,
            error_class=cls,
            message=message,
            topic=recs.topic(index),
            partition=recs.partition(index),
            offset=recs.offset(index),
            timestamp=recs.timestamp(index),
            attempts=attempts,
            first_failure=self.first_failure,
            schema_id=schema_id,
            sqlstate=sqlstate,
            original=recs.headers(index),
        )
        self.pending.append(DeadLetter(recs.key(index), recs.value(index), headers, stage, cls))
        self.dead_inputs.append(index)

    def _slice(self, start: int, stop: int) -> Batch:
        batch = self.batch
        if start == 0 and stop == batch.num_rows:
            return batch
        sub = batch.slice(start, stop)
        if self.eo and self.ctx is not None:
            recs = self.ctx.records
            src = memoryview(sub.source_indices)
            offs: dict[tuple[str, int], int] = {}
            for i in range(sub.num_rows):
                j = src[i]
                tp = (recs.topic(j), recs.partition(j))
                offs[tp] = max(offs.get(tp, -1), recs.offset(j) + 1)
            sub.context = dataclasses.replace(self.ctx, next_offsets=offs)
        return sub

    def _write_range(
        self, start: int, stop: int, attempts_before: int, locate: bool = True
    ) -> None:
        """Write rows ``[start, stop)``; isolate and dead-letter the rows that fail.

        Iterative over located rows (k located rows never nest k calls deep).
        """
        d = self.d
        while start < stop:
            if self.eo:
                self._flush()  # everything before this slice must be durable first
            sub = self._slice(start, stop)
            try:
                d._write(sub, self.stop)
                return
            except PermanentSinkError as exc:
                d.metrics.add("sink_errors")
                if self.first_failure is None:
                    self.first_failure = d.clock()
                if d.queue is None:
                    raise PermanentSinkError(
                        f"rows [{start}, {stop}) of the batch cannot be written ({exc}) and no "
                        "DeadLetterPolicy is configured",
                        sqlstate=exc.sqlstate,
                    ) from exc
                attempts = attempts_before + 1
                if stop - start == 1:
                    src = memoryview(self.batch.source_indices)[start]
                    self._dead(src, "sink", _error_class(exc), str(exc), attempts, exc.sqlstate)
                    return
                hint = getattr(exc, "row", None) if locate and self.hints else None
            self.bisected = True
            if not isinstance(hint, int) or isinstance(hint, bool) or not 0 <= hint < stop - start:
                d.metrics.add("bisections")
                mid = (start + stop) // 2
                self._write_range(start, mid, attempts, locate)
                self._write_range(mid, stop, attempts, locate)
                return
            d.metrics.add("located")
            bad = start + hint
            if bad > start:
                # Accepted by the server before the failure: one write; bisected if it fails.
                self._write_range(start, bad, attempts, False)
            dead_before = len(self.dead_inputs)
            self._write_range(bad, bad + 1, attempts, False)  # confirm the located row alone
            if len(self.dead_inputs) == dead_before:
                self.hints = False  # it was fine alone: stop trusting locators for this batch
            start, attempts_before = bad + 1, attempts
