"""A pipeline in its own process for the session-expiry test (test_runtime_lost.py).

    python lost_child.py BOOTSTRAP GROUP TOPIC DIR [--hold-after N] [--kafka KEY=VALUE ...]

It runs until SIGTERM (drain, commit, close) and leaves in DIR:

* ``rows.txt``: "partition offset id" per delivered row, one ``os.write`` per batch;
* ``commits.txt``: one JSON line per commit outcome librdkafka reports (``on_commit``):
  ``{"err": str | null, "offsets": [[partition, offset, str | null], ...]}``;
* ``metrics.json``: ``pipe.metrics()``, rewritten (atomically) every 0.1 s;
* ``held``: created when the sink starts holding a batch (see below).

With ``--hold-after N``, once N rows are written the sink holds its next batch, before
writing it, for as long as ``DIR/hold`` exists (the test creates it before the start).

stdout gets "metrics <json>" at exit, stderr kfast's log (INFO) and a "SIGCONT" line when the
process is resumed.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from runtime_util import SCHEMA

import kfast


class FileSink:
    def __init__(self, directory: str, hold_after: int) -> None:
        self.dir = directory
        self.fd = os.open(
            os.path.join(directory, "rows.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )
        self.hold_after = hold_after
        self.written = 0

    def write(self, batch):  # type: ignore[no-untyped-def]
        if self.hold_after >= 0 and self.written >= self.hold_after:
            hold = os.path.join(self.dir, "hold")
            if os.path.exists(hold):
                with open(os.path.join(self.dir, "held"), "w"):
                    pass
                while os.path.exists(hold):
                    time.sleep(0.01)
        recs = batch.context.records
        ids = memoryview(batch.column("id")).tolist()
        src = memoryview(batch.source_indices).tolist()
        lines = [f"{recs.partition(j)} {recs.offset(j)} {ids[r]}\n" for r, j in enumerate(src)]
        os.write(self.fd, "".join(lines).encode())
        self.written += len(lines)

    def close(self) -> None:
        os.close(self.fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("group")
    ap.add_argument("topic")
    ap.add_argument("dir")
    ap.add_argument("--hold-after", type=int, default=-1)
    ap.add_argument("--batch-rows", type=int, default=250)
    ap.add_argument("--source", default="confluent", help="Pipeline(source=)")
    ap.add_argument("--kafka", action="append", default=[], help="extra librdkafka KEY=VALUE")
    a = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )

    faulthandler.register(signal.SIGUSR1)  # the test dumps the stacks of a hung shutdown
    # the wake-up in the log, for reading it next to kfast's "lost" line
    signal.signal(signal.SIGCONT, lambda *_: logging.getLogger("lost_child").info("SIGCONT"))
    commits_fd = os.open(
        os.path.join(a.dir, "commits.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
    )

    def on_commit(err, partitions):  # type: ignore[no-untyped-def]
        rec = {
            "err": None if err is None else str(err),
            "offsets": [
                [tp.partition, tp.offset, None if tp.error is None else str(tp.error)]
                for tp in partitions
            ],
        }
        os.write(commits_fd, (json.dumps(rec) + "\n").encode())

    conf = {
        "bootstrap.servers": a.bootstrap,
        "group.id": a.group,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
        "topic.metadata.refresh.interval.ms": 5000,
        "on_commit": on_commit,
    }
    conf.update(kv.split("=", 1) for kv in a.kafka)
    pipe = kfast.Pipeline(
        conf,
        [a.topic],
        kfast.AvroDecoder(SCHEMA),
        FileSink(a.dir, a.hold_after),
        memory_limit="64MiB",
        batch=kfast.BatchPolicy(max_rows=a.batch_rows, max_bytes="1MiB", max_wait=0.02),
        revoke_timeout=2.0,
        commit_interval=0.2,
        source=a.source,
    )
    metrics_path = os.path.join(a.dir, "metrics.json")

    def snapshot() -> None:
        m = pipe.metrics()
        m.pop("memory_plan", None)
        m["exit_reason"] = pipe.exit_reason
        tmp = metrics_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(m, f, default=str)
        os.replace(tmp, metrics_path)

    done = threading.Event()

    def publish() -> None:
        while not done.wait(0.1):
            snapshot()

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        pipe.run()
    finally:
        done.set()
        publisher.join()  # one writer of metrics.json.tmp at a time
        snapshot()
    m = pipe.metrics()
    m.pop("memory_plan", None)
    print("metrics", json.dumps(m, default=str), flush=True)


if __name__ == "__main__":
    main()
