"""The dead-letter record: original key and value untouched, ``kfast.*`` headers added."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["HEADER_PREFIX", "DeadLetter", "dlq_headers"]

HEADER_PREFIX = "kfast."


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
