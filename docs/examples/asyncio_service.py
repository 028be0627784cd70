"""A plain asyncio service: ``await pipe.run_async()`` with an async sink on the service's loop.

The sink is an ``async def write(batch)`` that copies rows into PostgreSQL with psycopg's async
connection; kfast awaits it on this program's event loop (its delivery thread waits for each
write: that wait is the backpressure). Ctrl-C (SIGINT) or SIGTERM drains what is in flight,
commits it and exits 0.

    KFAST_BOOTSTRAP=127.0.0.1:9092 KFAST_DSN=postgresql://postgres@127.0.0.1/kfast \\
        python docs/examples/asyncio_service.py

Settings come from the environment (or ``argv``: bootstrap, then DSN): ``KFAST_BOOTSTRAP``,
``KFAST_DSN``, ``KFAST_TOPIC`` (default ``events``), ``KFAST_GROUP`` (``events-to-postgres``),
``KFAST_TABLE`` (``events``, which must exist: ``CREATE TABLE events (id bigint, name text)``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import psycopg
from psycopg import sql

import kfast

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [{"name": "id", "type": "long"}, {"name": "name", "type": "string"}],
}

log = logging.getLogger("asyncio_service")


class AsyncPostgresWriter:
    """An async sink: each batch in one COPY and one transaction on an async connection."""

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn = dsn
        self.copy = sql.SQL("COPY {} (id, name) FROM STDIN").format(sql.Identifier(table))
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def open(self, info: Any) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn)

    async def write(self, batch: kfast.Batch) -> None:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = await psycopg.AsyncConnection.connect(self.dsn)
            async with self.conn.cursor() as cur, cur.copy(self.copy) as copy:
                for row in batch.to_pylist():
                    await copy.write_row((row["id"], row["name"]))
            await self.conn.commit()
        except psycopg.OperationalError as e:
            # the server or the connection: retried (under the RetryPolicy) on a new connection.
            # Any other exception means these rows cannot be written (dead-lettered or stop).
            if self.conn is not None:
                await self.conn.close()
            raise kfast.TransientSinkError(f"PostgreSQL: {e}") from e
        except Exception:
            await self.conn.rollback()  # the delivery layer retries smaller slices or stops
            raise

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def main(bootstrap: str, dsn: str) -> None:
    env = os.environ
    pipe = kfast.Pipeline(
        kafka={
            "bootstrap.servers": bootstrap,
            "group.id": env.get("KFAST_GROUP", "events-to-postgres"),
            "auto.offset.reset": "earliest",
        },
        topics=[env.get("KFAST_TOPIC", "events")],
        decoder=kfast.AvroDecoder(SCHEMA),
        sink=AsyncPostgresWriter(dsn, env.get("KFAST_TABLE", "events")),
        memory_limit="128MiB",
    )
    # SIGTERM (a container stop): stop() drains, and run_async() returns once that is done.
    # Ctrl-C: asyncio.run() cancels this task; run_async() then drains and re-raises.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, pipe.stop)
    await pipe.run_async()
    log.info("stopped: %d rows written", pipe.metrics()["written"])


def cli(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bootstrap = argv[0] if argv else os.environ.get("KFAST_BOOTSTRAP", "127.0.0.1:9092")
    dsn = argv[1] if len(argv) > 1 else os.environ.get("KFAST_DSN", "postgresql://127.0.0.1/kfast")
    try:
        asyncio.run(main(bootstrap, dsn))
    except KeyboardInterrupt:
        log.info("interrupted: drained and committed")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
