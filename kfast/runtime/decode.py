"""The decoder thread: cut the ring into batches (``BatchPolicy``) and decode them.

It decodes into one of ``batches_in_flight`` recycled Batch objects and hands
each to the worker in ring order (``Channels.decoded``). With two, batch N+1
is decoded while the worker delivers batch N (decoding releases the GIL, and
so does the sink's socket I/O); with one, it waits for the worker to return
the batch (``Channels.recycled``), so decoding and delivery alternate.

A schema registry outage (the decoder raises
:class:`kfast.errors.SchemaRegistryUnavailable`) is not bad data: the same
span is decoded again into a fresh batch, with backoff under the pipeline's
``RetryPolicy``, and nothing is dead-lettered. Meanwhile the ring fills and
the poll thread pauses the partitions (backpressure) while it keeps serving
the group. When the policy runs out the pipeline stops with
``RetryExhausted``; the span was never delivered, so its offsets are not
committed.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any

from kfast._batch import Batch
from kfast.errors import SchemaRegistryUnavailable
from kfast.retry import Retrier, RetryPolicy, Stopped
from kfast.runtime.channels import Channels, Decoded
from kfast.runtime.health import HealthBoard
from kfast.runtime.kafka_log import Throttle
from kfast.runtime.policies import BatchPolicy
from kfast.runtime.stats import DecodeStats

__all__ = ["DecodeLoop"]

log = logging.getLogger("kfast.runtime.decode")

_OUTAGE = "schema registry"


class DecodeLoop:
    """Runs on the ``kfast-decoder`` thread; :meth:`run` is the thread's target."""

    def __init__(
        self,
        ring: Any,
        decoder: Any,
        policy: BatchPolicy,
        batches_in_flight: int,
        retry: RetryPolicy,
        channels: Channels,
        stats: DecodeStats,
        health: HealthBoard,
        *,
        retrier: Retrier | None = None,
        throttle: Throttle | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.ring = ring
        self.decoder = decoder
        self.metadata = metadata or None  # Kafka coordinate columns (kfast._layout.metadata_plan)
        self.policy = policy
        self.batches_in_flight = batches_in_flight
        self.ch = channels
        self.stats = stats
        self.health = health
        self.retrier = retrier if retrier is not None else Retrier(retry)
        self.throttle = throttle if throttle is not None else Throttle()
        self._outage_since = 0.0
        self._outage_attempts = 0

    def run(self) -> None:
        ch = self.ch
        try:
            self._loop()
        except Stopped:
            pass  # shutdown during a registry outage: the span stays undelivered
        except BaseException as e:
            if ch.failure.set(e, "decoder"):
                log.error("decoder stopped: %s: %s", type(e).__name__, e)
            self.health.error(e)
            ch.released.set()  # wake a revoke that waits for slots
        finally:
            ch.decoded.put(None)  # wakes the worker; nothing follows

    def _loop(self) -> None:
        ring = self.ring
        ch = self.ch
        max_rows = self.policy.max_rows
        max_bytes = int(self.policy.max_bytes)
        max_wait = float(self.policy.max_wait)
        for _ in range(self.batches_in_flight):
            ch.recycled.put(Batch())
        read = 0  # next ring slot to decode; the worker releases behind it
        first_seen = 0.0
        batch: Any = None
        while not ch.stop_workers.is_set() and not ch.failure:
            if batch is None:
                try:
                    batch = ch.recycled.get(timeout=0.05)
                except queue.Empty:
                    continue
            ch.new_messages.clear()
            avail = ring.head - read
            if avail <= 0:
                first_seen = 0.0
                ch.new_messages.wait(0.05)
                continue
            now = time.monotonic()
            if not first_seen:
                first_seen = now
            count, nbytes = ring.span(read, max_rows, max_bytes)
            if (
                count < max_rows
                and nbytes < max_bytes
                and now - first_seen < max_wait
                and not ch.flush.is_set()
            ):
                ch.new_messages.wait(max_wait - (now - first_seen))
                continue
            first_seen = 0.0
            t0 = time.perf_counter()
            batch, view = self._decode(read, count, batch)
            with self.stats.lock:
                self.stats.decode.add(time.perf_counter() - t0)
                self.stats.batches_decoded += 1
            ch.decoded.put(Decoded(batch, view, read, count))
            read += count
            batch = None

    def _decode(self, start: int, count: int, batch: Any) -> tuple[Any, Any]:
        """Decode ring slots [start, start + count); retries a registry outage."""
        ring = self.ring
        decoder = self.decoder
        out = [batch]

        def once() -> Any:
            try:
                return ring.decode(decoder, start, count, out[0], self.metadata)
            except BufferError:
                # the sink kept a view of this batch's buffers from an earlier
                # delivery: leave them to it and decode into a fresh batch
                out[0] = Batch()
                return ring.decode(decoder, start, count, out[0], self.metadata)
            except SchemaRegistryUnavailable:
                out[0] = Batch()  # nothing half-decoded is carried into the retry
                raise

        view = self.retrier.run(
            once,
            self.ch.stop_workers,
            retry_on=(SchemaRegistryUnavailable,),
            on_retry=self._on_retry,
            what="decode (schema registry)",
        )
        if self._outage_since:
            self._outage_over()
        return out[0], view

    def _on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        if not self._outage_since:
            self._outage_since = time.monotonic()
        self._outage_attempts = attempt
        with self.stats.lock:
            self.stats.registry_retries += 1
        self.health.retrying(_OUTAGE, f"schema registry unavailable: {exc}")
        suppressed = self.throttle.allow(_OUTAGE)
        if suppressed is not None:
            log.warning(
                "schema registry unavailable (%s: %s); retrying the batch, attempt %d, "
                "backoff %.2f s%s",
                type(exc).__name__,
                exc,
                attempt,
                delay,
                f" ({suppressed} retries not logged)" if suppressed else "",
            )

    def _outage_over(self) -> None:
        took = time.monotonic() - self._outage_since
        self.throttle.reset(_OUTAGE)
        self.health.recovered(_OUTAGE)
        log.info(
            "schema registry reachable again after %.1f s (%d failed attempts)",
            took,
            self._outage_attempts,
        )
        self._outage_since = 0.0
        self._outage_attempts = 0
