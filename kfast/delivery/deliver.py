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
     ``exactly_once`` without key) and the error locates its row
     (``PermanentSinkError.row``: the COPY line). Rows that fail on their
     own (CHECK, NOT NULL, data errors) are found by probes that are rolled
     back, the rest is written in one COPY, each found row is confirmed by
     COPYing it alone; other failures are handled in order. Each COPY sits
     in a savepoint, the batch commits once. See :class:`_Isolation` for
     the algorithm and its bound (about 2k+2 COPYs for k bad rows);
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

import bisect
import collections
import dataclasses
import logging
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

log = logging.getLogger("kfast.delivery")


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
        self.pending: list[DeadLetter] = []  # built, not yet handed to the DLQ producer
        self.produced: list[DeadLetter] = []  # handed to the producer, not yet confirmed
        self.dead_inputs: list[int] = []
        self.bisected = False  # the batch was written in slices
        self.hints = True  # follow PermanentSinkError.row locators
        self.eo = bool(getattr(d.sink, "stores_offsets", False))
        # Trips the breaker as soon as this batch's dead letters found so far are enough.
        self.check = (
            d.breaker.batch(batch.num_rows + len(batch.errors)) if d.breaker is not None else None
        )

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
            self._produce()  # on their way to the broker while the rows are written
        if batch.num_rows:
            self._write_rows()
        if self.eo and (self.bisected or batch.num_rows == 0):
            self._confirm()
            d._write(batch.slice(0, 0), self.stop)  # the whole batch's offsets, no rows
        self._confirm()
        if d.breaker is not None:
            n = batch.num_rows + len(batch.errors)
            d.breaker.record(n, sorted(self.dead_inputs))

    def _produce(self) -> None:
        """Hand the pending dead letters to the DLQ producer (delivery reports come later)."""
        if self.pending:
            assert self.d.queue is not None
            self.d.queue.produce(self.pending)
            self.produced.extend(self.pending)
            self.pending = []

    def _confirm(self) -> None:
        """Return when every dead letter so far is acknowledged by the DLQ broker."""
        self._produce()
        if self.produced:
            assert self.d.queue is not None
            self.d.queue.confirm(self.stop)
            for rec in self.produced:
                self.d.metrics.dead(rec.stage, rec.error_class)
            self.produced = []

    def _records(self) -> Any:
        if self.ctx is None:
            raise KfastError(
                "batch.context is not set: the delivery layer needs it to dead-letter records "
                "(kfast.Pipeline sets it; tests set a kfast.sinks.BatchContext)"
            )
        return self.ctx.records

    def _dead(
        self,
        index: int,
        stage: str,
        cls: str,
        message: str,
        attempts: int,
        sqlstate: str | None,
        note: bool = True,
    ) -> None:
        """Build the dead letter of input ``index``. ``note``: count it in the breaker's
        check first, which raises ``CircuitBreakerOpen`` (the letter is not built) when the
        batch is already certain to trip the breaker."""
        if note and self.check is not None and self.check.add(index):
            assert self.check.error is not None
            raise self.check.error
        recs = self._records()
        schema_id = None
        get_sid = getattr(recs, "schema_id", None)
        if callable(get_sid):
            try:
                schema_id = get_sid(index)
            except Exception as exc:
                # a decoder's schema_id_of (user code) must not stop dead-lettering:
                # the letter goes out without the optional header
                log.warning("schema_id_of failed, kfast.schema.id left out: %r", exc)
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

    def _dead_row(
        self, row: int, exc: PermanentSinkError, attempts: int, note: bool = True
    ) -> None:
        src = memoryview(self.batch.source_indices)[row]
        self._dead(src, "sink", _error_class(exc), str(exc), attempts, exc.sqlstate, note)

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

    def _failed(self, exc: PermanentSinkError, start: int, stop: int) -> None:
        """Bookkeeping of a permanent write failure; raises without a DeadLetterPolicy."""
        d = self.d
        d.metrics.add("sink_errors")
        if self.first_failure is None:
            self.first_failure = d.clock()
        if d.queue is None:
            raise PermanentSinkError(
                f"rows [{start}, {stop}) of the batch cannot be written ({exc}) and no "
                "DeadLetterPolicy is configured",
                sqlstate=exc.sqlstate,
            ) from exc

    def _write_rows(self) -> None:
        """Write the batch; on a permanent failure isolate the bad rows.

        With a sink that offers row transactions (``sink.row_transaction``) and an error
        that locates its row, the isolation runs in one sink transaction (:class:`_Isolation`);
        otherwise, or if that finds a located row that is fine alone, slice by slice
        (:meth:`_write_range`), continuing from the first failure.
        """
        d, n = self.d, self.batch.num_rows
        factory = getattr(d.sink, "row_transaction", None)
        if not callable(factory):
            self._write_range(0, n, 0)
            return
        if self.eo:
            self._confirm()  # the write stores the batch's offsets: dead letters first
        try:
            d._write(self.batch, self.stop)
            return
        except PermanentSinkError as exc:
            self._failed(exc, 0, n)
            first = exc
        if _located(first, 0, n) is not None:
            done = self._isolate(first, factory)
            if done:
                return
            if done is False:
                self.hints = False  # a located row was fine alone: bisect instead
        self._write_range(0, n, 0, known=first)

    def _isolate(self, first: PermanentSinkError, factory: Any) -> bool | None:
        """Isolate in one sink transaction, retried as a whole on transient errors.

        True: committed. False: a located row was not bad after all (nothing committed).
        None: no transaction for this batch, or a failure without a locator (nothing
        committed).
        """
        d = self.d
        outcome: bool | None = None

        def op() -> None:
            nonlocal outcome
            t0 = time.perf_counter()
            outcome = self._isolate_once(first, factory)
            d.metrics.latency(time.perf_counter() - t0)

        def on_retry(_attempt: int, _exc: BaseException, _delay: float) -> None:
            d.metrics.add("retries")
            d.metrics.add("sink_errors")

        d.retrier.run(op, self.stop, on_retry=on_retry, what="sink write")
        return outcome

    def _isolate_once(self, first: PermanentSinkError, factory: Any) -> bool | None:
        d, n = self.d, self.batch.num_rows
        try:
            txn = factory(self.batch)
        except PermanentSinkError:
            return None  # e.g. a value of the batch fails before any row is sent: bisect
        if txn is None:
            return None
        marks = len(self.pending), len(self.dead_inputs)
        try:
            with txn:
                iso = _Isolation(self, txn)
                try:
                    iso.isolate(first)
                except _GiveUp as stop:
                    return False if stop.wrong_locator else None
                dead = sorted(iso.dead.items())
                # iso.check already holds every dead row and did not trip.
                if self.eo:  # dead letters durable before the commit stores the offsets
                    for row, (exc, attempts) in dead:
                        self._dead_row(row, exc, attempts, note=False)
                    self._confirm()
                    txn.commit()
                else:
                    txn.commit()
                    for row, (exc, attempts) in dead:
                        self._dead_row(row, exc, attempts, note=False)
                self.check = iso.check
        except BaseException:
            del self.pending[marks[0] :], self.dead_inputs[marks[1] :]
            raise
        d.metrics.add("writes", iso.kept)
        d.metrics.add("rows_written", n - len(dead))
        return True

    def _write_range(
        self,
        start: int,
        stop: int,
        attempts_before: int,
        locate: bool = True,
        known: PermanentSinkError | None = None,
    ) -> None:
        """Write rows ``[start, stop)``; isolate and dead-letter the rows that fail.

        ``known``: the failure of writing exactly these rows, when already seen.
        Iterative over located rows (k located rows never nest k calls deep).
        """
        d = self.d
        while start < stop:
            if known is None:
                if self.eo:
                    self._confirm()  # everything before this slice must be durable first
                sub = self._slice(start, stop)
                try:
                    d._write(sub, self.stop)
                    return
                except PermanentSinkError as exc:
                    self._failed(exc, start, stop)
                    known = exc
            failure, known = known, None
            attempts = attempts_before + 1
            if stop - start == 1:
                self._dead_row(start, failure, attempts)
                return
            hint = _located(failure, 0, stop - start) if locate and self.hints else None
            self.bisected = True
            if hint is None:
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


