"""The poll thread: the only thread that touches the Kafka consumer.

It calls ``consume()``, copies messages into the ring, pauses and resumes
partitions (backpressure), seeks partitions back when the ring had to drop a
message, runs the rebalance callbacks (they are called from inside
``consume()``), commits offsets and turns the consumer's error events into
health (broker reachability, missing topics). It never blocks on the sink, so
``max.poll.interval.ms`` is never exceeded however long the sink stalls.

At shutdown it drains (keeps serving the group while the worker delivers
what the ring holds, bounded by ``drain_timeout``), stops the decoder and
worker threads, commits what is durable and closes the consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kfast.errors import TransientSinkError
from kfast.runtime.channels import Channels
from kfast.runtime.health import HealthBoard
from kfast.runtime.kafka_log import Throttle
from kfast.runtime.offsets import OffsetTracker
from kfast.runtime.policies import BufferPolicy
from kfast.runtime.source import Source
from kfast.runtime.stats import PollStats

__all__ = ["PollLoop"]

log = logging.getLogger("kfast.runtime.poll")

_RETRIABLE_COMMIT = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}
# error events that mean no broker can be reached
_UNREACHABLE = {KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
_TOPIC_MISSING = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}
_LAG_REFRESH = 5.0  # seconds between lag queries until librdkafka's statistics arrive


class PollLoop:
    """Owns the consumer (through ``Source``); every method runs on the poll thread."""

    def __init__(
        self,
        ring: Any,
        tracker: OffsetTracker,
        sink: Any,
        group_id: str,
        topics: Sequence[str],
        buffer: BufferPolicy,
        channels: Channels,
        stats: PollStats,
        health: HealthBoard,
        *,
        poll_batch: int,
        poll_timeout: float,
        commit_interval: float,
        drain_timeout: float,
        revoke_timeout: float,
    ) -> None:
        self.ring = ring
        self.tracker = tracker
        self.sink = sink
        self.group_id = group_id
        self.topics = list(topics)
        self.buffer = buffer
        self.ch = channels
        self.stats = stats
        self.health = health
        self.poll_batch = poll_batch
        self.poll_timeout = poll_timeout
        self.commit_interval = commit_interval
        self.drain_timeout = drain_timeout
        self.revoke_timeout = revoke_timeout
        self.source: Source | None = None  # set by the pipeline before run()
        self.paused = False
        self.paused_partitions = 0
        self.exit_reason = ""
        self._assignment_changed = False
        self._closing = False
        self._lag_due = 0.0
        self._stats_seen = 0
        self._commits_seen = 0
        self._throttle = Throttle()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Subscribe, consume until stop or failure, then drain."""
        src = self._src()
        src.subscribe()
        self._loop()
        if not self.ch.failure:
            self.health.phase = "draining"
        self._drain()

    def _src(self) -> Source:
        assert self.source is not None
        return self.source

    def _loop(self) -> None:
        ring = self.ring
        src = self._src()
        stats = self.stats
        ch = self.ch
        pause_at = self.buffer.pause_at
        resume_at = self.buffer.resume_at
        next_commit = time.monotonic() + self.commit_interval
        poll_batch = self.poll_batch
        latency_poll = stats.poll
        while not ch.stop.is_set():
            if ch.failure:
                self.exit_reason = f"{ch.failure.where} failed"
                return
            if src.fatal is not None:
                raise KafkaException(src.fatal)
            free = ring.capacity_messages - ring.used_messages
            t0 = time.perf_counter()
            stored = src.consume_into(ring, max(1, min(poll_batch, free)), self.poll_timeout)
            with stats.lock:
                latency_poll.add(time.perf_counter() - t0)
                stats.consume_calls += 1
            if stored:
                ch.new_messages.set()
                if self.health.broker_reachable is not True:
                    self._broker_back()
            if ring.errors:
                self._consume_errors()
            if self._assignment_changed:
                self._assignment_changed = False
                if self.paused:
                    assignment = src.assignment()
                    src.pause(assignment)
                    self.paused_partitions = len(assignment)
            fill = ring.fill()
            if not self.paused:
                if fill >= pause_at or ring.rewinds():
                    self._pause()
            elif fill <= resume_at:
                self._resume()
            now = time.monotonic()
            if now >= next_commit:
                self._commit(asynchronous=True)
                next_commit = now + self.commit_interval
            if self._lag_due and now >= self._lag_due:
                self._query_lag()
            self._update_health()
        self.exit_reason = self.exit_reason or "stopped"

    def _update_health(self) -> None:
        src = self._src()
        h = self.health
        if src.stats_received != self._stats_seen:  # new librdkafka statistics
            self._stats_seen = src.stats_received
            h.lag = src.lag_total()
            self._lag_due = 0.0
            if src.brokers_up and h.broker_reachable is not True:
                self._broker_back()
        if src.async_commits_ok != self._commits_seen:  # the broker confirmed a commit
            self._commits_seen = src.async_commits_ok
            h.committed()
        h.paused = self.paused

    # ----------------------------------------------------------- errors
    def on_error(self, err: KafkaError) -> None:
        """Consumer error event (``error_cb``, called inside ``consume()``)."""
        name = err.name()
        with self.stats.lock:
            self.stats.kafka_errors[name] += 1
        h = self.health
        if err.code() in _UNREACHABLE:
            if h.broker_reachable is not False:
                log.warning("Kafka brokers unreachable: %s", err.str())
            h.broker_error = err.str()
            h.broker_reachable = False
            return
        suppressed = self._throttle.allow(("error", err.code()))
        if suppressed is not None:
            log.warning(
                "Kafka error %s: %s%s",
                name,
                err.str(),
                f" ({suppressed} more since the last line)" if suppressed else "",
            )

    def _broker_back(self) -> None:
        if self.health.broker_reachable is False:
            log.info("Kafka brokers reachable again")
        self.health.broker_reachable = True
        self.health.broker_error = ""

    def _consume_errors(self) -> None:
        errors, self.ring.errors = self.ring.errors, []
        for err in errors:
            if err.fatal():
                raise KafkaException(err)
            if err.code() in _TOPIC_MISSING:
                topic = self._missing_topic(err)
                if topic not in self.health.missing_topics:
                    log.warning("topic %r does not exist: %s", topic, err.str())
                self.health.missing_topics[topic] = err.str()
                if self.health.broker_reachable is not True:
                    self._broker_back()  # a broker answered that
                continue
            suppressed = self._throttle.allow(("consume", err.code()))
            if suppressed is not None:
                log.warning("consume error: %s", err)

    def _missing_topic(self, err: KafkaError) -> str:
        text = err.str()
        for t in self.topics:
            if t in text:
                return t
        return ",".join(self.topics)

    # ------------------------------------------------------- backpressure
    def _pause(self) -> None:
        src = self._src()
        assignment = src.assignment()
        src.pause(assignment)
        self.paused = True
        self.paused_partitions = len(assignment)
        with self.stats.lock:
            self.stats.pauses += 1
        if self._throttle.allow("pause") is not None:
            log.info(
                "ring %.0f%% full: paused %d partitions until the sink catches up",
                self.ring.fill() * 100,
                len(assignment),
            )

    def _resume(self) -> None:
        src = self._src()
        assignment = src.assignment()
        src.resume(assignment)
        self.paused = False
        self.paused_partitions = 0
        with self.stats.lock:
            self.stats.resumes += 1
        if self._throttle.allow("resume") is not None:
            log.info(
                "ring %.0f%% full: resumed %d partitions", self.ring.fill() * 100, len(assignment)
            )
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
        ring = self.ring
        rewinds = {(t, p): off for t, p, off in ring.rewinds()}
        for tp in assignment:
            key = (tp.topic, tp.partition)
            offset = rewinds.get(key, -1)
            if offset < 0:
                offset = ring.expected_offset(tp.topic, tp.partition)
            if offset < 0:
                continue  # nothing consumed yet: the committed offset applies
            try:
                self._src().seek(tp.topic, tp.partition, offset)
            except KafkaException as e:
                if key in rewinds:
                    # Still in rewind state: the ring keeps dropping this
                    # partition's messages, so nothing is lost; retry later.
                    with self.stats.lock:
                        self.stats.seek_errors += 1
                    self.paused = True  # stay in the paused state machine to retry
                log.info("seek %s[%d] to %d failed (%s)", tp.topic, tp.partition, offset, e)
                continue
            if key in rewinds:
                ring.seek_done(tp.topic, tp.partition)
            with self.stats.lock:
                self.stats.seeks += 1

    # ------------------------------------------------------------ commits
    def _commit(
        self, *, asynchronous: bool, indexes: list[int] | None = None, retry: bool = False
    ) -> None:
        src = self._src()
        failures = src.take_commit_failures()
        if failures:
            self.tracker.commit_failed(failures)
        offsets = self.tracker.pending(indexes, force=not asynchronous)
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
                src.commit(offsets, asynchronous=asynchronous)
            except KafkaException as e:
                code = e.args[0].code() if e.args and isinstance(e.args[0], KafkaError) else None
                if delays and code in _RETRIABLE_COMMIT:
                    time.sleep(delays.pop(0))
                    continue
                self.tracker.commit_failed(offsets)
                if not asynchronous:
                    with self.stats.lock:
                        self.stats.sync_commit_failures += 1
                log.warning("commit of %d partitions failed: %s", len(offsets), e)
                return
            self.tracker.committed(offsets)
            if not asynchronous:
                self.health.committed()  # async ones when the broker confirms (_update_health)
            return

    def _commit_sync(self, indexes: list[int] | None = None, *, retry: bool = False) -> None:
        self._commit(asynchronous=False, indexes=indexes, retry=retry)

    # ---------------------------------------------------- rebalance hooks
    def on_assign(self, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """Register new partitions; return start offsets a sink stores itself (exactly-once)."""
        with self.stats.lock:
            self.stats.assign_callbacks += 1
            self.stats.assigned += len(partitions)
        for tp in partitions:
            index = self.ring.assign(tp.topic, tp.partition)
            self.tracker.assign(index, tp.topic, tp.partition, self.ring.generation(index))
            self.health.missing_topics.pop(tp.topic, None)
        self._assignment_changed = True
        h = self.health
        h.assigned_partitions += len(partitions)
        if h.phase == "joining":
            h.phase = "running"
        self._broker_back()
        self._lag_due = time.monotonic()  # query lag now; librdkafka's stats come later
        # an incremental rebalance that brings nothing is not worth an INFO line
        log.log(
            logging.INFO if partitions else logging.DEBUG,
            "assigned %d partitions (%d in total): %s",
            len(partitions),
            h.assigned_partitions,
            _describe(partitions),
        )
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
                log.warning("reading the offsets stored in the sink failed, retrying: %s", e)
                continue
            wanted = {(tp.topic, tp.partition) for tp in partitions}
            return {tp: int(off) for tp, off in stored.items() if tp in wanted}
        assert last is not None
        raise last

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Finish the revoked partitions' in-flight messages (bounded), commit, release."""
        ch = self.ch
        ring = self.ring
        with self.stats.lock:
            if self._closing:
                self.stats.revoked_at_close += len(partitions)
            else:
                self.stats.revoke_callbacks += 1
                self.stats.revoked += len(partitions)
        if not self._closing and not ch.failure:
            target = ring.head
            deadline = time.monotonic() + self.revoke_timeout
            ch.flush.set()
            ch.new_messages.set()
            while ring.tail < target and not ch.failure:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    with self.stats.lock:
                        self.stats.revoke_timeouts += 1
                    log.warning(
                        "revoke: %d messages still in flight after %.1f s; abandoning them "
                        "(not committed, the next owner reads them again)",
                        target - ring.tail,
                        self.revoke_timeout,
                    )
                    break
                ch.released.wait(min(remaining, 0.05))
                ch.released.clear()
            if not ch.stop.is_set():
                ch.flush.clear()
        indexes = [ring.partition_index(tp.topic, tp.partition) for tp in partitions]
        if not ch.failure:
            self._commit_sync(indexes)
        for tp, index in zip(partitions, indexes):
            ring.revoke(tp.topic, tp.partition)
            self.tracker.remove(index)
        self.health.assigned_partitions = max(0, self.health.assigned_partitions - len(partitions))
        log.info("revoked %d partitions: %s", len(partitions), _describe(partitions))

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost (session timeout): commit nothing, drop their in-flight rows."""
        with self.stats.lock:
            self.stats.lost += len(partitions)
        for tp in partitions:
            index = self.ring.revoke(tp.topic, tp.partition)
            if index >= 0:
                self.tracker.remove(index)
        self.health.assigned_partitions = max(0, self.health.assigned_partitions - len(partitions))
        log.warning(
            "lost %d partitions (not committed; their in-flight rows are dropped): %s",
            len(partitions),
            _describe(partitions),
        )

    # ---------------------------------------------------------------- lag
    def _query_lag(self) -> None:
        """Lag from the broker (watermarks - committed) until librdkafka's statistics arrive."""
        self._lag_due = time.monotonic() + _LAG_REFRESH
        try:
            lag = self._src().query_lag(timeout=1.0)
        except KafkaException as e:
            log.debug("lag query failed: %s", e)
            return
        if lag is not None and not self._src().stats_received:
            self.health.lag = lag

    # -------------------------------------------------------------- drain
    def _drain(self) -> None:
        """Stop taking messages; let the worker finish what the ring holds (bounded)."""
        ch = self.ch
        if ch.failure:
            return
        src = self._src()
        ring = self.ring
        ch.flush.set()
        ch.new_messages.set()
        try:
            src.pause(src.assignment())
        except KafkaException as e:  # pragma: no cover - defensive
            log.debug("pause on drain failed: %s", e)
        self.paused = True
        deadline = time.monotonic() + self.drain_timeout
        next_commit = time.monotonic() + self.commit_interval
        while ring.tail < ring.head and not ch.failure:
            if time.monotonic() >= deadline:
                log.warning(
                    "drain timeout (%.1f s): %d messages not delivered; they are not "
                    "committed and will be read again",
                    self.drain_timeout,
                    ring.head - ring.tail,
                )
                self.exit_reason = "drain timeout"
                break
            # keep serving the group; anything consumed now is not stored
            # (not committed either, so it is read again after restart)
            src.consume(100, self.poll_timeout)
            if time.monotonic() >= next_commit:
                self._commit(asynchronous=True)
                next_commit = time.monotonic() + self.commit_interval

    def close(
        self, workers: Sequence[threading.Thread], *, workers_timeout: float
    ) -> tuple[bool, list[BaseException]]:
        """Stop the decoder and worker, commit what is durable, close the consumer.

        Returns (a worker is still inside the sink, errors to log).
        """
        ch = self.ch
        ch.stop_workers.set()
        ch.flush.set()
        ch.new_messages.set()
        for t in workers:
            if t.is_alive():
                t.join(timeout=workers_timeout)
        stuck = any(t.is_alive() for t in workers)
        self._closing = True
        errors: list[BaseException] = []
        if self.source is not None:
            try:
                self._commit_sync(retry=True)
            except Exception as e:
                log.warning("final commit failed: %s", e)
                errors.append(e)
            try:
                self.source.close()
            except Exception as e:
                log.warning("consumer close failed: %s", e)
                errors.append(e)
        return stuck, errors


def _describe(partitions: list[TopicPartition], limit: int = 8) -> str:
    parts = [f"{tp.topic}[{tp.partition}]" for tp in partitions[:limit]]
    if len(partitions) > limit:
        parts.append(f"... {len(partitions) - limit} more")
    return ", ".join(parts) if parts else "-"
