"""Dead-letter queue: where undecodable payloads and rows the sink rejects go.

* :class:`DeadLetterPolicy` (public, frozen, validated) names the DLQ topic,
  extra librdkafka settings for the DLQ producer (kept apart from the
  consumer's), and the circuit breaker (``max_ratio`` over the last
  ``window`` input messages, ``max_consecutive`` dead letters in a row).
* :class:`DeadLetterQueue` owns the producer (``acks=all``,
  ``enable.idempotence=true``), sends records with the original key and value
  bytes untouched plus ``kfast.*`` headers, and waits for every delivery
  report before returning (the offsets may be committed only then). A broker
  that cannot be reached is retried under the pipeline's RetryPolicy; then
  ``RetryExhausted`` propagates and the runtime stops without committing.
* :func:`replay_main` is ``kfast replay``: re-publish DLQ records to their
  original topic (or another), optionally filtered by error class or stage.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kfast.errors import ConfigError, KfastError, TransientSinkError
from kfast.retry import Retrier, RetryPolicy

__all__ = [
    "BatchCheck",
    "CircuitBreaker",
    "CircuitBreakerOpen",
    "DeadLetter",
    "DeadLetterPolicy",
    "DeadLetterQueue",
    "DeadLetterUnavailable",
    "HEADER_PREFIX",
    "dlq_headers",
    "producer_config",
    "replay_main",
]

HEADER_PREFIX = "kfast."
# Settings of the consumer's librdkafka dict that also describe how to reach
# the cluster; everything else (group.id, fetch sizes, ...) stays out.
_CONNECTION_KEYS = (
    "bootstrap.servers",
    "security.protocol",
    "client.dns.lookup",
    "broker.address.family",
)
_CONNECTION_PREFIXES = ("ssl.", "sasl.")
# Producer queue bounds the runtime derives from memory_limit and passes along.
_BUDGET_KEYS = ("queue.buffering.max.kbytes", "queue.buffering.max.messages")
_FORCED = {"acks": "all", "enable.idempotence": "true"}
_ACKS_ALL = {"all", "-1"}


class CircuitBreakerOpen(KfastError):
    """Too large a share of recent messages went to the DLQ: stop, do not drain the topic."""


class DeadLetterUnavailable(TransientSinkError):
    """The DLQ producer could not get delivery confirmations (retried under the policy)."""


@dataclass(frozen=True)
class DeadLetterPolicy:
    """Where dead letters go and when to stop instead.

    * ``topic``: DLQ topic name.
    * ``producer``: extra librdkafka settings for the DLQ producer only
      (e.g. ``{"bootstrap.servers": ..., "message.timeout.ms": "30000"}``);
      ``acks`` and ``enable.idempotence`` are forced to ``all``/``true``.
    * ``max_ratio``: trip when more than this share (0 < x <= 1) of the last
      ``window`` input messages were dead-lettered (checked once ``window``
      messages have been seen).
    * ``max_consecutive``: trip after this many dead letters in a row
      (1..10_000_000, or None to disable).
    * ``window``: number of most recent input messages the ratio looks at
      (100..10_000_000).
    """

    topic: str
    producer: Mapping[str, Any] | None = None
    max_ratio: float = 0.1
    max_consecutive: int | None = 1000
    window: int = 10_000

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str, value: object) -> ConfigError:
            return ConfigError(f"DeadLetterPolicy.{name} must be {allowed}, got {value!r}")

        if not isinstance(self.topic, str) or not self.topic.strip() or len(self.topic) > 249:
            raise bad("topic", "a non-empty topic name (at most 249 characters)", self.topic)
        if self.producer is not None:
            if not isinstance(self.producer, Mapping) or not all(
                isinstance(k, str) for k in self.producer
            ):
                raise bad("producer", "a dict of librdkafka settings (str keys)", self.producer)
            acks = self.producer.get("acks")
            if acks is not None and str(acks).lower() not in _ACKS_ALL:
                raise bad(
                    "producer['acks']", "'all' (the DLQ producer never weakens durability)", acks
                )
            idem = self.producer.get("enable.idempotence")
            if idem is not None and str(idem).lower() not in ("true", "1"):
                raise bad("producer['enable.idempotence']", "true", idem)
            object.__setattr__(self, "producer", dict(self.producer))
        r = self.max_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise bad("max_ratio", "a number in (0, 1]", r)
        c = self.max_consecutive
        if c is not None and (
            isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 10_000_000
        ):
            raise bad("max_consecutive", "an int in [1, 10000000] or None", c)
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or not 100 <= w <= 10_000_000:
            raise bad("window", "an int in [100, 10000000]", w)


def producer_config(policy: DeadLetterPolicy, kafka_config: Mapping[str, Any]) -> dict[str, str]:
    """librdkafka settings of the DLQ producer: how to reach the cluster (from
    the consumer's dict, plus the producer queue bounds the runtime derives
    from ``memory_limit``), then the policy's own settings, then the forced
    durability settings. Consumer settings (group.id, fetch sizes, ...) never
    reach the producer."""
    conf: dict[str, str] = {}
    for k, v in kafka_config.items():
        if k in _CONNECTION_KEYS or k in _BUDGET_KEYS or k.startswith(_CONNECTION_PREFIXES):
            conf[k] = str(v)
    conf["message.timeout.ms"] = "30000"
    conf["linger.ms"] = "5"
    for k, v in (policy.producer or {}).items():
        conf[k] = str(v).lower() if isinstance(v, bool) else str(v)
    conf.update(_FORCED)
    if "bootstrap.servers" not in conf:
        raise ConfigError(
            "DeadLetterPolicy: no bootstrap.servers for the DLQ producer (set it in the pipeline's "
            "kafka settings or in DeadLetterPolicy.producer)"
        )
    return conf


@dataclass
class DeadLetter:
    """One record to dead-letter: original key/value untouched, headers added."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    stage: str
    error_class: str


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(
        timespec="milliseconds"
    )


