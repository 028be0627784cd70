"""Cost of a poisoned batch in the PostgreSQL sink: one batch with bad rows vs a clean one.

Each round writes, into fresh copies of the order table (PK, NOT NULL, CHECK (quantity > 0)):

* ``clean``: a batch of N rows, all good;
* ``check``: the same with K rows violating the CHECK (spread evenly);
* ``decode``: N good rows plus K payloads that do not decode (dead-lettered by the delivery layer);
* ``dup``: K rows whose primary key is already in the table (unique violations);
* ``clean_after_check``: a clean batch right after a batch with CHECK violations;

in three variants, interleaved: ``client`` (the sink as shipped: the rows whose NOT NULL or
CHECK the client can evaluate are found before any COPY, the rest written by one COPY; the
server's screen for what it cannot judge), ``screen`` (no client check: set-based screen of
the bad rows, and after a bad batch the next one screened before any plain write) and
``probes`` (no client check and the screen hidden: isolation by probes and COPY-line
locators, each batch written plainly first), through ``kfast.delivery.Delivery`` with a DeadLetterPolicy whose producer is replaced by an
in-memory queue (this measures the sink side; the DLQ producer overlaps with the writes).
Each timed batch follows one untimed batch of the same kind through the same sink (steady
state: connections, plans and temp tables made, the sink knows the last batch had bad rows).
Interleaved rounds, medians; wall time per batch and this process's CPU (from
/proc/self/task/*/schedstat) per batch, as ratios to ``clean``.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_isolation.py [--rows 10000] [--bad 20] \
        [--mode copy|exactly_once]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from typing import Any

import psycopg

import kfast
from kfast.delivery import Delivery, DeliveryMetrics
from kfast.dlq import DeadLetterPolicy
from kfast.retry import RetryPolicy
from kfast.sinks import BatchContext, ListRecordSource
from kfast.sinks.postgres import PostgresSink
from kfast.testing.orders import ORDER_SCHEMA, ORDER_TABLE_DDL, encode, make_order

CASES = ("clean", "check", "decode", "dup", "clean_after_check")


def proc_cpu() -> float:
    """Seconds this process (all its threads) ran on a CPU, from /proc (ns resolution)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


class _Queue:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def produce(self, records: list[Any]) -> None:
        self.records.extend(records)

    def confirm(self, stop: Any = None) -> None:
        pass

    def close(self) -> None:
        pass


def _batch(payloads: list[bytes], base: int = 0) -> Any:
    batch = kfast.AvroDecoder(ORDER_SCHEMA).decode(payloads)
    recs = [
        {"topic": "t", "partition": 0, "offset": base + i, "timestamp": 0, "key": None, "value": p}
        for i, p in enumerate(payloads)
    ]
    batch.context = BatchContext(ListRecordSource(recs), {("t", 0): base + len(payloads)}, "g")
    return batch


