"""PostgreSQL sink benchmark: N order records into a real PostgreSQL, three ways, one run.

* ``kfast``: decoded Batches (10k rows each) -> ``PostgresSink(mode="copy").write`` (the Cython
  encoder writes binary COPY from the column buffers; one transaction per batch).
* ``psycopg_write_row``: what a user writes today: the same rows as Python tuples (as
  ``fastavro.schemaless_reader`` gives them) -> ``copy.write_row(row)`` per row in binary COPY, one
  transaction per 10k rows.
* ``ceiling``: the server's ceiling: the binary COPY bytes encoded beforehand, sent with
  ``copy.write`` in 1 MiB chunks, one transaction per 10k rows (no client encoding at all).

Also reported: the encoder alone (no server), rows/s. Decoding is not measured here (see the Avro
benchmarks); the end-to-end Kafka -> PostgreSQL run needs the Pipeline.

Run (starts its own PostgreSQL via kfast.testing)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sink.py --rows 1000000 [--json out.json]

or under pytest-benchmark (smaller N by default): ``pytest benchmarks/bench_sink.py``.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import io
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import fastavro
import psycopg

import kfast
from kfast.sinks.postgres import PostgresSink

ORDER_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "fields": [
        {"name": "order_id", "type": "long"},
        {"name": "customer_id", "type": "long"},
        {"name": "sku", "type": "string"},
        {"name": "qty", "type": "int"},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2},
        },
        {
            "name": "currency",
            "type": {"type": "enum", "name": "Cur", "symbols": ["AZN", "TRY", "EUR", "USD"]},
        },
        {"name": "created_at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "express", "type": "boolean"},
        {"name": "note", "type": ["null", "string"]},
    ],
}
DDL = (
    "CREATE TABLE {t} (order_id bigint, customer_id bigint, sku text, qty integer, price numeric(12,2), "
    "currency text, created_at timestamptz, express boolean, note text)"
)
BATCH = 10_000


def make_records(n: int) -> list[dict[str, Any]]:
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cur = ["AZN", "TRY", "EUR", "USD"]
    return [
        {
            "order_id": i,
            "customer_id": (i * 7919) % 100_003,
            "sku": f"SKU-{i % 5000:05d}",
            "qty": 1 + i % 9,
            "price": decimal.Decimal(i % 100_000) / 100,
            "currency": cur[i % 4],
            "created_at": base + datetime.timedelta(microseconds=i * 1013),
            "express": i % 3 == 0,
            "note": None if i % 4 else f"gift wrap #{i}",
        }
        for i in range(n)
    ]


def encode_payloads(records: list[dict[str, Any]]) -> list[bytes]:
    parsed = fastavro.parse_schema(ORDER_SCHEMA)
    out = []
    for r in records:
        bio = io.BytesIO()
        fastavro.schemaless_writer(bio, parsed, r)
        out.append(bio.getvalue())
    return out


def reset(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(DDL.format(t=table))
        c.execute("CHECKPOINT")


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def run_kfast(dsn: str, batches: list[Any]) -> float:
    reset(dsn, "bench_kfast")
    sink = PostgresSink(dsn, "bench_kfast")
    sink.write(batches[0].slice(0, 0))  # open + plan outside the timing
    t0 = time.perf_counter()
    for b in batches:
        sink.write(b)
    dt = time.perf_counter() - t0
    sink.close()
    return dt


def run_write_row(dsn: str, tuples: list[tuple[Any, ...]]) -> float:
    reset(dsn, "bench_naive")
    cols = "order_id, customer_id, sku, qty, price, currency, created_at, express, note"
    with psycopg.connect(dsn) as conn:
        t0 = time.perf_counter()
        for start in range(0, len(tuples), BATCH):
            with conn.cursor() as cur:
                with cur.copy(f"COPY bench_naive ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(
                        [
                            "int8",
                            "int8",
                            "text",
                            "int4",
                            "numeric",
                            "text",
                            "timestamptz",
                            "bool",
                            "text",
                        ]
                    )
                    for row in tuples[start : start + BATCH]:
                        cp.write_row(row)
            conn.commit()
        return time.perf_counter() - t0


def encode_all(batches: list[Any]) -> tuple[list[bytes], float]:
    """Pre-encode each batch's COPY stream (for the ceiling) and time the encoder alone."""
    from kfast.sinks._pgcopy import CopyEncoder

    # The same plan PostgresSink builds for this schema and table.
    entries = [
        {"op": "int8", "col": 0},
        {"op": "int8", "col": 1},
        {"op": "bytes", "col": 2},
        {"op": "int4", "col": 3},
        {"op": "numeric", "col": 4, "scale": 2},
        {"op": "enum", "col": 5, "symbols": ORDER_SCHEMA["fields"][5]["type"]["symbols"]},
        {"op": "ts_us", "col": 6},
        {"op": "bool", "col": 7},
        {"op": "bytes", "col": 8},
    ]
    enc = CopyEncoder(entries)
    out = []
    t0 = time.perf_counter()
    for b in batches:
        enc.clear()
        enc.header()
        enc.encode(b, 0, b.num_rows, 1 << 40)
        enc.trailer()
        out.append(bytes(memoryview(enc)))
    return out, time.perf_counter() - t0