def dlq_headers(
    *,
    stage: str,
    error_class: str,
    message: str,
    topic: str,
    partition: int,
    offset: int,
    timestamp: int,
    attempts: int,
    first_failure: float,
    schema_id: int | None = None,
    sqlstate: str | None = None,
    original: Sequence[tuple[str, bytes]] | None = None,
    max_message: int = 4096,
) -> list[tuple[str, bytes]]:
    """The ``kfast.*`` headers of a DLQ record (see docs/dlq.md), followed by
    the original message's own headers (``kfast replay`` restores those)."""
    msg = message.encode("utf-8", "replace")
    if len(msg) > max_message:
        msg = msg[: max_message - 3] + b"..."
    h = [
        ("kfast.error.stage", stage.encode()),
        ("kfast.error.class", error_class.encode()),
        ("kfast.error.message", msg),
        ("kfast.original.topic", topic.encode()),
        ("kfast.original.partition", str(partition).encode()),
        ("kfast.original.offset", str(offset).encode()),
        ("kfast.original.timestamp", str(timestamp).encode()),
        ("kfast.attempts", str(attempts).encode()),
        ("kfast.first_failure", _iso(first_failure).encode()),
    ]
    if schema_id is not None:
        h.append(("kfast.schema.id", str(schema_id).encode()))
    if sqlstate:
        h.append(("kfast.sqlstate", sqlstate.encode()))
    for k, v in original or ():
        if not k.startswith(HEADER_PREFIX):
            h.append((k, v))
    return h


