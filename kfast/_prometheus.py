"""Prometheus exposition of ``Pipeline.metrics()`` (needs the ``prometheus`` extra)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kfast.errors import ConfigError


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{k}", v, out)


def _name(raw: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in raw).strip("_")


def serve(pipeline: Any, port: int) -> Any:
    """Serve ``pipeline.metrics()`` on ``http://0.0.0.0:port/metrics``; returns the server."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import GaugeMetricFamily
    except ImportError:
        raise ConfigError(
            "metrics_port: needs the 'prometheus' extra (pip install 'kfast[prometheus]')"
        ) from None

    class _Collector:
        def collect(self) -> Iterator[Any]:
            snap = pipeline.metrics()
            lag = snap.pop("consumer_lag", {})
            commits = snap.get("commits", {})
            commits.pop("partitions", None)
            snap.pop("memory_plan", None)
            flat: dict[str, float] = {}
            _flatten("kfast", snap, flat)
            for key, value in sorted(flat.items()):
                yield GaugeMetricFamily(_name(key), key, value=value)
            g = GaugeMetricFamily(
                "kfast_consumer_lag", "messages behind the high watermark", labels=["partition"]
            )
            for part, value in sorted(lag.items()):
                g.add_metric([part], float(value))
            yield g

    registry = CollectorRegistry()
    registry.register(_Collector())
    server, _thread = start_http_server(port, registry=registry)
    return server
