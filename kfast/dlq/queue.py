"""``DeadLetterQueue``: the DLQ producer (``acks=all``, idempotent) and its delivery reports.

Records keep the original key and value bytes untouched, plus ``kfast.*`` headers; every
delivery report is awaited before the offsets may be committed. A broker that cannot be
reached is retried under the pipeline's RetryPolicy; then ``RetryExhausted`` propagates and
the runtime stops without committing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from kfast.dlq.headers import DeadLetter
from kfast.dlq.policy import DeadLetterPolicy, producer_config
from kfast.errors import ConfigError, DeadLetterUnavailable, KfastError
from kfast.retry import Retrier, RetryPolicy
from kfast.runtime.kafka_log import Throttle, kafka_logger_config

__all__ = ["DeadLetterQueue"]

log = logging.getLogger("kfast.dlq")


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
        self._throttle = Throttle()

    def start(self) -> None:
        """Create the producer now rather than at the first dead letter: it connects and gets
        its producer id while the consumer joins its group, instead of holding up the first
        batch with bad rows (a cold producer's first delivery took ~1 s here), and a bad
        ``DeadLetterPolicy.producer`` setting fails the start, not a batch."""
        self._get_producer()

    def _get_producer(self) -> Any:
        if self._producer is None:
            from confluent_kafka import Producer

            # librdkafka's own lines go to the kfast.kafka logger (rate-limited), its error
            # events to kfast.dlq: nothing on stderr, even during a long DLQ outage.
            conf: dict[str, Any] = kafka_logger_config(dict(self.config), "dlq-producer")
            conf.setdefault("error_cb", self._on_error)
            try:
                self._producer = Producer(conf)
            except Exception as exc:  # KafkaException for bad settings
                raise ConfigError(f"DeadLetterPolicy.producer: {exc}") from exc
        return self._producer

    def _on_error(self, err: Any) -> None:
        code = getattr(err, "code", None)
        suppressed = self._throttle.allow(code() if callable(code) else str(err))
        if suppressed is not None:
            more = f" ({suppressed} similar suppressed)" if suppressed else ""
            log.warning("DLQ producer (topic %r): %s%s", self.policy.topic, err, more)

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
