"""Shared helpers of the sink/DLQ integration tests (area: sink)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import fastavro

import kfast
from kfast.dlq import DeadLetter
from kfast.sinks import BatchContext, ListRecordSource
from kfast.sinks.postgres import PostgresSink

ORDER_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "customer", "type": "string"},
        {"name": "qty", "type": "int"},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2},
        },
    ],
}


def avro_payloads(schema: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[bytes]:
    parsed = fastavro.parse_schema(schema)
    out = []
    for r in records:
        bio = io.BytesIO()
        fastavro.schemaless_writer(bio, parsed, r)
        out.append(bio.getvalue())
    return out


def make_batch(
    schema: dict[str, Any],
    payloads: Sequence[bytes],
    *,
    topic: str = "orders",
    partition: int = 0,
    base_offset: int = 0,
    group: str = "g",
    keys: Sequence[bytes | None] | None = None,
) -> Any:
    """Decode ``payloads`` and attach a BatchContext as the runtime would."""
    batch = kfast.AvroDecoder(schema).decode(list(payloads))
    recs = [
        {
            "topic": topic,
            "partition": partition,
            "offset": base_offset + i,
            "timestamp": 1_700_000_000_000 + i,
            "key": keys[i] if keys is not None else f"k{base_offset + i}".encode(),
            "value": p,
            "headers": [("trace", f"t{i}".encode())],
        }
        for i, p in enumerate(payloads)
    ]
    nxt = {(topic, partition): base_offset + len(payloads)} if payloads else {}
    batch.context = BatchContext(ListRecordSource(recs), nxt, group)
    return batch


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    """Read ``expected`` messages of ``topic`` from the beginning (real broker)."""
    import time

    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
        }
    )
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error() is not None:
                continue
            out.append(m)
        # Make sure nothing unexpected follows.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


class CountingSink(PostgresSink):
    """A PostgresSink that counts its writes, row transactions and their COPYs.

    ``client_check=False`` (the default here) leaves every rule to the server, so that
    rows a client-side check would find still exercise the server-side isolation paths."""

    def __init__(
        self, *args: Any, wrap: Any = None, client_check: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._client_check = client_check
        self.writes = 0
        self.txns: list[Any] = []
        self.wrap = wrap  # optional proxy factory around each RowTransaction

    def write(self, batch: Any) -> None:
        self.writes += 1
        super().write(batch)

    def row_transaction(self, batch: Any) -> Any:
        txn = super().row_transaction(batch)
        if txn is None:
            return None
        self.txns.append(txn)
        return self.wrap(txn) if self.wrap is not None else txn

    @property
    def copies(self) -> int:
        """COPY statements: the plain writes plus every COPY of the row transactions."""
        return self.writes + sum(t.statements for t in self.txns)


class TxnProxy:
    """Wraps the sink's row transaction (``CountingSink(wrap=...)``); subclasses override
    the calls they observe or distort and delegate the rest."""

    def __init__(self, txn: Any) -> None:
        self.txn = txn

    def __enter__(self) -> Any:
        self.txn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.txn.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.txn, name)


class CapturingQueue:
    """Stands in for the DLQ producer: keeps the records, counts confirmations."""

    def __init__(self) -> None:
        self.records: list[DeadLetter] = []
        self.confirmed = 0

    def produce(self, records: list[DeadLetter]) -> None:
        self.records.extend(records)

    def confirm(self, stop: Any = None) -> None:
        self.confirmed = len(self.records)

    def close(self) -> None:
        pass