class CircuitBreaker:
    """Trips when the DLQ share of recent input messages is too high.

    ``record(n, dead)`` takes the number of input messages of a batch and the
    sorted input indices that were dead-lettered. Memory is one bytearray of
    ``window`` entries.
    """

    def __init__(self, policy: DeadLetterPolicy) -> None:
        self.policy = policy
        self._ring = bytearray(policy.window)
        self._pos = 0
        self._seen = 0
        self._dead_in_window = 0
        self._run = 0

    def record(self, n: int, dead: Sequence[int]) -> None:
        """Account for a batch of ``n`` input messages; ``dead`` (sorted) went to the DLQ.

        Cost is O(n) in C (bytearray slices) plus O(len(dead)) in Python, so a
        batch without dead letters adds no per-message Python work.
        """
        p = self.policy
        if n <= 0:
            return
        # Consecutive dead letters, walking only the dead indices.
        run, prev = self._run, -1
        for i in dead:
            if i == prev + 1:
                run += 1
            else:
                run = 1
            prev = i
            if p.max_consecutive is not None and run >= p.max_consecutive:
                self._trip_consecutive(run)
        self._run = run if dead and dead[-1] == n - 1 else 0
        # Ratio over the last `window` messages.
        w = len(self._ring)
        bits = bytearray(n)
        for i in dead:
            bits[i] = 1
        if n > w:
            bits = bits[n - w :]
        m = len(bits)
        pos = self._pos
        first = min(m, w - pos)
        old = self._dead_in_slots(m)
        self._ring[pos : pos + first] = bits[:first]
        if m > first:
            self._ring[0 : m - first] = bits[first:]
        self._dead_in_window += bits.count(1) - old
        self._pos = (pos + m) % w
        self._seen += n
        if self._seen >= w and self._dead_in_window > p.max_ratio * w:
            raise CircuitBreakerOpen(
                f"{self._dead_in_window} of the last {w} messages went to the DLQ {p.topic!r} "
                f"(ratio {self._dead_in_window / w:.3f} > DeadLetterPolicy.max_ratio={p.max_ratio}); "
                "stopping instead of draining the topic into the DLQ"
            )

    def _dead_in_slots(self, m: int) -> int:
        """Dead letters in the next ``m`` window slots (the ones a batch of ``m`` overwrites)."""
        pos = self._pos
        first = min(m, len(self._ring) - pos)
        return self._ring.count(1, pos, pos + first) + self._ring.count(1, 0, m - first)

    def _trip_consecutive(self, run: int) -> None:
        raise _consecutive_error(self.policy, run)

    def batch(self, n: int) -> BatchCheck:
        """A check that follows one batch of ``n`` input messages while its dead letters are
        found, to trip before the batch is done (see :class:`BatchCheck`)."""
        return BatchCheck(self, n)


def _consecutive_error(p: DeadLetterPolicy, run: int, during: str = "") -> CircuitBreakerOpen:
    return CircuitBreakerOpen(
        f"{run} consecutive messages went to the DLQ {p.topic!r}{during} "
        f"(DeadLetterPolicy.max_consecutive={p.max_consecutive}); stopping instead of "
        "draining the topic into the DLQ"
    )


