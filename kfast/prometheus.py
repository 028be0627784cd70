"""Prometheus exposition of a :class:`kfast.Pipeline` (needs the ``prometheus`` extra).

Two ways to expose a pipeline:

* :func:`register` adds kfast's collector to a registry the host already serves (by default
  ``prometheus_client.REGISTRY``, the one a web framework's ``/metrics`` route usually exports);
  :func:`unregister` removes it again.
* :func:`serve` starts a small standalone HTTP server (``/metrics``, ``/healthz``, ``/readyz``)
  on ``127.0.0.1`` unless told otherwise; ``close()`` releases its socket and thread.

The collector reads ``pipe.metrics()`` and ``pipe.health()`` at scrape time; nothing is
recorded between scrapes. Names follow Prometheus conventions: a ``kfast_`` prefix, counters end
in ``_total``, units are in the name (``_seconds``, ``_bytes``), latencies are histograms, and
topic, partition, stage and reason are labels.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kfast.errors import ConfigError
from kfast.runtime.health import STATES as _HEALTH_STATES

__all__ = ["KfastCollector", "MetricsServer", "register", "serve", "unregister"]

log = logging.getLogger("kfast.prometheus")


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # the *MetricFamily classes
    except ImportError:
        raise ConfigError(
            "prometheus: needs the 'prometheus' extra (pip install 'kfast[prometheus]')"
        ) from None
    return prometheus_client


def _path(snap: Mapping[str, Any], path: str) -> Any:
    cur: Any = snap
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _split_tp(key: str) -> tuple[str, str]:
    """``"orders[3]"`` -> ``("orders", "3")`` (the key format of metrics()' per-partition maps)."""
    topic, sep, rest = key.rpartition("[")
    if not sep or not rest.endswith("]"):
        return key, ""
    return topic, rest[:-1]


# (metrics() path, name without _total, HELP); label-free counters
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("consumed", "kfast_messages_consumed", "Kafka messages copied into the ring."),
    ("decoded", "kfast_rows_decoded", "Rows the decoder produced."),
    ("decode_errors", "kfast_decode_errors", "Messages the decoder could not decode."),
    ("written", "kfast_rows_written", "Rows the sink made durable (dead letters not included)."),
    ("batches", "kfast_batches_delivered", "Batches delivered (to the sink and/or the DLQ)."),
    ("batches_decoded", "kfast_batches_decoded", "Batches decoded."),
    (
        "pauses",
        "kfast_backpressure_pauses",
        "Times the consumer paused its partitions because the ring was full.",
    ),
    ("resumes", "kfast_backpressure_resumes", "Times the consumer resumed paused partitions."),
    ("seeks", "kfast_seeks", "Partition seeks back to a message the ring had to drop."),
    ("seek_errors", "kfast_seek_errors", "Partition seeks that failed."),
    (
        "decode_retries",
        "kfast_decode_retries",
        "Decodes retried because the schema registry was unreachable.",
    ),
    (
        "rebalances.revoke_timeouts",
        "kfast_revoke_timeouts",
        "Revocations whose in-flight batches were not durable within revoke_timeout.",
    ),
    ("commits.submitted", "kfast_commits", "Offset commits handed to the consumer."),
    ("commits.failed", "kfast_commit_failures", "Offset commits that failed (retried later)."),
    ("ring.rewinds", "kfast_ring_rewinds", "Times the ring rewound a partition."),
    ("ring.oversized", "kfast_oversized_messages", "Messages larger than the ring's arena."),
    ("ring.gaps", "kfast_offset_gaps", "Offset gaps seen (compacted or transactional topics)."),
    ("ring.tombstones", "kfast_tombstones", "Messages with a null value."),
    (
        "ring.abandoned",
        "kfast_ring_abandoned_messages",
        "Messages dropped from the ring because their partition was revoked.",
    ),
    ("delivery.writes", "kfast_sink_writes", "Calls to the sink's write()."),
    ("delivery.retries", "kfast_sink_retries", "Sink writes retried after a transient error."),
    ("delivery.sink_errors", "kfast_sink_errors", "Errors raised by the sink."),
    (
        "delivery.bisections",
        "kfast_sink_bisections",
        "Batch splits made to isolate rows the sink rejected.",
    ),
    ("delivery.located", "kfast_sink_bad_rows_located", "Rows found to be rejected by the sink."),
)

