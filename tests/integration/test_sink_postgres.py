"""PostgresSink against the real PostgreSQL of kfast.testing: types, modes, SQLSTATE classes."""

from __future__ import annotations

import datetime
import decimal
import math
import threading
import uuid
from typing import Any

import psycopg
import pytest
from _sink_helpers import ORDER_SCHEMA, avro_payloads, make_batch

import kfast
from kfast.errors import ConfigError, PermanentSinkError, TransientSinkError
from kfast.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

UTC = datetime.timezone.utc

ALL_TYPES: dict[str, Any] = {
    "type": "record",
    "name": "AllTypes",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "qty", "type": "int"},
        {"name": "qty8", "type": "int"},
        {"name": "f", "type": "float"},
        {"name": "f8", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "ok", "type": "boolean"},
        {"name": "s", "type": ["null", "string"]},
        {"name": "vc", "type": "string"},
        {"name": "b", "type": "bytes"},
        {"name": "fx", "type": {"type": "fixed", "name": "F4", "size": 4}},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "CC"]}},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 3},
        },
        {
            "name": "big",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 0},
        },
        {
            "name": "fxdec",
            "type": {
                "type": "fixed",
                "name": "D16",
                "size": 16,
                "logicalType": "decimal",
                "precision": 30,
                "scale": 6,
            },
        },
        {"name": "u", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "dt", "type": {"type": "int", "logicalType": "date"}},
        {"name": "tm", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "tu", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "tsu", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "lts", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "ltsm", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "nums", "type": {"type": "array", "items": ["null", "long"]}},
        {"name": "ints", "type": {"type": "array", "items": "int"}},
        {"name": "dbls", "type": {"type": "array", "items": "double"}},
        {"name": "flags", "type": {"type": "array", "items": "boolean"}},
        {
            "name": "days",
            "type": {"type": "array", "items": {"type": "int", "logicalType": "date"}},
        },
        {"name": "attrs", "type": {"type": "map", "values": "double"}},
        {"name": "labels", "type": {"type": "map", "values": ["null", "string"]}},
        {"name": "counts", "type": {"type": "map", "values": "long"}},
        {
            "name": "nested",
            "type": {"type": "map", "values": {"type": "array", "items": "int"}},
        },
        {
            "name": "lines",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "Line",
                    "fields": [{"name": "sku", "type": "string"}, {"name": "n", "type": "int"}],
                },
            },
        },
        {"name": "un", "type": ["null", "string", "long", {"type": "array", "items": "int"}]},
        {
            "name": "address",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Addr",
                    "fields": [
                        {"name": "city", "type": "string"},
                        {"name": "zip", "type": ["null", "int"]},
                    ],
                },
            ],
        },
    ],
}

ALL_TYPES_DDL = """
CREATE TABLE {t} (
  id bigint PRIMARY KEY, qty integer, qty8 bigint, f real, f8 double precision, d double precision,
  ok boolean, s text, vc varchar(40), b bytea, fx bytea, e text, price numeric, big numeric,
  fxdec numeric(30, 6), u uuid, dt date, tm time, tu time, ts timestamptz, tsu timestamptz,
  lts timestamp, ltsm timestamp, tags text[], nums bigint[], ints integer[], dbls float8[],
  flags boolean[], days date[], attrs jsonb, labels jsonb, counts jsonb, nested jsonb, lines jsonb,
  un jsonb, address_city text, address_zip integer
)
"""