class BatchCheck:
    """Would :meth:`CircuitBreaker.record` of this batch trip, from the dead letters known so far?

    ``add(i)`` marks input ``i`` (0 <= i < n, any order) as dead and returns True when
    ``record(n, dead)`` is already certain to raise: the known dead letters alone trip it,
    even if every other message of the batch turns out fine. That is the case when

    * they hold a run of ``max_consecutive`` consecutive inputs (a run starting at input 0
      continues the run the previous batch ended with), or
    * the ratio is checked after this batch (``window`` messages seen by then) and the dead
      letters the window will still hold from earlier batches plus the known ones among
      this batch's last ``window`` inputs are more than ``max_ratio · window``.

    A dead letter found later can only add to both, so a check that trips never trips
    wrongly, and once every dead letter is added it trips exactly when ``record`` would.
    Nothing of the breaker changes (``record`` does that for a batch that is done).
    ``add`` is O(1); making a check counts the window slots the batch overwrites (C).
    """

    def __init__(self, breaker: CircuitBreaker, n: int) -> None:
        p = breaker.policy
        self.policy = p
        self.n = n
        self._carry = breaker._run  # dead letters in a row at the end of the previous batch
        self._dead: set[int] = set()
        self._start: dict[int, int] = {}  # run of known dead inputs: first -> last + 1
        self._end: dict[int, int] = {}  # last + 1 -> first
        w = len(breaker._ring)
        self._w = w
        self._ratio = breaker._seen + n >= w  # record() checks the ratio after this batch
        self._tail = max(0, n - w)  # inputs before this are out of the window by then
        # kept from earlier batches: the window slots this batch does not overwrite
        self._in_window = breaker._dead_in_window - breaker._dead_in_slots(min(n, w))
        self.error: CircuitBreakerOpen | None = None

    def copy(self) -> BatchCheck:
        c = object.__new__(BatchCheck)
        c.__dict__.update(self.__dict__)
        c._dead, c._start, c._end = set(self._dead), dict(self._start), dict(self._end)
        return c

    def add(self, i: int) -> bool:
        """Mark input ``i`` dead; True (and ``error`` set) when the batch will trip the breaker."""
        if self.error is not None:
            return True
        if i in self._dead or not 0 <= i < self.n:
            return False
        self._dead.add(i)
        p = self.policy
        lo, hi = i, i + 1
        if hi in self._start:
            hi = self._start.pop(hi)
        if lo in self._end:
            lo = self._end.pop(lo)
        self._start[lo], self._end[hi] = hi, lo
        run = hi - lo + (self._carry if lo == 0 else 0)
        if p.max_consecutive is not None and run >= p.max_consecutive:
            self.error = _consecutive_error(p, run, " within a batch not yet written")
            return True
        if i >= self._tail:
            self._in_window += 1
            if self._ratio and self._in_window > p.max_ratio * self._w:
                self.error = CircuitBreakerOpen(
                    f"at least {self._in_window} of the last {self._w} messages go to the DLQ "
                    f"{p.topic!r} once the batch being written is done (ratio "
                    f"{self._in_window / self._w:.3f} > DeadLetterPolicy.max_ratio="
                    f"{p.max_ratio}); stopping instead of draining the topic into the DLQ"
                )
                return True
        return False


