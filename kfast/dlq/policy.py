"""``DeadLetterPolicy``: where dead letters go, and the DLQ producer's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kfast.errors import ConfigError

__all__ = ["DeadLetterPolicy", "producer_config"]

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