def _records(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        out.append(
            {
                "id": i,
                "qty": -i * 1000 - 1 if i % 2 else i,
                "qty8": 2**31 - 1 - i,
                "f": 1.5 * i - 0.25,
                "f8": 3.25 * i,
                "d": 0.1 * i - 1e300 * (i == 3),
                "ok": i % 2 == 0,
                "s": None if i % 4 == 2 else f's{i} "q" \\ ünï',
                "vc": "v" * (i % 40),
                "b": bytes([i % 256, 0, 255]) * (i % 3),
                "fx": b"ab\x00d",
                "e": ["A", "B", "CC"][i % 3],
                "price": decimal.Decimal("-12345.678")
                if i == 1
                else decimal.Decimal(i * 1000003) / 1000,
                "big": decimal.Decimal(-(10**37) + i) if i % 2 else decimal.Decimal(10**37 - 7 * i),
                "fxdec": decimal.Decimal("123456789012.345678") * (-1 if i % 3 == 1 else 1)
                if i
                else decimal.Decimal("0.000001"),
                "u": str(uuid.UUID(int=i * 0x1234567890ABCDEF)),
                "dt": datetime.date(1999, 12, 31) + datetime.timedelta(days=i * 37 - 100),
                "tm": datetime.time(23, 59, 59, 999000) if i == 1 else datetime.time(1, 2, 3, 4000),
                "tu": datetime.time(0, 0, 0, i),
                "ts": datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
                + datetime.timedelta(days=i),
                "tsu": datetime.datetime(1969, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
                - datetime.timedelta(seconds=i),
                "lts": datetime.datetime(2024, 5, 6, 7, 8, 9, 123456),
                "ltsm": datetime.datetime(1970, 1, 1, 0, 0, 0, 1000 * i),
                "tags": ["x", "y\n", "", "z,{}"][: i % 5],
                "nums": [1, None, -(2**62)] if i % 3 == 0 else [],
                "ints": list(range(i % 4)),
                "dbls": [0.5, -1e-300] if i % 2 else [],
                "flags": [True, False][: i % 3],
                "days": [datetime.date(2000, 1, 1), datetime.date(1970, 1, 1)] if i % 2 else [],
                "attrs": {"a": 1.25, 'b"\\': 0.1 * i, "\x01": -0.0} if i else {},
                "labels": {"k": None, "l": "ü\t"} if i % 2 else {"m": "x"},
                "counts": {"n": 2**40 + i},
                "nested": {"a": [1, 2], "b": []} if i % 2 else {},
                "lines": [{"sku": "S1", "n": i}, {"sku": "S2", "n": -i}] if i % 2 else [],
                "un": [None, f"u{i}", i * 10**12, [i, -i]][i % 4],
                "address": None
                if i % 5 == 4
                else {"city": "Bakı", "zip": None if i % 3 == 0 else 1000 + i},
            }
        )
    return out


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    addr = row.pop("address")
    row["address_city"] = None if addr is None else addr["city"]
    row["address_zip"] = None if addr is None else addr["zip"]
    return row


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bytes, memoryview)) and isinstance(b, (bytes, memoryview)):
        return bytes(a) == bytes(b)
    if isinstance(b, decimal.Decimal) and isinstance(a, str):  # Decimal inside JSON: text
        return decimal.Decimal(a) == b
    return bool(a == b)


def _table(conn: psycopg.Connection[Any], name: str, ddl: str) -> None:
    conn.execute(f'DROP TABLE IF EXISTS "{name}"')
    conn.execute(ddl.format(t=f'"{name}"'))


@pytest.fixture
def conn(pg_dsn: str) -> Any:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        yield c


def test_every_type_round_trips(pg_dsn: str, conn: Any) -> None:
    _table(conn, "all_types", ALL_TYPES_DDL)
    recs = _records(40)
    batch = make_batch(ALL_TYPES, avro_payloads(ALL_TYPES, recs))
    assert batch.num_rows == 40 and not batch.errors
    sink = PostgresSink(pg_dsn, "all_types")
    sink.open(None)
    sink.write(batch)
    sink.close()
    cur = conn.execute("SELECT * FROM all_types ORDER BY id")
    names = [d.name for d in cur.description]
    got = [dict(zip(names, r)) for r in cur.fetchall()]
    want = [_flat(r) for r in batch.to_pylist()]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in w:
            assert _same(g[k], w[k]), (g["id"], k, g[k], w[k])


def test_create_table_columns_mapping_and_skip(pg_dsn: str, conn: Any) -> None:
    conn.execute("DROP TABLE IF EXISTS created_t")
    recs = _records(5)
    batch = make_batch(ALL_TYPES, avro_payloads(ALL_TYPES, recs))
    sink = PostgresSink(
        pg_dsn,
        "created_t",
        create_table=True,
        key="id",
        columns={"address.city": "city", "lines": None},
    )
    sink.write(batch)
    sink.close()
    cols = {
        r[0]: r[1]
        for r in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'created_t'"
        )
    }
    assert "city" in cols and "address_city" not in cols and "lines" not in cols
    assert cols["price"] == "numeric" and cols["u"] == "uuid" and cols["tags"] == "ARRAY"
    assert cols["attrs"] == "jsonb" and cols["ts"] == "timestamp with time zone"
    assert conn.execute("SELECT count(*), count(city) FROM created_t").fetchone() == (5, 4)


