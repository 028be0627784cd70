"""How a Batch's flat columns compose into one row (used by ``to_pylist``).

Decoders describe their output with these nodes; the Batch walks them to
rebuild Python values column by column. Column numbers index ``Batch.names``.

``ValueNode.conv`` names the Python conversion applied to the stored
physical value, so ``to_pylist`` matches the reference decoders:

=====================  ==================  ==========================================
conv                   column kind         Python value
=====================  ==================  ==========================================
``int``                INT32 / INT64       ``int``
``float``              FLOAT32 / FLOAT64   ``float``
``bool``               BOOL                ``bool``
``str``                BINARY (UTF-8)      ``str``
``bytes``              BINARY              ``bytes``
``enum``               INT32 index         ``arg[index]`` (symbol); out-of-range stays ``int``
``date``               INT32 days          ``datetime.date``
``time-millis``        INT32               ``datetime.time``
``time-micros``        INT64               ``datetime.time``
``timestamp-millis``   INT64               tz-aware UTC ``datetime``
``timestamp-micros``   INT64               tz-aware UTC ``datetime``
``timestamp-nanos``    INT64               as fastavro returns it (see docs/avro.md)
``local-timestamp-*``  INT64               naive ``datetime``
``decimal``            BINARY (two's c.)   ``decimal.Decimal``; ``arg`` = scale
``uuid``               BINARY              ``uuid.UUID``
``duration``           BINARY (12 bytes)   as fastavro returns it
``duration-micros``    INT64               ``datetime.timedelta`` (Protobuf Duration)
``null``               (no column)         ``None``
=====================  ==================  ==========================================

Kafka coordinate columns (``metadata_plan``, filled by the ring after
decoding): topic (BINARY ``str``), partition (INT32), offset (INT64),
timestamp (INT64 ``timestamp-millis``, null when the message has none), key
(BINARY ``bytes``, null for a null key) and headers (LIST of records
``{"key": str, "value": bytes or None}``, in message order, duplicates kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ValueNode:
    col: int
    conv: str
    arg: Any = None


@dataclass(frozen=True)
class ListNode:
    col: int  # LIST column
    item: Node


@dataclass(frozen=True)
class MapNode:
    col: int  # LIST column; its slots are the entries
    key: Node
    value: Node


@dataclass(frozen=True)
class RecordNode:
    fields: tuple[tuple[str, Node], ...]
    valid_col: int = -1  # STRUCT column giving presence of a nullable record, or -1


@dataclass(frozen=True)
class ObjectNode:
    col: int  # OBJECT column; values already converted to Python objects


Node = ValueNode | ListNode | MapNode | RecordNode | ObjectNode


# Kafka coordinates a batch can carry as ordinary columns (opt-in), and their
# default column names.
METADATA_FIELDS: dict[str, str] = {
    "topic": "kafka_topic",
    "partition": "kafka_partition",
    "offset": "kafka_offset",
    "timestamp": "kafka_timestamp",
    "key": "kafka_key",
    "headers": "kafka_headers",
}


def metadata_plan(metadata: Any) -> tuple[tuple[str, str], ...]:
    """``["topic", "offset"]`` or ``{"offset": "off", ...}`` -> ((field, column), ...)."""
    if not metadata:
        return ()
    if isinstance(metadata, str):
        raise TypeError("metadata: a list of fields or a {field: column name} dict, not a str")
    items = metadata.items() if isinstance(metadata, dict) else ((f, None) for f in metadata)
    plan = []
    for fld, name in items:
        if fld not in METADATA_FIELDS:
            raise ValueError(f"metadata: unknown field {fld!r}; known: {list(METADATA_FIELDS)}")
        plan.append((fld, str(name) if name else METADATA_FIELDS[fld]))
    names = [n for _, n in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"metadata: duplicate column names {names}")
    return tuple(plan)
