"""Real-broker smoke test of an installed kfast (run by `make dist-check` in each wheel's venv).

Starts a throwaway Kafka broker with kfast.testing, produces Avro records, runs
Pipeline -> AvroDecoder -> CallableSink until every record arrived, stops the pipeline, and
checks rows and committed offsets. Run it with the venv's python from outside the source tree's
root so that `import kfast` finds the installed wheel (the script prints where it came from).
"""

from __future__ import annotations

import io
import sys
import threading
import time

import fastavro

import kfast
from kfast.testing import KafkaBroker

N = 2000
SCHEMA = {
    "type": "record",
    "name": "Order",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "sku", "type": "string"},
        {"name": "price", "type": "double"},
    ],
}


def _payloads() -> list[bytes]:
    parsed = fastavro.parse_schema(SCHEMA)
    out = []
    for i in range(N):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, {"id": i, "sku": f"sku-{i % 7}", "price": i / 4})
        out.append(buf.getvalue())
    return out


def main() -> int:
    print(f"kfast {kfast.__version__} from {kfast.__file__}")
    seen: list[int] = []
    lock = threading.Lock()

    def write(batch: kfast.Batch) -> None:
        rows = batch.to_pylist()
        with lock:
            seen.extend(row["id"] for row in rows)

    started = time.monotonic()
    with KafkaBroker() as broker:
        broker.create_topic("smoke", partitions=2)
        broker.produce("smoke", _payloads())
        conf = broker.consumer_config("smoke-group")
        pipe = kfast.Pipeline(
            kafka=conf,
            topics=["smoke"],
            decoder=kfast.AvroDecoder(SCHEMA),
            sink=kfast.CallableSink(write),
            memory_limit="64MiB",
            install_signal_handlers=False,
        )
        pipe.start()
        deadline = time.monotonic() + 120
        while len(seen) < N and time.monotonic() < deadline and pipe.running:
            time.sleep(0.05)
        pipe.stop()
        pipe.join(60)
        if sorted(seen) != list(range(N)):
            print(f"FAIL: {len(seen)} rows, {len(set(seen))} distinct, expected {N}")
            return 1
        from confluent_kafka import Consumer, TopicPartition

        check = Consumer(conf)
        try:
            committed = check.committed([TopicPartition("smoke", p) for p in (0, 1)], timeout=30)
        finally:
            check.close()
        total = sum(tp.offset for tp in committed)
        if total != N:
            print(f"FAIL: committed offsets sum to {total}, expected {N}")
            return 1
    print(
        f"OK: {N} records produced, decoded, delivered and committed in "
        f"{time.monotonic() - started:.1f} s (broker start included)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