def test_nested_record_as_one_jsonb_column(pg_dsn: str, conn: Any) -> None:
    _table(
        conn,
        "addr_json",
        "CREATE TABLE {t} (id bigint, address jsonb, lines jsonb, extra text DEFAULT 'x')",
    )
    recs = _records(6)
    batch = make_batch(ALL_TYPES, avro_payloads(ALL_TYPES, recs))
    keep = {"id", "address", "lines"}
    cols: dict[str, str | None] = {
        f["name"]: None for f in ALL_TYPES["fields"] if f["name"] not in keep
    }
    cols["address"] = "address"
    sink = PostgresSink(pg_dsn, "addr_json", columns=cols)
    sink.write(batch)
    sink.close()
    got = conn.execute("SELECT address, lines FROM addr_json ORDER BY id").fetchall()
    want = batch.to_pylist()
    assert [g[0] for g in got] == [w["address"] for w in want]
    assert [g[1] for g in got] == [w["lines"] for w in want]


@pytest.mark.parametrize(
    ("ddl", "needle"),
    [
        ("CREATE TABLE {t} (id bigint, customer text, qty text, price numeric)", "'qty'"),
        ("CREATE TABLE {t} (id bigint, customer text, qty integer, price integer)", "'price'"),
        ("CREATE TABLE {t} (id bigint, customer text, price numeric)", "'qty'"),
        (
            "CREATE TABLE {t} (id bigint, customer text, qty int, price numeric, x int NOT NULL)",
            "'x'",
        ),
        ("CREATE TABLE {t} (id integer, customer text, qty int, price numeric)", "'id'"),
    ],
)
def test_mismatch_is_config_error_naming_the_column(
    pg_dsn: str, conn: Any, ddl: str, needle: str
) -> None:
    _table(conn, "mismatch_t", ddl)
    sink = PostgresSink(pg_dsn, "mismatch_t")
    sink.open(None)
    payloads = avro_payloads(
        ORDER_SCHEMA, [{"id": 1, "customer": "c", "qty": 1, "price": decimal.Decimal("1.00")}]
    )
    with pytest.raises(ConfigError, match=needle):
        sink.write(make_batch(ORDER_SCHEMA, payloads))
    assert conn.execute("SELECT count(*) FROM mismatch_t").fetchone() == (0,)
    sink.close()


def test_open_rejects_missing_table_and_bad_mapping(pg_dsn: str, conn: Any) -> None:
    conn.execute("DROP TABLE IF EXISTS nope_t")
    with pytest.raises(ConfigError, match="nope_t"):
        PostgresSink(pg_dsn, "nope_t").open(None)
    _table(conn, "map_t", "CREATE TABLE {t} (id bigint)")
    with pytest.raises(ConfigError, match="'missing'"):
        PostgresSink(pg_dsn, "map_t", columns={"id": "missing"}).open(None)
    with pytest.raises(ConfigError, match="key"):
        PostgresSink(pg_dsn, "map_t", mode="upsert", key="k").open(None)
    with pytest.raises(ConfigError, match="mode"):
        PostgresSink(pg_dsn, "map_t", mode="merge")
    with pytest.raises(ConfigError, match="connections"):
        PostgresSink(pg_dsn, "map_t", mode="upsert", key="id", connections=2)


def _orders(ids: list[int], qty: int = 1) -> list[dict[str, Any]]:
    return [
        {"id": i, "customer": f"c{i}", "qty": qty + n, "price": decimal.Decimal("9.99")}
        for n, i in enumerate(ids)
    ]


ORDERS_DDL = "CREATE TABLE {t} (id bigint PRIMARY KEY, customer text, qty integer CHECK (qty >= 0), price numeric(12,2))"


def test_upsert_dedups_keys_last_offset_wins(pg_dsn: str, conn: Any) -> None:
    _table(conn, "ups", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "ups", mode="upsert", key="id")
    recs = _orders([1, 2, 1, 3, 1, 2])  # qty 1..6; id 1 last has qty 5, id 2 last qty 6
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, recs)))
    assert conn.execute("SELECT id, qty FROM ups ORDER BY id").fetchall() == [
        (1, 5),
        (2, 6),
        (3, 4),
    ]
    sink.write(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([3], qty=40)), base_offset=6)
    )
    assert conn.execute("SELECT id, qty FROM ups ORDER BY id").fetchall() == [
        (1, 5),
        (2, 6),
        (3, 40),
    ]
    sink.close()


