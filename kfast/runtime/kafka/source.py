"""``CompiledSource``: the pipeline's Kafka side over kfast's own librdkafka
consumer (``_consumer.pyx``), with the interface of
:class:`kfast.runtime.source.Source`.

The difference is ``consume_into(ring, n, timeout)``: messages are copied
from librdkafka's fetch buffers into the ring in C, so no Python object is
built per message; the poll thread gets a count. Everything else - the
configuration kfast enforces (:func:`kfast.runtime.source.consumer_config`),
rebalance hooks, pause/resume, seek, commits and their results, statistics
(lag), error events - behaves as in ``Source``. librdkafka's log lines go to
the ``kfast.kafka`` logger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from kfast.errors import ConfigError
from kfast.runtime.kafka_log import kafka_logger_config
from kfast.runtime.source import consumer_config, parse_statistics, uses_consumer_protocol

__all__ = ["CompiledSource"]

log = logging.getLogger("kfast.runtime.source")
# confluent-kafka callbacks kfast's source calls itself; others are not supported
_CALLBACKS = ("stats_cb", "on_commit", "error_cb", "logger")
_UNSUPPORTED = ("throttle_cb", "oauth_cb", "on_delivery")

RebalanceCb = Callable[[list[TopicPartition]], None]
AssignCb = Callable[[list[TopicPartition]], "dict[tuple[str, int], int] | None"]


class _Committed(TopicPartition):
    """A commit result for the user's ``on_commit``: confluent-kafka's
    ``TopicPartition.error`` is read-only, set only by its own C code."""

    def __init__(self, topic: str, partition: int, offset: int, error: KafkaError | None):
        super().__init__(topic, partition, offset)
        self._error = error

    @property
    def error(self) -> KafkaError | None:  # type: ignore[override]
        return self._error


class CompiledSource:
    """Owns the consumer; every method is called from the poll thread only."""

    def __init__(
        self,
        kafka: dict[str, Any],
        topics: Sequence[str],
        *,
        plan_settings: dict[str, str] | None = None,
        on_assign: AssignCb,
        on_revoke: RebalanceCb,
        on_lost: RebalanceCb,
        on_error: Callable[[KafkaError], None],
        librdkafka: str | None = None,
    ) -> None:
        import kfast.runtime.kafka._consumer as _consumer

        conf = kafka_logger_config(consumer_config(kafka, plan_settings), "consumer")
        for key in _UNSUPPORTED:
            if key in conf:
                raise ConfigError(
                    f"kafka[{key!r}]: not supported by the compiled source; use source='confluent'"
                )
        self._user_stats_cb = conf.pop("stats_cb", None)
        self._user_on_commit = conf.pop("on_commit", None)
        self._user_error_cb = conf.pop("error_cb", None)
        self._logger = conf.pop("logger")
        self.config = dict(conf)
        self.cooperative = uses_consumer_protocol(conf) or "cooperative" in str(
            conf.get("partition.assignment.strategy", "")
        )
        self.topics = list(topics)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._on_error_cb = on_error
        self._lock = threading.Lock()
        self.lag: dict[str, int] = {}
        self.stats_received = 0
        self.commit_failures: list[tuple[str, int, int]] = []
        self.async_commits_ok = 0
        self.async_commits_failed = 0
        self.fatal: KafkaError | None = None
        self.brokers_up = False
        try:
            _consumer.load(librdkafka)
        except ImportError as e:
            raise ConfigError(f"source='compiled': {e}") from None
        try:
            self.consumer = _consumer.Consumer(conf, self)
        except ValueError as e:
            raise ConfigError(f"kafka: librdkafka rejected the configuration: {e}") from None

    # ------------------------------------------------------------- consuming
    def subscribe(self) -> None:
        self.consumer.subscribe(self.topics)

    def consume_into(self, ring: Any, num_messages: int, timeout: float) -> int:
        """Store up to ``num_messages`` messages in ``ring``; return how many were stored."""
        n: int = self.consumer.consume_into(ring, num_messages, timeout)
        return n

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        """Serve the group for up to ``timeout`` s, dropping what arrives (the
        pipeline's drain); always an empty list: no message objects exist."""
        self.consumer.consume_discard(num_messages, timeout)
        return []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.consumer.assignment()]

    def pause(self, partitions: list[TopicPartition]) -> None:
        if partitions:
            self.consumer.pause([(tp.topic, tp.partition) for tp in partitions])

    def resume(self, partitions: list[TopicPartition]) -> None:
        if partitions:
            self.consumer.resume([(tp.topic, tp.partition) for tp in partitions])

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.consumer.seek(topic, partition, offset)

    def commit(self, offsets: list[tuple[str, int, int]], *, asynchronous: bool) -> None:
        """Commit ``[(topic, partition, next offset)]``; sync commits raise KafkaException."""
        self.consumer.commit(list(offsets), asynchronous)

    def close(self) -> None:
        self.consumer.close()

    def lag_total(self) -> int:
        with self._lock:
            return sum(v for v in self.lag.values() if v >= 0)

    def query_lag(self, timeout: float) -> int | None:
        """Total lag of the assignment asked from the broker; None if unknown.

        ``timeout`` bounds the whole query (it runs on the poll thread); a query
        that does not finish in time answers None.
        """
        deadline = time.monotonic() + timeout
        assignment = self.consumer.assignment()
        if not assignment:
            return 0
        total = 0
        for t, p, committed in self.consumer.committed(assignment, timeout):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            low, high = self.consumer.watermarks(t, p, left)
            if high < 0:
                return None
            # no committed offset yet: count the whole partition (auto.offset.reset=earliest)
            total += max(0, high - committed) if committed >= 0 else max(0, high - low)
        return total

    def take_commit_failures(self) -> list[tuple[str, int, int]]:
        with self._lock:
            out, self.commit_failures = self.commit_failures, []
        return out

    # ---------------------------------------------- called by _consumer.pyx
    def _on_rebalance(
        self, kind: str, items: list[tuple[str, int, int, int]]
    ) -> dict[tuple[str, int], int] | None:
        partitions = [TopicPartition(t, p, o) for t, p, o, _e in items]
        if kind == "assign":
            return self._on_assign(partitions)
        if kind == "lost":
            self._on_lost(partitions)
        else:
            self._on_revoke(partitions)
        return None

    def _on_rebalance_error(self, code: int, text: str) -> None:
        log.warning("rebalance error: %s", text)

    def _on_commit_result(
        self, code: int, text: str | None, items: list[tuple[str, int, int, int]]
    ) -> None:
        failed = [(t, p, o) for t, p, o, e in items if code or e]
        with self._lock:
            if failed:
                self.async_commits_failed += 1
                self.commit_failures.extend(failed)
            else:
                self.async_commits_ok += 1
        if failed and code and code != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s", text)
        if self._user_on_commit is not None:
            err = KafkaError(code, text) if code else None
            parts = [_Committed(t, p, o, KafkaError(e) if e else None) for t, p, o, e in items]
            self._user_on_commit(err, parts)

    def _on_stats(self, stats_json: str) -> None:
        try:
            lag, up = parse_statistics(stats_json)
        except (ValueError, TypeError, AttributeError) as e:  # pragma: no cover - defensive
            log.debug("cannot parse librdkafka statistics: %s", e)
        else:
            with self._lock:
                self.lag = lag
                self.stats_received += 1
                self.brokers_up = up
        if self._user_stats_cb is not None:
            self._user_stats_cb(stats_json)

    def _on_error_event(self, code: int, text: str, fatal: bool) -> None:
        err = KafkaError(code, text, fatal=fatal)
        if fatal:
            self.fatal = err
        self._on_error_cb(err)
        if self._user_error_cb is not None:
            self._user_error_cb(err)

    def _on_log(self, level: int, facility: str, line: str) -> None:
        # confluent-kafka's convention for its ``logger=`` (syslog level,
        # facility, client name, line), so kfast's adapter serves both sources
        self._logger.log(level, "%s [%s] %s", facility, "consumer", line)