_MIN_PROBE = 64  # rows in the smallest probe window


def _located(exc: PermanentSinkError, lo: int, hi: int) -> int | None:
    """``exc.row`` when it is an int in ``[lo, hi)``, else None."""
    row = exc.row
    if isinstance(row, int) and not isinstance(row, bool) and lo <= row < hi:
        return row
    return None


def _count(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


class _Isolation:
    """Isolate the bad rows of a batch inside one sink transaction (``RowTransaction``).

    1. **Probe**: while the last failure is one its row raises on its own
       (``txn.row_only``: a CHECK, NOT NULL or data error) at a located row, exclude
       that row and probe the rows after it to find the next one (``txn.probe``: a COPY
       always rolled back, into an index-less copy of the table when the sink has one).
       Probes run without the rows before them, so only row-only failures are taken
       from them: those do not depend on other rows. A probe covers 4 mean gaps between
       the rows found so far (at least 64 rows) and 4x more after each probe that found
       nothing, so dense bad rows are not each followed by the rest of the batch.
    2. **In order**: COPY every row not excluded, in batch order, in one statement. A
       failure (a unique or foreign key violation, or anything the probes did not see)
       is handled in order, as the slice-by-slice path does: the rows before the
       located row are written (``txn.write``: no savepoint, they were just accepted),
       the located row is tried alone (dead if that fails too), the rest continues.
    3. **Confirm**: each excluded row is COPY'd alone (rolled back) and must fail with a
       row-only error again.

    A located row that is fine alone, rows before it that fail, or a failure without a
    locator raise ``_GiveUp``: the caller rolls everything back and goes slice by slice
    (bisecting). Probes and rows tried alone sit in a savepoint that is rolled back, so
    failures cost no reconnect and leave no subtransaction behind; good rows reach the
    table in one COPY instead of once per bad row; the batch commits once.

    Bound, for k bad rows among n that all fail on their own: at most
    ``2k + 1 + k·⌈log4 n⌉`` COPYs (the batch's first write, k - 1 probes that find
    one, at most ⌈log4 n⌉ that find nothing after each, one COPY of the rest, k rows
    alone), typically 2k + 2. Each other bad row adds at most 3 (its failing COPY, the
    rows before it, itself alone).
    """

    def __init__(self, run: _Run, txn: Any) -> None:
        self.run = run
        self.txn = txn
        self.metrics = run.d.metrics
        self.n = run.batch.num_rows
        self.skip: list[int] = []  # sorted rows not to write: excluded or dead
        self.excl: dict[int, tuple[PermanentSinkError, int]] = {}  # row -> (error, attempts)
        self.dead: dict[int, tuple[PermanentSinkError, int]] = {}
        self.kept = 0  # COPYs whose rows were kept
        # The breaker's check of the batch, counting excluded rows too (they are confirmed
        # before it trips); a copy: a rolled back isolation leaves the run's check as it was.
        self.check = run.check.copy() if run.check is not None else None
        self.src = memoryview(run.batch.source_indices)

    def isolate(self, first: PermanentSinkError) -> None:
        """Steps 1-3 (the caller commits); raises ``_GiveUp``."""
        seed = self._probe(first)
        self._in_order(seed)
        self._confirm_excluded()

    def _exclude(self, row: int) -> None:
        bisect.insort(self.skip, row)

    def _ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Rows of ``[lo, hi)`` not skipped, as ranges."""
        out = []
        a = lo
        i = bisect.bisect_left(self.skip, lo)
        while i < len(self.skip) and self.skip[i] < hi:
            r = self.skip[i]
            if r > a:
                out.append((a, r))
            a = r + 1
            i += 1
        if a < hi:
            out.append((a, hi))
        return out

    @staticmethod
    def _row(exc: PermanentSinkError, ranges: list[tuple[int, int]]) -> int | None:
        row = _located(exc, ranges[0][0], ranges[-1][1]) if ranges else None
        if row is None or not any(a <= row < b for a, b in ranges):
            return None
        return row

    def _probe(self, first: PermanentSinkError) -> PermanentSinkError | None:
        """Step 1. Returns ``first`` when the in-order step starts with that failure (it
        was not row-only, and the batch's first write had every row before it)."""
        txn, m = self.txn, self.metrics
        err, attempts = first, 1
        ranges = [(0, self.n)]
        while True:
            row = self._row(err, ranges)
            if row is None or not txn.row_only(err):
                return first if err is first else None
            m.add("located")
            self.excl[row] = (err, attempts)
            self._exclude(row)
            self._note(row)
            # Probe a window of a few mean gaps between the rows found so far, growing 4x
            # while nothing fails: dense bad rows are not followed by the whole rest of the
            # batch each time (quadratic), sparse ones cost few extra probes.
            lo, window = row + 1, max(_MIN_PROBE, 4 * (row + 1) // len(self.excl))
            while True:
                ranges = self._ranges(lo, min(self.n, lo + window))
                if not ranges:
                    return None
                try:
                    txn.probe(ranges)
                except PermanentSinkError as exc:
                    m.add("sink_errors")
                    err, attempts = exc, attempts + 1
                    break
                lo, window = ranges[-1][1], 4 * window

    def _in_order(self, err: PermanentSinkError | None) -> None:
        """Step 2; ``err``: the known failure of COPYing every row, if already seen."""
        txn, m = self.txn, self.metrics
        pos, attempts = 0, 1
        while True:
            ranges = self._ranges(pos, self.n)
            if not ranges:
                return
            if err is None:
                try:
                    txn.copy(ranges, keep=True)
                    self.kept += 1
                    return
                except PermanentSinkError as exc:
                    m.add("sink_errors")
                    err = exc
            failure, err = err, None
            attempts += 1
            if _count(ranges) == 1:
                self._kill(ranges[0][0], failure, attempts)
                return
            row = self._row(failure, ranges)
            if row is None:
                raise _GiveUp(wrong_locator=False)  # no COPY line: bisect, slice by slice
            m.add("located")
            before = self._ranges(pos, row)
            if before:
                try:
                    txn.write(before)  # accepted by the server right before the failure
                except PermanentSinkError as exc:
                    raise _GiveUp(wrong_locator=True) from exc  # the transaction is lost
                self.kept += 1
            try:
                txn.copy([(row, row + 1)], keep=False)  # the located row alone
            except PermanentSinkError as exc2:
                m.add("sink_errors")
                self._kill(row, exc2, attempts + 1)
            else:
                raise _GiveUp(wrong_locator=True)  # fine alone: the locator was wrong
            pos = row + 1

    def _kill(self, row: int, exc: PermanentSinkError, attempts: int) -> None:
        self.dead[row] = (exc, attempts)
        self._exclude(row)
        self._note(row)

    def _note(self, row: int) -> None:
        """Count a dead or excluded row in the breaker's check. When the rows found so far
        trip it, confirm the excluded rows (a row fine alone: ``_GiveUp``, the batch goes
        slice by slice, where only confirmed rows count) and raise ``CircuitBreakerOpen``:
        the caller rolls the transaction back, no dead letter of the batch is built."""
        if self.check is None or not self.check.add(self.src[row]):
            return
        self._confirm_excluded()
        assert self.check.error is not None
        raise self.check.error

    def _confirm_excluded(self) -> None:
        """Step 3 (rows confirmed already are skipped)."""
        for row in sorted(self.excl):
            if row in self.dead:
                continue
            attempts = self.excl[row][1]
            try:
                self.txn.copy([(row, row + 1)], keep=False)
            except PermanentSinkError as exc:
                self.metrics.add("sink_errors")
                if self.txn.row_only(exc):
                    self.dead[row] = (exc, attempts + 1)
                    continue
            raise _GiveUp(wrong_locator=True)


class _GiveUp(Exception):
    """Isolating in one transaction cannot go on: roll it back, go slice by slice."""

    def __init__(self, wrong_locator: bool) -> None:
        super().__init__()
        self.wrong_locator = wrong_locator  # a located row was not bad after all