class DeadLetterQueue:
    """Sends dead letters and waits for their delivery reports.

    ``produce(records)`` hands records to the producer without waiting, so their
    delivery overlaps with other work (the sink's writes); ``confirm(stop)`` returns
    when every record produced since the last ``confirm`` has a successful delivery
    report, re-sending the failed ones under the RetryPolicy. ``send`` is both.
    Memory: the records awaiting confirmation (at most one batch's dead letters, the
    caller confirms once per batch) and the producer queue bounded by
    ``queue.buffering.max.*``.
    """

    def __init__(
        self,
        policy: DeadLetterPolicy,
        kafka_config: Mapping[str, Any],
        retry: RetryPolicy,
        *,
        retrier: Retrier | None = None,
    ) -> None:
        self.policy = policy
        self.config = producer_config(policy, kafka_config)
        self.retrier = retrier or Retrier(retry)
        self._producer: Any = None
        self._unconfirmed = 0  # produced since the last confirm()
        self._failed: list[tuple[DeadLetter, Any]] = []  # failed reports or refused produce()
        self.sent = 0
        self.retries = 0

    def _get_producer(self) -> Any:
        if self._producer is None:
            from confluent_kafka import Producer

            try:
                self._producer = Producer(self.config)
            except Exception as exc:  # KafkaException for bad settings
                raise ConfigError(f"DeadLetterPolicy.producer: {exc}") from exc
        return self._producer

    def send(self, records: Sequence[DeadLetter], stop: threading.Event | None = None) -> None:
        """Produce ``records``; return when every one has a successful delivery report."""
        self.produce(records)
        self.confirm(stop)

    def produce(self, records: Sequence[DeadLetter]) -> None:
        """Hand ``records`` to the producer without waiting for their delivery reports.

        Blocks only while the producer queue is full. A record the producer refuses
        (unknown topic, fatal producer error) is retried by :meth:`confirm`.
        """
        if not records:
            return
        self._produce(list(records))
        self._unconfirmed += len(records)

    def _produce(self, records: list[DeadLetter]) -> None:
        producer = self._get_producer()
        failed = self._failed

        def report(rec: DeadLetter) -> Any:
            def cb(err: Any, _msg: Any) -> None:
                if err is not None:
                    failed.append((rec, err))

            return cb

        for n, rec in enumerate(records):
            while True:
                try:
                    producer.produce(
                        self.policy.topic,
                        value=rec.value,
                        key=rec.key,
                        headers=rec.headers,
                        on_delivery=report(rec),
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
                except Exception as exc:  # KafkaException: unknown topic, fatal producer
                    failed.extend((r, exc) for r in records[n:])
                    return

    def confirm(self, stop: threading.Event | None = None) -> None:
        """Return when every record produced since the last ``confirm`` has a successful
        delivery report; failed ones are re-sent under the RetryPolicy, after which
        ``RetryExhausted`` propagates."""
        if not self._unconfirmed and not self._failed:
            return
        count, self._unconfirmed = self._unconfirmed, 0
        timeout = int(self.config.get("message.timeout.ms", "30000")) / 1000.0
        first = True

        def attempt() -> None:
            nonlocal first
            producer = self._get_producer()
            if not first:  # re-send what failed last time
                again = [rec for rec, _ in self._failed]
                self._failed.clear()
                self._produce(again)
            first = False
            # message.timeout.ms bounds every delivery report; wait a bit longer.
            left = producer.flush(timeout + 10.0)
            if left:
                raise KfastError(
                    f"DLQ producer still has {left} undelivered records after {timeout + 10:.0f}s "
                    "(message.timeout.ms did not fire); stopping without committing"
                )
            if self._failed:
                raise DeadLetterUnavailable(
                    f"{len(self._failed)} of the records sent to DLQ topic {self.policy.topic!r} "
                    f"failed: {self._failed[0][1]}"
                )

        def on_retry(_attempt: int, _exc: BaseException, _delay: float) -> None:
            self.retries += 1

        try:
            self.retrier.run(
                attempt,
                stop,
                retry_on=(DeadLetterUnavailable,),
                on_retry=on_retry,
                what=f"dead-lettering to {self.policy.topic!r}",
            )
        except BaseException:
            self._failed.clear()  # the caller stops without committing; nothing carries over
            raise
        self.sent += count

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5.0)
            self._producer = None


# ------------------------------------------------------------------ kfast replay


def _replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kfast replay",
        description="Re-publish dead letters to their original topic (or --to TOPIC). Original key, "
        "value and headers are restored; kfast.* headers are dropped.",
    )
    p.add_argument("dlq_topic", help="the DLQ topic to read")
    p.add_argument("--bootstrap-servers", "-b", required=True)
    p.add_argument("--to", dest="to_topic", help="publish here instead of kfast.original.topic")
    p.add_argument(
        "--error-class", action="append", default=[], help="only records of this class (repeatable)"
    )
    p.add_argument("--stage", choices=("decode", "sink"), help="only records of this stage")
    p.add_argument(
        "--group", help="consumer group: commit replayed offsets (resume later); default: read all"
    )
    p.add_argument(
        "--max-records", type=int, default=0, help="stop after this many replayed (0: no limit)"
    )
    p.add_argument(
        "--max-in-flight", type=int, default=10_000, help="bound on unacknowledged records"
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for records/deliveries"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed, publish nothing"
    )
    p.add_argument(
        "-X",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka setting",
    )
    return p


