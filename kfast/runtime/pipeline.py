"""``kfast.Pipeline``: Kafka -> ring -> decoder -> sink, bounded and at-least-once.

This module builds the pipeline and runs its lifecycle; each thread's loop
lives in its own module:

* the **poll thread** (:mod:`kfast.runtime.poll`) owns the consumer: consume,
  ring push, pause/resume, rebalance callbacks, commits, drain;
* the **decoder thread** (:mod:`kfast.runtime.decode`) cuts the ring into
  batches and decodes them with the GIL released;
* the **worker thread** (:mod:`kfast.runtime.deliver`) delivers the batches
  (retries, bad-row isolation, DLQ), marks them durable and releases their
  ring slots.

They talk only through :mod:`kfast.runtime.channels`; each keeps its own
counters (:mod:`kfast.runtime.stats`). ``health()`` is described in
:mod:`kfast.runtime.health`.

Lifecycle: ``start()`` builds the consumer and starts the three threads and
returns; ``stop()`` asks them to drain, commit and shut down; ``join()``
waits and re-raises the pipeline's error; ``close()`` stops, waits and
releases everything (idempotent). ``run()`` is start + join in the calling
thread (with SIGINT/SIGTERM handlers on the main thread), ``run_async()``
the same without blocking the host's event loop. ``with`` and ``async with``
start on enter and close on exit.

See docs/concepts.md for the design and docs/operations.md for rebalances,
shutdown and tuning.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from kfast._batch import BaseDecoder
from kfast._layout import metadata_plan
from kfast.delivery import Delivery, DeliveryMetrics
from kfast.dlq import DeadLetterPolicy
from kfast.errors import ConfigError, KfastError, StartupTimeout
from kfast.prometheus import serve as serve_metrics
from kfast.retry import RetryPolicy, Stopped
from kfast.runtime.channels import Channels
from kfast.runtime.decode import DecodeLoop
from kfast.runtime.deliver import DeliverLoop, ObservedRetrier
from kfast.runtime.health import Health, HealthBoard
from kfast.runtime.kafka import CompiledSource, available
from kfast.runtime.memory import MemoryPlan, plan_memory
from kfast.runtime.offsets import OffsetTracker
from kfast.runtime.policies import BatchPolicy, BufferPolicy, parse_duration
from kfast.runtime.poll import PollLoop
from kfast.runtime.ring import Ring
from kfast.runtime.source import Source, check_kafka, consumer_config
from kfast.runtime.stats import DecodeStats, DeliverStats, PollStats, percentiles
from kfast.sinks import CallableSink, PipelineInfo, SinkHooks
from kfast.sinks.async_sink import AsyncSinkAdapter, is_async_sink

__all__ = ["Pipeline"]

log = logging.getLogger("kfast.runtime.pipeline")

# Kafka consumers a pipeline can run on (``source=``)
SOURCES = ("confluent", "compiled")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Pipeline:
    """Consume ``topics``, decode with ``decoder``, write to ``sink``; see the module doc.

    ``kafka`` is a dict of librdkafka settings passed through untouched except
    for the few kfast must control (see :mod:`kfast.runtime.source`). Policies bound
    every buffer; ``memory_limit`` is split by :func:`kfast.runtime.memory.plan_memory`
    (``memory_plan()`` shows the split). ``startup_timeout`` (seconds) makes
    ``start()`` wait until the pipeline is ready and fail if it is not by then.
    ``metadata`` adds Kafka coordinates to every batch as ordinary columns:
    ``["topic", "partition", "offset", "timestamp", "key", "headers"]`` (named
    ``kafka_topic``, ...) or ``{"offset": "column_name", ...}``.
    ``source`` picks the Kafka consumer: ``"compiled"`` (the default where it
    is available: kfast's consumer over confluent-kafka's librdkafka, which
    copies messages into the ring without a Python object per message; see
    :mod:`kfast.runtime.kafka`) or ``"confluent"`` (confluent-kafka's
    ``Consumer``; the default on Windows). Both behave the same otherwise.
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
        retry: RetryPolicy | None = None,
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
        startup_timeout: float | str | None = None,
        source: str | None = None,
        metadata: Sequence[str] | dict[str, str] | None = None,
    ) -> None:
        check_kafka(kafka)
        if isinstance(topics, str):
            topics = [topics]
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise ConfigError(f"topics: expected a non-empty list of topic names, got {topics!r}")
        if not isinstance(decoder, BaseDecoder):
            raise ConfigError(
                f"decoder: expected a kfast decoder (AvroDecoder, ProtobufDecoder, ...), "
                f"got {type(decoder).__name__}"
            )
        if is_async_sink(sink):
            # awaited for real: on the host's loop under run_async(), else on a loop of its own
            sink = AsyncSinkAdapter(sink)
        elif callable(sink) and not hasattr(sink, "write"):
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
            if not isinstance(retry, RetryPolicy):
                raise ConfigError(f"retry: expected kfast.RetryPolicy, got {type(retry).__name__}")
        if dlq is not None:
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

        self._startup_timeout: float | None = None
        if startup_timeout is not None:
            self._startup_timeout = parse_duration(startup_timeout, "startup_timeout")
            if not 0 < self._startup_timeout <= 3600:
                raise ConfigError(
                    f"startup_timeout: {self._startup_timeout} s is out of range (0, 3600]"
                )

        try:
            # Kafka coordinates as batch columns, e.g. ["topic", "partition", "offset"]
            self.metadata = metadata_plan(metadata)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        self.kafka = dict(kafka)
        self.topics = list(topics)
        self.decoder = decoder
        self.sink = sink
        self._sink_hooks = SinkHooks(sink)
        self.batch_policy = batch
        self.buffer_policy = buffer
        self.retry = retry
        self.dlq = dlq
        self.group_id = str(kafka["group.id"])
        self._poll_batch = poll_batch
        if source is None:
            source = "compiled" if available() else "confluent"
        if source not in SOURCES:
            raise ConfigError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
        if source == "compiled" and not available():
            raise ConfigError("source='compiled': no usable librdkafka found (not supported here?)")
        self.source: str = source
        self._metrics_port = metrics_port
        self._install_signals = install_signal_handlers
        self._plan = plan_memory(
            memory_limit, self.kafka, batch, buffer, dlq=dlq is not None, partitions=partitions
        )
        # fail now, not in start(), on librdkafka settings it rejects
        consumer_config(self.kafka, self._plan.kafka_settings())

        self._retry_policy = retry if retry is not None else RetryPolicy()
        self._ch = Channels()
        self._health = HealthBoard()
        self._poll_stats = PollStats()
        self._decode_stats = DecodeStats()
        self._deliver_stats = DeliverStats()
        self._tracker = OffsetTracker()
        self._lock = threading.Lock()  # start() / close() against each other
        self._started = False
        self._closed = False
        self._done = threading.Event()  # set by the poll thread when everything is released
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._started_at = 0.0
        self._ring: Any = None
        self._source: Source | None = None
        self._poll: PollLoop | None = None
        self._delivery: Delivery | None = None
        self._delivery_metrics = DeliveryMetrics()
        self._threads: list[threading.Thread] = []
        self._metrics_server: Any = None
        self._sink_opened = False
        self.exit_reason = ""

    # -------------------------------------------------------------- public
    def memory_plan(self) -> MemoryPlan:
        """How ``memory_limit`` is split (see :mod:`kfast.runtime.memory`)."""
        return self._plan

    @property
    def running(self) -> bool:
        """True from ``start()`` until everything is shut down."""
        return self._started and not self._done.is_set()

    def health(self) -> Health:
        """The pipeline's state for operators and orchestrators (:mod:`kfast.runtime.health`)."""
        return self._health.snapshot()

    def start(self) -> None:
        """Build the consumer, start the threads and return.

        Raises ``ConfigError`` at once for settings librdkafka rejects or a
        metrics port in use. With ``startup_timeout`` it then waits until the
        pipeline is ready (sink open, partitions assigned): a missing topic
        raises ``ConfigError``, anything else not ready in time (broker
        unreachable, sink unreachable) ``StartupTimeout``; an error of the
        pipeline meanwhile is raised as is. Whatever fails, everything
        ``start()`` created is released before it raises.
        """
        with self._lock:
            if self._closed:
                raise KfastError("the Pipeline is closed; build a new one")
            if self._started:
                raise KfastError("a Pipeline starts once; build a new one to run again")
            self._started = True
        try:
            self._build()
        except BaseException as e:
            self._health.phase = "failed"
            self._health.error(e)
            self._release_unstarted()
            raise
        log.info(
            "started: group %r, topics %s, memory_limit %.0f MiB (ring %d slots / %.1f MiB, "
            "prefetch %.1f MiB, %d batches in flight)",
            self.group_id,
            ",".join(self.topics),
            self._plan.limit / 2**20,
            self._plan.ring_messages,
            self._plan.ring_bytes / 2**20,
            self._plan.prefetch / 2**20,
            self._plan.batches_in_flight,
        )
        if self._startup_timeout is not None:
            self._await_ready(self._startup_timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Ask the pipeline to drain, commit and shut down (thread-safe, idempotent).

        Returns at once, or with ``timeout`` after waiting up to that many
        seconds for the shutdown (without raising the pipeline's error; use
        ``join()`` for that). Safe to call from a signal handler.
        """
        if self._started and not self._done.is_set() and not self._ch.stop.is_set():
            self._health.phase = "draining"
        self._ch.stop.set()
        if timeout is not None and self._started:
            self._done.wait(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the pipeline has shut down; re-raise its error (``RetryExhausted``, ...).

        With ``timeout``, returns after that many seconds even if it is still
        running (check ``running``).
        """
        if not self._started:
            raise KfastError("join(): the Pipeline was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        # short waits so that a signal handler runs promptly on the main thread
        while not self._done.is_set():
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return
            self._done.wait(left)
        self._raise_failure()

    def close(self) -> None:
        """Stop, wait for the shutdown and release everything; idempotent.

        Does not raise the pipeline's error (``join()`` does).
        """
        with self._lock:
            self._closed = True
            started = self._started
        if not started:
            return
        self.stop()
        self._done.wait()

    def run(self) -> None:
        """Consume until ``stop()``, SIGTERM or SIGINT; then drain, commit and close.

        ``start()`` + ``join()`` in the calling thread. On the main thread (and
        with ``install_signal_handlers``) SIGINT and SIGTERM drain the
        pipeline; a second one exits the process at once. The previous
        handlers are restored on every exit path. Raises the pipeline's error
        (e.g. ``RetryExhausted``, ``DecodeError``) after a clean shutdown that
        commits only what was durable.
        """
        previous = self._install_handlers()
        try:
            self.start()
            self.join()
        finally:
            try:
                self.close()
            finally:
                self._restore_handlers(previous)

    async def run_async(self) -> None:
        """``run()`` for an asyncio host: never blocks its event loop.

        The threads are started and joined through worker threads; an async
        sink runs on the host's loop. Cancelling the task stops the pipeline,
        waits for the drain and then re-raises ``CancelledError``.
        """
        await self.__aenter__()
        try:
            await self._wait_done()
        except asyncio.CancelledError:
            self.stop()
            await asyncio.shield(self._wait_done())
            raise
        finally:
            await asyncio.to_thread(self.close)
        self._raise_failure()

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if exc_type is None:
            self._raise_failure()

    async def __aenter__(self) -> Pipeline:
        self._bind_loop(asyncio.get_running_loop())
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        await asyncio.shield(self._wait_done())
        await asyncio.to_thread(self.close)
        if exc_type is None:
            self._raise_failure()

    # ------------------------------------------------------------ lifecycle
    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Async sinks run on the host's loop under ``run_async()``/``async with``."""
        if isinstance(self.sink, AsyncSinkAdapter):
            self.sink.bind_loop(loop)

    def _wait_done(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self._done.is_set():
                self._async_waiters.append((loop, fut))
                return fut
        fut.set_result(None)
        return fut

    def _raise_failure(self) -> None:
        err = self._ch.failure.error
        if err is not None:
            raise err

    def _build(self) -> None:
        """Everything start() creates, in an order that ``_release_unstarted`` can undo."""
        plan = self._plan
        ch = self._ch
        keep_headers = self.dlq is not None or any(f == "headers" for f, _ in self.metadata)
        self._ring = Ring(plan.ring_messages, plan.ring_bytes, keep_headers=keep_headers)
        # an optional decoder capability (Confluent framing): schema ids for dead letters
        self._ring.schema_id_of = getattr(self.decoder, "schema_id_of", None)
        self._poll = poll = PollLoop(
            self._ring,
            self._tracker,
            self.sink,
            self.group_id,
            self.topics,
            self.buffer_policy,
            ch,
            self._poll_stats,
            self._health,
            poll_batch=self._poll_batch,
            poll_timeout=self._poll_timeout,
            commit_interval=self._commit_interval,
            drain_timeout=self._drain_timeout,
            revoke_timeout=self._revoke_timeout,
        )
        source_cls: Any = CompiledSource if self.source == "compiled" else Source
        self._source = poll.source = source_cls(
            self.kafka,
            self.topics,
            plan_settings=plan.kafka_settings(),
            on_assign=poll.on_assign,
            on_revoke=poll.on_revoke,
            on_lost=poll.on_lost,
            on_error=poll.on_error,
        )
        kafka = dict(self.kafka)
        if self.dlq is not None and plan.dlq_queue:
            kafka.setdefault("queue.buffering.max.kbytes", str(max(1, plan.dlq_queue >> 10)))
        retrier = ObservedRetrier(self._retry_policy, self._health)
        self._delivery = Delivery(
            self.sink, self._retry_policy, self.dlq, kafka, self._delivery_metrics, retrier=retrier
        )
        self._delivery.start()
        decode = DecodeLoop(
            self._ring,
            self.decoder,
            self.batch_policy,
            plan.batches_in_flight,
            self._retry_policy,
            ch,
            self._decode_stats,
            self._health,
            metadata=self.metadata,
        )
        deliver = DeliverLoop(
            self._ring,
            self._delivery,
            self._delivery_metrics,
            self._tracker,
            self.group_id,
            ch,
            self._deliver_stats,
            self._health,
        )
        if self._metrics_port is not None:
            try:
                self._metrics_server = serve_metrics(self, self._metrics_port)
            except OSError as e:
                raise ConfigError(
                    f"metrics_port: cannot listen on {self._metrics_port}: {e}"
                ) from e
        self._started_at = time.monotonic()
        self._threads = [
            threading.Thread(target=decode.run, name="kfast-decoder", daemon=True),
            threading.Thread(target=deliver.run, name="kfast-worker", daemon=True),
            threading.Thread(target=self._main, name="kfast-poll", daemon=True),
        ]
        started: list[threading.Thread] = []
        try:
            for t in self._threads:
                t.start()
                started.append(t)
        except BaseException:
            ch.stop.set()
            ch.stop_workers.set()
            for t in started:
                t.join(5.0)
            raise

    def _release_unstarted(self) -> None:
        """A failed start(): release what ``_build`` created (no thread runs)."""
        for closer, what in (
            (self._metrics_server.close if self._metrics_server is not None else None, "metrics"),
            (self._source.close if self._source is not None else None, "consumer"),
            (self._delivery.close if self._delivery is not None else None, "delivery"),
        ):
            if closer is None:
                continue
            try:
                closer()
            except Exception as e:  # pragma: no cover - defensive
                log.warning("%s close after a failed start: %s", what, e)
        self._metrics_server = None
        self._finish()

    def _await_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._done.is_set():
            h = self._health.snapshot()
            if h.ready:
                return
            if time.monotonic() >= deadline:
                break
            self._done.wait(0.05)
        if self._done.is_set() or self._ch.stop.is_set():
            self._raise_failure()
            if self._ch.stop.is_set():
                return  # stop() (a signal) during startup: not an error
            raise KfastError(f"the pipeline stopped during startup: {self.exit_reason}")
        h = self._health.snapshot()
        missing = dict(self._health.missing_topics)
        self.close()
        if missing:
            raise ConfigError(
                f"topics: {', '.join(repr(t) for t in sorted(missing))} not found "
                f"within startup_timeout ({timeout:g} s): {h.reason}"
            )
        raise StartupTimeout(
            f"not ready within startup_timeout ({timeout:g} s): {h.state}: {h.reason}", health=h
        )

    def _main(self) -> None:
        """The poll thread: open the sink, consume until stopped, drain, release."""
        ch = self._ch
        health = self._health
        poll = self._poll
        assert poll is not None
        try:
            self._open_sink()
            if not ch.stop.is_set():
                health.phase = "joining"
                poll.run()
        except Stopped:
            pass  # stop() while the sink was being retried at start
        except BaseException as e:
            if ch.failure.set(e, "poll"):
                log.error("poll thread stopped: %s: %s", type(e).__name__, e)
            health.error(e)
        finally:
            self._shutdown()

    def _open_sink(self) -> None:
        """``sink.open()`` under the RetryPolicy, exactly like a write (before joining the group)."""
        hooks = self._sink_hooks
        if not hooks.has_open:
            return
        info = PipelineInfo(group_id=self.group_id, topics=list(self.topics))
        self._sink_opened = True
        assert self._delivery is not None
        self._delivery.retrier.run(lambda: hooks.open(info), self._ch.stop, what="sink open")

    def _shutdown(self) -> None:
        """Runs last on the poll thread, on every exit path: threads, consumer, sink, server."""
        poll = self._poll
        assert poll is not None
        workers = [t for t in self._threads if t is not threading.current_thread()]
        stuck, _errors = poll.close(workers, workers_timeout=min(5.0, self._drain_timeout))
        if stuck:
            log.warning(
                "worker still inside the sink after the drain timeout; not closing the sink"
            )
        else:
            if self._delivery is not None:
                try:
                    self._delivery.close()
                except Exception as e:
                    log.warning("delivery close failed: %s", e)
            if self._sink_opened or not self._sink_hooks.has_open:
                try:
                    self._sink_hooks.close()
                except Exception as e:
                    log.warning("sink close failed: %s", e)
        if self._metrics_server is not None:
            try:
                self._metrics_server.close()
            except Exception as e:  # pragma: no cover - defensive
                log.warning("metrics server close failed: %s", e)
            self._metrics_server = None
        failure = self._ch.failure
        self.exit_reason = f"{failure.where} failed" if failure else (poll.exit_reason or "stopped")
        d = self._deliver_stats.snapshot()
        log.info(
            "stopped (%s) after %.1f s: %d messages consumed, %d rows written, %d decode errors, "
            "%d batches, %d dead letters",
            self.exit_reason,
            time.monotonic() - self._started_at,
            self._ring.pushed if self._ring is not None else 0,
            d["written"],
            d["decode_errors"],
            d["batches"],
            self._delivery_metrics.snapshot()["dlq_records"],
        )
        self._finish()

    def _finish(self) -> None:
        """Mark the pipeline done and wake every waiter (threads and event loops)."""
        self._health.phase = (
            "failed" if self._ch.failure or self._health.phase == "failed" else "stopped"
        )
        with self._lock:
            self._done.set()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    # ------------------------------------------------------------- signals
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
        if self._ch.stop.is_set():
            # Second signal: leave at once. Nothing that is not durable was
            # committed, so the next run re-reads it (at-least-once).
            log.warning("second signal (%d): exiting without draining", signum)
            os._exit(128 + signum)
        log.info("signal %d: draining (send again to exit at once)", signum)
        self.stop()

    # ------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, Any]:
        """A snapshot of counters, fill levels, latencies and process health.

        The keys are listed in :mod:`kfast.runtime.stats`.
        """
        poll = self._poll_stats.snapshot()
        dec = self._decode_stats.snapshot()
        dlv = self._deliver_stats.snapshot()
        ring = self._ring
        src = self._source
        tracker = self._tracker
        started = self._started_at
        elapsed = max(1e-9, time.monotonic() - started) if started else 0.0
        ring_stats = ring.stats() if ring is not None else {}
        consumed = ring_stats.get("pushed", 0)
        written = dlv["written"]
        latency = {**poll["latency"], **dec["latency"], **dlv["latency"]}
        delivery = self._delivery_metrics.snapshot()
        latency["sink_write"] = percentiles(list(self._delivery_metrics.write_latency))
        pl = self._poll
        paused = pl.paused if pl is not None else False
        lag = dict(src.lag) if src is not None else {}
        out: dict[str, Any] = {
            "running": self.running,
            "uptime_s": elapsed,
            "consumed": consumed,
            "decoded": dlv["decoded"],
            "decode_errors": dlv["decode_errors"],
            "written": written,
            "batches": dlv["batches"],
            "batches_decoded": dec["batches_decoded"],
            "decode_retries": dec["decode_retries"],
            "rates": {
                "consumed_per_s": consumed / elapsed if elapsed else 0.0,
                "written_per_s": written / elapsed if elapsed else 0.0,
            },
            "ring": {**ring_stats, "fill": ring.fill() if ring is not None else 0.0},
            "in_flight": ring_stats.get("used_messages", 0),
            "batch_size": dlv["batch_size"],
            "latency_s": latency,
            "latency_histograms": {**poll["histograms"], **dec["histograms"], **dlv["histograms"]},
            "consumer_lag": lag,
            "lag_total": self._health.lag,
            "paused": paused,
            # counted by the poll thread: metrics() never calls the consumer
            # (a consumer call from another thread can wait behind consume())
            "paused_partitions": pl.paused_partitions if pl is not None and paused else 0,
            "pauses": poll["pauses"],
            "resumes": poll["resumes"],
            "seeks": poll["seeks"],
            "seek_errors": poll["seek_errors"],
            "rebalances": poll["rebalances"],
            "commits": {
                "submitted": tracker.commits,
                "failed": tracker.commit_errors,
                "sync_failed": poll["sync_commit_failures"],
                "async_ok": src.async_commits_ok if src is not None else 0,
                "async_failed": src.async_commits_failed if src is not None else 0,
                "partitions": tracker.snapshot(),
            },
            "kafka_errors": poll["kafka_errors"],
            "rss_bytes": _rss_bytes(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "gc": {
                "collections": [g["collections"] for g in gc.get_stats()],
                "counts": list(gc.get_count()),
            },
            "memory_plan": self._plan.as_dict(),
            "delivery": delivery,
            "health": self.health().as_dict(),
        }
        return out


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
