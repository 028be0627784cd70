"""RetryPolicy validation and the retry runner's timing, with a fake clock (no wall clock)."""

from __future__ import annotations

import threading

import pytest

from kfast.errors import ConfigError, PermanentSinkError, RetryExhausted, TransientSinkError
from kfast.retry import Retrier, RetryPolicy, Stopped


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, stop: threading.Event, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.now += seconds
        return stop.is_set()


def failing(n: int, exc: BaseException | None = None):  # type: ignore[no-untyped-def]
    calls = []

    def op() -> str:
        calls.append(1)
        if len(calls) <= n:
            raise exc if exc is not None else TransientSinkError("down")
        return "ok"

    return op, calls


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1001}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_backoff": 0}, "initial_backoff"),
        ({"initial_backoff": -1}, "initial_backoff"),
        ({"initial_backoff": float("nan")}, "initial_backoff"),
        ({"max_backoff": 0.01, "initial_backoff": 0.1}, "max_backoff"),
        ({"max_backoff": 5000}, "max_backoff"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
        ({"jitter": "yes"}, "jitter"),
    ],
)
def test_policy_validation_names_field_and_range(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"RetryPolicy\.{field} must be"):
        RetryPolicy(**kwargs)


def test_policy_is_frozen() -> None:
    p = RetryPolicy()
    with pytest.raises(AttributeError):
        p.max_attempts = 3  # type: ignore[misc]


def test_exponential_backoff_capped_without_jitter() -> None:
    p = RetryPolicy(
        max_attempts=10, initial_backoff=0.1, max_backoff=1.0, deadline=100, jitter=False
    )
    assert [p.backoff(a) for a in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_full_jitter_scales_the_cap() -> None:
    p = RetryPolicy(initial_backoff=0.5, max_backoff=4.0)
    assert p.backoff(3, rng=lambda: 0.0) == 0.0
    assert p.backoff(3, rng=lambda: 0.5) == pytest.approx(1.0)
    assert p.backoff(30, rng=lambda: 0.999) == pytest.approx(3.996)


def test_retries_until_success_with_backoff_sequence() -> None:
    clock = FakeClock()
    p = RetryPolicy(max_attempts=5, initial_backoff=1, max_backoff=3, deadline=100, jitter=False)
    op, calls = failing(3)
    seen = []
    r = Retrier(p, clock=clock, sleep=clock.sleep)
    assert r.run(op, on_retry=lambda a, e, d: seen.append((a, d))) == "ok"
    assert len(calls) == 4 and clock.sleeps == [1, 2, 3]
    assert seen == [(1, 1), (2, 2), (3, 3)]


def test_attempts_bound() -> None:
    clock = FakeClock()
    p = RetryPolicy(max_attempts=3, initial_backoff=1, max_backoff=1, deadline=1000, jitter=False)
    op, calls = failing(10)
    with pytest.raises(RetryExhausted) as ei:
        Retrier(p, clock=clock, sleep=clock.sleep).run(op)
    assert len(calls) == 3 and ei.value.attempts == 3
    assert isinstance(ei.value.last_error, TransientSinkError)
    assert clock.sleeps == [1, 1]


def test_deadline_bound_counts_from_first_failure() -> None:
    clock = FakeClock()
    p = RetryPolicy(max_attempts=1000, initial_backoff=1, max_backoff=8, deadline=20, jitter=False)
    op, calls = failing(10_000)
    with pytest.raises(RetryExhausted, match="deadline"):
        Retrier(p, clock=clock, sleep=clock.sleep).run(op)
    # 1 + 2 + 4 + 8 = 15 s slept; the next 8 s backoff would pass 20 s: stop after 5 attempts.
    assert clock.sleeps == [1, 2, 4, 8] and len(calls) == 5
    assert clock.now - 1000.0 < p.deadline


def test_permanent_and_other_errors_are_not_retried() -> None:
    clock = FakeClock()
    op, calls = failing(1, PermanentSinkError("bad row"))
    with pytest.raises(PermanentSinkError):
        Retrier(RetryPolicy(), clock=clock, sleep=clock.sleep).run(op)
    assert len(calls) == 1 and clock.sleeps == []


def test_stop_event_interrupts_backoff() -> None:
    clock = FakeClock()
    stop = threading.Event()
    stop.set()
    op, calls = failing(5)
    with pytest.raises(Stopped):
        Retrier(RetryPolicy(), clock=clock, sleep=clock.sleep).run(op, stop)
    assert len(calls) == 1


def test_event_sleep_uses_steps_and_returns_on_stop() -> None:
    # The default sleep waits on the event in steps; a set event returns at once.
    stop = threading.Event()
    stop.set()
    r = Retrier(RetryPolicy(), step=10.0)
    assert r._event_sleep(stop, 3600.0) is True