def payloads(case: str, n: int, k: int, base: int) -> list[bytes]:
    rng = random.Random(5)
    bad = set(range(n // (2 * k), n, n // k)) if k else set()
    out = []
    for i in range(n):
        if case == "decode" and i in bad:
            out.append(b"\x03\x00")
            continue
        out.append(encode(make_order(base + i, rng, violate=case == "check" and i in bad)))
    return out


class _NoScreen:
    """The sink's row transaction without its set-based screen: isolation by probes and
    locators only (the algorithm before the screen existed), for the side-by-side run."""

    def __init__(self, txn: Any) -> None:
        self.txn = txn

    def __enter__(self) -> Any:
        self.txn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.txn.__exit__(*exc)

    def screen(self, ranges: Any, keys: bool = True) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.txn, name)


class _ProbeSink(PostgresSink):
    def row_transaction(self, batch: Any) -> Any:
        txn = super().row_transaction(batch)
        return None if txn is None else _NoScreen(txn)


def run_case(
    dsn: str, case: str, n: int, k: int, table: str, variant: str = "client", mode: str = "copy"
) -> tuple[float, float, int]:
    screen = variant != "probes"
    warm = "check" if case == "clean_after_check" else case
    timed = "clean" if case == "clean_after_check" else case
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute("DROP TABLE IF EXISTS kfast_offsets")  # exactly_once: no stored offsets
        c.execute(ORDER_TABLE_DDL.format(table=table))
        if case == "dup":  # K keys of each batch are already there
            for base in (0, n):
                c.execute(
                    f"INSERT INTO {table} SELECT g, 'c', 1, 1, true, now(), 'NEW', NULL, "
                    "'{}', 'x', 'y' FROM generate_series(%s::bigint, %s::bigint, %s::bigint) g",
                    (base + n // (2 * k), base + n - 1, n // k),
                )
        c.execute(f"VACUUM ANALYZE {table}")
    sink = (PostgresSink if screen else _ProbeSink)(dsn, table, mode=mode)
    sink._client_check = variant == "client"
    d = Delivery(
        sink,
        RetryPolicy(),
        DeadLetterPolicy("bench.dlq", max_ratio=1.0, max_consecutive=None),
        {"bootstrap.servers": "127.0.0.1:9"},
        DeliveryMetrics(),
    )
    q = _Queue()
    d.queue = q  # type: ignore[assignment]
    d.deliver(_batch(payloads(warm, n, k, 0)), threading.Event())
    if not screen:
        d.dirty = False  # no screen: every batch starts with its plain write
    batch = _batch(payloads(timed, n, k, n), base=n)
    before = len(q.records)
    t0, c0 = time.perf_counter(), proc_cpu()
    d.deliver(batch, threading.Event())
    t1, c1 = time.perf_counter(), proc_cpu()
    sink.close()
    dead = len(q.records) - before
    want = 0 if timed == "clean" else k
    assert dead == want, (case, dead, want)
    return t1 - t0, c1 - c0, dead


def bench(dsn: str, n: int, k: int, rounds: int, mode: str = "copy") -> dict[str, Any]:
    variants = ("probes", "screen", "client")
    wall: dict[str, list[float]] = {f"{v}/{c}": [] for v in variants for c in CASES}
    cpu: dict[str, list[float]] = {key: [] for key in wall}
    for _ in range(rounds):
        for case in CASES:
            for v in variants:
                w, c, _dead = run_case(dsn, case, n, k, f"iso_{case}", variant=v, mode=mode)
                wall[f"{v}/{case}"].append(w)
                cpu[f"{v}/{case}"].append(c)
    med = {key: statistics.median(v) for key, v in wall.items()}
    medc = {key: statistics.median(v) for key, v in cpu.items()}
    clean = statistics.median([x for v in variants for x in wall[f"{v}/clean"]])
    clean_cpu = statistics.median([x for v in variants for x in cpu[f"{v}/clean"]])
    return {
        "mode": mode,
        "rows": n,
        "bad": k,
        "rounds": rounds,
        "wall_ms": {key: round(1000 * v, 2) for key, v in med.items()},
        "cpu_ms": {key: round(1000 * v, 2) for key, v in medc.items()},
        "wall_ratio_to_clean": {key: round(v / clean, 2) for key, v in med.items()},
        "cpu_ratio_to_clean": {key: round(v / clean_cpu, 2) for key, v in medc.items()},
        "loadavg_after": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--bad", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mode", choices=("copy", "exactly_once"), default="copy")
    ap.add_argument("--dsn", help="use this PostgreSQL instead of starting one")
    ns = ap.parse_args(argv)
    if ns.dsn:
        res = bench(ns.dsn, ns.rows, ns.bad, ns.rounds, ns.mode)
    else:
        from kfast.testing import PostgresServer

        with PostgresServer() as pg:
            res = bench(pg.dsn, ns.rows, ns.bad, ns.rounds, ns.mode)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
