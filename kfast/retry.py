"""Bounded retry: exponential backoff with full jitter, under attempts and a deadline.

``RetryPolicy`` is the user-facing, validated policy. ``Retrier`` runs one
operation under it: a transient failure (``TransientSinkError`` by default)
is retried after ``backoff(attempt)`` seconds, sleeping in short steps on a
``threading.Event`` so that ``Pipeline.stop()`` interrupts a long backoff.
Anything else propagates at once. When attempts or the deadline run out,
``RetryExhausted`` is raised with the last error attached.

The clock, the sleep and the random source are injectable so the timing
logic is tested with a fake clock (``tests/unit/test_sink_retry.py``).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kfast.errors import ConfigError, RetryExhausted, Stopped, TransientSinkError

__all__ = ["RetryPolicy", "Retrier", "Stopped"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying a transient failure.

    * ``max_attempts``: total tries including the first (1..1000).
    * ``initial_backoff``: seconds before the second try (0 < x <= 3600).
    * ``max_backoff``: cap on one backoff (>= initial_backoff, <= 3600).
    * ``deadline``: seconds from the first failure after which no new
      attempt starts (0 < x <= 86400).
    * ``jitter``: full jitter (sleep uniform in [0, backoff]); AWS
      architecture blog "Exponential Backoff And Jitter".
    """

    max_attempts: int = 8
    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    deadline: float = 120.0
    jitter: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str, value: object) -> ConfigError:
            return ConfigError(f"RetryPolicy.{field} must be {allowed}, got {value!r}")

        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise bad("max_attempts", "an int in [1, 1000]", self.max_attempts)
        if not 1 <= self.max_attempts <= 1000:
            raise bad("max_attempts", "an int in [1, 1000]", self.max_attempts)
        for name, hi in (
            ("initial_backoff", 3600.0),
            ("max_backoff", 3600.0),
            ("deadline", 86400.0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, f"a number of seconds in (0, {hi:g}]", v)
            if not 0 < v <= hi:
                raise bad(name, f"a number of seconds in (0, {hi:g}]", v)
        if self.max_backoff < self.initial_backoff:
            raise bad(
                "max_backoff",
                f">= initial_backoff ({self.initial_backoff!r}) and <= 3600",
                self.max_backoff,
            )
        if not isinstance(self.jitter, bool):
            raise bad("jitter", "a bool", self.jitter)

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_backoff, self.initial_backoff * (2.0 ** min(attempt - 1, 60)))
        return cap * rng() if self.jitter else cap


class Retrier:
    """Runs operations under a :class:`RetryPolicy`.

    ``on_retry(attempt, error, delay)`` is called before each backoff (the
    delivery layer counts retries and reconnects there).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[threading.Event, float], bool] | None = None,
        step: float = 0.05,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self._sleep = sleep if sleep is not None else self._event_sleep
        self.step = step

    def _event_sleep(self, stop: threading.Event, seconds: float) -> bool:
        """Sleep ``seconds`` in steps; True if the stop event was set."""
        end = self.clock() + seconds
        while True:
            left = end - self.clock()
            if left <= 0:
                return stop.is_set()
            if stop.wait(min(self.step, left)):
                return True

    def run(
        self,
        op: Callable[[], T],
        stop: threading.Event | None = None,
        *,
        retry_on: tuple[type[BaseException], ...] = (TransientSinkError,),
        on_retry: Callable[[int, BaseException, float], None] | None = None,
        what: str = "operation",
    ) -> T:
        stop = stop if stop is not None else threading.Event()
        policy = self.policy
        first_failure: float | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                return op()
            except retry_on as exc:
                now = self.clock()
                if first_failure is None:
                    first_failure = now
                elapsed = now - first_failure
                if attempt >= policy.max_attempts:
                    raise RetryExhausted(
                        f"{what} failed after {attempt} attempts: {exc}",
                        attempts=attempt,
                        last_error=exc,
                    ) from exc
                delay = policy.backoff(attempt, self.rng)
                if elapsed + delay >= policy.deadline:
                    # Sleep only what is left of the deadline, then give up
                    # unless the next attempt can still start before it.
                    raise RetryExhausted(
                        f"{what} failed for {elapsed:.1f}s (deadline {policy.deadline:g}s, "
                        f"{attempt} attempts): {exc}",
                        attempts=attempt,
                        last_error=exc,
                    ) from exc
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
                if self._sleep(stop, delay):
                    raise Stopped(
                        f"{what}: stopped while waiting to retry after {attempt} attempts: {exc}",
                        attempts=attempt,
                        last_error=exc,
                    ) from exc
