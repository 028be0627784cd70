"""PostgreSQL sink: binary COPY straight from the Batch's columns.

Modes
-----
* ``copy`` (default): ``COPY table (cols) FROM STDIN (FORMAT BINARY)``, one
  transaction per write.
* ``upsert``: COPY into a per-connection TEMP staging table, then
  ``INSERT ... SELECT DISTINCT ON (key) ... ORDER BY key, seq DESC
  ON CONFLICT (key) DO UPDATE``: duplicate keys inside a batch collapse to
  the last row (rows are in consumption order, so the last offset wins).
* ``exactly_once``: the rows (COPY, or the upsert path when ``key`` is given)
  and one ``kfast_offsets(group_id, topic, partition, next_offset)`` row per
  partition from ``batch.context.next_offsets`` are committed in one
  transaction. ``stored_offsets(group_id, topics)`` returns what the runtime
  seeks to on assignment.

Errors are classified by SQLSTATE class only (see :func:`classify`).

The table is introspected at ``open()`` (names, types, NOT NULL/defaults).
The batch layout is only known when the first batch arrives: the encoding
plan is built then and every mismatch is a ``ConfigError`` naming the
column. DDL (``create_table``, ``kfast_offsets``, the TEMP staging table)
runs before any row is written, in its own transaction, never inside a
data transaction.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from kfast._layout import ListNode, MapNode, RecordNode, ValueNode
from kfast.errors import (
    ConfigError,
    KfastError,
    PermanentSinkError,
    SinkError,
    TransientSinkError,
)
from kfast.sinks import PipelineInfo
from kfast.sinks._pgcopy import KIND_NAMES, CopyEncoder, EncodeError, column_kinds, pre_values

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = [
    "PostgresSink",
    "RowTransaction",
    "classify",
    "TRANSIENT_CLASSES",
    "PERMANENT_CLASSES",
    "CONFIG_CLASSES",
]

MODES = ("copy", "upsert", "exactly_once")

# SQLSTATE classes (first two characters), PostgreSQL Appendix A.
TRANSIENT_CLASSES = frozenset(
    {
        "08",  # connection exception
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: admin shutdown, crash shutdown, cannot connect now
        "58",  # system error (I/O error)
        "25",  # invalid transaction state: read-only transaction after a failover
        "55",  # object not in prerequisite state: lock not available
        "XX",  # internal error: the server's problem, bounded by the retry deadline
    }
)
PERMANENT_CLASSES = frozenset(
    {
        "22",  # data exception: out of range, invalid text, bad encoding
        "23",  # integrity constraint violation: unique, not null, check, FK
        "21",  # cardinality violation
        "44",  # WITH CHECK OPTION violation
        "54",  # program limit exceeded (row too big)
        "P0",  # PL/pgSQL raise (a trigger rejecting rows)
        "38",  # external routine exception (trigger)
        "39",  # external routine invocation exception (trigger)
    }
)
CONFIG_CLASSES = frozenset(
    {
        "42",  # syntax error or access rule violation: undefined column, permission denied
        "28",  # invalid authorization specification
        "3D",  # invalid catalog name (database does not exist)
        "3F",  # invalid schema name
        "0A",  # feature not supported
    }
)


def classify(exc: BaseException) -> KfastError:
    """Map a psycopg error to a kfast error by SQLSTATE class.

    08/40/53/57/58 (and 25, 55, XX) are transient; 22/23 (and 21, 44, 54,
    P0, 38, 39) are permanent for the rows involved; 42 (and 28, 3D, 3F, 0A)
    are configuration errors. An error without SQLSTATE from the connection
    layer (``OperationalError``/``InterfaceError``: connection refused or
    lost) is transient. Any other class is treated as transient: retrying is
    bounded by the RetryPolicy deadline, after which the pipeline stops
    without committing, so nothing is lost or dead-lettered by guess.
    """
    if isinstance(exc, KfastError):
        return exc
    state = getattr(exc, "sqlstate", None)
    msg = f"{type(exc).__name__}: {str(exc).strip()}"
    out: KfastError
    if not state:
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, OSError)):
            out = TransientSinkError(msg, sqlstate=None)
        elif isinstance(exc, psycopg.DataError):
            out = PermanentSinkError(msg, sqlstate=None)
        else:
            out = TransientSinkError(msg, sqlstate=None)
    else:
        cls = state[:2]
        if cls in PERMANENT_CLASSES:
            out = PermanentSinkError(msg, sqlstate=state)
        elif cls in CONFIG_CLASSES:
            out = ConfigError(f"{msg} (SQLSTATE {state})")
            out.sqlstate = state  # type: ignore[attr-defined]
        else:
            out = TransientSinkError(msg, sqlstate=state)
    out.__cause__ = exc
    return out


# Locator classes: data exceptions and integrity violations are raised for one row of a COPY.
_LOCATOR_CLASSES = frozenset({"22", "23"})
# Errors a row raises on its own, whatever else the table or the batch holds: data exceptions
# (class 22: binary input, typmod overflow, expressions of CHECK constraints and generated
# columns), NOT NULL (23502) and CHECK (23514: also domain checks and partition routing). Only
# triggers can make them depend on other rows, so a table with user triggers has none.
# Unique, foreign key and exclusion violations (23505, 23503, 23P01) depend on other rows.
_ROW_ONLY_CLASSES = frozenset({"22"})
_ROW_ONLY_STATES = frozenset({"23502", "23514"})
_SAVEPOINT = "kfast_rows"
_PROBE_TABLE = "kfast_probe"
_INTEGER = re.compile(r"(?<![\w.])\d+(?![\w.])")


def copy_row_hint(exc: BaseException, ranges: Sequence[tuple[int, int]]) -> int | None:
    """Index (in the written batch) of the COPY row PostgreSQL blamed, or None.

    A locator only, never a classifier: ``exc.diag.context`` of a failed COPY
    reads e.g. ``COPY orders, line 1234`` (possibly translated), the COPY
    context being the outermost, i.e. last, line. The hint is given only for
    SQLSTATE classes 22/23 when exactly one standalone integer of that line
    is a plausible line number (1..rows copied); ``ranges`` are the batch row
    ranges the COPY streamed, in order, so line ``L`` is the ``L``-th row of
    their concatenation. The delivery layer confirms the hint by writing that
    row alone, so a wrong hint costs writes, never correctness.
    """
    state = getattr(exc, "sqlstate", None)
    if not state or state[:2] not in _LOCATOR_CLASSES:
        return None
    diag = getattr(exc, "diag", None)
    context = getattr(diag, "context", None) if diag is not None else None
    if not isinstance(context, str):
        return None
    lines = [line for line in context.splitlines() if line.strip()]
    if not lines:
        return None
    total = sum(b - a for a, b in ranges)
    found = {int(m) for m in _INTEGER.findall(lines[-1])}
    plausible = [v for v in found if 1 <= v <= total]
    if len(plausible) != 1:
        return None
    idx = plausible[0] - 1
    for a, b in ranges:
        if idx < b - a:
            return a + idx
        idx -= b - a
    return None  # pragma: no cover - total bounds idx


# ------------------------------------------------------------------ type mapping

# PostgreSQL type names accepted for each source, first one is what
# create_table uses. Keys: (conv, storage kind).
_TEXT = ("text", "varchar", "bpchar")
_TS = ("timestamptz", "timestamp")
_LTS = ("timestamp", "timestamptz")
_SCALAR: dict[tuple[str, str], dict[str, str]] = {
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
}
_JSON_SCALAR_OPS = {
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


def _sql_type_name(typname: str) -> str:
    if typname.startswith("_"):
        return _sql_type_name(typname[1:]) + "[]"
    return _PG_SQL_NAME.get(typname, typname)


@dataclass
class TableColumn:
    name: str
    typname: str  # pg_type.typname ("int4", "_text", ...)
    elem_typname: str | None
    elem_oid: int
    not_null: bool
    has_default: bool
    display: str  # format_type()


@dataclass
class _Source:
    """One output value of the batch layout (a leaf after flattening)."""

    path: tuple[str, ...]
    node: Any
    valid: tuple[int, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def _scale(node: ValueNode) -> int:
    """Decimal scale from a ValueNode's arg: ``scale`` or ``(precision, scale)``."""
    if node.conv != "decimal":
        return 0
    arg = node.arg
    if isinstance(arg, (tuple, list)):
        return int(arg[-1] or 0)
    return int(arg or 0)


