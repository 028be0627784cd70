"""The Kafka side of the pipeline: a thin wrapper around ``confluent_kafka.Consumer``.

kfast commits offsets itself (only what is durable), so the consumer
configuration is adjusted in exactly three places and passed through
untouched otherwise (``group.instance.id`` for static membership included):

* ``enable.auto.commit=false`` and ``enable.auto.offset.store=false`` are
  forced; setting either to true is a :class:`kfast.ConfigError`;
* ``partition.assignment.strategy`` defaults to ``cooperative-sticky``
  (incremental rebalances: members keep their partitions while others join),
  except under ``group.protocol=consumer`` (KIP-848), where the broker assigns,
  rebalances are always incremental and librdkafka rejects the setting;
* the prefetch settings of the memory plan (``queued.max.messages.kbytes``,
  ``fetch.max.bytes``, ``max.partition.fetch.bytes``, ``queued.min.messages``)
  are filled in where the user did not set them, and
  ``statistics.interval.ms`` defaults to 5000 so that consumer lag is known.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from kfast.errors import ConfigError
from kfast.runtime.kafka_log import kafka_logger_config

__all__ = ["Source", "check_kafka", "consumer_config", "FORCED_FALSE"]

log = logging.getLogger("kfast.runtime.source")

FORCED_FALSE = ("enable.auto.commit", "enable.auto.offset.store")
_CALLBACK_KEYS = ("on_commit", "stats_cb", "error_cb", "throttle_cb", "logger", "oauth_cb")
_LEAVE_TIMEOUT = 10.0  # seconds close() serves the revoke before closing anyway

RebalanceCb = Callable[[list[TopicPartition]], None]
AssignCb = Callable[[list[TopicPartition]], "dict[tuple[str, int], int] | None"]


def _is_true(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes", "on")


def check_kafka(kafka: Any) -> None:
    """``kafka`` is a dict of librdkafka settings with the two kfast cannot run without."""
    if not isinstance(kafka, dict):
        raise ConfigError(
            f"kafka: expected a dict of librdkafka settings, got {type(kafka).__name__}"
        )
    for key in ("bootstrap.servers", "group.id"):
        if not kafka.get(key):
            raise ConfigError(f"kafka[{key!r}]: required")


def consumer_config(
    kafka: dict[str, Any], plan_settings: dict[str, str] | None = None
) -> dict[str, Any]:
    """The librdkafka configuration kfast runs with (see the module docstring)."""
    check_kafka(kafka)
    for key in FORCED_FALSE:
        if key in kafka and _is_true(kafka[key]):
            raise ConfigError(
                f"kafka[{key!r}]: must be false; kfast stores and commits offsets itself, "
                "only after the sink made the messages durable"
            )
    conf = dict(kafka)
    for key in FORCED_FALSE:
        conf[key] = "false"
    if not uses_consumer_protocol(conf):
        conf.setdefault("partition.assignment.strategy", "cooperative-sticky")
    conf.setdefault("statistics.interval.ms", "5000")
    for key, value in (plan_settings or {}).items():
        conf.setdefault(key, value)
    return conf


def uses_consumer_protocol(conf: dict[str, Any]) -> bool:
    """True for ``group.protocol=consumer`` (KIP-848: the broker runs the assignment)."""
    return str(conf.get("group.protocol", "classic")).strip().lower() == "consumer"


def parse_statistics(stats_json: str) -> tuple[dict[str, int], bool]:
    """Per-partition lag (``"topic[p]"``) of this member and whether any broker is up,
    from librdkafka's statistics JSON (both sources' ``stats_cb``)."""
    stats = json.loads(stats_json)
    lag: dict[str, int] = {}
    for tname, t in stats.get("topics", {}).items():
        for pid, p in t.get("partitions", {}).items():
            if pid == "-1":
                continue
            if p.get("fetch_state") in (None, "none", "stopped"):
                continue  # not assigned to this member
            # consumer_lag = high watermark - committed offset (kfast
            # commits explicit offsets and never uses the offset store).
            lag[f"{tname}[{pid}]"] = int(p.get("consumer_lag", -1))
    up = any(b.get("state") == "UP" for b in stats.get("brokers", {}).values())
    return lag, up


class Source:
    """Owns the consumer; every method is called from the poll thread only.

    What the poll thread (:mod:`kfast.runtime.poll`) uses, and all another
    consumer implementation has to provide:

    * ``Source(kafka, topics, *, plan_settings, on_assign, on_revoke,
      on_lost, on_error)``: builds the client from :func:`consumer_config`
      (raises ``ConfigError`` when librdkafka rejects the settings);
      librdkafka's log lines go to the ``kfast.kafka`` logger;
    * ``subscribe()``; ``consume_into(ring, n, timeout) -> int`` (stores up
      to ``n`` messages in the ring, returns how many; the rebalance and error
      callbacks run inside it); ``consume(n, timeout)`` (the drain: serves
      the group, what it returns is not stored);
    * ``assignment() -> list[TopicPartition]``, ``pause(tps)``,
      ``resume(tps)``, ``seek(topic, partition, offset)``;
    * ``commit([(topic, partition, next offset)], asynchronous=)`` (sync
      commits raise ``KafkaException``) and ``take_commit_failures()`` (async
      commits that failed since the last call);
    * ``query_lag(timeout) -> int | None``: total lag of the assignment from
      the broker (high watermark - committed), before statistics arrive;
    * ``close()``;
    * attributes: ``fatal`` (a fatal ``KafkaError`` or None),
      ``stats_received``, ``lag`` (``{"topic[partition]": lag}``),
      ``lag_total()``, ``brokers_up`` (a broker is UP per the last
      statistics), ``async_commits_ok``, ``async_commits_failed``.

    Callbacks: ``on_assign(partitions)`` may return start offsets
    ``{(topic, partition): offset}`` (exactly-once sinks); ``on_revoke`` and
    ``on_lost`` get the partitions; ``on_error(KafkaError)`` gets every
    error event once (the poll thread logs it).
    """

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
    ) -> None:
        conf = kafka_logger_config(consumer_config(kafka, plan_settings), "consumer")
        self._user_stats_cb = conf.pop("stats_cb", None)
        self._user_on_commit = conf.pop("on_commit", None)
        self._user_error_cb = conf.pop("error_cb", None)
        conf["stats_cb"] = self._on_stats
        conf["on_commit"] = self._on_commit
        conf["error_cb"] = self._on_error
        self.config = {k: v for k, v in conf.items() if k not in _CALLBACK_KEYS}
        # KIP-848 rebalances are incremental whatever the (unset) strategy says
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
        self._rebalances = 0
        self._closed = False
        try:
            self.consumer = Consumer(conf)
        except KafkaException as e:
            raise ConfigError(f"kafka: librdkafka rejected the configuration: {e}") from None

    def subscribe(self) -> None:
        self.consumer.subscribe(
            self.topics, on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost
        )

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """``on_assign`` may return start offsets (kept by the sink, exactly-once):
        the partitions are then assigned here, starting there."""
        self._rebalances += 1
        offsets = self._on_assign(partitions)
        if not offsets:
            return  # confluent_kafka assigns them from the committed offsets
        for tp in partitions:
            start = offsets.get((tp.topic, tp.partition))
            if start is not None:
                tp.offset = start
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        self._on_revoke(partitions)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        self._on_lost(partitions)

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        return self.consumer.consume(num_messages=num_messages, timeout=timeout)

    def consume_into(self, ring: Any, num_messages: int, timeout: float) -> int:
        """``consume()`` then ``ring.push()``; returns how many messages the ring stored
        (error messages land in ``ring.errors``). The messages are dropped on return:
        a held message pins librdkafka's fetch buffer."""
        msgs = self.consumer.consume(num_messages=num_messages, timeout=timeout)
        stored: int = ring.push(msgs) if msgs else 0
        return stored

    def assignment(self) -> list[TopicPartition]:
        return self.consumer.assignment()

    def pause(self, partitions: list[TopicPartition]) -> None:
        if partitions:
            self.consumer.pause(partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        if partitions:
            self.consumer.resume(partitions)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.consumer.seek(TopicPartition(topic, partition, offset))

    def commit(self, offsets: list[tuple[str, int, int]], *, asynchronous: bool) -> None:
        """Commit ``[(topic, partition, next offset)]``; sync commits raise KafkaException."""
        tps = [TopicPartition(t, p, o) for t, p, o in offsets]
        if asynchronous:
            self.consumer.commit(offsets=tps, asynchronous=True)
        else:
            self.consumer.commit(offsets=tps, asynchronous=False)

    def close(self) -> None:
        """Leave the group, then close the consumer.

        The group is left first - unsubscribe, then serve the revoke like any
        rebalance until nothing is assigned (at most ``_LEAVE_TIMEOUT``) - so
        that librdkafka's consumer_close has nothing to revoke: inside it, the
        rebalance callback's calls into librdkafka (rebalance_protocol(),
        assign()) can wait forever for a reply (librdkafka #4041, #4884)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.consumer.unsubscribe()
            deadline = time.monotonic() + _LEAVE_TIMEOUT
            while time.monotonic() < deadline:
                seen = self._rebalances
                # messages still arriving are dropped: not committed, the next owner reads them
                self.consumer.consume(num_messages=100, timeout=0.1)
                if self._rebalances == seen and not self.consumer.assignment():
                    break
        except KafkaException as e:
            log.debug("leaving the group before close: %s", e)
        finally:
            self.consumer.close()

    def lag_total(self) -> int:
        with self._lock:
            return sum(v for v in self.lag.values() if v >= 0)

    def query_lag(self, timeout: float) -> int | None:
        """Total lag of the assignment asked from the broker; None if unknown.

        ``timeout`` bounds the whole query (it runs on the poll thread): one
        ``committed()`` call and one watermark request per partition; a query
        that does not finish in time answers None.
        """
        deadline = time.monotonic() + timeout
        assignment = self.consumer.assignment()
        if not assignment:
            return 0
        committed = self.consumer.committed(assignment, timeout=timeout)
        total = 0
        for tp in committed:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            low, high = self.consumer.get_watermark_offsets(tp, timeout=left, cached=False)
            if high < 0:
                return None
            # no committed offset yet: count the whole partition (auto.offset.reset=earliest)
            total += max(0, high - tp.offset) if tp.offset >= 0 else max(0, high - low)
        return total

    # ------------------------------------------------------------ callbacks
    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [
            (tp.topic, tp.partition, tp.offset)
            for tp in partitions
            if err is not None or tp.error is not None
        ]
        with self._lock:
            if failed:
                self.async_commits_failed += 1
                self.commit_failures.extend(failed)
            else:
                self.async_commits_ok += 1
        if failed and err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s", err)
        if self._user_on_commit is not None:
            self._user_on_commit(err, partitions)

    def take_commit_failures(self) -> list[tuple[str, int, int]]:
        with self._lock:
            out, self.commit_failures = self.commit_failures, []
        return out

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

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err
        self._on_error_cb(err)
        if self._user_error_cb is not None:
            self._user_error_cb(err)