def test_exactly_once_offsets_in_the_same_transaction(
    pg_dsn: str, conn: Any, unique_group: str
) -> None:
    _table(conn, "eo", ORDERS_DDL)
    conn.execute("DROP TABLE IF EXISTS kfast_offsets")
    sink = PostgresSink(pg_dsn, "eo", mode="exactly_once")
    sink.open(kfast.sinks.PipelineInfo(unique_group, ["orders"]))
    b1 = make_batch(
        ORDER_SCHEMA,
        avro_payloads(ORDER_SCHEMA, _orders([1, 2, 3])),
        group=unique_group,
        base_offset=100,
    )
    sink.write(b1)
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): 103}
    # A failing batch (duplicate key) rolls back the rows AND the offsets.
    b2 = make_batch(
        ORDER_SCHEMA,
        avro_payloads(ORDER_SCHEMA, _orders([4, 1])),
        group=unique_group,
        base_offset=103,
    )
    with pytest.raises(PermanentSinkError) as ei:
        sink.write(b2)
    assert ei.value.sqlstate == "23505"
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): 103}
    assert conn.execute("SELECT count(*) FROM eo").fetchone() == (3,)
    # Exactly-once with a key uses the upsert path: a replay after a crash is idempotent.
    sink2 = PostgresSink(pg_dsn, "eo", mode="exactly_once", key="id")
    sink2.open(kfast.sinks.PipelineInfo(unique_group, ["orders"]))
    b3 = make_batch(
        ORDER_SCHEMA,
        avro_payloads(ORDER_SCHEMA, _orders([3, 4])),
        group=unique_group,
        base_offset=103,
    )
    sink2.write(b3)
    sink2.write(b3)
    assert sink2.stored_offsets(unique_group, ["orders"]) == {("orders", 0): 105}
    assert conn.execute("SELECT count(*) FROM eo").fetchone() == (4,)
    assert sink2.stored_offsets("other-group", ["orders"]) == {}
    sink.close()
    sink2.close()


def test_parallel_connections_copy(pg_dsn: str, conn: Any) -> None:
    _table(conn, "par", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "par", connections=2, chunk_bytes=4096)
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders(list(range(1000))))))
    assert conn.execute("SELECT count(*), sum(id) FROM par").fetchone() == (1000, sum(range(1000)))
    # A duplicate in one part rolls back both parts.
    with pytest.raises(PermanentSinkError):
        sink.write(
            make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([5000, 5001, 5002, 999])))
        )
    assert conn.execute("SELECT count(*) FROM par").fetchone() == (1000,)
    sink.close()


# ------------------------------------------------------------------ SQLSTATE classes


def test_unique_violation_is_permanent_23505(pg_dsn: str, conn: Any) -> None:
    _table(conn, "cls_u", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "cls_u")
    batch = make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([1, 2])))
    sink.write(batch)
    with pytest.raises(PermanentSinkError) as ei:
        sink.write(batch)
    assert ei.value.sqlstate == "23505"
    assert type(ei.value.__cause__).__name__ == "UniqueViolation"
    sink.write(
        make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([3])))
    )  # connection still usable
    assert conn.execute("SELECT count(*) FROM cls_u").fetchone() == (3,)
    sink.close()


def test_copy_mode_batch_is_one_autocommit_copy(pg_dsn: str, conn: Any) -> None:
    """copy mode's COPY commits itself (no BEGIN/COMMIT round trips): a batch failing on its
    last row leaves none of its rows, and the connection goes back to transactions."""
    from kfast.sinks.postgres.copy import CopyTiming

    _table(conn, "cp_ac", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "cp_ac")
    sink._timing = timing = CopyTiming()
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([1]))))
    with pytest.raises(PermanentSinkError) as ei:
        sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([10, 11, 1]))))
    assert ei.value.row == 2
    assert conn.execute("SELECT array_agg(id ORDER BY id) FROM cp_ac").fetchone() == ([1],)
    pg = sink._conns.current(0)
    assert pg is not None and not pg.autocommit and not pg.info.transaction_status
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([2]))))
    assert conn.execute("SELECT count(*) FROM cp_ac").fetchone() == (2,)
    assert timing.copies == 2 and timing.finish > 0 and timing.encode > 0  # completed COPYs
    sink.close()


