"""The runtime's entry point for ``metrics_port`` (kept until the runtime calls kfast.prometheus)."""

from __future__ import annotations

from typing import Any

from kfast.prometheus import MetricsServer
from kfast.prometheus import serve as _serve


def serve(pipeline: Any, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """See :func:`kfast.prometheus.serve`; the result also has ``shutdown()`` (= ``close()``)."""
    return _serve(pipeline, port, host)
