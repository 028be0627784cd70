"""The dead letters of one batch: built, handed to the DLQ producer, confirmed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kfast.delivery.metrics import DeliveryMetrics
from kfast.dlq import BatchCheck, DeadLetter, DeadLetterQueue, dlq_headers
from kfast.errors import KfastError, PermanentSinkError, SinkError

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch
    from kfast.sinks import BatchContext

__all__ = ["Letters", "error_class"]

log = logging.getLogger("kfast.delivery")


def error_class(exc: BaseException) -> str:
    """The class name a dead letter reports: the underlying driver error when there is one."""
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, SinkError):
        return type(cause).__name__
    return type(exc).__name__


class Letters:
    """Dead letters of one batch.

    ``pending``: built, not yet handed to the producer; ``produced``: handed over, not yet
    confirmed; ``dead_inputs``: input indices dead-lettered. ``check`` (the circuit
    breaker's :class:`BatchCheck` of the batch) trips as soon as the dead letters found so
    far are enough.
    """

    def __init__(
        self,
        batch: Batch,
        queue: DeadLetterQueue | None,
        metrics: DeliveryMetrics,
        check: BatchCheck | None,
        clock: Callable[[], float],
        stop: threading.Event,
    ) -> None:
        self.batch = batch
        self.ctx: BatchContext | None = getattr(batch, "context", None)
        self.queue = queue
        self.metrics = metrics
        self.check = check
        self.clock = clock
        self.stop = stop
        self.first_failure: float | None = None
        self.pending: list[DeadLetter] = []
        self.produced: list[DeadLetter] = []
        self.dead_inputs: list[int] = []
        self.sink_states: set[str] = set()  # SQLSTATEs of the rows the sink rejected
        # Rows among dead_inputs the sink's client-side check found (the server saw none).
        self.client_found = 0
        # Batch rows whose letters were handed to the producer before their transaction
        # committed (certain: found by the sink's client-side check), and their inputs: a
        # rolled back or retried isolation does not build them again.
        self.early_rows: set[int] = set()
        self.early_inputs: set[int] = set()
        self.deaths = 0  # dead_row calls (a row declared dead, lettered now or before)

    def failed(self, exc: PermanentSinkError, start: int, stop: int) -> None:
        """Bookkeeping of a permanent write failure; raises without a DeadLetterPolicy."""
        self.metrics.add("sink_errors")
        if self.first_failure is None:
            self.first_failure = self.clock()
        if self.queue is None:
            raise PermanentSinkError(
                f"rows [{start}, {stop}) of the batch cannot be written ({exc}) and no "
                "DeadLetterPolicy is configured",
                sqlstate=exc.sqlstate,
            ) from exc

    def produce(self) -> None:
        """Hand the pending dead letters to the DLQ producer (delivery reports come later)."""
        if self.pending:
            assert self.queue is not None
            self.queue.produce(self.pending)
            self.produced.extend(self.pending)
            self.pending = []

    def confirm(self) -> None:
        """Return when every dead letter so far is acknowledged by the DLQ broker."""
        self.produce()
        if self.produced:
            assert self.queue is not None
            self.queue.confirm(self.stop)
            for rec in self.produced:
                self.metrics.dead(rec.stage, rec.error_class)
            self.produced = []

    def _records(self) -> Any:
        if self.ctx is None:
            raise KfastError(
                "batch.context is not set: the delivery layer needs it to dead-letter records "
                "(kfast.Pipeline sets it; tests set a kfast.sinks.BatchContext)"
            )
        return self.ctx.records

    def dead(
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

    def dead_row(self, row: int, exc: PermanentSinkError, attempts: int, note: bool = True) -> None:
        """The dead letter of batch row ``row`` (stage ``sink``); nothing when it was built
        early (:meth:`dead_row_early`)."""
        self.deaths += 1
        src = memoryview(self.batch.source_indices)[row]
        if row in self.early_rows:
            # Built already; the breaker's check may not have seen it (a rolled back
            # isolation's check is dropped).
            if note and self.check is not None and self.check.add(src):
                assert self.check.error is not None
                raise self.check.error
            return
        if exc.sqlstate:
            self.sink_states.add(exc.sqlstate)
        self.dead(src, "sink", error_class(exc), str(exc), attempts, exc.sqlstate, note)

    def dead_row_early(self, row: int, exc: PermanentSinkError, attempts: int) -> None:
        """The dead letter of a row certain to be bad, built before its transaction commits
        (the caller produces it at once, so that it travels while the rows are written);
        once per batch row, whatever is rolled back or retried."""
        if row in self.early_rows:
            return
        self.dead_row(row, exc, attempts, note=False)
        self.early_rows.add(row)
        self.early_inputs.add(self.dead_inputs[-1])

    def mark(self) -> tuple[int, int]:
        return len(self.pending), len(self.dead_inputs)

    def undo(self, mark: tuple[int, int]) -> None:
        """Forget the letters built since ``mark`` (a rolled back transaction), but those
        built early (already produced: their rows stay dead)."""
        del self.pending[mark[0] :]
        kept = [i for i in self.dead_inputs[mark[1] :] if i in self.early_inputs]
        self.dead_inputs[mark[1] :] = kept