def test_bad_data_is_permanent_22(pg_dsn: str, conn: Any) -> None:
    _table(conn, "cls_d", ORDERS_DDL.replace("numeric(12,2)", "numeric(4,2)"))
    sink = PostgresSink(pg_dsn, "cls_d")
    recs = _orders([1])
    recs[0]["price"] = decimal.Decimal("123456.78")
    with pytest.raises(PermanentSinkError) as ei:
        sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, recs)))
    assert ei.value.sqlstate is not None and ei.value.sqlstate.startswith("22")
    sink.close()


def test_undefined_column_is_config_error_42703(pg_dsn: str, conn: Any) -> None:
    _table(conn, "cls_c", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "cls_c")
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([1]))))
    conn.execute("ALTER TABLE cls_c DROP COLUMN customer")  # behind the sink's back
    with pytest.raises(ConfigError) as ei:
        sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([2]))))
    assert ei.value.sqlstate == "42703"  # type: ignore[attr-defined]
    assert "customer" in str(ei.value)
    sink.close()


def test_terminated_backend_is_transient_then_reconnects(pg_dsn: str, conn: Any) -> None:
    _table(conn, "cls_t", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "cls_t")
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([1]))))
    n = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'kfast' AND pid <> pg_backend_pid()"
    ).fetchone()
    assert n is not None and n[0] >= 1
    with pytest.raises(TransientSinkError) as ei:
        sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([2]))))
    assert ei.value.sqlstate in (None, "57P01")
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([2]))))
    assert conn.execute("SELECT count(*) FROM cls_t").fetchone() == (2,)
    sink.close()


def test_server_down_is_transient_then_delivery_succeeds(pg_server: Any, pg_dsn: str) -> None:
    from kfast.delivery import Delivery, DeliveryMetrics
    from kfast.retry import RetryPolicy

    with psycopg.connect(pg_dsn, autocommit=True) as c:
        _table(c, "cls_s", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "cls_s")
    sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([1]))))
    pg_server.stop()
    try:
        with pytest.raises(TransientSinkError):
            sink.write(make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([2]))))
        metrics = DeliveryMetrics()
        d = Delivery(
            sink,
            RetryPolicy(max_attempts=60, initial_backoff=0.2, max_backoff=0.5, deadline=60),
            None,
            {},
            metrics,
        )
        errors: list[BaseException] = []

        def deliver() -> None:
            try:
                d.deliver(
                    make_batch(ORDER_SCHEMA, avro_payloads(ORDER_SCHEMA, _orders([2]))),
                    threading.Event(),
                )
            except BaseException as exc:
                errors.append(exc)

        # Delivery retries in a thread; the server comes back from the main thread (the
        # test bed's postgres gets a parent-death signal when the thread that started it ends).
        worker = threading.Thread(target=deliver)
        worker.start()
        while metrics.retries < 2 and worker.is_alive():
            threading.Event().wait(0.05)
        pg_server.start()
        worker.join(60)
        assert not worker.is_alive() and not errors, errors
    finally:
        if not pg_server.running:
            pg_server.start()
    assert metrics.retries >= 1
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM cls_s").fetchone() == (2,)
    sink.close()


# ------------------------------------------------------------------ encoder properties

DEC_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Dec",
    "fields": [
        {"name": "id", "type": "long"},
        {
            "name": "v",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 60, "scale": 0},
        },
    ],
}


