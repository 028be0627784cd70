"""A service whose main thread does its own work while a kfast Pipeline runs in its threads.

``start()`` returns once the pipeline's threads run; the host stops it with ``stop()`` (from any
thread, or from a signal handler it installed itself), waits with ``join()``, which re-raises the
pipeline's error, and releases everything with ``close()``.

    KFAST_BOOTSTRAP=127.0.0.1:9092 KFAST_DSN=postgresql://postgres@127.0.0.1/kfast \\
        python docs/examples/thread_service.py

Settings come from the environment (or ``argv``: bootstrap, then DSN): ``KFAST_BOOTSTRAP``,
``KFAST_DSN``, ``KFAST_TOPIC`` (default ``events``), ``KFAST_GROUP`` (``events-to-postgres``),
``KFAST_TABLE`` (``events``, which must exist: ``CREATE TABLE events (id bigint, name text)``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import kfast

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [{"name": "id", "type": "long"}, {"name": "name", "type": "string"}],
}

log = logging.getLogger("thread_service")


def build_pipeline(bootstrap: str, dsn: str) -> kfast.Pipeline:
    env = os.environ
    return kfast.Pipeline(
        kafka={
            "bootstrap.servers": bootstrap,
            "group.id": env.get("KFAST_GROUP", "events-to-postgres"),
            "auto.offset.reset": "earliest",
        },
        topics=[env.get("KFAST_TOPIC", "events")],
        decoder=kfast.AvroDecoder(SCHEMA),
        sink=kfast.PostgresSink(dsn, table=env.get("KFAST_TABLE", "events")),
        memory_limit="128MiB",
    )


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bootstrap = argv[0] if argv else os.environ.get("KFAST_BOOTSTRAP", "127.0.0.1:9092")
    dsn = argv[1] if len(argv) > 1 else os.environ.get("KFAST_DSN", "postgresql://127.0.0.1/kfast")
    pipe = build_pipeline(bootstrap, dsn)

    # The host owns its signals: they only set an event. (start() installs no handlers; only
    # run() on the main thread does.)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.set())

    pipe.start()  # returns once the threads run; a bad setting raises ConfigError here
    try:
        # the host's own work; here: report health every few seconds until asked to stop
        while not stopping.wait(5.0) and pipe.running:
            h = pipe.health()
            log.info("pipeline %s %s lag=%s", h.state, h.reason, h.lag)
        pipe.stop()  # drain what is in flight, commit, shut down
        pipe.join()  # wait for that; raises the pipeline's error if it failed
    finally:
        pipe.close()  # idempotent; releases the consumer, threads, sockets
    log.info("stopped: %d rows written", pipe.metrics()["written"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
