"""``kfast.Pipeline``: Kafka -> ring -> decoder -> sink, bounded and at-least-once.

Three threads:

* the **poll thread** (the thread that calls :meth:`Pipeline.run`) owns the
  consumer: it calls ``consume()``, copies messages into the ring, pauses and
  resumes partitions (backpressure), seeks partitions back when the ring had
  to drop a message, runs the rebalance callbacks and commits offsets. It
  never blocks on the sink, so ``max.poll.interval.ms`` is never exceeded,
  however long the sink stalls;
* the **decoder thread** takes batches out of the ring (``BatchPolicy``) and
  decodes them with the GIL released, so decoding overlaps polling and, with
  two batches in flight (``MemoryPlan.batches_in_flight``), the delivery of
  the previous batch;
* the **worker thread** delivers the decoded batches in ring order
  (``kfast.delivery.Delivery`` when present: retries, bisection, DLQ), marks
  them durable in the offset tracker and releases their ring slots.

See docs/concepts.md for the design and docs/operations.md for rebalances,
shutdown and tuning.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kfast.errors import ConfigError, DecodeError, KfastError, TransientSinkError
from kfast.runtime.memory import MemoryPlan, plan_memory
from kfast.runtime.offsets import OffsetTracker
from kfast.runtime.policies import BatchPolicy, BufferPolicy, parse_duration
from kfast.sinks import BatchContext, CallableSink, PipelineInfo

__all__ = ["Pipeline"]

log = logging.getLogger("kfast.runtime.pipeline")

_SAMPLES = 2048  # latency / batch-size samples kept per stage (bounded reservoir)
_STAGES = ("poll", "decode", "deliver", "end_to_end")
_BATCH_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000)
_RETRIABLE_COMMIT = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "count": 0}
    s = sorted(samples)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, int(p * n))]

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "count": n}


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0
    decoded_rows: int = 0
    decode_errors: int = 0
    written_rows: int = 0
    batches: int = 0
    batches_decoded: int = 0
    pauses: int = 0
    resumes: int = 0
    seeks: int = 0
    seek_errors: int = 0
    revokes: int = 0
    revokes_at_close: int = 0
    sync_commit_failures: int = 0
    assigns: int = 0
    lost: int = 0
    revoke_timeouts: int = 0
    consume_calls: int = 0
    batch_hist: list[int] = field(default_factory=lambda: [0] * (len(_BATCH_BUCKETS) + 1))
    batch_rows: deque[int] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    latency: dict[str, deque[float]] = field(
        default_factory=lambda: {s: deque(maxlen=_SAMPLES) for s in _STAGES}
    )


def _load_delivery() -> tuple[Any, Any] | None:
    try:
        from kfast.delivery import Delivery, DeliveryMetrics
    except ImportError:
        return None
    return Delivery, DeliveryMetrics


class Pipeline:
    """Consume ``topics``, decode with ``decoder``, write to ``sink``; see the module doc.

    ``kafka`` is a dict of librdkafka settings passed through untouched except
    for the few kfast must control (see :mod:`kfast.runtime.source`). Policies bound
    every buffer; ``memory_limit`` is split by :func:`kfast.runtime.memory.plan_memory`
    (``memory_plan()`` shows the split).
    """

    def __init__(
        self,
        kafka: dict[str, Any],
        topics: Sequence[str] | str,
        decoder: Any,
        sink: Any,
        *,
        batch: BatchPolicy | None = None,
        buffer: BufferPolicy | None = None,
        retry: Any = None,
        dlq: Any = None,
        memory_limit: int | str | None = "256MiB",
        drain_timeout: float | str = 30.0,
        revoke_timeout: float | str = 10.0,
        commit_interval: float | str = 1.0,
        poll_batch: int = 1000,
        poll_timeout: float | str = 0.1,
        partitions: int = 8,
        metrics_port: int | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        from kfast._batch import BaseDecoder

        if not isinstance(kafka, dict):
            raise ConfigError(
                f"kafka: expected a dict of librdkafka settings, got {type(kafka).__name__}"
            )
        for key in ("bootstrap.servers", "group.id"):
            if not kafka.get(key):
                raise ConfigError(f"kafka[{key!r}]: required")
        if isinstance(topics, str):
            topics = [topics]
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise ConfigError(f"topics: expected a non-empty list of topic names, got {topics!r}")
        if not isinstance(decoder, BaseDecoder):
            raise ConfigError(
                f"decoder: expected a kfast decoder (AvroDecoder, ProtobufDecoder, ...), "
                f"got {type(decoder).__name__}"
            )
        if callable(sink) and not hasattr(sink, "write"):
            sink = CallableSink(sink)
        if not callable(getattr(sink, "write", None)):
            raise ConfigError(
                f"sink: expected an object with write(batch), got {type(sink).__name__}"
            )
        batch = BatchPolicy() if batch is None else batch
        buffer = BufferPolicy() if buffer is None else buffer
        if not isinstance(batch, BatchPolicy):
            raise ConfigError(f"batch: expected kfast.BatchPolicy, got {type(batch).__name__}")
        if not isinstance(buffer, BufferPolicy):
            raise ConfigError(f"buffer: expected kfast.BufferPolicy, got {type(buffer).__name__}")
        if retry is not None:
            from kfast.retry import RetryPolicy

            if not isinstance(retry, RetryPolicy):
                raise ConfigError(f"retry: expected kfast.RetryPolicy, got {type(retry).__name__}")
        if dlq is not None:
            from kfast.dlq import DeadLetterPolicy

            if not isinstance(dlq, DeadLetterPolicy):
                raise ConfigError(f"dlq: expected kfast.DeadLetterPolicy, got {type(dlq).__name__}")
        if (
            isinstance(poll_batch, bool)
            or not isinstance(poll_batch, int)
            or not 1 <= poll_batch <= 100_000
        ):
            raise ConfigError(f"poll_batch: {poll_batch!r} is out of range [1, 100000]")
        if (
            isinstance(partitions, bool)
            or not isinstance(partitions, int)
            or not 1 <= partitions <= 100_000
        ):
            raise ConfigError(f"partitions: {partitions!r} is out of range [1, 100000]")
        self._drain_timeout = parse_duration(drain_timeout, "drain_timeout")
        self._revoke_timeout = parse_duration(revoke_timeout, "revoke_timeout")
        self._commit_interval = parse_duration(commit_interval, "commit_interval")
        self._poll_timeout = parse_duration(poll_timeout, "poll_timeout")
        if not 0 < self._drain_timeout <= 3600:
            raise ConfigError(f"drain_timeout: {self._drain_timeout} s is out of range (0, 3600]")
        max_poll_s = int(kafka.get("max.poll.interval.ms", 300_000)) / 1000.0
        if not 0 <= self._revoke_timeout < max_poll_s / 2:
            raise ConfigError(
                f"revoke_timeout: {self._revoke_timeout} s is out of range [0, {max_poll_s / 2}) "
                "(half of max.poll.interval.ms: the rebalance callback must return in time)"
            )
        if not 0 < self._poll_timeout <= 1.0:
            raise ConfigError(f"poll_timeout: {self._poll_timeout} s is out of range (0, 1]")
        if not 0 <= self._commit_interval <= 60:
            raise ConfigError(f"commit_interval: {self._commit_interval} s is out of range [0, 60]")
        if metrics_port is not None and not (
            isinstance(metrics_port, int) and 0 <= metrics_port <= 65535
        ):
            raise ConfigError(f"metrics_port: {metrics_port!r} is out of range [0, 65535]")

        self.kafka = dict(kafka)
        self.topics = list(topics)
        self.decoder = decoder
        self.sink = sink
        self.batch_policy = batch
        self.buffer_policy = buffer
        self.retry = retry
        self.dlq = dlq
        self.group_id = str(kafka["group.id"])
        self._poll_batch = poll_batch
        self._metrics_port = metrics_port
        self._install_signals = install_signal_handlers
        self._plan = plan_memory(
            memory_limit, self.kafka, batch, buffer, dlq=dlq is not None, partitions=partitions
        )
        # fail now, not in run(), on librdkafka settings it rejects
        from kfast.runtime.source import consumer_config

        consumer_config(self.kafka, self._plan.kafka_settings())

        self._stop = threading.Event()  # stop() called: drain and shut down
        self._worker_stop = threading.Event()  # worker, decoder: leave after the current batch
        self._data = threading.Event()  # poll -> decoder: new messages in the ring
        self._released = threading.Event()  # worker -> poll: slots released
        self._flush = threading.Event()  # decoder: do not wait for max_wait
        self._running = False
        self._ran = False
        self._worker_error: BaseException | None = None
        self._stats = _Stats()
        self._tracker = OffsetTracker()
        self._ring: Any = None
        self._source: Any = None
        self._delivery: Any = None
        self._delivery_metrics: Any = None
        self._paused = False
        self._assignment_changed = False
        self._paused_partitions = 0
        self._closing = False
        # decoder thread -> worker: (batch, view, first slot, slots) in ring order, then None
        self._ready: queue.Queue[Any] = queue.Queue()
        # worker -> decoder thread: delivered batches to decode into again
        self._free: queue.Queue[Any] = queue.Queue()
        self._metrics_server: Any = None
        self.exit_reason = ""

    # ----------------------------------------------------------------- public
    def memory_plan(self) -> MemoryPlan:
        """How ``memory_limit`` is split (see :mod:`kfast.runtime.memory`)."""
        return self._plan

    def stop(self) -> None:
        """Ask ``run()`` to drain, commit and return (thread-safe, idempotent)."""
        self._stop.set()
        self._flush.set()
        self._data.set()

    @property
    def running(self) -> bool:
        return self._running

    def run(self) -> None:
        """Consume until ``stop()``, SIGTERM or SIGINT; then drain, commit and close.

        Raises the worker's error (e.g. ``RetryExhausted``, ``DecodeError``)
        after a clean shutdown that commits only what was durable.
        """
        from kfast.runtime.ring import Ring
        from kfast.runtime.source import Source

        if self._ran:
            raise KfastError("a Pipeline runs once; build a new one to run again")
        self._ran = True
        plan = self._plan
        self._ring = Ring(plan.ring_messages, plan.ring_bytes, keep_headers=self.dlq is not None)
        self._ring.schema_id_of = getattr(self.decoder, "schema_id_of", None)
        self._source = Source(
            self.kafka,
            self.topics,
            plan_settings=plan.kafka_settings(),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._setup_delivery()
        opener = getattr(self.sink, "open", None)
        if callable(opener):
            opener(PipelineInfo(group_id=self.group_id, topics=list(self.topics)))
        previous_handlers = self._install_handlers()
        self._start_metrics_server()
        decoder = threading.Thread(target=self._decode_loop, name="kfast-decoder", daemon=True)
        worker = threading.Thread(target=self._work, name="kfast-worker", daemon=True)
        self._stats.started = time.monotonic()
        self._running = True
        try:
            self._source.subscribe()
            decoder.start()
            worker.start()
            self._poll_loop()
            self._drain()
        finally:
            self._shutdown(worker, decoder)
            self._restore_handlers(previous_handlers)
            self._running = False
        if self._worker_error is not None:
            raise self._worker_error

    # ------------------------------------------------------------ poll thread
    def _poll_loop(self) -> None:
        ring = self._ring
        src = self._source
        stats = self._stats
        pause_at = self.buffer_policy.pause_at
        resume_at = self.buffer_policy.resume_at
        next_commit = time.monotonic() + self._commit_interval
        poll_batch = self._poll_batch
        latency_poll = stats.latency["poll"]
        while not self._stop.is_set():
            if self._worker_error is not None:
                self.exit_reason = "worker failed"
                return
            if src.fatal is not None:
                raise KafkaException(src.fatal)
            free = ring.capacity_messages - ring.used_messages
            t0 = time.perf_counter()
            msgs = src.consume(max(1, min(poll_batch, free)), self._poll_timeout)
            latency_poll.append(time.perf_counter() - t0)
            stats.consume_calls += 1
            if msgs:
                if ring.push(msgs):
                    self._data.set()
                del msgs
                if ring.errors:
                    self._handle_consume_errors()
            if self._assignment_changed:
                self._assignment_changed = False
                if self._paused:
                    assignment = src.assignment()
                    src.pause(assignment)
                    self._paused_partitions = len(assignment)
            fill = ring.fill()
            if not self._paused:
                if fill >= pause_at or ring.rewinds():
                    self._pause()
            elif fill <= resume_at:
                self._resume()
            now = time.monotonic()
            if now >= next_commit:
                self._commit(asynchronous=True)
                next_commit = now + self._commit_interval
        self.exit_reason = self.exit_reason or "stopped"

    def _handle_consume_errors(self) -> None:
        errors, self._ring.errors = self._ring.errors, []
        for err in errors:
            if err.fatal():
                raise KafkaException(err)
            log.warning("consume error: %s", err)

    def _pause(self) -> None:
        assignment = self._source.assignment()
        self._source.pause(assignment)
        self._paused = True
        self._paused_partitions = len(assignment)
        self._stats.pauses += 1
        log.debug(
            "ring %.0f%% full: paused %d partitions", self._ring.fill() * 100, len(assignment)
        )

    def _resume(self) -> None:
        src = self._source
        assignment = src.assignment()
        src.resume(assignment)
        self._paused = False
        self._paused_partitions = 0
        self._stats.resumes += 1
        log.debug("ring %.0f%% full: resumed", self._ring.fill() * 100)
        self._seek_on_resume(assignment)

    def _seek_on_resume(self, assignment: list[TopicPartition]) -> None:
        """Seek every resumed partition to the next offset the ring has not stored.

        For a partition whose messages the ring had to drop, that is the first
        dropped one (without the seek it would be lost: librdkafka resumes after
        the last message ``consume()`` returned). For the others it is where
        librdkafka would resume anyway, but the seek makes it fetch at once:
        a plain resume waited ~700 ms before the first fetch (librdkafka 2.16,
        measured), time in which a small ring runs dry and the sink idles.
        """
        ring = self._ring
        rewinds = {(t, p): off for t, p, off in ring.rewinds()}
        for tp in assignment:
            key = (tp.topic, tp.partition)
            offset = rewinds.get(key, -1)
            if offset < 0:
                offset = ring.expected_offset(tp.topic, tp.partition)
            if offset < 0:
                continue  # nothing consumed yet: the committed offset applies
            try:
                self._source.seek(tp.topic, tp.partition, offset)
            except KafkaException as e:
                if key in rewinds:
                    # Still in rewind state: the ring keeps dropping this
                    # partition's messages, so nothing is lost; retry later.
                    self._stats.seek_errors += 1
                    self._paused = True  # stay in the paused state machine to retry
                log.info("seek %s[%d] to %d failed (%s)", tp.topic, tp.partition, offset, e)
                continue
            if key in rewinds:
                ring.seek_done(tp.topic, tp.partition)
            self._stats.seeks += 1

    def _commit(
        self, *, asynchronous: bool, indexes: list[int] | None = None, retry: bool = False
    ) -> None:
        failures = self._source.take_commit_failures()
        if failures:
            self._tracker.commit_failed(failures)
        offsets = self._tracker.pending(indexes, force=not asynchronous)
        if not offsets:
            return
        # The shutdown commit is the last chance before the partitions move:
        # retry transient coordinator states briefly (librdkafka completes a
        # rebalance in the background meanwhile). Not inside a rebalance
        # callback: the group waits for the callback to return, so retrying
        # there only prolongs the rebalance.
        delays = [0.05, 0.1, 0.2, 0.4, 0.8] if retry and not asynchronous else []
        while True:
            try:
                self._source.commit(offsets, asynchronous=asynchronous)
            except KafkaException as e:
                code = e.args[0].code() if e.args and hasattr(e.args[0], "code") else None
                if delays and code in _RETRIABLE_COMMIT:
                    time.sleep(delays.pop(0))
                    continue
                self._tracker.commit_failed(offsets)
                if not asynchronous:
                    self._stats.sync_commit_failures += 1
                log.warning("commit of %d partitions failed: %s", len(offsets), e)
                return
            self._tracker.committed(offsets)
            return

    # -------------------------------------------------------- rebalance hooks
    def _on_assign(self, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """Register new partitions; return start offsets a sink stores itself (exactly-once)."""
        self._stats.assigns += 1
        for tp in partitions:
            index = self._ring.assign(tp.topic, tp.partition)
            self._tracker.assign(index, tp.topic, tp.partition, self._ring.generation(index))
        self._assignment_changed = True
        log.info("assigned %d partitions", len(partitions))
        if not getattr(self.sink, "stores_offsets", False) or not partitions:
            return {}
        return self._stored_offsets(partitions)

    def _stored_offsets(self, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """Offsets the sink committed with the rows (``PostgresSink(mode="exactly_once")``).

        Starting anywhere else would write rows twice, so when the sink cannot
        answer (after a few tries) the error stops the pipeline.
        """
        last: BaseException | None = None
        for delay in (0.0, 0.5, 1.0, 2.0):
            if delay:
                time.sleep(delay)
            try:
                stored = self.sink.stored_offsets(self.group_id, list(self.topics))
            except TransientSinkError as e:
                last = e
                continue
            wanted = {(tp.topic, tp.partition) for tp in partitions}
            return {tp: int(off) for tp, off in stored.items() if tp in wanted}
        assert last is not None
        raise last

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Finish the revoked partitions' in-flight messages (bounded), commit, release."""
        if self._closing:
            self._stats.revokes_at_close += 1
        else:
            self._stats.revokes += 1
        if not self._closing and self._worker_error is None:
            target = self._ring.head
            deadline = time.monotonic() + self._revoke_timeout
            self._flush.set()
            self._data.set()
            while self._ring.tail < target and self._worker_error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._stats.revoke_timeouts += 1
                    log.warning(
                        "revoke: %d messages still in flight after %.1f s; abandoning them "
                        "(not committed, the next owner reads them again)",
                        target - self._ring.tail,
                        self._revoke_timeout,
                    )
                    break
                self._released.wait(min(remaining, 0.05))
                self._released.clear()
            if not self._stop.is_set():
                self._flush.clear()
        indexes = []
        for tp in partitions:
            index = self._ring.partition_index(tp.topic, tp.partition)
            indexes.append(index)
        if self._worker_error is None:
            self._commit_sync(indexes)
        for tp, index in zip(partitions, indexes):
            self._ring.revoke(tp.topic, tp.partition)
            self._tracker.remove(index)
        log.info("revoked %d partitions", len(partitions))

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost (session timeout): commit nothing, drop their in-flight rows."""
        self._stats.lost += 1
        for tp in partitions:
            index = self._ring.revoke(tp.topic, tp.partition)
            if index >= 0:
                self._tracker.remove(index)
        log.warning("lost %d partitions", len(partitions))

    def _commit_sync(self, indexes: list[int] | None = None, *, retry: bool = False) -> None:
        self._commit(asynchronous=False, indexes=indexes, retry=retry)

    # ---------------------------------------------------------------- worker
    def _setup_delivery(self) -> None:
        loaded = _load_delivery()
        if loaded is None:
            return
        delivery_cls, metrics_cls = loaded
        retry = self.retry
        if retry is None:
            from kfast.retry import RetryPolicy

            retry = RetryPolicy()
        kafka = dict(self.kafka)
        if self.dlq is not None and self._plan.dlq_queue:
            kafka.setdefault("queue.buffering.max.kbytes", str(max(1, self._plan.dlq_queue >> 10)))
        self._delivery_metrics = metrics_cls()
        self._delivery = delivery_cls(self.sink, retry, self.dlq, kafka, self._delivery_metrics)

    def _deliver(self, batch: Any) -> None:
        if self._delivery is not None:
            self._delivery.deliver(batch, self._worker_stop)
            return
        if batch.errors:
            first = batch.errors[0]
            raise DecodeError(
                f"{len(batch.errors)} undecodable messages and no DeadLetterPolicy "
                f"(first: {batch.context.records.topic(first.index)}"
                f"[{batch.context.records.partition(first.index)}]@"
                f"{batch.context.records.offset(first.index)}: {first.reason})"
            )
        if batch.num_rows:
            self.sink.write(batch)

    def _decode_loop(self) -> None:
        """Decoder thread: cut the ring into batches (``BatchPolicy``) and decode them.

        It decodes into one of ``batches_in_flight`` recycled Batch objects and hands
        each to the worker in ring order. With two, batch N+1 is decoded while the
        worker delivers batch N (decoding releases the GIL, and so does the sink's
        socket I/O); with one, it waits for the worker to return the batch, so
        decoding and delivery alternate.
        """
        from kfast._batch import Batch

        ring = self._ring
        decoder = self.decoder
        max_rows = self.batch_policy.max_rows
        max_bytes = int(self.batch_policy.max_bytes)
        max_wait = float(self.batch_policy.max_wait)
        stats = self._stats
        lat = stats.latency["decode"]
        free = self._free
        ready = self._ready
        for _ in range(self._plan.batches_in_flight):
            free.put(Batch())
        read = 0  # next ring slot to decode; the worker releases behind it
        first_seen = 0.0
        batch: Any = None
        try:
            while not self._worker_stop.is_set() and self._worker_error is None:
                if batch is None:
                    try:
                        batch = free.get(timeout=0.05)
                    except queue.Empty:
                        continue
                self._data.clear()
                avail = ring.head - read
                if avail <= 0:
                    first_seen = 0.0
                    self._data.wait(0.05)
                    continue
                now = time.monotonic()
                if not first_seen:
                    first_seen = now
                count, nbytes = ring.span(read, max_rows, max_bytes)
                if (
                    count < max_rows
                    and nbytes < max_bytes
                    and now - first_seen < max_wait
                    and not self._flush.is_set()
                ):
                    self._data.wait(max_wait - (now - first_seen))
                    continue
                first_seen = 0.0
                t0 = time.perf_counter()
                try:
                    view = ring.decode(decoder, read, count, batch)
                except BufferError:
                    # the sink kept a view of this batch's buffers from an earlier
                    # delivery: leave them to it and decode into a fresh batch
                    batch = Batch()
                    view = ring.decode(decoder, read, count, batch)
                with stats.lock:
                    lat.append(time.perf_counter() - t0)
                    stats.batches_decoded += 1
                ready.put((batch, view, read, count))
                read += count
                batch = None
        except BaseException as e:
            log.error("decoder stopped: %r", e)
            self._worker_error = e
            self._released.set()
        finally:
            ready.put(None)  # wakes the worker; nothing follows

    def _work(self) -> None:
        """Worker thread: deliver decoded batches in ring order, then release their slots."""
        ring = self._ring
        stats = self._stats
        lat = stats.latency
        free = self._free
        ready = self._ready
        try:
            while not self._worker_stop.is_set():
                try:
                    item = ready.get(timeout=0.05)
                except queue.Empty:
                    if self._worker_error is not None:
                        return
                    continue
                if item is None:
                    return
                batch, view, start, count = item
                t1 = time.perf_counter()
                if batch.num_rows or batch.errors:
                    batch.context = BatchContext(
                        records=view, next_offsets=view.next_offsets(), group_id=self.group_id
                    )
                    self._deliver(batch)
                t2 = time.perf_counter()
                ts = view.timestamp(0) if len(view) else -1
                self._tracker.mark(view.progress)
                nrows = batch.num_rows
                nerr = len(batch.errors)
                batch.context = None
                del view
                ring.release(start + count)
                free.put(batch)
                del batch
                self._released.set()
                with stats.lock:
                    stats.batches += 1
                    stats.decoded_rows += nrows
                    stats.decode_errors += nerr
                    stats.written_rows += nrows
                    stats.batch_rows.append(count)
                    b = 0
                    while b < len(_BATCH_BUCKETS) and count > _BATCH_BUCKETS[b]:
                        b += 1
                    stats.batch_hist[b] += 1
                    lat["deliver"].append(t2 - t1)
                    if ts > 0:
                        lat["end_to_end"].append(max(0.0, time.time() - ts / 1000.0))
        except BaseException as e:
            log.error("worker stopped: %r", e)
            self._worker_error = e
            self._released.set()

    # -------------------------------------------------------------- shutdown
    def _drain(self) -> None:
        """Stop taking messages; let the worker finish what the ring holds (bounded)."""
        if self._worker_error is not None:
            return
        src = self._source
        ring = self._ring
        self._flush.set()
        self._data.set()
        try:
            src.pause(src.assignment())
        except KafkaException as e:  # pragma: no cover - defensive
            log.debug("pause on drain failed: %s", e)
        self._paused = True
        deadline = time.monotonic() + self._drain_timeout
        next_commit = time.monotonic() + self._commit_interval
        while ring.tail < ring.head and self._worker_error is None:
            if time.monotonic() >= deadline:
                log.warning(
                    "drain timeout (%.1f s): %d messages not delivered; they are not "
                    "committed and will be read again",
                    self._drain_timeout,
                    ring.head - ring.tail,
                )
                self.exit_reason = "drain timeout"
                break
            # keep serving the group; anything consumed now is not stored
            # (not committed either, so it is read again after restart)
            src.consume(100, self._poll_timeout)
            if time.monotonic() >= next_commit:
                self._commit(asynchronous=True)
                next_commit = time.monotonic() + self._commit_interval

    def _shutdown(self, worker: threading.Thread, decoder: threading.Thread) -> None:
        self._worker_stop.set()
        self._flush.set()
        self._data.set()
        if worker.is_alive():
            worker.join(timeout=min(5.0, self._drain_timeout))
        if decoder.is_alive():
            decoder.join(timeout=5.0)  # decoding one batch takes milliseconds
        worker_stuck = worker.is_alive()
        self._closing = True
        if self._source is not None:
            try:
                self._commit_sync(retry=True)
            except Exception as e:
                log.warning("final commit failed: %s", e)
            try:
                self._source.close()
            except Exception as e:
                log.warning("consumer close failed: %s", e)
        if worker_stuck:
            log.warning(
                "worker still inside the sink after the drain timeout; not closing the sink"
            )
        else:
            if self._delivery is not None:
                try:
                    self._delivery.close()
                except Exception as e:
                    log.warning("delivery close failed: %s", e)
            closer = getattr(self.sink, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception as e:
                    log.warning("sink close failed: %s", e)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    # --------------------------------------------------------------- signals
    def _install_handlers(self) -> dict[int, Any]:
        if not self._install_signals or threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return previous

    def _restore_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop.is_set():
            # Second signal: leave at once. Nothing that is not durable was
            # committed, so the next run re-reads it (at-least-once).
            os.write(2, b"kfast: second signal, exiting without draining\n")
            os._exit(128 + signum)
        log.info("signal %d: draining (send again to exit at once)", signum)
        self.exit_reason = f"signal {signum}"
        self.stop()

    # --------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, Any]:
        """A snapshot of counters, fill levels, latencies and process health."""
        s = self._stats
        ring = self._ring
        elapsed = max(1e-9, time.monotonic() - s.started) if s.started else 0.0
        with s.lock:
            lat = {k: _percentiles(list(v)) for k, v in s.latency.items()}
            batch_rows = _percentiles([float(x) for x in s.batch_rows])
            hist = {
                (f"<={b}" if i < len(_BATCH_BUCKETS) else f">{_BATCH_BUCKETS[-1]}"): s.batch_hist[i]
                for i, b in enumerate((*_BATCH_BUCKETS, _BATCH_BUCKETS[-1]))
            }
            decoded, errors, written, batches, batches_decoded = (
                s.decoded_rows,
                s.decode_errors,
                s.written_rows,
                s.batches,
                s.batches_decoded,
            )
        ring_stats = ring.stats() if ring is not None else {}
        consumed = ring_stats.get("pushed", 0)
        src = self._source
        out: dict[str, Any] = {
            "running": self._running,
            "uptime_s": elapsed,
            "consumed": consumed,
            "decoded": decoded,
            "decode_errors": errors,
            "written": written,
            "batches": batches,
            "batches_decoded": batches_decoded,
            "rates": {
                "consumed_per_s": consumed / elapsed if elapsed else 0.0,
                "written_per_s": written / elapsed if elapsed else 0.0,
            },
            "ring": {
                **ring_stats,
                "fill": ring.fill() if ring is not None else 0.0,
            },
            "in_flight": ring_stats.get("used_messages", 0),
            "batch_size": {"histogram": hist, **batch_rows},
            "latency_s": lat,
            "consumer_lag": dict(src.lag) if src is not None else {},
            "paused": self._paused,
            # counted by the poll thread: metrics() never calls the consumer
            # (a consumer call from another thread can wait behind consume())
            "paused_partitions": self._paused_partitions if self._paused else 0,
            "pauses": s.pauses,
            "resumes": s.resumes,
            "seeks": s.seeks,
            "seek_errors": s.seek_errors,
            "rebalances": {
                "assigned": s.assigns,
                "revoked": s.revokes,
                "revoked_at_close": s.revokes_at_close,
                "lost": s.lost,
                "revoke_timeouts": s.revoke_timeouts,
            },
            "commits": {
                "submitted": self._tracker.commits,
                "failed": self._tracker.commit_errors,
                "sync_failed": s.sync_commit_failures,
                "async_ok": src.async_commits_ok if src is not None else 0,
                "async_failed": src.async_commits_failed if src is not None else 0,
                "partitions": self._tracker.snapshot(),
            },
            "rss_bytes": _rss_bytes(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "gc": {
                "collections": [g["collections"] for g in gc.get_stats()],
                "counts": list(gc.get_count()),
            },
            "memory_plan": self._plan.as_dict(),
        }
        dm = self._delivery_metrics
        if dm is not None:
            if callable(getattr(dm, "snapshot", None)):
                out["delivery"] = dm.snapshot()
            else:
                out["delivery"] = {
                    k: getattr(dm, k)
                    for k in ("retries", "dlq_records", "sink_errors", "bisections", "located")
                    if hasattr(dm, k)
                }
            wl = getattr(dm, "write_latency", None)
            if wl is not None:
                out["latency_s"]["sink_write"] = _percentiles(list(wl))
        return out

    def _start_metrics_server(self) -> None:
        if self._metrics_port is None:
            return
        from kfast._prometheus import serve

        self._metrics_server = serve(self, self._metrics_port)