@pytest.mark.parametrize("scale", [0, 1, 2, 3, 4, 5, 7, 8, 12, 30])
def test_numeric_encoding_matches_postgres(pg_dsn: str, conn: Any, scale: int) -> None:
    """PG's numeric_recv must read back exactly the decimal fastavro wrote (random + edge values)."""
    import random

    rng = random.Random(scale)
    schema = json_copy(DEC_SCHEMA)
    schema["fields"][1]["type"]["scale"] = scale
    edge = [
        0,
        1,
        -1,
        9999,
        10000,
        -10000,
        10**scale,
        -(10**scale),
        10**59 - 1,
        -(10**59) + 1,
        2**63,
        -(2**63),
    ]
    ints = edge + [
        rng.randrange(-(10**59), 10**59) // (10 ** rng.randrange(0, 58)) for _ in range(300)
    ]
    wide = decimal.Context(prec=200)
    values = [decimal.Decimal(i).scaleb(-scale, context=wide) for i in ints]
    _table(conn, "dec_t", "CREATE TABLE {t} (id bigint, v numeric)")
    sink = PostgresSink(pg_dsn, "dec_t")
    payloads = avro_payloads(schema, [{"id": i, "v": v} for i, v in enumerate(values)])
    sink.write(make_batch(schema, payloads))
    sink.close()
    got = [r[0] for r in conn.execute("SELECT v FROM dec_t ORDER BY id")]
    assert got == values
    # The display scale is kept too (numeric_out prints `scale` digits).
    texts = [r[0] for r in conn.execute("SELECT v::text FROM dec_t ORDER BY id LIMIT 12")]
    assert texts == [str(v) if scale == 0 else f"{v:.{scale}f}" for v in values[:12]]


def json_copy(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x))


def test_bad_uuid_is_a_permanent_error_naming_the_column(pg_dsn: str, conn: Any) -> None:
    schema = {
        "type": "record",
        "name": "U",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "u", "type": {"type": "string", "logicalType": "uuid"}},
        ],
    }
    plain = {
        "type": "record",
        "name": "U",
        "fields": [{"name": "id", "type": "long"}, {"name": "u", "type": "string"}],
    }
    _table(conn, "uuid_t", "CREATE TABLE {t} (id bigint, u uuid)")
    sink = PostgresSink(pg_dsn, "uuid_t")
    ok = str(uuid.uuid4())
    payloads = avro_payloads(plain, [{"id": 0, "u": ok}, {"id": 1, "u": "not-a-uuid"}])
    batch = make_batch(schema, payloads)
    if batch.errors:  # the decoder may already reject it: then it is a decode error, also fine
        return
    with pytest.raises(PermanentSinkError, match="'u'"):
        sink.write(batch)
    sink.write(batch.slice(0, 1))  # the connection is usable; the good row goes in
    assert conn.execute("SELECT u::text FROM uuid_t").fetchall() == [(ok,)]
    sink.close()


def _eo_batch(items: list[tuple[int, int]], group: str) -> Any:
    """A batch of orders whose rows come from (partition, offset) pairs, in this order."""
    from kfast.sinks import BatchContext, ListRecordSource

    recs = _orders([p * 100_000 + off for p, off in items])
    payloads = avro_payloads(ORDER_SCHEMA, recs)
    batch = kfast.AvroDecoder(ORDER_SCHEMA).decode(payloads)
    src = [
        {"topic": "orders", "partition": p, "offset": off, "timestamp": 0, "key": None, "value": v}
        for (p, off), v in zip(items, payloads)
    ]
    nxt: dict[tuple[str, int], int] = {}
    for p, off in items:
        nxt[("orders", p)] = max(nxt.get(("orders", p), 0), off + 1)
    batch.context = BatchContext(ListRecordSource(src), nxt, group)
    return batch


@pytest.mark.parametrize("key", [None, "id"])
def test_exactly_once_fence_skips_rows_already_committed(
    pg_dsn: str, conn: Any, unique_group: str, key: str | None
) -> None:
    _table(conn, "eo_fence", ORDERS_DDL)
    sink = PostgresSink(pg_dsn, "eo_fence", mode="exactly_once", key=key)
    # Two partitions interleaved, offsets 0..59 each.
    first = [(p, off) for off in range(60) for p in (0, 1)]
    sink.write(_eo_batch(first, unique_group))
    # Crash before the Kafka commit: the runtime re-reads from older offsets, with different
    # batch boundaries: 40..99 on both partitions. Only 60..99 may be written.
    again = [(p, off) for off in range(40, 100) for p in (0, 1)]
    sink.write(_eo_batch(again, unique_group))
    assert sink.fenced_rows == 40
    # A fenced-out (zombie) consumer delivers a stale batch: nothing is written.
    sink.write(_eo_batch([(0, 5), (1, 7), (0, 6)], unique_group))
    assert sink.fenced_rows == 43
    ids = sorted(r[0] for r in conn.execute("SELECT id FROM eo_fence"))
    assert ids == sorted(p * 100_000 + off for p in (0, 1) for off in range(100))
    assert sink.stored_offsets(unique_group, ["orders"]) == {("orders", 0): 100, ("orders", 1): 100}
    sink.close()
