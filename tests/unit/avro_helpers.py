"""Helpers shared by the Avro tests: write with fastavro, read back both ways."""

from __future__ import annotations

import io
from typing import Any

import fastavro
from _wire import zigzag  # noqa: F401 - re-exported to the Avro tests


def parsed(schema: Any) -> Any:
    return fastavro.parse_schema(schema, _write_hint=False)


def encode(schema: Any, record: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed(schema), record)
    return buf.getvalue()


def reference(payload: bytes, writer: Any, reader: Any = None) -> Any:
    """What fastavro returns for one payload (the oracle)."""
    w = parsed(writer)
    r = parsed(reader) if reader is not None else None
    return fastavro.schemaless_reader(io.BytesIO(payload), w, r)