def run_ceiling(dsn: str, streams: list[bytes]) -> float:
    reset(dsn, "bench_ceiling")
    cols = "order_id, customer_id, sku, qty, price, currency, created_at, express, note"
    with psycopg.connect(dsn) as conn:
        t0 = time.perf_counter()
        for data in streams:
            mv = memoryview(data)
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY bench_ceiling ({cols}) FROM STDIN (FORMAT BINARY)") as cp,
            ):
                for i in range(0, len(mv), 1 << 20):
                    cp.write(mv[i : i + (1 << 20)])
            conn.commit()
        return time.perf_counter() - t0


def environment(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SHOW server_version").fetchone()
        server = row[0] if row else "?"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "psycopg": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "postgresql": server,
        "kfast": kfast.__version__,
        "note": "PostgreSQL from kfast.testing on loopback (fsync/synchronous_commit off), same machine",
    }


def bench(dsn: str, n: int, rounds: int = 3) -> dict[str, Any]:
    records = make_records(n)
    payloads = encode_payloads(records)
    dec = kfast.AvroDecoder(ORDER_SCHEMA)
    batches = [dec.decode(payloads[i : i + BATCH]) for i in range(0, n, BATCH)]
    parsed = fastavro.parse_schema(ORDER_SCHEMA)
    names = [f["name"] for f in ORDER_SCHEMA["fields"]]
    tuples = []
    for p in payloads:
        r = fastavro.schemaless_reader(io.BytesIO(p), parsed, parsed)
        tuples.append(tuple(r[k] for k in names))  # type: ignore[index,call-overload]
    del records
    streams, _ = encode_all(batches)
    # Interleaved rounds (the machine is shared): report the median of each method.
    times: dict[str, list[float]] = {
        "kfast": [],
        "psycopg_write_row": [],
        "ceiling": [],
        "encoder_only": [],
    }
    for _ in range(rounds):
        times["encoder_only"].append(encode_all(batches)[1])
        times["kfast"].append(run_kfast(dsn, batches))
        assert count(dsn, "bench_kfast") == n
        times["psycopg_write_row"].append(run_write_row(dsn, tuples))
        assert count(dsn, "bench_naive") == n
        times["ceiling"].append(run_ceiling(dsn, streams))
        assert count(dsn, "bench_ceiling") == n
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "rows": n,
        "batch_rows": BATCH,
        "rounds": rounds,
        "copy_bytes": sum(len(s) for s in streams),
        "seconds_all_rounds": times,
        "seconds": med,
        "rows_per_s": {k: n / v for k, v in med.items()},
        "ratios": {
            "kfast_vs_write_row": med["psycopg_write_row"] / med["kfast"],
            "kfast_share_of_ceiling": med["ceiling"] / med["kfast"],
        },
        "environment": environment(dsn),
    }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dsn", help="use this PostgreSQL instead of starting one")
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; medians are reported"
    )
    ap.add_argument("--json", help="write the result here")
    ns = ap.parse_args(argv)
    if ns.dsn:
        res = bench(ns.dsn, ns.rows, ns.rounds)
    else:
        from kfast.testing import PostgresServer

        with PostgresServer() as pg:
            res = bench(pg.dsn, ns.rows, ns.rounds)
    r = res["rows_per_s"]
    print(
        f"rows: {res['rows']:,} in batches of {BATCH:,}; COPY bytes {res['copy_bytes']:,}; "
        f"median of {res['rounds']} interleaved rounds"
    )
    for k in ("kfast", "psycopg_write_row", "ceiling", "encoder_only"):
        print(f"  {k:<20} {res['seconds'][k]:8.3f} s  {r[k]:>12,.0f} rows/s")
    print(
        f"  kfast vs write_row: {res['ratios']['kfast_vs_write_row']:.1f}x; "
        f"kfast reaches {100 * res['ratios']['kfast_share_of_ceiling']:.0f}% of the server ceiling"
    )
    print(json.dumps(res["environment"]))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def test_bench_sink(pg_dsn: str, benchmark: Any) -> None:
    """pytest-benchmark entry: one round, N from KFAST_BENCH_ROWS (default 100k)."""
    n = int(os.environ.get("KFAST_BENCH_ROWS", "100000"))
    res = benchmark.pedantic(bench, args=(pg_dsn, n, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert res["ratios"]["kfast_vs_write_row"] > 1


if __name__ == "__main__":
    sys.exit(main())
