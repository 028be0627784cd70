"""The type map: which PostgreSQL column types each batch value can be written to, and how.

Keys of :data:`SCALAR` are ``(conv, storage kind)`` of a batch value; values map an accepted
``pg_type.typname`` to the encoder op (``kfast/sinks/_pgcopy.pyx``) that writes it. The first
accepted type is what ``create_table`` uses. Values without a fast path (records mapped to one
column, nested maps/lists, OBJECT columns) are encoded to JSON here, on the slow path.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import uuid
from typing import Any

__all__ = ["JSON_SCALAR_OPS", "SCALAR", "allowed_types", "json_bytes", "scalar_op", "sql_type_name"]

_TEXT = ("text", "varchar", "bpchar")
_TS = ("timestamptz", "timestamp")
_LTS = ("timestamp", "timestamptz")
SCALAR: dict[tuple[str, str], dict[str, str]] = {
    ("int", "INT32"): {"int4": "int4", "int8": "int8_i32"},
    ("int", "INT64"): {"int8": "int8"},
    ("uint32", "INT32"): {"int8": "u32_int8"},
    ("uint64", "INT64"): {"numeric": "u64_numeric", "int8": "u64_int8"},
    ("float", "FLOAT32"): {"float4": "float4", "float8": "float8_f32"},
    ("float", "FLOAT64"): {"float8": "float8"},
    ("bool", "BOOL"): {"bool": "bool"},
    ("str", "BINARY"): {**{t: "bytes" for t in _TEXT}, "uuid": "uuid"},
    ("bytes", "BINARY"): {"bytea": "bytes"},
    ("enum", "INT32"): {t: "enum" for t in _TEXT},
    ("decimal", "BINARY"): {"numeric": "numeric"},
    ("uuid", "BINARY"): {"uuid": "uuid"},
    ("date", "INT32"): {"date": "date"},
    ("time-millis", "INT32"): {"time": "time_ms"},
    ("time-micros", "INT64"): {"time": "time_us"},
    ("timestamp-millis", "INT64"): {t: "ts_ms" for t in _TS},
    ("timestamp-micros", "INT64"): {t: "ts_us" for t in _TS},
    ("timestamp-nanos", "INT64"): {t: "ts_ns" for t in _TS},
    ("local-timestamp-millis", "INT64"): {t: "ts_ms" for t in _LTS},
    ("local-timestamp-micros", "INT64"): {t: "ts_us" for t in _LTS},
    ("local-timestamp-nanos", "INT64"): {t: "ts_ns" for t in _LTS},
    ("duration-micros", "INT64"): {"interval": "interval_us"},
}
# Ops the encoder can write as the value of a jsonb map (the C fast path for maps).
JSON_SCALAR_OPS = frozenset(
    {
        "u32_int8",
        "u64_numeric",
        "int4",
        "int8_i32",
        "int8",
        "float4",
        "float8",
        "float8_f32",
        "bool",
        "bytes",
        "enum",
    }
)
_SCALAR_OP = {
    ("int", "INT32"): "int4",
    ("int", "INT64"): "int8",
    ("float", "FLOAT32"): "float4",
    ("float", "FLOAT64"): "float8",
    ("bool", "BOOL"): "bool",
    ("str", "BINARY"): "bytes",
    ("enum", "INT32"): "enum",
    ("uint32", "INT32"): "u32_int8",
    ("uint64", "INT64"): "u64_numeric",
}
_PG_SQL_NAME = {
    "int4": "integer",
    "int8": "bigint",
    "float4": "real",
    "float8": "double precision",
    "timestamptz": "timestamp with time zone",
    "timestamp": "timestamp without time zone",
    "time": "time without time zone",
    "varchar": "character varying",
    "bpchar": "character",
}


def sql_type_name(typname: str) -> str:
    """The SQL spelling of a ``pg_type.typname`` (``_int8`` -> ``bigint[]``)."""
    if typname.startswith("_"):
        return sql_type_name(typname[1:]) + "[]"
    return _PG_SQL_NAME.get(typname, typname)


def allowed_types(conv: str, kind: str) -> dict[str, str]:
    """``{typname: encoder op}`` accepted for a value of this conv and storage kind."""
    return SCALAR.get((conv, kind), {})


def scalar_op(conv: str, kind: str) -> str:
    """The op writing this value inside a jsonb map ("" when there is none)."""
    return _SCALAR_OP.get((conv, kind), "")


def _json_default(o: Any) -> Any:
    if isinstance(o, decimal.Decimal):
        return str(o)
    if isinstance(o, (datetime.datetime, datetime.date, datetime.time)):
        return o.isoformat()
    if isinstance(o, uuid.UUID):
        return str(o)
    if isinstance(o, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(o)).decode("ascii")
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _json_clean(o: Any) -> Any:
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {str(k): _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    return o


def json_bytes(value: Any, binary_jsonb: bool) -> bytes | None:
    """``value`` as the COPY bytes of a json (or binary jsonb: version byte 1) column."""
    if value is None:
        return None
    text = json.dumps(
        _json_clean(value),
        default=_json_default,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()
    return b"\x01" + text if binary_jsonb else text
