"""The worker thread: deliver decoded batches in ring order, mark, release.

For each batch from ``Channels.decoded`` it sets ``batch.context``, hands the
batch to :class:`kfast.delivery.Delivery` (sink write with retries, bad-row
isolation, DLQ), then marks the batch's offsets durable in the offset tracker
(the poll thread commits them), releases its ring slots and returns the
Batch object to the decoder thread (``Channels.recycled``).

:class:`ObservedRetrier` is the ``Retrier`` the delivery layer runs its
retries under: it adds the health state (``retrying`` with the reason) and
rate-limited log lines (attempt, backoff, error class; outage begin and end).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kfast.delivery import Delivery, DeliveryMetrics
from kfast.errors import TransientSinkError
from kfast.retry import Retrier, RetryPolicy
from kfast.runtime.channels import Channels, Decoded
from kfast.runtime.health import HealthBoard
from kfast.runtime.kafka_log import Throttle
from kfast.runtime.offsets import OffsetTracker
from kfast.runtime.stats import DeliverStats
from kfast.sinks import BatchContext

__all__ = ["DeliverLoop", "ObservedRetrier"]

log = logging.getLogger("kfast.runtime.deliver")
retry_log = logging.getLogger("kfast.retry")

T = TypeVar("T")


class ObservedRetrier(Retrier):
    """A ``Retrier`` that reports each outage in health and in the log (rate-limited)."""

    def __init__(
        self, policy: RetryPolicy, health: HealthBoard, throttle: Throttle | None = None
    ) -> None:
        super().__init__(policy)
        self.health = health
        self.throttle = throttle if throttle is not None else Throttle()

    def run(
        self,
        op: Callable[[], T],
        stop: threading.Event | None = None,
        *,
        retry_on: tuple[type[BaseException], ...] = (TransientSinkError,),
        on_retry: Callable[[int, BaseException, float], None] | None = None,
        what: str = "operation",
    ) -> T:
        began = [0.0, 0]

        def observed(attempt: int, exc: BaseException, delay: float) -> None:
            if not began[0]:
                began[0] = time.monotonic()
            began[1] = attempt
            self.health.retrying(what, f"{what}: {type(exc).__name__}: {exc}")
            suppressed = self.throttle.allow(what)
            if suppressed is not None:
                retry_log.warning(
                    "%s failed (%s: %s); retrying, attempt %d, backoff %.2f s%s",
                    what,
                    type(exc).__name__,
                    exc,
                    attempt,
                    delay,
                    f" ({suppressed} retries not logged)" if suppressed else "",
                )
            if on_retry is not None:
                on_retry(attempt, exc, delay)

        try:
            result = super().run(op, stop, retry_on=retry_on, on_retry=observed, what=what)
        finally:
            if began[0]:
                self.throttle.reset(what)
                self.health.recovered(what)
        if began[0]:
            retry_log.info(
                "%s succeeded again after %.1f s (%d failed attempts)",
                what,
                time.monotonic() - began[0],
                began[1],
            )
        return result


class DeliverLoop:
    """Runs on the ``kfast-worker`` thread; :meth:`run` is the thread's target."""

    def __init__(
        self,
        ring: Any,
        delivery: Delivery,
        delivery_metrics: DeliveryMetrics,
        tracker: OffsetTracker,
        group_id: str,
        channels: Channels,
        stats: DeliverStats,
        health: HealthBoard,
    ) -> None:
        self.ring = ring
        self.delivery = delivery
        self.delivery_metrics = delivery_metrics
        self.tracker = tracker
        self.group_id = group_id
        self.ch = channels
        self.stats = stats
        self.health = health

    def run(self) -> None:
        ch = self.ch
        try:
            while not ch.stop_workers.is_set():
                try:
                    item = ch.decoded.get(timeout=0.05)
                except queue.Empty:
                    if ch.failure:
                        return
                    continue
                if item is None:
                    return
                self._deliver(item)
        except BaseException as e:
            if ch.failure.set(e, "worker"):
                log.error("worker stopped: %s: %s", type(e).__name__, e)
            self.health.error(e)
            ch.released.set()

    def _deliver(self, item: Decoded) -> None:
        batch, view, start, count = item
        dm = self.delivery_metrics
        t1 = time.perf_counter()
        nrows = batch.num_rows
        nerr = len(batch.errors)
        written = 0
        if nrows or nerr:
            batch.context = BatchContext(
                records=view, next_offsets=view.next_offsets(), group_id=self.group_id
            )
            before = dm.rows_written
            self.delivery.deliver(batch, self.ch.stop_workers)
            # rows the sink made durable; dead-lettered rows are counted by the DLQ
            written = dm.rows_written - before
        t2 = time.perf_counter()
        ts = view.timestamp(0) if len(view) else -1
        self.tracker.mark(view.progress)
        batch.context = None
        del view
        self.ring.release(start + count)
        self.ch.recycled.put(batch)
        del batch
        self.ch.released.set()
        self.health.batch_delivered()
        self.stats.record(
            messages=count, rows=nrows, errors=nerr, written=written, seconds=t2 - t1, ts_ms=ts
        )
