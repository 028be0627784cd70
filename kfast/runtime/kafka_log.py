"""Log plumbing shared by the runtime and the DLQ producer.

* :func:`kafka_logger_config` routes librdkafka's own log lines of a consumer
  or producer through Python ``logging`` (logger ``kfast.kafka``) instead of
  stderr. Use it for every client kfast creates::

      conf = kafka_logger_config(conf, "dlq-producer")
      producer = confluent_kafka.Producer(conf)

  (confluent-kafka's ``logger=`` setting: librdkafka's lines are queued and
  emitted by the client's poll/consume calls, on the thread that polls.)
  Repeated lines (same facility and client) are
  rate-limited by :class:`Throttle` so a broker outage cannot flood the log.
  Error *events* (``error_cb``) are logged by whoever owns the client, once.
* :class:`Throttle`: at most one line per key per interval, with a count of
  what was suppressed in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__all__ = ["KAFKA_LOGGER", "KafkaLogAdapter", "Throttle", "kafka_logger_config"]

KAFKA_LOGGER = "kfast.kafka"

_SYSLOG_LEVELS = {
    0: logging.CRITICAL,
    1: logging.CRITICAL,
    2: logging.CRITICAL,
    3: logging.ERROR,
    4: logging.WARNING,
    5: logging.INFO,
    6: logging.INFO,
    7: logging.DEBUG,
}


class Throttle:
    """Rate-limits log lines by key: one per ``interval`` seconds, the rest counted.

    ``allow(key)`` returns ``None`` to suppress, else the number of lines
    suppressed since the last one allowed (0 the first time). Thread-safe;
    the number of keys kept is bounded (``max_keys``, oldest dropped).
    """

    def __init__(
        self,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._last: dict[Any, list[float]] = {}  # key -> [last allowed at, suppressed]

    def allow(self, key: Any) -> int | None:
        now = self.clock()
        with self._lock:
            entry = self._last.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return None
            suppressed = int(entry[1]) if entry is not None else 0
            if entry is None and len(self._last) >= self.max_keys:
                self._last.pop(next(iter(self._last)))
            self._last[key] = [now, 0]
            return suppressed

    def reset(self, key: Any) -> int:
        """Forget ``key`` (an outage ended); returns the lines suppressed since the last one."""
        with self._lock:
            entry = self._last.pop(key, None)
        return int(entry[1]) if entry is not None else 0


if TYPE_CHECKING:
    _LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:  # subscriptable at run time only from Python 3.11
    _LoggerAdapter = logging.LoggerAdapter


class KafkaLogAdapter(_LoggerAdapter):
    """The ``logger=`` object handed to confluent-kafka: one librdkafka line per ``log``.

    confluent-kafka calls ``logger.log(level, "%s [%s] %s", facility, client
    name, message)`` with ``level`` already a ``logging`` level (older
    releases passed the syslog severity; both are accepted).
    """

    def __init__(self, client: str, throttle: Throttle | None = None) -> None:
        super().__init__(logging.getLogger(KAFKA_LOGGER), {"kafka_client": client})
        self.client = client
        self.throttle = throttle if throttle is not None else Throttle()

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        pylevel = _SYSLOG_LEVELS.get(level, logging.DEBUG) if level < 10 else level
        if not self.logger.isEnabledFor(pylevel):
            return
        fac = args[0] if len(args) >= 3 else ""  # (facility, client name, message)
        suppressed = self.throttle.allow((self.client, fac, pylevel))
        if suppressed is None:
            return
        text = str(msg) % args if args else str(msg)
        if suppressed:
            text = f"{text} ({suppressed} similar lines suppressed)"
        self.logger.log(pylevel, "[%s] %s", self.client, text, extra=self.extra)


def kafka_logger_config(conf: dict[str, Any], client: str) -> dict[str, Any]:
    """``conf`` plus ``logger=`` so librdkafka's lines go to ``kfast.kafka``, not stderr.

    A ``logger`` the user set is kept. ``client`` names the client in each
    line (``consumer``, ``dlq-producer``).
    """
    out = dict(conf)
    out.setdefault("logger", KafkaLogAdapter(client))
    return out
