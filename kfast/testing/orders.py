"""The realistic order record used by the demo, the benchmarks and tests.

Ten fields of the shapes a real order stream has: a long id, a short
string, a double, an int, a boolean, a timestamp-millis, an enum, a
nullable string, an array of ints and a nested two-field record.
"""

from __future__ import annotations

import datetime as dt
import io
import random
from collections.abc import Iterator
from typing import Any

ORDER_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "namespace": "kfast.demo",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "customer", "type": "string"},
        {"name": "price", "type": "double"},
        {"name": "quantity", "type": "int"},
        {"name": "paid", "type": "boolean"},
        {"name": "created_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "status",
            "type": {
                "type": "enum",
                "name": "Status",
                "symbols": ["NEW", "PAID", "SHIPPED", "CANCELLED"],
            },
        },
        {"name": "coupon", "type": ["null", "string"], "default": None},
        {"name": "items", "type": {"type": "array", "items": "int"}},
        {
            "name": "address",
            "type": {
                "type": "record",
                "name": "Address",
                "fields": [
                    {"name": "city", "type": "string"},
                    {"name": "zip", "type": "string"},
                ],
            },
        },
    ],
}

# PostgreSQL table for the order record (nested fields flattened with "_").
# The CHECK constraint is what the demo's poison rows violate.
ORDER_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id bigint PRIMARY KEY,
    customer text NOT NULL,
    price double precision NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    paid boolean NOT NULL,
    created_at timestamptz NOT NULL,
    status text NOT NULL,
    coupon text,
    items integer[] NOT NULL,
    address_city text NOT NULL,
    address_zip text NOT NULL
)
"""

_CITIES = ["Baku", "Istanbul", "Berlin", "Lisbon", "Osaka", "Lima", "Oslo", "Accra"]
_EPOCH_MS = int(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)


def make_order(i: int, rng: random.Random, *, violate: bool = False) -> dict[str, Any]:
    """Order number ``i``; ``violate`` makes ``quantity`` break the CHECK."""
    return {
        "id": i,
        "customer": f"c{rng.randrange(100_000):05d}",
        "price": round(rng.uniform(1, 500), 2),
        "quantity": -rng.randrange(1, 5) if violate else rng.randrange(1, 20),
        "paid": rng.random() < 0.8,
        "created_at": dt.datetime.fromtimestamp(
            (_EPOCH_MS + rng.randrange(86_400_000 * 30)) / 1000, tz=dt.timezone.utc
        ),
        "status": rng.choice(["NEW", "PAID", "SHIPPED", "CANCELLED"]),
        "coupon": f"SAVE{rng.randrange(50)}" if rng.random() < 0.2 else None,
        "items": [rng.randrange(10_000) for _ in range(rng.randrange(1, 6))],
        "address": {"city": rng.choice(_CITIES), "zip": f"{rng.randrange(100_000):05d}"},
    }


def iter_orders(n: int, seed: int = 7, start: int = 0) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(start, start + n):
        yield make_order(i, rng)


def encode(record: dict[str, Any], schema: Any = None) -> bytes:
    """One record as a schemaless Avro payload (fastavro is the reference)."""
    import fastavro

    parsed = schema if schema is not None else _parsed_order_schema()
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def encode_orders(n: int, seed: int = 7) -> list[bytes]:
    parsed = _parsed_order_schema()
    return [encode(r, parsed) for r in iter_orders(n, seed)]


_PARSED: Any = None


def _parsed_order_schema() -> Any:
    global _PARSED
    if _PARSED is None:
        import fastavro

        _PARSED = fastavro.parse_schema(ORDER_SCHEMA)
    return _PARSED
