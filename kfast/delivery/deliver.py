"""Delivery: make every input message of a batch durable, or fail loudly.

``Delivery.deliver(batch, stop_event)`` (see docs/dev/runtime-contract.md):

1. decode errors (``batch.errors``) become dead letters (stage ``decode``),
   handed to the DLQ producer at once so they travel while the rows are
   written;
2. the rows are written with ``sink.write``; a ``TransientSinkError`` is
   retried under the RetryPolicy (interruptible backoff). A
   ``PermanentSinkError`` isolates the bad rows; good rows land in the sink,
   each bad row becomes a dead letter (stage ``sink``):

   * **in one sink transaction** when the sink offers one
     (``sink.row_transaction(batch)``, PostgreSQL ``copy`` and
     ``exactly_once`` without key). The transaction's set-based screen
     (``txn.screen``) finds every bad row at once and the rest is written in
     one statement; without a screen, or when it does not explain the
     failure, rows located by the error (``PermanentSinkError.row``: the
     COPY line) are isolated by probes, one COPY of the rest, and each found
     row confirmed alone. Each step sits in a savepoint, the batch commits
     once. See :class:`~kfast.delivery.isolation.Isolation` for the algorithm
     and its bounds. After a batch with bad rows, the next one is screened
     before any plain write;
   * otherwise **slice by slice**, each slice its own write: a located row
     splits the rows into the ones before it (one write), itself (written
     alone: dead-lettered only if that fails too) and the rest (about 3k+1
     writes); without a locator the rows are bisected recursively (k bad
     rows among n cost O(k log n) writes).

   A located row that writes fine alone disables locators for the rest of
   the batch (bisection bounds the cost of a sink that points at wrong
   rows); in the transaction that rolls everything back first;
3. every dead letter is confirmed by the DLQ broker before ``deliver``
   returns (one wait per batch); the circuit breaker then records the
   batch's dead letters.

The breaker does not wait for step 3: each dead letter, once its row is
confirmed bad (a probed row is confirmed alone first), goes through a
``BatchCheck`` that raises ``CircuitBreakerOpen`` as soon as the batch is
certain to trip the breaker. The transaction is rolled back, dead letters
not yet produced are dropped, nothing is committed.

Without a DeadLetterPolicy a decode error or a permanently failing row
raises: a poison pill is never dropped silently.

Exactly-once sinks (``sink.stores_offsets``) store ``batch.context
.next_offsets`` with the rows. In one transaction, the dead letters are
confirmed before it commits with the whole batch's offsets. Slice by slice,
each slice carries the offsets of its own rows only (locating writes the
same in-order slices), pending dead letters are confirmed before the next
write, and a final empty write stores the whole batch's offsets, so a crash
at any moment resumes exactly after what is durable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kfast.delivery.isolation import KEY_STATES, isolate
from kfast.delivery.letters import Letters
from kfast.delivery.metrics import DeliveryMetrics
from kfast.delivery.slices import Slices
from kfast.dlq import CircuitBreaker, DeadLetterPolicy, DeadLetterQueue
from kfast.errors import DecodeError, PermanentSinkError
from kfast.retry import Retrier, RetryPolicy
from kfast.sinks import SinkHooks

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch
    from kfast.sinks import Sink

__all__ = ["Delivery"]


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
        self.hooks = SinkHooks(sink)
        self.retry = retry
        self.policy = dlq
        self.metrics = metrics if metrics is not None else DeliveryMetrics()
        self.retrier = retrier or Retrier(retry)
        self.queue = (
            DeadLetterQueue(dlq, kafka_config, retry, retrier=self.retrier) if dlq else None
        )
        self.breaker = CircuitBreaker(dlq) if dlq else None
        self.clock = clock
        self.dirty = False  # the last batch had rows the sink rejected
        self.dirty_keys = False  # ... and some of them broke a unique or foreign key

    def start(self) -> None:
        """Make the dead-letter producer ready before the first batch (see DeadLetterQueue)."""
        if self.queue is not None:
            self.queue.start()

    def deliver(self, batch: Batch, stop_event: threading.Event) -> None:
        _Run(self, batch, stop_event).go()

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    def _write(self, batch: Batch, stop: threading.Event) -> int:
        """One sink write under the retry policy; returns attempts made."""
        attempts = 0

        def op() -> None:
            nonlocal attempts
            attempts += 1
            t0 = time.perf_counter()
            self.hooks.write(batch)
            self.metrics.latency(time.perf_counter() - t0)

        def on_retry(_attempt: int, _exc: BaseException, _delay: float) -> None:
            self.metrics.add("retries")
            self.metrics.add("sink_errors")

        self.retrier.run(op, stop, on_retry=on_retry, what="sink write")
        self.metrics.add("writes")
        self.metrics.add("rows_written", batch.num_rows)
        return attempts


class _Run:
    """One ``deliver`` call: decode errors, then the rows (one transaction or slices)."""

    def __init__(self, d: Delivery, batch: Batch, stop: threading.Event) -> None:
        self.d = d
        self.batch = batch
        self.stop = stop
        self.eo = d.hooks.stores_offsets
        # Trips the breaker as soon as this batch's dead letters found so far are enough.
        check = (
            d.breaker.batch(batch.num_rows + len(batch.errors)) if d.breaker is not None else None
        )
        self.letters = Letters(batch, d.queue, d.metrics, check, d.clock, stop)
        self.slices = Slices(batch, lambda b: d._write(b, stop), self.letters, d.metrics, self.eo)

    def go(self) -> None:
        d, batch, letters = self.d, self.batch, self.letters
        if batch.errors:
            if d.queue is None:
                e = batch.errors[0]
                raise DecodeError(
                    f"{len(batch.errors)} payload(s) could not be decoded (first: input {e.index}: "
                    f"{e.reason}) and no DeadLetterPolicy is configured"
                )
            letters.first_failure = d.clock()
            for e in batch.errors:
                letters.dead(e.index, "decode", "DecodeError", e.reason, 1, None)
            letters.produce()  # on their way to the broker while the rows are written
        if batch.num_rows:
            self._write_rows()
        if self.eo and (self.slices.bisected or batch.num_rows == 0):
            letters.confirm()
            d._write(batch.slice(0, 0), self.stop)  # the whole batch's offsets, no rows
        letters.confirm()
        # Rows the server rejected: the next batch is screened first. Rows the sink's
        # client-side check found cost nothing to isolate and say nothing of the next batch.
        d.dirty = len(letters.dead_inputs) > len(batch.errors) + letters.client_found
        d.dirty_keys = bool(letters.sink_states & KEY_STATES)
        if d.breaker is not None:
            n = batch.num_rows + len(batch.errors)
            d.breaker.record(n, sorted(letters.dead_inputs))

    def _write_rows(self) -> None:
        """Write the batch; on a permanent failure isolate the bad rows.

        With a sink that offers row transactions the isolation runs in one sink
        transaction (:func:`kfast.delivery.isolation.isolate`: the sink's set-based screen,
        else probes from the error's row locator); otherwise, or if that finds a located row
        that is fine alone or cannot go on, slice by slice
        (:class:`kfast.delivery.slices.Slices`), continuing from the first failure. After a
        batch with bad rows the next one is screened before any plain write.
        """
        d, n, letters = self.d, self.batch.num_rows, self.letters
        if not d.hooks.has_row_transaction:
            self.slices.write_range(0, n, 0)
            return
        if d.queue is not None and (d.dirty or (self.eo and letters.produced)):
            # After a batch with bad rows this one likely has some too: it is screened first
            # instead of paying for a plain write that fails part way (a clean batch is then
            # written from the screen's staging table). In exactly_once mode a batch with
            # decode errors is written in a row transaction too, so that their dead letters
            # are acknowledged while the rows are written, before the commit stores the
            # offsets, instead of before the write.
            if letters.first_failure is None:
                letters.first_failure = d.clock()
            if isolate(
                self.batch,
                None,
                d.hooks.row_transaction,
                letters,
                d.retrier,
                d.metrics,
                self.stop,
                self.eo,
                keys=d.dirty_keys,
                screen_first=d.dirty,
            ):
                return
        if self.eo:
            letters.confirm()  # the write stores the batch's offsets: dead letters first
        try:
            d._write(self.batch, self.stop)
            return
        except PermanentSinkError as exc:
            letters.failed(exc, 0, n)
            first = exc
        # The sink's transaction screens the rows, or follows the locator, or gives up at
        # once (no locator, nothing screened): then slice by slice.
        done = isolate(
            self.batch,
            first,
            d.hooks.row_transaction,
            letters,
            d.retrier,
            d.metrics,
            self.stop,
            self.eo,
        )
        if done:
            return
        if done is False:
            self.slices.hints = False  # a located row was fine alone: bisect instead
        self.slices.write_range(0, n, 0, known=first)
