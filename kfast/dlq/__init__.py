"""Dead-letter queue: where undecodable payloads and rows the sink rejects go.

* :mod:`.policy`: :class:`DeadLetterPolicy` (public, frozen, validated) names the DLQ
  topic, extra librdkafka settings for the DLQ producer (kept apart from the consumer's),
  and the circuit breaker's limits;
* :mod:`.headers`: :class:`DeadLetter` and the ``kfast.*`` headers of a DLQ record;
* :mod:`.breaker`: :class:`CircuitBreaker` and :class:`BatchCheck`;
* :mod:`.queue`: :class:`DeadLetterQueue`, the producer and its delivery reports.

``kfast replay`` lives in :mod:`kfast.cli.replay`. ``CircuitBreakerOpen`` and
``DeadLetterUnavailable`` are defined in :mod:`kfast.errors` (also exported from ``kfast``).
"""

from __future__ import annotations

from kfast.dlq.breaker import BatchCheck, CircuitBreaker
from kfast.dlq.headers import HEADER_PREFIX, DeadLetter, dlq_headers
from kfast.dlq.policy import DeadLetterPolicy, producer_config
from kfast.dlq.queue import DeadLetterQueue
from kfast.errors import CircuitBreakerOpen, DeadLetterUnavailable

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
]
