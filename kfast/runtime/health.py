"""``Pipeline.health()``: one state an orchestrator or an operator can act on.

``Health.state`` is one of

* ``starting``: ``start()`` is opening the sink (retried under the
  ``RetryPolicy`` while it is unreachable);
* ``joining``: subscribed, waiting for the group to assign partitions (also
  while the broker is unreachable or a topic is missing: ``reason`` says so);
* ``running``: consuming and delivering;
* ``backpressure``: the ring is full and partitions are paused (a slow sink);
* ``retrying``: an outage is being retried (sink write, schema registry,
  broker connection lost after joining); ``reason`` names it;
* ``draining``: ``stop()`` was called; delivering what is in flight;
* ``stopped``: shut down cleanly;
* ``failed``: shut down on an error (``last_error``).

``live`` is false only once the pipeline failed; ``ready`` is true in
``running`` and ``backpressure``. Times are wall-clock (``time.time()``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["STATES", "Health", "HealthBoard"]

STATES = (
    "starting",
    "joining",
    "running",
    "backpressure",
    "retrying",
    "draining",
    "stopped",
    "failed",
)


@dataclass(frozen=True)
class Health:
    state: str
    reason: str
    last_error: str | None
    last_batch_at: float | None
    last_commit_at: float | None
    broker_reachable: bool | None
    assigned_partitions: int
    lag: int | None
    live: bool
    ready: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class HealthBoard:
    """What ``health()`` is computed from; each attribute has one writer (named)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phase = "starting"  # pipeline + poll thread: starting/joining/running/draining/...
        self.stop_reason = ""  # pipeline + poll thread
        self.paused = False  # poll thread (backpressure)
        self._retrying: dict[str, str] = {}  # the retrying thread, by what is retried
        self.last_error: str | None = None  # any thread (last one wins)
        self.last_batch_at: float | None = None  # worker
        self.last_commit_at: float | None = None  # poll thread
        self.broker_reachable: bool | None = None  # poll thread (consumer callbacks)
        self.broker_error = ""  # poll thread
        self.missing_topics: dict[str, str] = {}  # poll thread
        self.assigned_partitions = 0  # poll thread
        self.lag: int | None = None  # poll thread

    def retrying(self, what: str, reason: str) -> None:
        with self._lock:
            self._retrying[what] = reason

    def recovered(self, what: str) -> None:
        with self._lock:
            self._retrying.pop(what, None)

    def is_retrying(self, what: str) -> bool:
        with self._lock:
            return what in self._retrying

    def error(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"

    def snapshot(self) -> Health:
        with self._lock:
            retrying = list(self._retrying.values())
        phase = self.phase
        reason = self.stop_reason
        broker = self.broker_reachable
        missing = dict(self.missing_topics)
        if phase in ("stopped", "failed", "draining"):
            state = phase
        elif phase == "starting":
            state = "starting"
            reason = retrying[0] if retrying else "opening the sink"
        elif retrying:
            state, reason = "retrying", "; ".join(retrying)
        elif phase == "joining" or missing:
            state = "joining"
            if missing:
                reason = "; ".join(f"topic {t!r} missing: {e}" for t, e in sorted(missing.items()))
            elif broker is False:
                reason = f"broker unreachable: {self.broker_error}"
            else:
                reason = "waiting for the group to assign partitions"
        elif broker is False:
            state, reason = "retrying", f"broker unreachable: {self.broker_error}"
        elif self.paused:
            state, reason = "backpressure", "ring full: partitions paused until the sink catches up"
        else:
            state, reason = "running", ""
        return Health(
            state=state,
            reason=reason,
            last_error=self.last_error,
            last_batch_at=self.last_batch_at,
            last_commit_at=self.last_commit_at,
            broker_reachable=broker,
            assigned_partitions=self.assigned_partitions,
            lag=self.lag,
            live=state != "failed",
            ready=state in ("running", "backpressure"),
        )

    def batch_delivered(self) -> None:
        self.last_batch_at = time.time()

    def committed(self) -> None:
        self.last_commit_at = time.time()