# (metrics() path, name, HELP, scale); label-free gauges
_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("running", "kfast_running", "1 while the pipeline's threads run.", 1.0),
    ("uptime_s", "kfast_uptime_seconds", "Seconds since the pipeline started.", 1.0),
    ("ring.capacity_messages", "kfast_ring_capacity_messages", "Ring capacity in messages.", 1.0),
    ("ring.capacity_bytes", "kfast_ring_capacity_bytes", "Ring arena capacity in bytes.", 1.0),
    ("ring.used_messages", "kfast_ring_used_messages", "Messages held by the ring now.", 1.0),
    ("ring.used_bytes", "kfast_ring_used_bytes", "Arena bytes held by the ring now.", 1.0),
    ("ring.fill", "kfast_ring_fill_ratio", "Ring fill, 0 to 1 (max of messages and bytes).", 1.0),
    (
        "in_flight",
        "kfast_in_flight_messages",
        "Messages consumed and not yet durable in the sink or the DLQ.",
        1.0,
    ),
    ("paused", "kfast_paused", "1 while the consumer is paused for backpressure.", 1.0),
    (
        "paused_partitions",
        "kfast_paused_partitions",
        "Partitions paused for backpressure now.",
        1.0,
    ),
    ("memory_plan.limit", "kfast_memory_limit_bytes", "The memory_limit the plan splits.", 1.0),
)

_MEMORY_COMPONENTS = ("prefetch", "ring", "batch_buffers", "dlq_queue", "reserve")
_RING_DROPS = ("duplicate", "rewind", "unassigned")
_REBALANCE_EVENTS = ("assigned", "revoked", "revoked_at_close", "lost")
_BATCH_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000)


def _le(bound: Any) -> str:
    if isinstance(bound, str):
        if bound.lower() in ("+inf", "inf"):
            return "+Inf"
        bound = float(bound)
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _cumulative_buckets(hist: Any) -> tuple[list[tuple[str, float]], float | None] | None:
    """Read one histogram of ``metrics()["latency_histograms"]``.

    Accepted: ``{"buckets": [[le, cumulative_count], ...] or {le: cumulative_count},
    "sum": seconds, "count": n}``. ``+Inf`` is added from ``count`` when missing.
    """
    if not isinstance(hist, Mapping):
        return None
    raw = hist.get("buckets")
    pairs: Iterable[Any]
    if isinstance(raw, Mapping):
        pairs = raw.items()
    elif isinstance(raw, (list, tuple)):
        pairs = raw
    else:
        return None
    out: list[tuple[float, str, float]] = []
    for pair in pairs:
        le, n = pair[0], pair[1]
        label = _le(le)
        out.append((float("inf") if label == "+Inf" else float(label), label, float(n)))
    out.sort()
    count = _num(hist.get("count"))
    if not out or out[-1][1] != "+Inf":
        total = count if count is not None else (out[-1][2] if out else 0.0)
        out.append((float("inf"), "+Inf", total))
    return [(label, n) for _, label, n in out], _num(hist.get("sum"))


