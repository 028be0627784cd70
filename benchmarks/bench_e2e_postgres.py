"""End to end, Kafka -> PostgreSQL: N Avro order records, every write path, one run.

Paths (each loads its table from empty, one transaction per batch of 10k rows):

* ``naive``: what a user writes today: confluent-kafka ``consume(10_000)``, ``fastavro
  .schemaless_reader`` per message, psycopg ``copy.write_row`` per row (binary COPY), ``COMMIT``,
  then ``consumer.commit(asynchronous=False)`` per batch.
* ``copy``: ``kfast.Pipeline`` (AvroDecoder -> PostgresSink(mode="copy")), offsets committed to
  Kafka after each durable batch.
* ``copy_poisoned``: the same pipeline with a DeadLetterPolicy on a second topic of the same
  records in which 0.5% of the payloads are truncated (undecodable) and 0.1% of the records
  violate the table's CHECK constraint, spread uniformly over the topic. Checked after the run:
  every good record's row is in the table, no bad one is, and every bad record is in the DLQ
  topic (by original offset).
* ``upsert``: ``PostgresSink(mode="upsert", key="id")`` (COPY into a temporary staging table, then
  ``INSERT ... SELECT DISTINCT ON (id) ... ON CONFLICT (id) DO UPDATE``).
* ``exactly_once``: ``PostgresSink(mode="exactly_once")`` (offset fence: lock the partition's row
  in ``kfast_offsets``, COPY, store the next offsets, all in the batch's transaction).
* ``copy_2conn``: ``PostgresSink(connections=2)`` (each batch split over two connections).
* ``kafka_floor``: librdkafka's own cost on the same topic: kfast's compiled consumer with the
  memory plan's settings consuming and freeing every message (no decoding, no copy, no sink):
  the client CPU per row no librdkafka-based consumer goes under on this machine.
* ``ceiling``: COPY of the same rows pre-encoded as binary COPY buffers (no Kafka, no decoding, no
  client encoding), one connection, one transaction per 10k rows: what one server backend
  absorbs. ``ceiling_2conn``: two connections each copying every other pre-encoded batch.

Measures per path: rows/s (records of the topic per second, from the start of the path to its
last row committed), rows/s after the first batch reached the sink ("steady"), client CPU µs/row
(user+sys of this process from /proc/self/stat, from the first batch reaching the sink to the last
row committed; every kfast thread and librdkafka's run in this process and the harness thread only
sleeps meanwhile), and the PostgreSQL and Kafka broker CPU µs/row over the same window (their
/proc entries; PostgreSQL = postmaster + its children, incl. exited ones via cutime/cstime).
For the kfast paths, a sink wrapper records per batch: how long the sink waited for the pipeline
since its previous write returned, time in ``write`` and the COPY part of it; the COPY is split
by the sink's opt-in ``CopyTiming`` into start (BEGIN if any + the COPY statement's round trip),
encode (kfast's encoder), send (handing chunks to libpq) and finish (from the last byte sent to
the server's CommandComplete: the server still parsing). The decoder's per-batch time comes from
``Pipeline.metrics()`` once the path is done.

Method: after producing, one untimed ceiling pass warms the server and the harness's own objects
are moved out of the cyclic GC's way (``gc.freeze``). Then ``--rounds`` rounds run the paths back
to back, rotating which goes first; the report gives each path's median and the ratios within
each round (the machine is shared and noisy: ratios within a round are the numbers to trust).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_e2e_postgres.py --rows 1000000 --rounds 3 \
        --json /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from typing import Any

import fastavro
import psycopg

import kfast
from kfast.sinks.postgres import PostgresSink
from kfast.testing.orders import ORDER_SCHEMA, ORDER_TABLE_DDL, encode, encode_orders, make_order

BATCH = 10_000
CORRUPT_SHARE = 0.005
VIOLATION_SHARE = 0.001
COLS = [
    "id",
    "customer",
    "price",
    "quantity",
    "paid",
    "created_at",
    "status",
    "coupon",
    "items",
    "address_city",
    "address_zip",
]
TYPES = [
    "int8",
    "text",
    "float8",
    "int4",
    "bool",
    "timestamptz",
    "text",
    "text",
    "int4[]",
    "text",
    "text",
]
PATHS = [
    "ceiling",
    "copy",
    "copy_poisoned",
    "naive",
    "upsert",
    "exactly_once",
    "copy_2conn",
    "ceiling_2conn",
    "kafka_floor",
]
KFAST_PATHS: dict[str, dict[str, Any]] = {
    "copy": {"mode": "copy"},
    "copy_poisoned": {"mode": "copy"},
    "upsert": {"mode": "upsert", "key": "id"},
    "exactly_once": {"mode": "exactly_once"},
    "copy_2conn": {"mode": "copy", "connections": 2},
}
_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- CPU from /proc


def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2 :].split()  # fields from "state" on (comm may hold spaces)


def proc_cpu(pid: int | str = "self", children: bool = False) -> float:
    """utime+stime (+cutime+cstime with ``children``) of ``pid`` in seconds."""
    try:
        f = _stat_fields(pid)
    except OSError:
        return 0.0
    # after "state": ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / _TICK


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of ``pid`` and its direct children (live ones from their own entries,
    exited and reaped ones through the parent's cutime/cstime): a PostgreSQL cluster."""
    if not pid:
        return 0.0
    total = proc_cpu(pid, children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = _stat_fields(entry)
        except OSError:
            continue
        if f[1] == str(pid):
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / _TICK
    return total


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed by role: Python threads by name,
    librdkafka's threads (named ``rdk:...``) as ``librdkafka``, the rest by their comm."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for entry in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue  # exited meanwhile
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        f = raw[raw.rindex(")") + 2 :].split()
        cpu = (int(f[11]) + int(f[12])) / _TICK
        name = names.get(int(entry)) or ("librdkafka" if comm.startswith("rdk:") else comm)
        out[name] = out.get(name, 0.0) + cpu
    return out


def thread_cpu_us(before: dict[str, float], after: dict[str, float], rows: int) -> dict[str, float]:
    return {
        k: round(1e6 * (v - before.get(k, 0.0)) / rows, 3)
        for k, v in sorted(after.items())
        if v - before.get(k, 0.0) > 0
    }


class CpuWindow:
    """Client, PostgreSQL and broker CPU seconds between ``start()`` and ``stop()``."""

    def __init__(self, pg_pid: int | None, kafka_pid: int | None) -> None:
        self.pg_pid, self.kafka_pid = pg_pid, kafka_pid
        self.t: list[float] = []
        self.client: list[float] = []
        self.pg: list[float] = []
        self.kafka: list[float] = []

    def _sample(self, client: float | None = None, t: float | None = None) -> None:
        self.client.append(proc_cpu() if client is None else client)
        self.t.append(time.perf_counter() if t is None else t)
        self.pg.append(tree_cpu(self.pg_pid))
        self.kafka.append(proc_cpu(self.kafka_pid) if self.kafka_pid else 0.0)

    start = stop = _sample

    def per_row_us(self, rows: int) -> dict[str, float]:
        if len(self.t) < 2 or not rows:
            return {}
        return {
            "client": 1e6 * (self.client[-1] - self.client[0]) / rows,
            "postgres": 1e6 * (self.pg[-1] - self.pg[0]) / rows,
            "kafka": 1e6 * (self.kafka[-1] - self.kafka[0]) / rows,
            "window_s": self.t[-1] - self.t[0],
        }


# ---------------------------------------------------------------- data


def poison(payloads: list[bytes], seed: int = 11) -> tuple[list[bytes], list[int], list[int]]:
    """A copy of ``payloads`` with CORRUPT_SHARE truncated payloads and VIOLATION_SHARE records
    whose ``quantity`` breaks the CHECK, at random positions; returns (payloads, corrupt
    indexes, violating indexes)."""
    parsed = fastavro.parse_schema(ORDER_SCHEMA)
    rng = random.Random(seed)
    out = list(payloads)
    corrupt: list[int] = []
    violate: list[int] = []
    for i in range(len(out)):
        roll = rng.random()
        if roll < CORRUPT_SHARE:
            p = out[i]
            out[i] = p[: rng.randrange(1, len(p) - 1)]  # cut inside the record
            corrupt.append(i)
        elif roll < CORRUPT_SHARE + VIOLATION_SHARE:
            out[i] = encode(make_order(i, rng, violate=True), parsed)
            violate.append(i)
    return out, corrupt, violate


def reset(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(ORDER_TABLE_DDL.format(table=table))
        c.execute("CHECKPOINT")


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0


def check_table(dsn: str, table: str, n: int, bad: list[int]) -> None:
    """The table holds exactly the ids in [0, n) that are not in ``bad`` (id is the primary
    key, so the count plus the range plus the absence of every bad id pins the set)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            f"SELECT count(*), min(id), max(id), count(*) FILTER (WHERE id = ANY(%s)) FROM {table}",
            (bad,),
        ).fetchone()
    assert row is not None
    cnt, lo, hi, nbad = row
    want = n - len(bad)
    if cnt != want or nbad or (cnt and (lo < 0 or hi >= n)):
        raise AssertionError(
            f"{table}: {cnt} rows (want {want}), ids {lo}..{hi}, {nbad} bad ids present"
        )


def dlq_offsets(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list[int]:
    """Original offsets (header ``kfast.original.offset``) of every record in ``topic``."""
    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-dlq-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
        }
    )
    out: list[int] = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        idle = time.monotonic()
        while time.monotonic() < deadline:
            msgs = c.consume(1000, 0.5)
            if not msgs:
                if len(out) >= expected and time.monotonic() - idle > 1.0:
                    break
                continue
            idle = time.monotonic()
            for m in msgs:
                if m.error() is not None:
                    continue
                h = dict(m.headers() or [])
                off: Any = h.get("kfast.original.offset")
                out.append(int(off.decode() if isinstance(off, bytes) else off))
    finally:
        c.close()
    return out


# ---------------------------------------------------------------- kfast


class _TimedSink(PostgresSink):
    """PostgresSink that notes per write: the wait since the previous write returned (the
    pipeline's share), the write's duration and the COPY part of it; and the process CPU when
    the first batch arrives. Adds two perf_counter calls per batch and per COPY."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_t = 0.0
        self.first_cpu = 0.0
        self.first_rows = 0
        self.last_end = 0.0
        self.stages: list[tuple[float, float, float, int]] = []  # (wait, write, copy, rows)
        self.copy_steps: list[tuple[float, ...]] = []  # CopyTiming's steps, per write
        try:  # where the COPYs spend their time, if this kfast can tell
            from kfast.sinks.postgres.copy import CopyTiming

            self._timing = CopyTiming()
        except ImportError:
            pass
        self._copies: list[tuple[float, float]] = []

    def write(self, batch: Any) -> None:
        t = time.perf_counter()
        if not self.first_t:
            self.first_cpu = proc_cpu()
            self.first_t = t
        wait = t - self.last_end if self.last_end else 0.0
        self._copies = []
        ct = getattr(self, "_timing", None)
        before = (ct.start, ct.encode, ct.send, ct.finish) if ct is not None else ()
        try:
            super().write(batch)
        finally:
            end = time.perf_counter()
            # COPYs on parallel connections overlap: count the span they cover
            c = self._copies
            copy_s = max(b for _, b in c) - min(a for a, _ in c) if c else 0.0
            self.stages.append((wait, end - t, copy_s, batch.num_rows))
            if ct is not None:
                after = (ct.start, ct.encode, ct.send, ct.finish)
                self.copy_steps.append(tuple(a - b for a, b in zip(after, before)))
            self.last_end = end

    def _copy_ranges(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return super()._copy_ranges(*args, **kwargs)
        finally:
            self._copies.append((t, time.perf_counter()))


def _processed(pipe: Any) -> int:
    """Input messages the worker has delivered (decoded rows, written or dead-lettered, plus
    undecodable messages)."""
    # The worker's counters, read without metrics() (which sorts latency samples and would
    # take CPU from the pipeline it measures); metrics() if the runtime keeps them elsewhere.
    for name in ("_deliver_stats", "_stats"):
        s = getattr(pipe, name, None)
        if s is not None and hasattr(s, "decoded_rows"):
            return int(s.decoded_rows) + int(s.decode_errors)
    time.sleep(0.018)
    m = pipe.metrics()
    return int(m["decoded"]) + int(m["decode_errors"])


def run_kfast(
    bootstrap: str,
    topic: str,
    dsn: str,
    n: int,
    path: str,
    pids: tuple[int | None, int | None],
    bad: list[int] | None = None,
    create_topic: Any = None,
) -> dict[str, Any]:
    table = f"e2e_{path}"
    reset(dsn, table)
    opts = dict(KFAST_PATHS[path])
    sink = _TimedSink(dsn, table, **opts)
    dlq = None
    dlq_topic = ""
    if bad is not None:
        dlq_topic = f"{topic}-dlq-{time.time_ns()}"
        create_topic(dlq_topic)
        dlq = kfast.DeadLetterPolicy(topic=dlq_topic, max_ratio=0.05)
    pipe = kfast.Pipeline(
        kafka={
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{path}-{time.time_ns()}",
            "auto.offset.reset": "earliest",
        },
        topics=[topic],
        decoder=kfast.AvroDecoder(ORDER_SCHEMA),
        sink=sink,
        batch=kfast.BatchPolicy(max_rows=BATCH, max_wait=0.05),
        dlq=dlq,
        memory_limit="256MiB",
        install_signal_handlers=False,
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            pipe.run()
        except BaseException as exc:
            errors.append(exc)

    cpu = CpuWindow(*pids)
    t0 = time.perf_counter()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    deadline = time.monotonic() + 600
    started = False
    threads0: dict[str, float] = {}
    # A 2 ms poll of two counters costs ~0.1% of a core; the end is known within 2 ms.
    while not errors and time.monotonic() < deadline:
        if not started and sink.first_t:
            cpu.start(sink.first_cpu, sink.first_t)
            threads0 = thread_cpu()
            started = True
        if _processed(pipe) >= n:
            break
        time.sleep(0.002)
    end = time.perf_counter()
    cpu.stop(t=end)
    threads1 = thread_cpu()
    metrics = pipe.metrics()
    pipe.stop()
    th.join(120)
    if errors:
        raise errors[0]
    if bad is None:
        check_table(dsn, table, n, [])
    else:
        check_table(dsn, table, n, bad)
        got = dlq_offsets(bootstrap, dlq_topic, len(bad))
        if sorted(got) != bad:
            missing = sorted(set(bad) - set(got))[:5]
            extra = sorted(set(got) - set(bad))[:5]
            raise AssertionError(
                f"DLQ: {len(got)} records for {len(bad)} bad ones (missing {missing}, "
                f"extra or duplicated {extra})"
            )
    assert sink.first_t
    st = sink.stages
    clean = [s for s in st if s[3] >= BATCH // 2]  # full batches only
    lat = metrics.get("latency_s", {})

    def ms(xs: list[float]) -> float:
        return 1000 * statistics.median(xs) if xs else 0.0

    return {
        "seconds": end - t0,
        "steady_rows_per_s": n / (end - sink.first_t),
        "cpu_us_per_row": cpu.per_row_us(n),
        "thread_cpu_us_per_row": thread_cpu_us(threads0, threads1, n),
        "fenced_rows": getattr(sink, "fenced_rows", 0),
        "stages_ms": {
            "batches": len(st),
            "sink_wait_p50": ms([s[0] for s in clean[1:]]),
            "write_p50": ms([s[1] for s in clean]),
            "copy_p50": ms([s[2] for s in clean]),
            "write_minus_copy_p50": ms([s[1] - s[2] for s in clean]),
            "sum_wait_s": sum(s[0] for s in st),
            "sum_write_s": sum(s[1] for s in st),
            "sum_copy_s": sum(s[2] for s in st),
            **{
                f"copy_{step}_p50": ms([c[k] for c, s in zip(sink.copy_steps, st) if s in clean])
                for k, step in enumerate(("start", "encode", "send", "finish"))
            },
            "decode_p50": 1000 * lat.get("decode", {}).get("p50", 0.0),
            "deliver_p50": 1000 * lat.get("deliver", {}).get("p50", 0.0),
        },
    }


# ---------------------------------------------------------------- naive and ceiling


def run_naive(
    bootstrap: str, topic: str, dsn: str, n: int, pids: tuple[int | None, int | None]
) -> dict[str, Any]:
    from confluent_kafka import Consumer

    table = "e2e_naive"
    reset(dsn, table)
    parsed = fastavro.parse_schema(ORDER_SCHEMA)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-naive-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
        }
    )
    consumer.subscribe([topic])
    copy_sql = f"COPY {table} ({', '.join(COLS)}) FROM STDIN (FORMAT BINARY)"
    done = 0
    cpu = CpuWindow(*pids)
    first = 0.0
    with psycopg.connect(dsn) as conn:
        t0 = time.perf_counter()
        while done < n:
            msgs = consumer.consume(num_messages=BATCH, timeout=0.5)
            if not msgs:
                continue
            if not first:
                cpu.start()
                first = cpu.t[0]
            with conn.cursor() as cur, cur.copy(copy_sql) as cp:
                cp.set_types(TYPES)
                for m in msgs:
                    if m.error() is not None:
                        continue
                    r: Any = fastavro.schemaless_reader(
                        io.BytesIO(m.value() or b""), parsed, parsed
                    )
                    a = r["address"]
                    cp.write_row(
                        (
                            r["id"],
                            r["customer"],
                            r["price"],
                            r["quantity"],
                            r["paid"],
                            r["created_at"],
                            r["status"],
                            r["coupon"],
                            r["items"],
                            a["city"],
                            a["zip"],
                        )
                    )
                    done += 1
            conn.commit()
            consumer.commit(asynchronous=False)
        end = time.perf_counter()
        cpu.stop(t=end)
    consumer.close()
    check_table(dsn, table, n, [])
    return {
        "seconds": end - t0,
        "steady_rows_per_s": n / (end - first),
        "cpu_us_per_row": cpu.per_row_us(n),
    }


def run_kafka_floor(
    bootstrap: str, topic: str, n: int, pids: tuple[int | None, int | None]
) -> dict[str, Any]:
    from kfast.runtime.kafka.source import CompiledSource
    from kfast.runtime.memory import plan_memory

    plan = plan_memory("256MiB", {}, kfast.BatchPolicy(max_rows=BATCH), kfast.BufferPolicy())
    src = CompiledSource(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-floor-{time.time_ns()}",
            "auto.offset.reset": "earliest",
        },
        [topic],
        plan_settings=plan.kafka_settings(),
        on_assign=lambda parts: None,
        on_revoke=lambda parts: None,
        on_lost=lambda parts: None,
        on_error=lambda err: None,
    )
    cpu = CpuWindow(*pids)
    t0 = time.perf_counter()
    src.subscribe()
    got = 0
    first = 0.0
    threads0: dict[str, float] = {}
    try:
        while got < n:
            k = src.consumer.consume_discard(BATCH, 0.5)
            if k and not first:
                cpu.start()
                threads0 = thread_cpu()
                first = cpu.t[0]
            got += k
        end = time.perf_counter()
        cpu.stop(t=end)
        threads1 = thread_cpu()
    finally:
        src.close()
    return {
        "seconds": end - t0,
        "steady_rows_per_s": n / (end - first),
        "cpu_us_per_row": cpu.per_row_us(n),
        "thread_cpu_us_per_row": thread_cpu_us(threads0, threads1, n),
    }


def encode_streams(payloads: list[bytes], dsn: str) -> tuple[list[bytes], list[str], float]:
    """Every batch of ``payloads`` as one binary COPY stream, encoded by kfast (outside any
    timing); returns (streams, columns, encoder seconds)."""
    reset(dsn, "e2e_ceiling")
    dec = kfast.AvroDecoder(ORDER_SCHEMA)
    sink = PostgresSink(dsn, "e2e_ceiling")
    streams: list[bytes] = []
    enc_s = 0.0
    columns: list[str] = []
    for i in range(0, len(payloads), BATCH):
        b = dec.decode(payloads[i : i + BATCH])
        plan = sink._ensure_plan(b)
        columns = list(plan.columns)
        enc = sink._encoders[0]
        t = time.perf_counter()
        enc.clear()
        enc.header()
        enc.encode(b, 0, b.num_rows, 1 << 40)
        enc.trailer()
        enc_s += time.perf_counter() - t
        streams.append(bytes(memoryview(enc)))
    sink.close()
    return streams, columns, enc_s


def run_ceiling(
    dsn: str,
    streams: list[bytes],
    columns: list[str],
    n: int,
    pids: tuple[int | None, int | None],
    connections: int = 1,
) -> dict[str, Any]:
    """COPY of pre-encoded binary buffers; with ``connections`` > 1, that many threads each
    COPY every n-th batch on their own connection."""
    table = "e2e_ceiling"
    reset(dsn, table)
    copy_sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
    conns = [psycopg.connect(dsn) for _ in range(connections)]
    per_batch: list[float] = []

    def copy_every(k: int) -> None:
        conn = conns[k]
        for data in streams[k::connections]:
            t = time.perf_counter()
            mv = memoryview(data)
            with conn.cursor() as cur, cur.copy(copy_sql) as cp:
                for j in range(0, len(mv), 128 << 10):
                    cp.write(mv[j : j + (128 << 10)])
            conn.commit()
            per_batch.append(time.perf_counter() - t)

    cpu = CpuWindow(*pids)
    try:
        t0 = time.perf_counter()
        cpu.start(t=t0)
        threads = [threading.Thread(target=copy_every, args=(k,)) for k in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end = time.perf_counter()
        cpu.stop(t=end)
    finally:
        for c in conns:
            c.close()
    assert count(dsn, table) == n
    return {
        "seconds": end - t0,
        "steady_rows_per_s": n / (end - t0),
        "cpu_us_per_row": cpu.per_row_us(n),
        "stages_ms": {"copy_commit_p50": 1000 * statistics.median(per_batch)},
    }


def warm_up(bootstrap: str, topic: str) -> None:
    """Join a throwaway group and read one message before timing anything: on a fresh broker
    the first group creates ``__consumer_offsets`` (50 partitions, seconds), a cost that would
    otherwise fall on whichever path runs first."""
    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-warm-{time.time_ns()}",
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([topic])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            break
    c.commit(asynchronous=False)
    c.close()


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------- the run


def bench(
    bootstrap: str,
    create_topic: Any,
    produce: Any,
    dsn: str,
    n: int,
    rounds: int = 1,
    paths: list[str] | None = None,
    pids: tuple[int | None, int | None] = (None, None),
) -> dict[str, Any]:
    paths = list(paths or PATHS)
    for must in ("ceiling", "copy"):
        if must not in paths:
            paths.insert(0, must)
    payloads = encode_orders(n)
    topic = f"bench-e2e-{time.time_ns()}"
    create_topic(topic)
    for i in range(0, n, 100_000):
        produce(topic, payloads[i : i + 100_000])
    bad: list[int] = []
    ptopic = ""
    n_corrupt = n_violate = 0
    if "copy_poisoned" in paths:
        poisoned, corrupt, violate = poison(payloads)
        n_corrupt, n_violate = len(corrupt), len(violate)
        bad = sorted(corrupt + violate)
        ptopic = topic + "-poisoned"
        create_topic(ptopic)
        for i in range(0, n, 100_000):
            produce(ptopic, poisoned[i : i + 100_000])
        del poisoned
    warm_up(bootstrap, topic)
    streams, columns, enc_s = encode_streams(payloads, dsn)
    del payloads
    run_ceiling(dsn, streams, columns, n, pids)  # untimed: the first pass is slower
    gc.collect()
    gc.freeze()
    per_round: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            res: dict[str, dict[str, Any]] = {}
            k = r % len(paths)
            load_before = _load()
            for path in paths[k:] + paths[:k]:
                if path in KFAST_PATHS:
                    if path == "copy_poisoned":
                        res[path] = run_kfast(
                            bootstrap, ptopic, dsn, n, path, pids, bad, create_topic
                        )
                    else:
                        res[path] = run_kfast(bootstrap, topic, dsn, n, path, pids)
                elif path == "naive":
                    res[path] = run_naive(bootstrap, topic, dsn, n, pids)
                elif path == "kafka_floor":
                    res[path] = run_kafka_floor(bootstrap, topic, n, pids)
                else:
                    conns = 2 if path.endswith("_2conn") else 1
                    res[path] = run_ceiling(dsn, streams, columns, n, pids, conns)
            rd: dict[str, Any] = {
                "load_before": load_before,
                "load_after": _load(),
                "seconds": {p: res[p]["seconds"] for p in paths},
                "steady_rows_per_s": {p: res[p]["steady_rows_per_s"] for p in paths},
                "cpu_us_per_row": {p: res[p]["cpu_us_per_row"] for p in paths},
                "thread_cpu_us_per_row": {
                    p: res[p]["thread_cpu_us_per_row"]
                    for p in paths
                    if "thread_cpu_us_per_row" in res[p]
                },
                "stages_ms": {p: res[p]["stages_ms"] for p in paths if "stages_ms" in res[p]},
            }
            per_round.append(rd)
            sec = rd["seconds"]
            line = ", ".join(f"{p} {n / sec[p]:,.0f}" for p in paths)
            extra = f"copy {100 * sec['ceiling'] / sec['copy']:.0f}% of ceiling"
            if "copy_poisoned" in sec:
                extra += f", poisoned/clean {100 * sec['copy'] / sec['copy_poisoned']:.0f}%"
            print(f"  round {r + 1} (load {load_before}): {line} rows/s; {extra}", flush=True)
    finally:
        gc.unfreeze()

    med = {p: statistics.median([rd["seconds"][p] for rd in per_round]) for p in paths}
    med_steady = {
        p: statistics.median([rd["steady_rows_per_s"][p] for rd in per_round]) for p in paths
    }
    cpu = {
        p: {
            k: statistics.median([rd["cpu_us_per_row"][p].get(k, 0.0) for rd in per_round])
            for k in ("client", "postgres", "kafka")
        }
        for p in paths
    }

    def in_round(a: str, b: str) -> list[float]:
        """rate(a) / rate(b) in each round."""
        return [rd["seconds"][b] / rd["seconds"][a] for rd in per_round]

    ratios: dict[str, Any] = {}
    for p in paths:
        ratios[p] = {"vs_ceiling": med["ceiling"] / med[p]}
        if "naive" in med:
            ratios[p]["vs_naive"] = med["naive"] / med[p]
        ratios[p]["vs_ceiling_in_round"] = in_round(p, "ceiling")
        if "naive" in med:
            ratios[p]["vs_naive_in_round"] = in_round(p, "naive")
    goals: dict[str, Any] = {
        "clean_share_of_ceiling": med["ceiling"] / med["copy"],
        "clean_share_of_ceiling_in_round": in_round("copy", "ceiling"),
        "clean_share_of_ceiling_goal": 0.70,
    }
    if "copy_poisoned" in med:
        goals.update(
            poisoned_vs_clean=med["copy"] / med["copy_poisoned"],
            poisoned_vs_clean_in_round=in_round("copy_poisoned", "copy"),
            poisoned_vs_clean_goal=0.80,
        )
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SHOW server_version").fetchone()
    return {
        "rows": n,
        "batch_rows": BATCH,
        "rounds": rounds,
        "paths": paths,
        "copy_bytes": sum(len(s) for s in streams),
        "encoder_us_per_row": 1e6 * enc_s / n,
        "poisoned": {
            "corrupt": n_corrupt,
            "violating": n_violate,
            "good": n - n_corrupt - n_violate,
        },
        "seconds": med,
        "rows_per_s": {p: n / med[p] for p in paths},
        "steady_rows_per_s": med_steady,
        "cpu_us_per_row": cpu,
        "ratios": ratios,
        "goals": goals,
        "per_round": per_round,
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "psycopg": psycopg.__version__,
            "psycopg_impl": psycopg.pq.__impl__,
            "postgresql": row[0] if row else "?",
            "kfast": kfast.__version__,
            "load_at_end": _load(),
            "switch_interval_s": sys.getswitchinterval(),
            "git": _git_head(),
            "note": "single-node Kafka and PostgreSQL from kfast.testing on loopback, same machine",
        },
    }


def _git_head() -> str:
    """The commit benchmarked, "+dirty" when the work tree has changes."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return head + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report(res: dict[str, Any]) -> str:
    n = res["rows"]
    out = [
        f"{n:,} order records Kafka -> PostgreSQL, batches of {res['batch_rows']:,}, "
        f"median of {res['rounds']} rounds (load before each round: "
        + ", ".join(rd["load_before"] for rd in res["per_round"])
        + ")",
        f"{'path':<14} {'rows/s':>10} {'steady':>10} {'x naive':>8} {'% ceil':>7} "
        f"{'client':>7} {'pg':>6} {'kafka':>6}  (CPU us/row)",
    ]
    r, st, cpu, q = (
        res["rows_per_s"],
        res["steady_rows_per_s"],
        res["cpu_us_per_row"],
        res["ratios"],
    )
    for p in res["paths"]:
        out.append(
            f"{p:<14} {r[p]:>10,.0f} {st[p]:>10,.0f} {q[p].get('vs_naive', 0):>8.2f} "
            f"{100 * q[p]['vs_ceiling']:>6.0f}% {cpu[p]['client']:>7.2f} "
            f"{cpu[p]['postgres']:>6.2f} {cpu[p]['kafka']:>6.2f}"
        )
    g = res["goals"]
    out.append(
        f"goal clean >= 70% of ceiling: {100 * g['clean_share_of_ceiling']:.0f}% (in each round: "
        + ", ".join(f"{100 * x:.0f}%" for x in g["clean_share_of_ceiling_in_round"])
        + ")"
    )
    if "poisoned_vs_clean" in g:
        p = res["poisoned"]
        out.append(
            f"goal poisoned >= 80% of clean: {100 * g['poisoned_vs_clean']:.0f}% (in each round: "
            + ", ".join(f"{100 * x:.0f}%" for x in g["poisoned_vs_clean_in_round"])
            + f"); {p['corrupt']} corrupt + {p['violating']} violating records, all in the DLQ, "
            f"{p['good']:,} rows in the table"
        )
    out.append(f"kfast's COPY encoder alone: {res['encoder_us_per_row']:.3f} us/row")
    for rd in res["per_round"][-1:]:
        for p, t in rd.get("thread_cpu_us_per_row", {}).items():
            out.append(f"  client CPU by thread {p} (last round, us/row): " + json.dumps(t))
        for p, s in rd["stages_ms"].items():
            out.append(f"  stages {p} (last round, ms p50): " + json.dumps(s))
    out.append(json.dumps(res["environment"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", help="comma-separated subset of: " + ", ".join(PATHS))
    ap.add_argument("--json", help="write the result here")
    ap.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval() for this process (diagnosis: how long a thread that "
        "blocked on the server waits to get the GIL back; Python's default is 0.005 s)",
    )
    ns = ap.parse_args(argv)
    if ns.switch_interval:
        sys.setswitchinterval(ns.switch_interval)
    paths = ns.paths.split(",") if ns.paths else None
    if paths and not set(paths) <= set(PATHS):
        ap.error(f"unknown paths: {sorted(set(paths) - set(PATHS))}")
    from kfast.testing import KafkaBroker, PostgresServer

    print(f"uptime load at start: {_load()}", flush=True)
    with KafkaBroker() as kb, PostgresServer() as pg:
        res = bench(
            kb.bootstrap,
            kb.create_topic,
            kb.produce,
            pg.dsn,
            ns.rows,
            ns.rounds,
            paths,
            (pg.pid, kb.pid),
        )
    print(report(res))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def test_bench_e2e_postgres(kafka_broker: Any, pg_dsn: str, benchmark: Any) -> None:
    n = int(os.environ.get("KFAST_BENCH_ROWS", "100000"))
    res = benchmark.pedantic(
        bench,
        args=(kafka_broker.bootstrap, kafka_broker.create_topic, kafka_broker.produce, pg_dsn, n),
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(res)


if __name__ == "__main__":
    sys.exit(main())