def _describe(src: _Source, kinds: Sequence[int]) -> str:
    node = src.node
    if isinstance(node, ValueNode):
        kind = KIND_NAMES.get(kinds[node.col], "?")
        extra = f"(scale={_scale(node)})" if node.conv == "decimal" else ""
        return f"{node.conv}{extra} [{kind}]"
    if isinstance(node, ListNode):
        return "array"
    if isinstance(node, MapNode):
        return "map"
    if isinstance(node, RecordNode):
        return "record"
    return "object"


def _flatten(
    node: RecordNode,
    columns: Mapping[str, str | None],
    prefix: tuple[str, ...] = (),
    valid: tuple[int, ...] = (),
) -> list[_Source]:
    out: list[_Source] = []
    for name, child in node.fields:
        path = (*prefix, name)
        if isinstance(child, RecordNode) and ".".join(path) not in columns:
            v = valid + ((child.valid_col,) if child.valid_col >= 0 else ())
            out.extend(_flatten(child, columns, path, v))
        elif isinstance(child, ValueNode) and child.col < 0:
            continue  # Avro "null" type: nothing stored
        else:
            out.append(_Source(path, child, valid))
    return out


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


def _json_bytes(value: Any, binary_jsonb: bool) -> bytes | None:
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


@dataclass
class Plan:
    """How one batch layout maps onto the table."""

    entries: list[dict[str, Any]]
    columns: list[str]  # target column names, COPY order
    sources: list[_Source]
    pre: list[tuple[int, Any, bool]] = field(default_factory=list)  # (slot, node, jsonb?)