def _health(pipe: Any, snap: Mapping[str, Any] | None = None) -> tuple[str, bool, bool, Any]:
    """(state, live, ready, body) from ``pipe.health()``, or from metrics() without it."""
    h = snap.get("health") if snap is not None else None
    if isinstance(h, Mapping):  # the snapshot's own: consistent with the other families
        return str(h.get("state", "")), bool(h.get("live")), bool(h.get("ready")), h
    health = getattr(pipe, "health", None)
    if callable(health):
        h = health()
        body = h.as_dict() if callable(getattr(h, "as_dict", None)) else dict(h)
        state = str(getattr(h, "state", body.get("state", "")))
        live = bool(getattr(h, "live", body.get("live", False)))
        ready = bool(getattr(h, "ready", body.get("ready", False)))
        return state, live, ready, body
    # a pipeline without health(): running means live and ready
    running = bool(pipe.metrics().get("running", False))
    state = "running" if running else "stopped"
    return state, True, running, {"state": state, "live": True, "ready": running}


class KfastCollector:
    """A ``prometheus_client`` collector over one pipeline, or several by name.

    ``KfastCollector(pipe)`` exports one pipeline; ``KfastCollector({"orders": p1, "refunds":
    p2})`` exports each with a ``pipeline`` label (one registry cannot hold two collectors that
    export the same names).
    """

    def __init__(self, pipelines: Any) -> None:
        if isinstance(pipelines, Mapping):
            self._pipes: list[tuple[tuple[str, ...], Any]] = [
                ((str(k),), v) for k, v in pipelines.items()
            ]
            self._base: tuple[str, ...] = ("pipeline",)
        else:
            self._pipes = [((), pipelines)]
            self._base = ()
        for _, p in self._pipes:
            if not callable(getattr(p, "metrics", None)):
                raise ConfigError(f"prometheus: expected a kfast.Pipeline, got {type(p).__name__}")

    def describe(self) -> Iterator[Any]:
        # names only: lets a registry refuse a second collector with the same names at once
        yield from self._families(fill=False)

    def collect(self) -> Iterator[Any]:
        yield from self._families(fill=True)

    def _families(self, fill: bool) -> Iterator[Any]:
        core = _client().core
        base = self._base
        snaps: list[tuple[tuple[str, ...], dict[str, Any], Any]] = []
        if fill:
            for lv, p in self._pipes:
                snaps.append((lv, p.metrics(), p))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return core.CounterMetricFamily(name, doc, labels=[*base, *labels])

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return core.GaugeMetricFamily(name, doc, labels=[*base, *labels])

        def hist(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return core.HistogramMetricFamily(name, doc, labels=[*base, *labels])

        def fixed(fam: Any, series: Iterable[tuple[str, str]]) -> Any:
            # one sample per (metrics() path, label value) of a one-label family
            series = tuple(series)
            for lv, snap, _ in snaps:
                for path, label in series:
                    v = _num(_path(snap, path))
                    if v is not None:
                        fam.add_metric([*lv, label], v)
            return fam

        for path, name, doc in _COUNTERS:
            fam = counter(name, doc)
            for lv, snap, _ in snaps:
                v = _num(_path(snap, path))
                if v is not None:
                    fam.add_metric(lv, v)
            yield fam

        for path, name, doc, scale in _GAUGES:
            fam = gauge(name, doc)
            for lv, snap, _ in snaps:
                v = _num(_path(snap, path))
                if v is not None:
                    fam.add_metric(lv, v * scale)
            yield fam

        yield fixed(
            counter(
                "kfast_rebalance_partitions",
                "Partitions assigned, revoked (during the run or at close) or lost in rebalances.",
                ("event",),
            ),
            ((f"rebalances.{ev}", ev) for ev in _REBALANCE_EVENTS),
        )
        yield fixed(
            counter(
                "kfast_rebalance_callbacks",
                "Rebalance callbacks run, by kind (assign, revoke).",
                ("event",),
            ),
            (("rebalances.assign_callbacks", "assign"), ("rebalances.revoke_callbacks", "revoke")),
        )

        fam = counter(
            "kfast_kafka_errors",
            "Error events reported by the Kafka consumer, by librdkafka error name.",
            ("error",),
        )
        for lv, snap, _ in snaps:
            errs = snap.get("kafka_errors")
            if isinstance(errs, Mapping):
                for key, n in sorted(errs.items()):
                    v = _num(n)
                    if v is not None:
                        fam.add_metric([*lv, str(key)], v)
        yield fam

        yield fixed(
            counter(
                "kfast_ring_dropped_messages",
                "Messages the ring did not keep (already seen, rewound, or from a revoked "
                "partition).",
                ("reason",),
            ),
            ((f"ring.dropped_{reason}", reason) for reason in _RING_DROPS),
        )
        yield fixed(
            counter(
                "kfast_async_commits",
                "Asynchronous offset commits completed, by result.",
                ("result",),
            ),
            (("commits.async_ok", "ok"), ("commits.async_failed", "failed")),
        )

        fam = counter(
            "kfast_dlq_records",
            "Records sent to the dead-letter topic, by stage (decode, sink) and error class.",
            ("stage", "reason"),
        )
        for lv, snap, _ in snaps:
            by = _path(snap, "delivery.dlq_records_by_reason")
            if isinstance(by, Mapping):
                for key, n in sorted(by.items()):
                    stage, _, reason = str(key).partition("/")
                    v = _num(n)
                    if v is not None:
                        fam.add_metric([*lv, stage, reason], v)
        yield fam

        fam = gauge(
            "kfast_consumer_lag_messages",
            "Messages between the committed offset and the high watermark (librdkafka stats).",
            ("topic", "partition"),
        )
        for lv, snap, _ in snaps:
            lag = snap.get("consumer_lag")
            if isinstance(lag, Mapping):
                for key, n in sorted(lag.items()):
                    v = _num(n)
                    if v is not None and v >= 0:  # -1: not known yet
                        fam.add_metric([*lv, *_split_tp(str(key))], v)
        yield fam

        committed = gauge(
            "kfast_committed_offset",
            "Next offset committed to Kafka, per assigned partition.",
            ("topic", "partition"),
        )
        durable = gauge(
            "kfast_durable_offset",
            "Next offset whose predecessors are all durable (sink or DLQ), per partition.",
            ("topic", "partition"),
        )
        for lv, snap, _ in snaps:
            parts = _path(snap, "commits.partitions")
            if isinstance(parts, Mapping):
                for key, st in sorted(parts.items()):
                    tp = _split_tp(str(key))
                    if isinstance(st, Mapping):
                        c, d = _num(st.get("committed")), _num(st.get("durable_next"))
                        if c is not None and c >= 0:
                            committed.add_metric([*lv, *tp], c)
                        if d is not None and d >= 0:
                            durable.add_metric([*lv, *tp], d)
        yield committed
        yield durable

        yield fixed(
            gauge(
                "kfast_memory_budget_bytes",
                "Bytes of memory_limit planned for each component.",
                ("component",),
            ),
            ((f"memory_plan.{comp}", comp) for comp in _MEMORY_COMPONENTS),
        )

        fam = hist("kfast_batch_rows", "Rows per decoded batch.")
        for lv, snap, _ in snaps:
            h = _path(snap, "batch_size.histogram")
            if isinstance(h, Mapping):
                counts = [_num(h.get(f"<={b}")) or 0.0 for b in _BATCH_BUCKETS]
                over = _num(h.get(f">{_BATCH_BUCKETS[-1]}")) or 0.0
                buckets, acc = [], 0.0
                for b, n in zip(_BATCH_BUCKETS, counts):
                    acc += n
                    buckets.append((repr(float(b)), acc))
                buckets.append(("+Inf", acc + over))
                fam.add_metric(lv, buckets, None)
        yield fam

        fam = hist(
            "kfast_stage_latency_seconds",
            "Seconds a batch spent in each stage (poll, decode, deliver, end_to_end).",
            ("stage",),
        )
        for lv, snap, _ in snaps:
            hs = snap.get("latency_histograms")
            if isinstance(hs, Mapping):
                for stage, h in sorted(hs.items()):
                    parsed = _cumulative_buckets(h)
                    if parsed is not None:
                        fam.add_metric([*lv, str(stage)], parsed[0], parsed[1])
        yield fam

        state_fam = gauge(
            "kfast_health_state", "1 for the pipeline's current health state.", ("state",)
        )
        live_fam = gauge("kfast_live", "1 while the pipeline is live (not failed).")
        ready_fam = gauge("kfast_ready", "1 while the pipeline is ready (consuming normally).")
        for lv, snap, p in snaps:
            state, live, ready, _body = _health(p, snap)
            states = _HEALTH_STATES if state in _HEALTH_STATES else (*_HEALTH_STATES, state)
            for s in states:
                state_fam.add_metric([*lv, s], 1.0 if s == state else 0.0)
            live_fam.add_metric(lv, float(live))
            ready_fam.add_metric(lv, float(ready))
        yield state_fam
        yield live_fam
        yield ready_fam


def register(pipe: Any, registry: Any = None) -> KfastCollector:
    """Add kfast's collector for ``pipe`` to ``registry`` (default ``prometheus_client.REGISTRY``).

    ``pipe`` is a :class:`kfast.Pipeline` or a mapping of names to pipelines (exported with a
    ``pipeline`` label). Returns the collector; pass it to :func:`unregister` to remove it.
    """
    client = _client()
    collector = KfastCollector(pipe)
    (client.REGISTRY if registry is None else registry).register(collector)
    return collector


def unregister(collector: KfastCollector, registry: Any = None) -> None:
    """Remove a collector returned by :func:`register` from ``registry``."""
    client = _client()
    (client.REGISTRY if registry is None else registry).unregister(collector)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 5.0  # a client that connects and sends nothing cannot hold a thread for long

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                client = _client()
                body = client.generate_latest(self.server.kfast_registry)
                self._reply(200, client.CONTENT_TYPE_LATEST, body)
            elif path in ("/healthz", "/readyz"):
                _state, live, ready, doc = _health(self.server.kfast_pipe)
                ok = live if path == "/healthz" else ready
                body = json.dumps(doc, default=str, sort_keys=True).encode()
                self._reply(200 if ok else 503, "application/json", body)
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found\n")
        except Exception as e:  # a failing scrape must not kill the server thread
            log.warning("metrics server: %s failed: %s: %s", path, type(e).__name__, e)
            self._reply(500, "text/plain; charset=utf-8", b"internal error\n")

    def _reply(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes every request to stderr by default; a library must not
        log.debug("metrics server: " + format, *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the request threads: none is left behind
    kfast_pipe: Any
    kfast_registry: Any


class MetricsServer:
    """The standalone server :func:`serve` returns; ``close()`` frees the port and the thread."""

    def __init__(self, pipe: Any, port: int, host: str) -> None:
        client = _client()
        registry = client.CollectorRegistry()
        registry.register(KfastCollector(pipe))
        cls = _HTTPServer
        if ":" in host:

            class _V6(_HTTPServer):
                address_family = socket.AF_INET6

            cls = _V6
        try:
            self._httpd = cls((host, port), _Handler)
        except OSError as e:
            raise ConfigError(f"metrics_port: cannot listen on {host}:{port}: {e}") from e
        self._httpd.kfast_pipe = pipe
        self._httpd.kfast_registry = registry
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="kfast-metrics",
            daemon=True,
        )
        self._thread.start()
        self._closed = False
        log.info("metrics server listening on http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving, close the listening socket and join the server's threads."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # the name Pipeline used for the server prometheus_client used to return
    shutdown = close

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(pipe: Any, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` for ``pipe`` on ``host:port``.

    ``/healthz`` answers 200 while ``pipe.health().live``, ``/readyz`` while ``.ready``, else
    503; both with ``health().as_dict()`` as JSON. ``port=0`` picks a free port (``.port``).
    The server uses a registry of its own; call ``close()`` to release the port.
    """
    return MetricsServer(pipe, port, host)
