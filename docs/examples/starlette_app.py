"""A Starlette app, served by uvicorn, that embeds a kfast Pipeline into PostgreSQL.

The pipeline starts with the app (lifespan) and drains, commits and closes when uvicorn shuts
down (SIGTERM or Ctrl-C). The app serves ``/healthz`` (live), ``/readyz`` (ready) and
``/metrics`` (kfast's collector in the app's own Prometheus registry).

    KFAST_BOOTSTRAP=127.0.0.1:9092 KFAST_DSN=postgresql://postgres@127.0.0.1/kfast \\
        python docs/examples/starlette_app.py --port 8000

or with the uvicorn command line: ``uvicorn --app-dir docs/examples starlette_app:app``.

Settings come from the environment: ``KFAST_BOOTSTRAP``, ``KFAST_DSN``, ``KFAST_TOPIC``
(default ``events``), ``KFAST_GROUP`` (``events-to-postgres``), ``KFAST_TABLE`` (``events``,
which must exist: ``CREATE TABLE events (id bigint, name text)``) and ``KFAST_DLQ_TOPIC``
(optional dead-letter topic).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import kfast
import kfast.prometheus

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [{"name": "id", "type": "long"}, {"name": "name", "type": "string"}],
}


def build_pipeline() -> kfast.Pipeline:
    env = os.environ
    dlq_topic = env.get("KFAST_DLQ_TOPIC")
    return kfast.Pipeline(
        kafka={
            "bootstrap.servers": env.get("KFAST_BOOTSTRAP", "127.0.0.1:9092"),
            "group.id": env.get("KFAST_GROUP", "events-to-postgres"),
            "auto.offset.reset": "earliest",
        },
        topics=[env.get("KFAST_TOPIC", "events")],
        decoder=kfast.AvroDecoder(SCHEMA),
        sink=kfast.PostgresSink(
            env.get("KFAST_DSN", "postgresql://postgres@127.0.0.1/kfast"),
            table=env.get("KFAST_TABLE", "events"),
        ),
        dlq=kfast.DeadLetterPolicy(topic=dlq_topic) if dlq_topic else None,
        memory_limit="128MiB",
    )


registry = CollectorRegistry()  # the app's registry; /metrics exports it


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    pipe = build_pipeline()
    collector = kfast.prometheus.register(pipe, registry)
    app.state.pipe = pipe
    try:
        # start() on entry; on shutdown stop(), drain, commit and close, without ever
        # blocking the event loop that serves the requests
        async with pipe:
            yield
    finally:
        kfast.prometheus.unregister(collector, registry)


async def healthz(request: Request) -> JSONResponse:
    health = request.app.state.pipe.health()
    return JSONResponse(health.as_dict(), status_code=200 if health.live else 503)


async def readyz(request: Request) -> JSONResponse:
    health = request.app.state.pipe.health()
    return JSONResponse(health.as_dict(), status_code=200 if health.ready else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)],
    lifespan=lifespan,
)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    # uvicorn handles SIGTERM itself (graceful shutdown: the lifespan drains the pipeline),
    # then re-raises it once it is done; a requested stop that drained cleanly exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
