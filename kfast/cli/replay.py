"""``kfast replay``: re-publish dead letters to their original topic (or another).

    kfast replay DLQ_TOPIC -b HOST:PORT [--to TOPIC] [--error-class C] [--stage S] ...

Original key, value and headers are restored; ``kfast.*`` headers are dropped. Filters by
error class or stage; ``--group`` commits what was replayed so a later run resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from kfast.dlq.headers import HEADER_PREFIX

__all__ = ["main"]


def _replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kfast replay",
        description="Re-publish dead letters to their original topic (or --to TOPIC). Original key, "
        "value and headers are restored; kfast.* headers are dropped.",
    )
    p.add_argument("dlq_topic", help="the DLQ topic to read")
    p.add_argument("--bootstrap-servers", "-b", required=True)
    p.add_argument("--to", dest="to_topic", help="publish here instead of kfast.original.topic")
    p.add_argument(
        "--error-class", action="append", default=[], help="only records of this class (repeatable)"
    )
    p.add_argument("--stage", choices=("decode", "sink"), help="only records of this stage")
    p.add_argument(
        "--group", help="consumer group: commit replayed offsets (resume later); default: read all"
    )
    p.add_argument(
        "--max-records", type=int, default=0, help="stop after this many replayed (0: no limit)"
    )
    p.add_argument(
        "--max-in-flight", type=int, default=10_000, help="bound on unacknowledged records"
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for records/deliveries"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed, publish nothing"
    )
    p.add_argument(
        "-X",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka setting",
    )
    return p


def main(args: Sequence[str] | None = None) -> int:
    """``kfast replay DLQ_TOPIC -b HOST:PORT [--to T] [--error-class C] ...``; returns the exit code."""
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    ns = _replay_parser().parse_args(list(args) if args is not None else None)
    if ns.max_in_flight < 1:
        print("kfast replay: --max-in-flight must be >= 1", file=sys.stderr)
        return 2
    extra: dict[str, str] = {}
    for s in ns.settings:
        k, sep, v = s.partition("=")
        if not sep:
            print(f"kfast replay: -X needs KEY=VALUE, got {s!r}", file=sys.stderr)
            return 2
        extra[k] = v
    base = {"bootstrap.servers": ns.bootstrap_servers, **extra}
    consumer = Consumer(
        {
            **base,
            "group.id": ns.group or f"kfast-replay-{int(time.time() * 1000)}",
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": "true",
        }
    )
    producer = Producer(
        {
            **base,
            "acks": "all",
            "enable.idempotence": "true",
            "queue.buffering.max.messages": str(max(ns.max_in_flight, 1)),
        }
    )
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    replayed = skipped = 0
    try:
        md = consumer.list_topics(ns.dlq_topic, timeout=ns.timeout)
        tmeta = md.topics.get(ns.dlq_topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            print(f"kfast replay: DLQ topic {ns.dlq_topic!r} not found", file=sys.stderr)
            return 1
        parts = [TopicPartition(ns.dlq_topic, p) for p in sorted(tmeta.partitions)]
        # Read up to the end offsets seen now (records arriving later are left for the next run).
        ends = {}
        for tp in parts:
            _lo, hi = consumer.get_watermark_offsets(tp, timeout=ns.timeout)
            ends[tp.partition] = hi
        consumer.assign(
            parts if ns.group else [TopicPartition(ns.dlq_topic, tp.partition, 0) for tp in parts]
        )
        done = {p for p, hi in ends.items() if hi == 0}
        deadline = time.monotonic() + ns.timeout
        while len(done) < len(parts) and not (ns.max_records and replayed >= ns.max_records):
            msg: Any = consumer.poll(0.2)
            if msg is None:
                if time.monotonic() > deadline:
                    break
                continue
            deadline = time.monotonic() + ns.timeout
            if msg.error() is not None:
                if msg.error().code() == -191:  # _PARTITION_EOF
                    done.add(msg.partition())
                    continue
                raise KafkaException(msg.error())
            if msg.offset() >= ends.get(msg.partition(), 0) - 1:
                done.add(msg.partition())
            if msg.offset() >= ends.get(msg.partition(), 0):
                continue
            headers = msg.headers() or []
            hd = {k: v for k, v in headers}
            cls = (hd.get("kfast.error.class") or b"").decode()
            stage = (hd.get("kfast.error.stage") or b"").decode()
            if (ns.error_class and cls not in ns.error_class) or (ns.stage and stage != ns.stage):
                skipped += 1
                continue
            target = ns.to_topic or (hd.get("kfast.original.topic") or b"").decode()
            if not target:
                skipped += 1
                continue
            if not ns.dry_run:
                original = [(k, v) for k, v in headers if not k.startswith(HEADER_PREFIX)]
                while True:
                    try:
                        producer.produce(
                            target,
                            value=msg.value(),
                            key=msg.key(),
                            headers=original,
                            on_delivery=on_delivery,
                        )
                        break
                    except BufferError:  # max in flight reached: wait for reports
                        producer.poll(0.1)
                producer.poll(0)
            replayed += 1
        left = producer.flush(ns.timeout)
        if left or errors:
            print(
                f"kfast replay: {left} records unconfirmed, {len(errors)} failed ({errors[:1]}); "
                "offsets not committed",
                file=sys.stderr,
            )
            return 1
        if ns.group and not ns.dry_run:
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if "NO_OFFSET" not in str(exc):
                    raise
    finally:
        consumer.close()
    verb = "would replay" if ns.dry_run else "replayed"
    print(f"kfast replay: {verb} {replayed} records from {ns.dlq_topic}, skipped {skipped}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
