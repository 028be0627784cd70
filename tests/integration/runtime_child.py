"""A pipeline in its own process (kill -9 and RSS tests).

    python runtime_child.py BOOTSTRAP GROUP TOPIC OUT_FILE [--memory-limit 64MiB]
        [--stall-file PATH] [--strategy cooperative-sticky] [--max-poll-ms N]

The sink appends "partition offset id" lines to OUT_FILE with one os.write per
batch (durable against kill -9: the kernel keeps the page). While STALL_FILE
exists the sink blocks. Prints "baseline_rss <bytes>" before run() and a JSON
metrics line at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from runtime_util import SCHEMA

import kfast
from kfast.runtime.pipeline import _rss_bytes


class FileSink:
    def __init__(self, path: str, stall_file: str | None, delay: float = 0.0) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.stall_file = stall_file
        self.delay = delay

    def write(self, batch):  # type: ignore[no-untyped-def]
        while self.stall_file and os.path.exists(self.stall_file):
            time.sleep(0.05)
        if self.delay:
            time.sleep(self.delay)
        recs = batch.context.records
        ids = memoryview(batch.column("id")).tolist()
        src = memoryview(batch.source_indices).tolist()
        lines = [f"{recs.partition(j)} {recs.offset(j)} {ids[r]}\n" for r, j in enumerate(src)]
        os.write(self.fd, "".join(lines).encode())

    def close(self) -> None:
        os.close(self.fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("group")
    ap.add_argument("topic")
    ap.add_argument("out")
    ap.add_argument("--memory-limit", default="64MiB")
    ap.add_argument("--stall-file")
    ap.add_argument("--strategy", default="cooperative-sticky")
    ap.add_argument("--max-poll-ms", type=int, default=300000)
    ap.add_argument("--buffer-messages", type=int)
    ap.add_argument("--batch-rows", type=int, default=2000)
    ap.add_argument("--sink-delay", type=float, default=0.0)
    ap.add_argument("--source", default="confluent", help="Pipeline(source=)")
    ap.add_argument("--kafka", action="append", default=[], help="extra librdkafka KEY=VALUE")
    a = ap.parse_args()
    conf = {
        "bootstrap.servers": a.bootstrap,
        "group.id": a.group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "max.poll.interval.ms": a.max_poll_ms,
        "partition.assignment.strategy": a.strategy,
        "fetch.wait.max.ms": 100,
    }
    conf.update(kv.split("=", 1) for kv in a.kafka)
    buffer = kfast.BufferPolicy(max_messages=a.buffer_messages) if a.buffer_messages else None
    pipe = kfast.Pipeline(
        conf,
        [a.topic],
        kfast.AvroDecoder(SCHEMA),
        FileSink(a.out, a.stall_file, a.sink_delay),
        memory_limit=a.memory_limit,
        buffer=buffer,
        batch=kfast.BatchPolicy(max_rows=a.batch_rows, max_bytes="1MiB", max_wait=0.02),
        revoke_timeout=2.0,
        commit_interval=0.2,
        source=a.source,
    )
    print("baseline_rss", _rss_bytes(), flush=True)
    print("plan", json.dumps(pipe.memory_plan().as_dict()), flush=True)
    pipe.run()
    m = pipe.metrics()
    m.pop("memory_plan", None)
    print("metrics", json.dumps(m, default=str), flush=True)


if __name__ == "__main__":
    main()