def replay_main(args: Sequence[str] | None = None) -> int:
    """``kfast replay DLQ_TOPIC -b HOST:PORT [--to T] [--error-class C] ...``; returns the exit code."""
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    ns = _replay_parser().parse_args(list(args) if args is not None else None)
    if ns.max_in_flight < 1:
        print("kfast replay: --max-in-flight must be >= 1", file=sys.stderr)
        return 2
    extra: dict[str, str] = {}
    for s in ns.settings:
        k, sep, v = s.partition("=")
        if not sep:
            print(f"kfast replay: -X needs KEY=VALUE, got {s!r}", file=sys.stderr)
            return 2
        extra[k] = v
    base = {"bootstrap.servers": ns.bootstrap_servers, **extra}
    consumer = Consumer(
        {
            **base,
            "group.id": ns.group or f"kfast-replay-{int(time.time() * 1000)}",
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": "true",
        }
    )
    producer = Producer(
        {
            **base,
            "acks": "all",
            "enable.idempotence": "true",
            "queue.buffering.max.messages": str(max(ns.max_in_flight, 1)),
        }
    )
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    replayed = skipped = 0
    try:
        md = consumer.list_topics(ns.dlq_topic, timeout=ns.timeout)
        tmeta = md.topics.get(ns.dlq_topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            print(f"kfast replay: DLQ topic {ns.dlq_topic!r} not found", file=sys.stderr)
            return 1
        parts = [TopicPartition(ns.dlq_topic, p) for p in sorted(tmeta.partitions)]
        # Read up to the end offsets seen now (records arriving later are left for the next run).
        ends = {}
        for tp in parts:
            _lo, hi = consumer.get_watermark_offsets(tp, timeout=ns.timeout)
            ends[tp.partition] = hi
        consumer.assign(
            parts if ns.group else [TopicPartition(ns.dlq_topic, tp.partition, 0) for tp in parts]
        )
        done = {p for p, hi in ends.items() if hi == 0}
        deadline = time.monotonic() + ns.timeout
        while len(done) < len(parts) and not (ns.max_records and replayed >= ns.max_records):
            msg: Any = consumer.poll(0.2)
            if msg is None:
                if time.monotonic() > deadline:
                    break
                continue
            deadline = time.monotonic() + ns.timeout
            if msg.error() is not None:
                if msg.error().code() == -191:  # _PARTITION_EOF
                    done.add(msg.partition())
                    continue
                raise KafkaException(msg.error())
            if msg.offset() >= ends.get(msg.partition(), 0) - 1:
                done.add(msg.partition())
            if msg.offset() >= ends.get(msg.partition(), 0):
                continue
            headers = msg.headers() or []
            hd = {k: v for k, v in headers}
            cls = (hd.get("kfast.error.class") or b"").decode()
            stage = (hd.get("kfast.error.stage") or b"").decode()
            if (ns.error_class and cls not in ns.error_class) or (ns.stage and stage != ns.stage):
                skipped += 1
                continue
            target = ns.to_topic or (hd.get("kfast.original.topic") or b"").decode()
            if not target:
                skipped += 1
                continue
            if not ns.dry_run:
                original = [(k, v) for k, v in headers if not k.startswith(HEADER_PREFIX)]
                while True:
                    try:
                        producer.produce(
                            target,
                            value=msg.value(),
                            key=msg.key(),
                            headers=original,
                            on_delivery=on_delivery,
                        )
                        break
                    except BufferError:  # max in flight reached: wait for reports
                        producer.poll(0.1)
                producer.poll(0)
            replayed += 1
        left = producer.flush(ns.timeout)
        if left or errors:
            print(
                f"kfast replay: {left} records unconfirmed, {len(errors)} failed ({errors[:1]}); "
                "offsets not committed",
                file=sys.stderr,
            )
            return 1
        if ns.group and not ns.dry_run:
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if "NO_OFFSET" not in str(exc):
                    raise
    finally:
        consumer.close()
    verb = "would replay" if ns.dry_run else "replayed"
    print(f"kfast replay: {verb} {replayed} records from {ns.dlq_topic}, skipped {skipped}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(replay_main())