class PostgresSink:
    """Writes batches to one PostgreSQL table with binary COPY.

    ``columns`` maps dotted batch field paths to table column names
    (``{"address.city": "city"}``); mapping a path to ``None`` skips the
    field; mapping a nested record's path writes the whole record as one
    jsonb column. Unmapped nested fields are flattened with ``_``.
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        mode: str = "copy",
        key: str | Sequence[str] | None = None,
        columns: Mapping[str, str | None] | None = None,
        create_table: bool = False,
        connections: int = 1,
        *,
        offsets_table: str = "kfast_offsets",
        chunk_bytes: int = 128 << 10,
        connect_timeout: float = 10.0,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ConfigError("PostgresSink.dsn must be a non-empty connection string")
        if not isinstance(table, str) or not table:
            raise ConfigError("PostgresSink.table must be a non-empty table name")
        if mode not in MODES:
            raise ConfigError(f"PostgresSink.mode must be one of {', '.join(MODES)}, got {mode!r}")
        keys: tuple[str, ...] = ()
        if key is not None:
            keys = (key,) if isinstance(key, str) else tuple(key)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ConfigError(
                    "PostgresSink.key must be a column name or a non-empty list of names"
                )
        if mode == "upsert" and not keys:
            raise ConfigError(
                "PostgresSink.key is required when mode='upsert' (the ON CONFLICT target)"
            )
        if (
            isinstance(connections, bool)
            or not isinstance(connections, int)
            or not 1 <= connections <= 64
        ):
            raise ConfigError(
                f"PostgresSink.connections must be an int in [1, 64], got {connections!r}"
            )
        if connections > 1 and mode != "copy":
            raise ConfigError(
                "PostgresSink.connections > 1 is only allowed with mode='copy' "
                "(upsert and exactly_once need one transaction per batch)"
            )
        if not 4096 <= chunk_bytes <= 64 << 20:
            raise ConfigError(
                f"PostgresSink.chunk_bytes must be in [4096, 64MiB], got {chunk_bytes!r}"
            )
        self.dsn = dsn
        self.table = table
        self.mode = mode
        self.key = keys
        self.columns: dict[str, str | None] = dict(columns or {})
        self.create_table = bool(create_table)
        self.connections = connections
        self.offsets_table = offsets_table
        self.chunk_bytes = chunk_bytes
        self.connect_timeout = connect_timeout
        self.group_id: str | None = None
        self._conns: list[psycopg.Connection[Any] | None] = [None] * connections
        self._staged: set[int] = set()  # id() of connections that hold the staging table
        # id() of a connection -> it holds the probe table (False: it could not create one)
        self._probe_tables: dict[int, bool] = {}
        self._table_cols: dict[str, TableColumn] | None = None
        self._table_ident: sql.Composable | None = None
        self._table_oid: int | None = None
        self._plan: Plan | None = None
        self._plan_layout: Any = None
        self._encoders: list[CopyEncoder] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._copying: list[tuple[int, int]] | None = None  # ranges of the COPY in progress
        self._opened = False
        self.fenced_rows = 0  # exactly_once: rows skipped because their offset was already stored

    @property
    def stores_offsets(self) -> bool:
        """True in exactly_once mode: writes store ``batch.context.next_offsets``."""
        return self.mode == "exactly_once"

    def __repr__(self) -> str:
        return (
            f"PostgresSink(table={self.table!r}, mode={self.mode!r}, key={list(self.key) or None})"
        )

    # ------------------------------------------------------------ connections

    def _connect(self, i: int = 0) -> psycopg.Connection[Any]:
        conn = self._conns[i]
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._drop(i)
        try:
            conn = psycopg.connect(self.dsn, autocommit=False, **self._conn_params())
        except psycopg.Error as exc:
            raise classify(exc) from exc
        self._conns[i] = conn
        return conn

    def _conn_params(self) -> dict[str, Any]:
        """libpq settings kfast needs, unless the DSN sets them: a bounded connect, TCP
        keepalives and a TCP user timeout, so a silently dead server surfaces as a
        (transient) connection error instead of a write that blocks forever."""
        given = psycopg.conninfo.conninfo_to_dict(self.dsn)
        wanted: dict[str, Any] = {
            "connect_timeout": max(1, int(self.connect_timeout)),
            "application_name": "kfast",
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": 60_000,
        }
        return {k: v for k, v in wanted.items() if k not in given}

    def _drop(self, i: int) -> None:
        conn = self._conns[i]
        self._conns[i] = None
        if conn is not None:
            self._staged.discard(id(conn))
            self._probe_tables.pop(id(conn), None)
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken socket
                pass

    def _fail(self, i: int, exc: BaseException) -> KfastError:
        err = classify(exc)
        if isinstance(err, TransientSinkError):
            self._drop(i)  # reconnect on the next attempt
        else:
            self._rollback(i)
        return err

    def _rollback(self, i: int) -> None:
        """Roll back connection ``i``'s transaction; drop the connection if that fails."""
        conn = self._conns[i]
        if conn is None or conn.broken:
            self._drop(i)
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._drop(i)

    # ------------------------------------------------------------ open / introspection

    def open(self, pipeline_info: PipelineInfo | None = None) -> None:
        """Connect, introspect the table, create kfast_offsets (exactly_once)."""
        if pipeline_info is not None:
            self.group_id = pipeline_info.group_id
        conn = self._connect(0)
        try:
            self._introspect(conn)
            if self.mode == "exactly_once":
                self._create_offsets_table(conn)
            conn.commit()
        except psycopg.Error as exc:
            raise self._fail(0, exc) from exc
        self._opened = True

    def _introspect(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "SELECT c.oid, n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            (self.table,),
        ).fetchone()
        if row is None:
            if self.create_table:
                self._table_cols = None  # created when the first batch shows the layout
                parts = self.table.split(".")
                self._table_ident = sql.Identifier(*parts)
                return
            raise ConfigError(
                f"PostgresSink.table: table {self.table!r} does not exist "
                "(create it, or pass create_table=True)"
            )
        oid, nsp, rel = row
        self._table_ident = sql.Identifier(nsp, rel)
        self._table_oid = int(oid)
        rows = conn.execute(
            "SELECT a.attname, t.typname, et.typname, COALESCE(et.oid, 0), a.attnotnull, "
            "a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '', "
            "format_type(a.atttypid, a.atttypmod), t.typtype, bt.typname "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' "
            "LEFT JOIN pg_type bt ON bt.oid = t.typbasetype "
            "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (oid,),
        ).fetchall()
        cols: dict[str, TableColumn] = {}
        for name, typ, etyp, eoid, notnull, hasdef, display, typtype, basetyp in rows:
            if typtype == "d" and basetyp:  # a domain: encode as its base type
                typ = basetyp
            cols[name] = TableColumn(
                name, typ, etyp, int(eoid), bool(notnull), bool(hasdef), display
            )
        self._table_cols = cols
        for path, target in self.columns.items():
            if target is not None and target not in cols:
                raise ConfigError(
                    f"PostgresSink.columns maps {path!r} to column {target!r}, "
                    f"which table {self.table} does not have (columns: {', '.join(cols)})"
                )
        for k in self.key:
            if k not in cols:
                raise ConfigError(
                    f"PostgresSink.key: column {k!r} does not exist in table {self.table}"
                )

    def _create_offsets_table(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (group_id text NOT NULL, topic text NOT NULL, "
                "partition integer NOT NULL, next_offset bigint NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (group_id, topic, partition))"
            ).format(sql.Identifier(*self.offsets_table.split(".")))
        )

    # ------------------------------------------------------------ plan

    def _target_name(self, src: _Source) -> str | None:
        dotted = src.dotted
        if dotted in self.columns:
            return self.columns[dotted]
        return "_".join(src.path)

    def _build_plan(self, batch: Batch) -> Plan:
        kinds = column_kinds(batch)
        layout = batch.layout
        if not isinstance(layout, RecordNode):
            raise ConfigError(f"PostgresSink needs record rows, got layout {type(layout).__name__}")
        sources = _flatten(layout, self.columns)
        known = {s.dotted for s in sources}
        for path in self.columns:
            prefix_ok = any(k == path or k.startswith(path + ".") for k in known)
            if not prefix_ok and not self._is_record_path(layout, path):
                raise ConfigError(
                    f"PostgresSink.columns names batch field {path!r}, which the batch does not have "
                    f"(fields: {', '.join(sorted(known))})"
                )
        if self._table_cols is None:
            self._create_table(batch, sources, kinds)
        cols = self._table_cols
        assert cols is not None
        entries: list[dict[str, Any]] = []
        names: list[str] = []
        used: list[_Source] = []
        pre: list[tuple[int, Any, bool]] = []
        for src in sources:
            target = self._target_name(src)
            if target is None:
                continue
            tc = cols.get(target)
            if tc is None:
                raise ConfigError(
                    f"batch field {src.dotted!r} ({_describe(src, kinds)}) has no column {target!r} "
                    f"in table {self.table}; add the column, or map/skip it with "
                    f"columns={{{src.dotted!r}: ...}}"
                )
            if target in names:
                raise ConfigError(
                    f"two batch fields map to column {target!r} of table {self.table}"
                )
            entry = self._entry(src, tc, kinds)
            if entry["op"] == "pre":
                entry["slot"] = len(pre)
                pre.append((len(pre), src, tc.typname == "jsonb"))
            entries.append(entry)
            names.append(target)
            used.append(src)
        missing = [
            c.name
            for c in cols.values()
            if c.name not in names and c.not_null and not c.has_default
        ]
        if missing:
            raise ConfigError(
                f"table {self.table} column {missing[0]!r} is NOT NULL without a default and no batch "
                "field maps to it (map one with columns={...})"
            )
        for k in self.key:
            if k not in names:
                raise ConfigError(f"PostgresSink.key column {k!r} is not written by the batch")
        return Plan(entries, names, used, pre)

    @staticmethod
    def _is_record_path(layout: RecordNode, path: str) -> bool:
        node: Any = layout
        for part in path.split("."):
            if not isinstance(node, RecordNode):
                return False
            node = dict(node.fields).get(part)
            if node is None:
                return False
        return isinstance(node, RecordNode)

    def _entry(self, src: _Source, tc: TableColumn, kinds: Sequence[int]) -> dict[str, Any]:
        node = src.node
        valid = list(src.valid)

        def mismatch(expected: Sequence[str]) -> ConfigError:
            exp = ", ".join(_sql_type_name(t) for t in expected) or "a supported type"
            return ConfigError(
                f"column {tc.name!r} of table {self.table} has type {tc.display}, but batch field "
                f"{src.dotted!r} is {_describe(src, kinds)}; expected {exp}"
            )

        if tc.typname in ("jsonb", "json") and not (
            isinstance(node, ValueNode) and node.conv == "str"
        ):
            if isinstance(node, MapNode) and tc.typname == "jsonb" and self._fast_map(node, kinds):
                mkey, mval = node.key, node.value
                assert isinstance(mkey, ValueNode) and isinstance(mval, ValueNode)
                return {
                    "op": "map_jsonb",
                    "col": node.col,
                    "child": mkey.col,
                    "child2": mval.col,
                    "elem_op": self._scalar_op(mval, kinds),
                    "symbols": mval.arg if mval.conv == "enum" else None,
                    "valid": valid,
                }
            if isinstance(node, ValueNode):
                raise mismatch(self._allowed(node, kinds))
            return {"op": "pre", "valid": valid}
        if isinstance(node, ValueNode):
            allowed = _SCALAR.get((node.conv, KIND_NAMES.get(kinds[node.col], "?")), {})
            if node.conv == "str" and tc.typname == "jsonb":
                return {"op": "jsonb_str", "col": node.col, "valid": valid}
            op = allowed.get(tc.typname)
            if op is None:
                raise mismatch(list(allowed))
            return {
                "op": op,
                "col": node.col,
                "scale": _scale(node),
                "symbols": node.arg if node.conv == "enum" else None,
                "valid": valid,
            }
        if isinstance(node, ListNode) and isinstance(node.item, ValueNode) and node.item.col >= 0:
            item = node.item
            allowed = _SCALAR.get((item.conv, KIND_NAMES.get(kinds[item.col], "?")), {})
            if tc.elem_typname is None or tc.elem_typname not in allowed:
                raise mismatch(["_" + t for t in allowed] + ["jsonb"])
            return {
                "op": "array",
                "col": node.col,
                "child": item.col,
                "elem_op": allowed[tc.elem_typname],
                "elem_oid": tc.elem_oid,
                "scale": _scale(item),
                "symbols": item.arg if item.conv == "enum" else None,
                "valid": valid,
            }
        raise mismatch(["jsonb"])

    @staticmethod
    def _allowed(node: ValueNode, kinds: Sequence[int]) -> list[str]:
        return list(_SCALAR.get((node.conv, KIND_NAMES.get(kinds[node.col], "?")), {}))

    @staticmethod
    def _scalar_op(node: ValueNode, kinds: Sequence[int]) -> str:
        kind = KIND_NAMES.get(kinds[node.col], "?")
        return {
            ("int", "INT32"): "int4",
            ("int", "INT64"): "int8",
            ("float", "FLOAT32"): "float4",
            ("float", "FLOAT64"): "float8",
            ("bool", "BOOL"): "bool",
            ("str", "BINARY"): "bytes",
            ("enum", "INT32"): "enum",
            ("uint32", "INT32"): "u32_int8",
            ("uint64", "INT64"): "u64_numeric",
        }.get((node.conv, kind), "")

    def _fast_map(self, node: MapNode, kinds: Sequence[int]) -> bool:
        k, v = node.key, node.value
        return (
            isinstance(k, ValueNode)
            and k.col >= 0
            and k.conv == "str"
            and isinstance(v, ValueNode)
            and v.col >= 0
            and self._scalar_op(v, kinds) in _JSON_SCALAR_OPS
        )

    def _default_type(self, src: _Source, kinds: Sequence[int]) -> str:
        node = src.node
        if isinstance(node, ValueNode):
            allowed = self._allowed(node, kinds)
            if not allowed:
                raise ConfigError(
                    f"create_table: batch field {src.dotted!r} ({_describe(src, kinds)}) has no "
                    "PostgreSQL mapping"
                )
            return _sql_type_name(allowed[0])
        if isinstance(node, ListNode) and isinstance(node.item, ValueNode) and node.item.col >= 0:
            allowed = self._allowed(node.item, kinds)
            if allowed:
                return _sql_type_name(allowed[0]) + "[]"
        return "jsonb"

    def _create_table(self, batch: Batch, sources: list[_Source], kinds: Sequence[int]) -> None:
        defs = []
        for src in sources:
            target = self._target_name(src)
            if target is None:
                continue
            defs.append(
                sql.SQL("{} {}").format(
                    sql.Identifier(target), sql.SQL(self._default_type(src, kinds))
                )
            )
        if self.key:
            defs.append(
                sql.SQL("PRIMARY KEY ({})").format(
                    sql.SQL(", ").join(map(sql.Identifier, self.key))
                )
            )
        assert self._table_ident is not None
        stmt = sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
            self._table_ident, sql.SQL(", ").join(defs)
        )
        conn = self._connect(0)
        try:
            conn.execute(stmt)
            conn.commit()
            self._introspect(conn)
            conn.commit()
        except psycopg.Error as exc:
            raise self._fail(0, exc) from exc

    def _ensure_plan(self, batch: Batch) -> Plan:
        layout = batch.layout
        if self._plan is not None and (layout is self._plan_layout or layout == self._plan_layout):
            return self._plan
        if not self._opened:
            ctx = getattr(batch, "context", None)
            if self.group_id is None and ctx is not None:
                self.group_id = ctx.group_id
            self.open(None)
        plan = self._build_plan(batch)
        try:
            self._encoders = [
                CopyEncoder(self._encoder_entries(plan)) for _ in range(self.connections)
            ]
        except ValueError as exc:
            raise ConfigError(f"PostgresSink: cannot encode this layout: {exc}") from exc
        self._plan = plan
        self._plan_layout = layout
        self._staged.clear()
        self._probe_tables.clear()
        return plan

    def _encoder_entries(self, plan: Plan) -> list[dict[str, Any]]:
        entries = list(plan.entries)
        if self.key and self.mode in ("upsert", "exactly_once"):
            entries.append({"op": "rownum"})
        return entries

    # ------------------------------------------------------------ writes

    def write(self, batch: Batch) -> None:
        """Write every row of ``batch``; durable (committed) when it returns."""
        with self._lock:
            plan = self._ensure_plan(batch)
            pre = self._pre_encode(batch, plan)
            if self.connections > 1 and batch.num_rows >= 2 * self.connections:
                self._write_parallel(batch, plan, pre)
                return
            conn = self._connect(0)
            self._copying = None
            try:
                if self.mode == "copy":
                    self._copy(
                        conn,
                        self._encoders[0],
                        batch,
                        plan,
                        pre,
                        0,
                        batch.num_rows,
                        self._copy_sql(plan),
                    )
                elif self.mode == "upsert":
                    self._upsert(conn, batch, plan, pre)
                else:
                    ranges = self._fence(conn, batch)
                    if self.key:
                        self._upsert(conn, batch, plan, pre, ranges)
                    elif ranges:
                        self._copy_ranges(
                            conn, self._encoders[0], batch, plan, pre, ranges, self._copy_sql(plan)
                        )
                    self._store_offsets(conn, batch)
                conn.commit()
            except EncodeError as exc:
                self._fail(0, exc)
                raise self._encode_error(exc, plan, batch) from exc
            except psycopg.Error as exc:
                err = self._fail(0, exc)
                if isinstance(err, PermanentSinkError) and self._copying is not None:
                    err.row = copy_row_hint(exc, self._copying)
                raise err from exc
            except (SinkError, ConfigError):
                self._fail(0, RuntimeError("aborted"))
                raise
            finally:
                self._copying = None

    @staticmethod
    def _encode_error(exc: EncodeError, plan: Plan, batch: Batch) -> PermanentSinkError:
        field_name = plan.columns[exc.field] if exc.field < len(plan.columns) else "?"
        row = exc.row if 0 <= exc.row < batch.num_rows else None
        return PermanentSinkError(
            f"row {exc.row}: column {field_name!r}: {exc.reason}", sqlstate=None, row=row
        )

    def _pre_encode(self, batch: Batch, plan: Plan) -> list[list[bytes | None]]:
        out = []
        for _slot, src, jsonb in plan.pre:
            node = src.node
            values = pre_values(batch, node, 0, batch.num_rows)
            if src.valid:
                valid_rows = self._valid_mask(batch, src.valid)
                values = [v if ok else None for v, ok in zip(values, valid_rows)]
            try:
                out.append([_json_bytes(v, jsonb) for v in values])
            except (TypeError, ValueError) as exc:
                raise PermanentSinkError(
                    f"column for {src.dotted!r}: cannot encode as JSON: {exc}"
                ) from exc
        return out

    @staticmethod
    def _valid_mask(batch: Batch, valid: tuple[int, ...]) -> list[bool]:
        # Slow path only (records inside JSON columns): reuse to_pylist's walk.
        mask = [True] * batch.num_rows
        for col in valid:
            node = RecordNode((), valid_col=col)
            for i, v in enumerate(pre_values(batch, node, 0, batch.num_rows)):
                if v is None:
                    mask[i] = False
        return mask

    def _copy_sql(
        self, plan: Plan, target: sql.Composable | None = None, seq: bool = False
    ) -> sql.Composed:
        cols = [sql.Identifier(c) for c in plan.columns]
        if seq:
            cols.append(sql.Identifier("_kfast_seq"))
        return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            target if target is not None else self._table_ident, sql.SQL(", ").join(cols)
        )

    def _copy(
        self,
        conn: psycopg.Connection[Any],
        enc: CopyEncoder,
        batch: Batch,
        plan: Plan,
        pre: list[list[bytes | None]],
        start: int,
        stop: int,
        stmt: sql.Composed,
    ) -> None:
        self._copy_ranges(conn, enc, batch, plan, pre, [(start, stop)], stmt)

    def _copy_ranges(
        self,
        conn: psycopg.Connection[Any],
        enc: CopyEncoder,
        batch: Batch,
        plan: Plan,
        pre: list[list[bytes | None]],
        ranges: Sequence[tuple[int, int]],
        stmt: sql.Composed,
    ) -> None:
        """One COPY of rows ``[a, b)`` for each range, streamed in ``chunk_bytes`` pieces."""
        for slot, values in enumerate(pre):
            enc.bind_pre(slot, values, 0)
        enc.clear()
        enc.header()
        self._copying = list(ranges)  # read by write() if this COPY fails (single connection)
        with conn.cursor() as cur, cur.copy(stmt) as cp:
            for start, stop in ranges:
                row = start
                while row < stop:
                    row = enc.encode(batch, row, stop, self.chunk_bytes)
                    if len(enc) >= self.chunk_bytes:
                        with memoryview(enc) as mv:
                            cp.write(mv)
                        enc.clear()
            enc.trailer()
            with memoryview(enc) as mv:
                cp.write(mv)
            enc.clear()
        self._copying = None

    def _fence(self, conn: psycopg.Connection[Any], batch: Batch) -> list[tuple[int, int]]:
        """exactly_once: lock this batch's partitions in ``kfast_offsets`` and return the row
        ranges not yet covered by the stored offsets.

        After a crash the runtime may re-deliver messages whose rows were already committed
        here (the Kafka commit lags the PostgreSQL one), and a fenced-out consumer may still
        deliver a stale batch after a rebalance. Rows whose offset is below the stored
        ``next_offset`` of their partition are skipped, inside the same transaction that
        holds the row locks, so each offset's row is committed once. The per-row scan stops
        as soon as every partition's first row is known, unless some rows must be skipped.
        """
        ctx = getattr(batch, "context", None)
        if ctx is None or not ctx.next_offsets or batch.num_rows == 0:
            return [(0, batch.num_rows)] if batch.num_rows else []
        group = ctx.group_id or self.group_id
        tps = sorted(ctx.next_offsets)
        table = sql.Identifier(*self.offsets_table.split("."))
        # Make sure the rows exist so that FOR UPDATE locks them (first batch of a partition).
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (group_id, topic, partition, next_offset) "
                    "SELECT %s, t, p, 0 FROM unnest(%s::text[], %s::int4[]) AS u(t, p) "
                    "ON CONFLICT (group_id, topic, partition) DO NOTHING"
                ).format(table),
                (group, [t for t, _ in tps], [p for _, p in tps]),
            )
            rows = cur.execute(
                sql.SQL(
                    "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s "
                    "AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int4[])) "
                    "ORDER BY topic, partition FOR UPDATE"
                ).format(table),
                (group, [t for t, _ in tps], [p for _, p in tps]),
            ).fetchall()
        stored = {(t, int(p)): int(o) for t, p, o in rows if int(o) > 0}
        if not stored:
            return [(0, batch.num_rows)]
        recs = ctx.records
        src = memoryview(batch.source_indices)
        first: dict[tuple[str, int], int] = {}
        want = set(ctx.next_offsets)
        for row in range(batch.num_rows):
            j = src[row]
            tp = (recs.topic(j), recs.partition(j))
            if tp not in first:
                first[tp] = recs.offset(j)
                if len(first) == len(want):
                    break
        if all(first.get(tp, stored[tp]) >= off for tp, off in stored.items()):
            return [(0, batch.num_rows)]
        ranges: list[tuple[int, int]] = []
        start = -1
        for row in range(batch.num_rows):
            j = src[row]
            keep = recs.offset(j) >= stored.get((recs.topic(j), recs.partition(j)), 0)
            if keep and start < 0:
                start = row
            elif not keep and start >= 0:
                ranges.append((start, row))
                start = -1
        if start >= 0:
            ranges.append((start, batch.num_rows))
        self.fenced_rows += batch.num_rows - sum(b - a for a, b in ranges)
        return ranges

    def _ensure_stage(self, conn: psycopg.Connection[Any], plan: Plan) -> None:
        if id(conn) in self._staged:
            return
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in plan.columns)
        conn.execute("DROP TABLE IF EXISTS pg_temp.kfast_stage")
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE kfast_stage ON COMMIT DELETE ROWS AS SELECT {}, 0::bigint AS _kfast_seq "
                "FROM {} WITH NO DATA"
            ).format(cols, self._table_ident)
        )
        conn.commit()
        self._staged.add(id(conn))

    def _upsert(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        plan: Plan,
        pre: list[list[bytes | None]],
        ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self._ensure_stage(conn, plan)
        if ranges is None:
            ranges = [(0, batch.num_rows)] if batch.num_rows else []
        if not ranges:
            return
        stage = sql.Identifier("pg_temp", "kfast_stage")
        self._copy_ranges(
            conn, self._encoders[0], batch, plan, pre, ranges, self._copy_sql(plan, stage, True)
        )
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key))
        cols = sql.SQL(", ").join(map(sql.Identifier, plan.columns))
        rest = [c for c in plan.columns if c not in self.key]
        action: sql.Composable
        if rest:
            action = sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest
                )
            )
        else:
            action = sql.SQL("DO NOTHING")
        conn.execute(
            sql.SQL(
                "INSERT INTO {t} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM {s} "
                "ORDER BY {keys}, _kfast_seq DESC ON CONFLICT ({keys}) {action}"
            ).format(t=self._table_ident, cols=cols, keys=keys, s=stage, action=action)
        )

    def _store_offsets(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        ctx = getattr(batch, "context", None)
        if ctx is None:
            raise ConfigError(
                "PostgresSink(mode='exactly_once') needs batch.context (set by kfast.Pipeline) "
                "to know the offsets to store"
            )
        group = ctx.group_id or self.group_id
        rows = [(group, t, p, off) for (t, p), off in sorted(ctx.next_offsets.items())]
        if not rows:
            return
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {} AS o (group_id, topic, partition, next_offset) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (group_id, topic, partition) DO UPDATE "
                    "SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), "
                    "updated_at = now()"
                ).format(sql.Identifier(*self.offsets_table.split("."))),
                rows,
            )

    def _write_parallel(self, batch: Batch, plan: Plan, pre: list[list[bytes | None]]) -> None:
        n = self.connections
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kfast-pg")
        step = (batch.num_rows + n - 1) // n
        ranges = [(i, i * step, min(batch.num_rows, (i + 1) * step)) for i in range(n)]
        stmt = self._copy_sql(plan)

        def part(i: int, start: int, stop: int) -> None:
            conn = self._connect(i)
            self._copy(conn, self._encoders[i], batch, plan, pre, start, stop, stmt)

        futures = [self._pool.submit(part, i, a, b) for i, a, b in ranges if a < b]
        errors: list[tuple[int, BaseException]] = []
        for (i, _, _), fut in zip(ranges, futures):
            exc = fut.exception()
            if exc is not None:
                errors.append((i, exc))
        if errors:
            first: KfastError | None = None
            for i in range(n):
                exc2 = next((e for j, e in errors if j == i), None)
                if exc2 is not None:
                    a, b = ranges[i][1], ranges[i][2]
                    if isinstance(exc2, EncodeError):
                        row = exc2.row if 0 <= exc2.row < batch.num_rows else None
                        err: KfastError = PermanentSinkError(
                            f"row {exc2.row}: {exc2.reason}", row=row
                        )
                        self._fail(i, exc2)
                    elif isinstance(exc2, KfastError):
                        err = exc2
                        self._fail(i, exc2)
                    else:
                        err = self._fail(i, exc2)
                        if isinstance(err, PermanentSinkError):
                            err.row = copy_row_hint(exc2, [(a, b)])
                    first = first or err
                elif self._conns[i] is not None:
                    try:
                        self._conns[i].rollback()  # type: ignore[union-attr]
                    except psycopg.Error:
                        self._drop(i)
            assert first is not None
            raise first
        # All parts are in; commit them (a failure between these commits can
        # duplicate rows on retry: at-least-once, documented).
        for i in range(n):
            conn = self._conns[i]
            if conn is None:
                continue
            try:
                conn.commit()
            except psycopg.Error as exc:
                raise self._fail(i, exc) from exc

    # ------------------------------------------------------------ isolating bad rows

    def row_transaction(self, batch: Batch) -> RowTransaction | None:
        """A transaction in which the delivery layer isolates the bad rows of ``batch``.

        See :class:`RowTransaction`. ``None`` in ``upsert`` mode and with ``key`` (their
        constraint errors come from ``INSERT ... SELECT``, without a COPY line). In
        ``exactly_once`` mode the batch's partitions are fenced first, as in :meth:`write`.
        The sink is locked until the transaction is closed.
        """
        if self.mode == "upsert" or self.key:
            return None
        self._lock.acquire()
        try:
            plan = self._ensure_plan(batch)
            pre = self._pre_encode(batch, plan)
            conn = self._connect(0)
            try:
                probe = self._ensure_probe_table(conn)
                triggers = self._has_user_triggers(conn)
                allowed = self._fence(conn, batch) if self.mode == "exactly_once" else None
            except psycopg.Error as exc:
                raise self._fail(0, exc) from exc
            return RowTransaction(self, conn, batch, plan, pre, allowed, triggers, probe)
        except BaseException:
            self._lock.release()
            raise

    def _ensure_probe_table(self, conn: psycopg.Connection[Any]) -> bool:
        """Create ``pg_temp.kfast_probe`` like the table (its defaults, CHECK and NOT NULL
        constraints, generated and identity columns, no index, no trigger) in its own
        transaction, once per connection and plan. Probes COPY into it, always rolled back
        to a savepoint (it stays empty): the same row-only errors as the table, without
        index or WAL work and without dead rows left in the table. False when it cannot be
        created (no TEMP privilege): probes use the table."""
        made = self._probe_tables.get(id(conn))
        if made is not None:
            return made
        try:
            conn.execute(f"DROP TABLE IF EXISTS pg_temp.{_PROBE_TABLE}")
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                    "INCLUDING GENERATED INCLUDING IDENTITY)"
                ).format(sql.Identifier(_PROBE_TABLE), self._table_ident)
            )
            conn.commit()
            made = True
        except psycopg.Error as exc:
            if isinstance(classify(exc), TransientSinkError):
                raise
            conn.rollback()
            made = False
        self._probe_tables[id(conn)] = made
        return made

    def _has_user_triggers(self, conn: psycopg.Connection[Any]) -> bool:
        """True when the table or one of its partitions has a trigger a user created."""
        if self._table_oid is None:
            return True  # unknown: assume the worst
        row = conn.execute(
            "WITH RECURSIVE tree(oid) AS (SELECT %s::oid UNION ALL "
            "SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid) "
            "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN tree ON t.tgrelid = tree.oid "
            "WHERE NOT t.tgisinternal)",
            (self._table_oid,),
        ).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------ exactly-once support

    def stored_offsets(self, group_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """``{(topic, partition): next_offset}`` stored by exactly_once writes."""
        try:
            with psycopg.connect(self.dsn, autocommit=True, **self._conn_params()) as conn:
                exists = conn.execute("SELECT to_regclass(%s)", (self.offsets_table,)).fetchone()
                if exists is None or exists[0] is None:
                    return {}
                rows = conn.execute(
                    sql.SQL(
                        "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s AND topic = ANY(%s)"
                    ).format(sql.Identifier(*self.offsets_table.split("."))),
                    (group_id, list(topics)),
                ).fetchall()
        except psycopg.Error as exc:
            raise classify(exc) from exc
        return {(t, int(p)): int(o) for t, p, o in rows}

    def close(self) -> None:
        for i in range(len(self._conns)):
            self._drop(i)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _clip(
    ranges: Sequence[tuple[int, int]], allowed: Sequence[tuple[int, int]] | None
) -> list[tuple[int, int]]:
    """``ranges`` intersected with ``allowed`` (both sorted, disjoint), empty ranges dropped."""
    if allowed is None:
        return [(a, b) for a, b in ranges if a < b]
    out = []
    j = 0
    for a, b in ranges:
        while j < len(allowed) and allowed[j][1] <= a:
            j += 1
        k = j
        while k < len(allowed) and allowed[k][0] < b:
            lo, hi = max(a, allowed[k][0]), min(b, allowed[k][1])
            if lo < hi:
                out.append((lo, hi))
            k += 1
    return out


class _ProbeTableGone(Exception):
    """The probe table is missing in this session (raised inside RowTransaction only)."""


class RowTransaction:
    """One transaction in which the delivery layer isolates a batch's bad rows.

    Made by :meth:`PostgresSink.row_transaction`; use it as a context manager (leaving it
    without :meth:`commit` rolls everything back and unlocks the sink).

    * ``copy(ranges, keep)``: one COPY of the batch rows ``[a, b)`` of each range, in
      order, inside a savepoint. ``keep=True`` keeps the rows on success; ``keep=False``
      rolls them back whatever happens (a row tried alone). A permanent failure rolls back to the
      savepoint and raises ``PermanentSinkError`` whose ``row`` is the **batch** row
      PostgreSQL blamed (the COPY line mapped through ``ranges``), or None; the
      transaction stays usable. Any other error loses the transaction: it is raised
      (``TransientSinkError`` mostly) and the caller starts over with a new one.
    * ``write(ranges)``: one COPY of rows expected to succeed, kept, without a savepoint;
      a failure loses the transaction.
    * ``probe(ranges)``: like ``copy(ranges, keep=False)``, into ``pg_temp.kfast_probe`` when
      the sink could create it (``LIKE`` the table: its CHECK and NOT NULL constraints,
      defaults, generated and identity columns, no index, no trigger), else the table.
      Cheaper than the table (no index, no WAL) and it leaves no dead rows there.
    * ``row_only(exc)``: True when ``exc`` is an error the blamed row raises on its own,
      whatever else is written (see ``_ROW_ONLY_CLASSES``; never with user triggers).
    * ``commit()``: in exactly_once mode store the batch's ``next_offsets`` (the whole
      batch's), then COMMIT.

    ``statements`` counts the COPYs issued (the write bound the tests check).
    """

    def __init__(
        self,
        sink: PostgresSink,
        conn: psycopg.Connection[Any],
        batch: Batch,
        plan: Plan,
        pre: list[list[bytes | None]],
        allowed: list[tuple[int, int]] | None,
        triggers: bool,
        probe_table: bool = False,
    ) -> None:
        self._sink = sink
        self._conn = conn
        self._batch = batch
        self._plan = plan
        self._pre = pre
        self._allowed = allowed  # exactly_once: rows not yet stored (the fence)
        self._triggers = triggers
        self._stmt = sink._copy_sql(plan)
        self._probe_stmt = (
            sink._copy_sql(plan, sql.Identifier("pg_temp", _PROBE_TABLE))
            if probe_table
            else self._stmt
        )
        self._savepoint = False  # a savepoint named _SAVEPOINT is open
        self._open = True
        self.statements = 0

    def __enter__(self) -> RowTransaction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Roll back unless committed; unlock the sink. Idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            if self._sink._conns[0] is self._conn:
                self._sink._rollback(0)
        finally:
            self._sink._lock.release()

    def row_only(self, exc: PermanentSinkError) -> bool:
        if isinstance(exc.__cause__, EncodeError):
            return True  # kfast cannot encode the value: nothing else matters
        state = exc.sqlstate or ""
        return not self._triggers and (state[:2] in _ROW_ONLY_CLASSES or state in _ROW_ONLY_STATES)

    def _lost(self, exc: BaseException) -> KfastError:
        """The transaction cannot continue: roll back (or drop the connection)."""
        err = self._sink._fail(0, exc)
        self._open = False
        self._sink._lock.release()
        return err

    def _execute(self, stmt: str) -> None:
        try:
            self._conn.execute(stmt)
        except psycopg.Error as exc:
            raise self._lost(exc) from exc

    def copy(self, ranges: Sequence[tuple[int, int]], keep: bool) -> None:
        """One COPY of the rows of ``ranges`` into the table, in a savepoint; rolled back
        unless ``keep``."""
        self._copy(ranges, self._stmt, keep)

    def write(self, ranges: Sequence[tuple[int, int]]) -> None:
        """One COPY of rows expected to succeed, kept, without a savepoint: a failure
        loses the transaction (the rows are rolled back and the caller starts over).

        A savepoint released after success stays in the server's per-transaction list
        of subtransactions until COMMIT, and past 64 of them every other session's
        snapshots get slower (pg_subtrans lookups); rows that cannot fail do not need one.
        """
        self._copy(ranges, self._stmt, True, protect=False)

    def probe(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Like ``copy(ranges, keep=False)``, into the probe table when there is one: it
        finds the same row-only errors (see :meth:`row_only`), and only those."""
        if self._probe_stmt is self._stmt:
            self._copy(ranges, self._stmt, False)
            return
        try:
            self._copy(ranges, self._probe_stmt, False, probe_table=True)
        except _ProbeTableGone:
            # Dropped under us (e.g. a pooler that moves sessions): probe the table itself.
            self._probe_stmt = self._stmt
            self._sink._probe_tables[id(self._conn)] = False
            self._copy(ranges, self._stmt, False)

    def _copy(
        self,
        ranges: Sequence[tuple[int, int]],
        stmt: sql.Composed,
        keep: bool,
        protect: bool = True,
        probe_table: bool = False,
    ) -> None:
        if not self._open:
            raise KfastError("RowTransaction is closed")
        rs = _clip(ranges, self._allowed)
        if not rs:
            return
        sink = self._sink
        self.statements += 1
        if protect and not self._savepoint:
            self._execute(f"SAVEPOINT {_SAVEPOINT}")
            self._savepoint = True
        elif not protect and self._savepoint:
            self._execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")  # nothing in it: rolled back to
            self._savepoint = False
        try:
            sink._copy_ranges(
                self._conn, sink._encoders[0], self._batch, self._plan, self._pre, rs, stmt
            )
        except EncodeError as exc:
            err = sink._encode_error(exc, self._plan, self._batch)
            if not protect:
                raise self._lost(exc) from exc
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            raise err from exc
        except psycopg.Error as exc:
            err2 = classify(exc)
            if probe_table and isinstance(err2, ConfigError) and not self._conn.broken:
                self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
                raise _ProbeTableGone from exc
            if not protect or not isinstance(err2, PermanentSinkError) or self._conn.broken:
                raise self._lost(exc) from exc
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            err2.row = copy_row_hint(exc, rs)
            raise err2 from exc
        except BaseException as exc:
            raise self._lost(exc) from exc
        finally:
            sink._copying = None
        if not protect:
            return
        if keep:
            self._execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            self._savepoint = False
        else:
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            if stmt is self._stmt and self._probe_stmt is not self._stmt:
                # A row tried alone in the table went in: if the probe table rejected it,
                # its definition may be stale (ALTER TABLE). Make it again next time.
                sink._probe_tables.pop(id(self._conn), None)

    def commit(self) -> None:
        if not self._open:
            raise KfastError("RowTransaction is closed")
        try:
            if self._sink.mode == "exactly_once":
                self._sink._store_offsets(self._conn, self._batch)
            self._conn.commit()
        except BaseException as exc:
            raise self._lost(exc) from exc
        self._open = False
        self._sink._lock.release()
