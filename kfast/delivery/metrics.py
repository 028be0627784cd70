"""Delivery counters the runtime reads into ``pipe.metrics()``."""

from __future__ import annotations

import collections
import threading
from typing import Any

__all__ = ["DeliveryMetrics"]


class DeliveryMetrics:
    """Counters the runtime reads into ``pipe.metrics()`` (thread-safe snapshot)."""

    def __init__(self, latency_samples: int = 4096) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.sink_errors = 0
        self.bisections = 0
        self.located = 0
        self.writes = 0
        self.rows_written = 0
        self.dlq_records: collections.Counter[tuple[str, str]] = collections.Counter()
        self.write_latency: collections.deque[float] = collections.deque(maxlen=latency_samples)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def dead(self, stage: str, error_class: str) -> None:
        with self._lock:
            self.dlq_records[(stage, error_class)] += 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.write_latency.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self.write_latency)
            by = {f"{s}/{c}": n for (s, c), n in sorted(self.dlq_records.items())}

        def q(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

        return {
            "retries": self.retries,
            "sink_errors": self.sink_errors,
            "bisections": self.bisections,
            "located": self.located,
            "writes": self.writes,
            "rows_written": self.rows_written,
            "dlq_records": sum(by.values()),
            "dlq_records_by_reason": by,
            "write_latency_p50": q(0.50),
            "write_latency_p95": q(0.95),
            "write_latency_p99": q(0.99),
        }
