"""A Kafka -> PostgreSQL exactly_once pipeline in its own process (for kill -9 tests, area: sink).

python sink_eo_child.py BOOTSTRAP GROUP TOPIC DSN TABLE DLQ_TOPIC
"""

from __future__ import annotations

import sys

import kfast
from kfast.dlq import DeadLetterPolicy
from kfast.retry import RetryPolicy
from kfast.sinks.postgres import PostgresSink
from kfast.testing.orders import ORDER_SCHEMA


def main() -> None:
    bootstrap, group, topic, dsn, table, dlq = sys.argv[1:7]
    pipe = kfast.Pipeline(
        kafka={
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            # A killed member must leave the group fast (the broker's minimum is 6 s).
            "session.timeout.ms": "6000",
            "heartbeat.interval.ms": "1000",
        },
        topics=[topic],
        decoder=kfast.AvroDecoder(ORDER_SCHEMA),
        sink=PostgresSink(dsn, table, mode="exactly_once"),
        batch=kfast.BatchPolicy(max_rows=700, max_wait=0.02),
        retry=RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.5, deadline=60),
        dlq=DeadLetterPolicy(dlq, max_ratio=0.5),
        memory_limit="64MiB",
    )
    print("running", flush=True)
    pipe.run()


if __name__ == "__main__":
    main()
