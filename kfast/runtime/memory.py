"""One memory budget, split over every buffer the pipeline owns.

``memory_limit`` covers, in this order:

1. **reserve**: interpreter objects, metrics, librdkafka internals we do not
   size ourselves (10% of the limit, at least 8 MiB);
2. **batch buffers**: per batch in flight, the decoded columns plus the
   sink's wire-format buffer, estimated as ``4 x BatchPolicy.max_bytes``
   (columns of small Avro records are 2-3x the payload) plus the per-row
   pointer arrays. Two batches are in flight (one decoded while the previous
   one is delivered) when both fit in a third of the limit; otherwise one,
   and decoding and delivery alternate;
3. **DLQ producer queue** (only with a DeadLetterPolicy): ``min(16 MiB, limit/16)``;
4. what remains is split 40/60 between **librdkafka prefetch** and the **ring**:

   * prefetch = ``fetch.max.bytes`` (one fetch response in flight) +
     ``queued.max.messages.kbytes`` (the local queue) + per-message overhead
     of librdkafka's queue (bounded through ``queued.min.messages``);
   * ring = slot metadata (``max_messages x SLOT_BYTES``) + the byte arena.

Settings the user gave explicitly (librdkafka keys in ``kafka``, or
``BufferPolicy`` fields) are taken as they are; if they cannot fit, the plan
raises :class:`kfast.ConfigError` naming them.

The arithmetic behind the defaults is the seed's: messages in flight =
throughput x latency. At 100k msg/s and a sink that needs 50 ms per batch,
about 5,000 messages are in flight; a ring of 100k messages therefore absorbs
a full second of sink stall before partitions pause.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kfast.errors import ConfigError
from kfast.runtime.policies import BatchPolicy, BufferPolicy, parse_size

__all__ = ["MemoryPlan", "plan_memory", "SLOT_BYTES", "RDKAFKA_MSG_OVERHEAD"]

KiB = 1 << 10
MiB = 1 << 20

#: bytes of ring metadata per message slot (kfast.runtime.ring._ring.SLOT_SIZE, rounded up)
SLOT_BYTES = 64
#: librdkafka's own bytes per queued message besides the payload (op + msg structs)
RDKAFKA_MSG_OVERHEAD = 512
#: message size assumed when choosing the ring's message capacity from bytes
ASSUMED_MESSAGE_BYTES = 256
#: decoded columns + sink encoding per payload byte (estimate, see module doc)
BATCH_FACTOR = 4
#: per-row bookkeeping of a batch: pointer, length and slot arrays
BATCH_ROW_BYTES = 32

DEFAULT_MEMORY_LIMIT = 256 * MiB
MIN_RING_BYTES = 64 * KiB
MIN_FETCH_BYTES = 1 * MiB  # librdkafka raises fetch.max.bytes to message.max.bytes (1 MB)

_PREFETCH_KEYS = (
    "queued.max.messages.kbytes",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "queued.min.messages",
)


@dataclass(frozen=True)
class MemoryPlan:
    """How ``limit`` bytes are split. All values in bytes unless named otherwise."""

    limit: int
    reserve: int
    batch_buffers: int
    batches_in_flight: int
    dlq_queue: int
    prefetch: int
    fetch_max_bytes: int
    queued_max_messages_kbytes: int
    max_partition_fetch_bytes: int
    queued_min_messages: int
    partitions: int
    ring: int
    ring_messages: int
    ring_bytes: int
    explicit: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.reserve + self.batch_buffers + self.dlq_queue + self.prefetch + self.ring

    def kafka_settings(self) -> dict[str, str]:
        """The librdkafka settings this plan implies (explicit ones unchanged)."""
        return {
            "queued.max.messages.kbytes": str(self.queued_max_messages_kbytes),
            "fetch.max.bytes": str(self.fetch_max_bytes),
            "max.partition.fetch.bytes": str(self.max_partition_fetch_bytes),
            "queued.min.messages": str(self.queued_min_messages),
            # librdkafka >= 2.4 postpones a partition's next fetch by this much when
            # its queue is over the limits above (default 1000 ms: far too long
            # for a small budget)
            "fetch.queue.backoff.ms": "20",
        }

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["explicit"] = list(self.explicit)
        d["total"] = self.total
        return d

    def describe(self) -> str:
        """A small human-readable table (``kfast run --plan``, logs)."""

        def mib(n: int) -> str:
            return f"{n / MiB:9.1f} MiB"

        rows = [
            ("librdkafka prefetch", self.prefetch),
            ("  fetch.max.bytes", self.fetch_max_bytes),
            ("  queued.max.messages.kbytes", self.queued_max_messages_kbytes * KiB),
            ("ring", self.ring),
            (f"  arena ({self.ring_messages} slots)", self.ring_bytes),
            (f"batch buffers ({self.batches_in_flight} in flight)", self.batch_buffers),
            ("DLQ producer queue", self.dlq_queue),
            ("reserve (interpreter, librdkafka internals)", self.reserve),
            ("total", self.total),
            ("memory_limit", self.limit),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {mib(v)}" for name, v in rows)


def _int_setting(kafka: dict[str, Any], key: str) -> int | None:
    if key not in kafka:
        return None
    try:
        v = int(str(kafka[key]).strip())
    except ValueError:
        raise ConfigError(f"kafka[{key!r}]: expected an integer, got {kafka[key]!r}") from None
    if v <= 0:
        raise ConfigError(f"kafka[{key!r}]: {v} must be > 0")
    return v


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def plan_memory(
    memory_limit: int | str | None,
    kafka: dict[str, Any],
    batch: BatchPolicy,
    buffer: BufferPolicy,
    *,
    dlq: bool = False,
    partitions: int = 8,
) -> MemoryPlan:
    """Split ``memory_limit`` (see the module docstring); raise ConfigError if it cannot fit."""
    limit = (
        DEFAULT_MEMORY_LIMIT if memory_limit is None else parse_size(memory_limit, "memory_limit")
    )
    if limit < 32 * MiB:
        raise ConfigError(f"memory_limit: {limit} bytes is out of range [32MiB, 1TiB]")
    if partitions < 1:
        raise ConfigError(f"partitions: {partitions} must be >= 1")
    explicit: list[str] = []
    reserve = max(8 * MiB, limit // 10)
    batch_max_bytes = int(batch.max_bytes)
    per_batch = BATCH_FACTOR * batch_max_bytes + BATCH_ROW_BYTES * batch.max_rows
    # decode-ahead only where the second batch is cheap next to the limit: small
    # limits keep their ring and prefetch rather than overlap decode and delivery
    batches_in_flight = 2 if 2 * per_batch <= limit // 3 else 1
    batch_buffers = batches_in_flight * per_batch
    dlq_queue = min(16 * MiB, limit // 16) if dlq else 0

    fetch = _int_setting(kafka, "fetch.max.bytes")
    qkb = _int_setting(kafka, "queued.max.messages.kbytes")
    mpf = _int_setting(kafka, "max.partition.fetch.bytes")
    qmin = _int_setting(kafka, "queued.min.messages")
    explicit += [f"kafka[{k!r}]" for k in _PREFETCH_KEYS if k in kafka]
    if buffer.max_bytes is not None:
        explicit.append("buffer.max_bytes")
    if buffer.max_messages is not None:
        explicit.append("buffer.max_messages")

    available = limit - reserve - batch_buffers - dlq_queue
    fixed_needed = (
        (fetch or 0)
        + (qkb or 0) * KiB
        + (int(buffer.max_bytes) if buffer.max_bytes is not None else 0)
        + (buffer.max_messages or 0) * SLOT_BYTES
    )
    if available <= 0 or fixed_needed > available:
        named = ", ".join(explicit) if explicit else "none"
        raise ConfigError(
            f"memory_limit: {limit} bytes cannot hold batch buffers of {batch_buffers} bytes "
            f"({batches_in_flight} x (4 x batch.max_bytes + rows)), DLQ queue {dlq_queue}, reserve {reserve} and the "
            f"explicit settings [{named}] totalling {fixed_needed} bytes; raise memory_limit "
            f"or lower those settings"
        )

    prefetch_share = available * 2 // 5
    # When the ring is explicit, prefetch may take what the ring does not need.
    if buffer.max_bytes is not None:
        ring_fixed = int(buffer.max_bytes) + (
            (buffer.max_messages or int(buffer.max_bytes) // ASSUMED_MESSAGE_BYTES) * SLOT_BYTES
        )
        prefetch_share = available - ring_fixed

    # --- librdkafka prefetch ---
    if fetch is None:
        fetch = _clamp(prefetch_share // 4, MIN_FETCH_BYTES, 50 * MiB)
    if qkb is None:
        # the queue's payload bytes, plus librdkafka's per-message overhead for
        # as many messages as fit at ASSUMED_MESSAGE_BYTES (bounded via
        # queued.min.messages below): prefetch = fetch + qkb * (1 + overhead ratio)
        ratio = 1 + RDKAFKA_MSG_OVERHEAD / ASSUMED_MESSAGE_BYTES
        qkb = max(1024, int((prefetch_share - fetch) / ratio) // KiB)
    if mpf is None:
        mpf = _clamp(fetch // partitions, 64 * KiB, 1 * MiB)
    if qmin is None:
        # librdkafka keeps fetching a partition until it holds queued.min.messages
        # (or the kbytes limit is hit): bound the count to what the kbytes allow
        # at the assumed size. Too small a value starves the consumer (each
        # fetch overshoots it and waits fetch.queue.backoff.ms).
        qmin = _clamp(qkb * KiB // ASSUMED_MESSAGE_BYTES // partitions, 100, 100_000)
    prefetch = fetch + qkb * KiB + qmin * partitions * RDKAFKA_MSG_OVERHEAD

    # --- ring ---
    if buffer.max_bytes is None:
        ring_left = available - prefetch
        if ring_left < MIN_RING_BYTES + 16 * SLOT_BYTES:
            raise ConfigError(
                f"memory_limit: {limit} bytes leaves {ring_left} bytes for the ring after "
                f"prefetch ({prefetch}; explicit: {', '.join(explicit) or 'none'}); raise "
                "memory_limit or lower the prefetch settings"
            )
        if buffer.max_messages is not None:
            ring_messages = buffer.max_messages
            ring_bytes = ring_left - ring_messages * SLOT_BYTES
        else:
            ring_messages = _clamp(ring_left // (SLOT_BYTES + ASSUMED_MESSAGE_BYTES), 16, 4_000_000)
            ring_bytes = ring_left - ring_messages * SLOT_BYTES
        ring_bytes = min(ring_bytes, (1 << 31) - 1)
    else:
        ring_bytes = int(buffer.max_bytes)
        ring_messages = buffer.max_messages or _clamp(
            ring_bytes // ASSUMED_MESSAGE_BYTES, 16, 4_000_000
        )
    if ring_bytes < MIN_RING_BYTES:
        raise ConfigError(
            f"buffer.max_bytes: the ring would get {ring_bytes} bytes, below the minimum "
            f"{MIN_RING_BYTES}; raise memory_limit or lower buffer.max_messages"
        )
    ring = ring_bytes + ring_messages * SLOT_BYTES

    plan = MemoryPlan(
        limit=limit,
        reserve=reserve,
        batch_buffers=batch_buffers,
        batches_in_flight=batches_in_flight,
        dlq_queue=dlq_queue,
        prefetch=prefetch,
        fetch_max_bytes=fetch,
        queued_max_messages_kbytes=qkb,
        max_partition_fetch_bytes=mpf,
        queued_min_messages=qmin,
        partitions=partitions,
        ring=ring,
        ring_messages=ring_messages,
        ring_bytes=ring_bytes,
        explicit=tuple(explicit),
    )
    if plan.total > limit:
        over = [k for k in explicit] or ["memory_limit"]
        raise ConfigError(
            f"memory_limit: the plan needs {plan.total} bytes but the limit is {limit}; "
            f"the settings that do not fit: {', '.join(over)} "
            f"(prefetch {prefetch}, ring {ring}, batch buffers {batch_buffers}, "
            f"DLQ {dlq_queue}, reserve {reserve})"
        )
    return plan
