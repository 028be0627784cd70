"""The README's main job: Kafka -> kfast -> PostgreSQL, end to end, verified.

``python -m kfast.demo`` (``make demo``) starts a local Kafka broker and a
PostgreSQL cluster (kfast.testing), produces order records in Avro with a
small share of corrupt payloads and of rows that violate a CHECK constraint,
runs a kfast Pipeline into PostgreSQL while printing its progress, and ends
with a summary that it checks against the table and the dead-letter topic.
Exit status 0 only when every message is accounted for exactly.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from kfast.testing.orders import ORDER_SCHEMA, ORDER_TABLE_DDL, encode, make_order

CORRUPT_SHARE = 0.005
VIOLATION_SHARE = 0.001
PARTITIONS = 8


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


class _Progress:
    """One status line rewritten in place (a plain line per update when not a TTY)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.25 if self.tty else 2.0):
            return
        self.last = now
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def done(self, text: str) -> None:
        self.show(text, force=True)
        if self.tty:
            sys.stdout.write("\n")


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / max(total, 1):5.1f}%"


def produce_orders(bootstrap: str, topic: str, n: int, seed: int) -> dict[str, int]:
    """Produce ``n`` order payloads; returns how many of each kind were sent."""
    import fastavro
    from confluent_kafka import Producer

    parsed = fastavro.parse_schema(ORDER_SCHEMA)
    rng = random.Random(seed)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    counts = collections.Counter[str]()
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    progress = _Progress()
    for i in range(n):
        roll = rng.random()
        if roll < CORRUPT_SHARE:
            payload = encode(make_order(i, rng), parsed)
            # Cut inside the record: a truncated payload the decoder must reject.
            payload = payload[: rng.randrange(1, len(payload) - 1)]
            counts["corrupt"] += 1
        elif roll < CORRUPT_SHARE + VIOLATION_SHARE:
            payload = encode(make_order(i, rng, violate=True), parsed)
            counts["violation"] += 1
        else:
            payload = encode(make_order(i, rng), parsed)
            counts["good"] += 1
        while True:
            try:
                producer.produce(topic, payload, key=str(i).encode(), on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
            progress.show(f"producing {_bar(i, n)} {_fmt_int(i)}/{_fmt_int(n)} records")
    remaining = producer.flush(120)
    if remaining or failures:
        raise RuntimeError(f"producer: {remaining} undelivered, errors: {failures[:3]}")
    progress.done(
        f"produced  {_bar(n, n)} {_fmt_int(n)} records "
        f"({counts['corrupt']} corrupt, {counts['violation']} constraint-violating)"
    )
    return dict(counts)


def count_dlq(
    bootstrap: str, topic: str, expected: int, timeout: float = 60.0
) -> dict[tuple[str, str], int]:
    """Read the DLQ topic to the end; count records by (stage, error class)."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"kfast-demo-dlq-check-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        seen = 0
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            msgs = consumer.consume(1000, 0.5)
            if not msgs:
                if seen >= expected and time.monotonic() - idle_since > 2.0:
                    break
                continue
            idle_since = time.monotonic()
            for msg in msgs:
                if msg.error():
                    continue
                headers = dict(msg.headers() or [])
                stage = _text(headers.get("kfast.error.stage"))
                cls = _text(headers.get("kfast.error.class"))
                counts[(stage, cls)] += 1
                seen += 1
    finally:
        consumer.close()
    return dict(counts)


def _text(value: str | bytes | None) -> str:
    if value is None:
        return "?"
    return value.decode() if isinstance(value, bytes) else value


@contextlib.contextmanager
def _services(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    from kfast.testing import KafkaBroker, PostgresServer

    with contextlib.ExitStack() as stack:
        if args.bootstrap:
            bootstrap = args.bootstrap
        else:
            t0 = time.monotonic()
            print("starting Apache Kafka (KRaft, single node) ...", flush=True)
            broker = stack.enter_context(KafkaBroker())
            bootstrap = broker.bootstrap
            print(f"  broker at {bootstrap} in {time.monotonic() - t0:.1f}s", flush=True)
        if args.dsn:
            dsn = args.dsn
        else:
            t0 = time.monotonic()
            print("starting PostgreSQL ...", flush=True)
            pg = stack.enter_context(PostgresServer())
            dsn = pg.dsn
            print(f"  server at {dsn} in {time.monotonic() - t0:.1f}s", flush=True)
        yield bootstrap, dsn


def _create_topics(bootstrap: str, names: list[str]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in names]
    )
    for topic, fut in futures.items():
        try:
            fut.result(30)
        except Exception as exc:  # an existing topic is fine, anything else is not
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"cannot create topic {topic}: {exc}") from exc


def run_demo(args: argparse.Namespace) -> int:
    import psycopg

    import kfast

    n = args.messages
    topic = f"orders-{time.strftime('%H%M%S')}"
    dlq_topic = topic + ".dlq"
    table = "orders"
    with _services(args) as (bootstrap, dsn):
        _create_topics(bootstrap, [topic, dlq_topic])
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(ORDER_TABLE_DDL.format(table=table))

        t0 = time.monotonic()
        sent = produce_orders(bootstrap, topic, n, args.seed)
        print(f"  in {time.monotonic() - t0:.1f}s", flush=True)

        pipe = kfast.Pipeline(
            kafka={
                "bootstrap.servers": bootstrap,
                "group.id": f"kfast-demo-{topic}",
                "auto.offset.reset": "earliest",
            },
            topics=[topic],
            decoder=kfast.AvroDecoder(ORDER_SCHEMA),
            sink=kfast.PostgresSink(dsn, table=table),
            batch=kfast.BatchPolicy(max_rows=20_000, max_wait=0.1),
            retry=kfast.RetryPolicy(
                max_attempts=8, initial_backoff=0.1, max_backoff=5.0, deadline=120.0
            ),
            dlq=kfast.DeadLetterPolicy(topic=dlq_topic, max_ratio=0.05),
            memory_limit=args.memory_limit,
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                pipe.run()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        worker = threading.Thread(target=run, name="kfast-demo-pipeline", daemon=True)
        started = time.monotonic()
        worker.start()
        progress = _Progress()
        peak_rss = 0
        m: dict[str, Any] = {}
        rate_mark = (time.monotonic(), 0)
        rate = 0.0
        try:
            while worker.is_alive():
                time.sleep(0.2)
                m = pipe.metrics()
                peak_rss = max(peak_rss, int(m.get("rss_bytes", 0)))
                dead = _dead_total(m)
                accounted = _rows_written(m) + dead
                now = time.monotonic()
                if now - rate_mark[0] >= 1.0:
                    rate = (accounted - rate_mark[1]) / (now - rate_mark[0])
                    rate_mark = (now, accounted)
                lag = sum(m.get("consumer_lag", {}).values()) if m.get("consumer_lag") else 0
                progress.show(
                    f"loading   {_bar(accounted, n)} {_fmt_int(_rows_written(m))} rows "
                    f"{_fmt_int(rate)} msg/s  "
                    f"lag {_fmt_int(lag)}  dlq {_fmt_int(dead)}  "
                    f"RSS {_mib(m.get('rss_bytes', 0))} / limit {args.memory_limit}"
                )
                if accounted >= n:
                    break
                if time.monotonic() - started > args.timeout:
                    print(f"\ntimed out after {args.timeout:.0f}s", flush=True)
                    break
        except KeyboardInterrupt:
            print("\ninterrupted", flush=True)
        finally:
            pipe.stop()
            worker.join(60)
        elapsed = time.monotonic() - started
        m = pipe.metrics()
        if args.dump_metrics:
            import json

            print(json.dumps(m, indent=1, default=str))
        progress.done(f"loaded    {_bar(_rows_written(m) + _dead_total(m), n)} in {elapsed:.1f}s")
        if errors:
            print(f"pipeline failed: {errors[0]!r}", flush=True)
            return 1

        with psycopg.connect(dsn) as conn:
            rows_in_table = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
        expected_dead = sent.get("corrupt", 0) + sent.get("violation", 0)
        dlq = count_dlq(bootstrap, dlq_topic, expected_dead)
        return _summary(n, sent, m, elapsed, peak_rss, rows_in_table, dlq, args.memory_limit)


def _rows_written(m: dict[str, Any]) -> int:
    """Rows the sink confirmed (rows that went to the DLQ excluded)."""
    return int((m.get("delivery") or {}).get("rows_written", 0))


def _dead_total(m: dict[str, Any]) -> int:
    return int((m.get("delivery") or {}).get("dlq_records", 0))


def _summary(
    n: int,
    sent: dict[str, int],
    m: dict[str, Any],
    elapsed: float,
    peak_rss: int,
    rows_in_table: int,
    dlq: dict[tuple[str, str], int],
    memory_limit: str,
) -> int:
    lat = m.get("latency_s") or {}
    good = sent.get("good", 0)
    dlq_total = sum(dlq.values())
    expected_dead = sent.get("corrupt", 0) + sent.get("violation", 0)
    checks = [
        ("rows in table == good records", rows_in_table, good),
        ("DLQ records == corrupt + violating", dlq_total, expected_dead),
        (
            "DLQ decode-stage records == corrupt",
            sum(v for (stage, _), v in dlq.items() if stage == "decode"),
            sent.get("corrupt", 0),
        ),
        (
            "DLQ sink-stage records == violating",
            sum(v for (stage, _), v in dlq.items() if stage == "sink"),
            sent.get("violation", 0),
        ),
    ]
    rows = [
        ("messages", _fmt_int(n)),
        ("throughput", f"{_fmt_int(n / elapsed if elapsed else 0)} msg/s ({elapsed:.1f} s)"),
        *(
            (
                f"{label} latency p50/p95/p99",
                " / ".join(
                    f"{1000 * float(lat[stage].get(q) or 0):.1f}" for q in ("p50", "p95", "p99")
                )
                + " ms",
            )
            for stage, label in (("decode", "batch decode"), ("deliver", "batch delivery"))
            if stage in lat
        ),
        ("peak RSS", f"{_mib(peak_rss)} (limit {memory_limit} + interpreter)"),
        ("rows in table", _fmt_int(rows_in_table)),
        ("DLQ records", _fmt_int(dlq_total)),
        *((f"  {stage} / {cls}", _fmt_int(v)) for (stage, cls), v in sorted(dlq.items())),
        ("retries", _fmt_int((m.get("delivery") or {}).get("retries", 0))),
    ]
    width = max(len(k) for k, _ in rows) + 2
    print("\nsummary")
    print("-" * (width + 32))
    for k, v in rows:
        print(f"{k:<{width}}{v}")
    print("-" * (width + 32))
    ok = True
    for label, got, want in checks:
        mark = "ok" if got == want else "MISMATCH"
        ok &= got == want
        print(f"{mark:>8}  {label}: {_fmt_int(got)} (expected {_fmt_int(want)})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kfast demo", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--messages", "-n", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--memory-limit", default="256MiB")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    p.add_argument("--dsn", help="use this PostgreSQL instead of starting one")
    p.add_argument("--dump-metrics", action="store_true", help="print pipe.metrics() at the end")
    return run_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
