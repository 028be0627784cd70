"""The circuit breaker: stop instead of draining a topic into the DLQ.

:class:`CircuitBreaker` follows the DLQ share of recent input messages across batches;
:class:`BatchCheck` follows one batch while its dead letters are found, to trip before the
batch is written.
"""

from __future__ import annotations

from collections.abc import Sequence

from kfast.dlq.policy import DeadLetterPolicy
from kfast.errors import CircuitBreakerOpen

__all__ = ["BatchCheck", "CircuitBreaker", "CircuitBreakerOpen"]


class CircuitBreaker:
    """Trips when the DLQ share of recent input messages is too high.

    ``record(n, dead)`` takes the number of input messages of a batch and the
    sorted input indices that were dead-lettered. Memory is one bytearray of
    ``window`` entries.
    """

    def __init__(self, policy: DeadLetterPolicy) -> None:
        self.policy = policy
        self._ring = bytearray(policy.window)
        self._pos = 0
        self._seen = 0
        self._dead_in_window = 0
        self._run = 0

    def record(self, n: int, dead: Sequence[int]) -> None:
        """Account for a batch of ``n`` input messages; ``dead`` (sorted) went to the DLQ.

        Cost is O(n) in C (bytearray slices) plus O(len(dead)) in Python, so a
        batch without dead letters adds no per-message Python work.
        """
        p = self.policy
        if n <= 0:
            return
        # Consecutive dead letters, walking only the dead indices.
        run, prev = self._run, -1
        for i in dead:
            if i == prev + 1:
                run += 1
            else:
                run = 1
            prev = i
            if p.max_consecutive is not None and run >= p.max_consecutive:
                self._trip_consecutive(run)
        self._run = run if dead and dead[-1] == n - 1 else 0
        # Ratio over the last `window` messages.
        w = len(self._ring)
        bits = bytearray(n)
        for i in dead:
            bits[i] = 1
        if n > w:
            bits = bits[n - w :]
        m = len(bits)
        pos = self._pos
        first = min(m, w - pos)
        old = self._dead_in_slots(m)
        self._ring[pos : pos + first] = bits[:first]
        if m > first:
            self._ring[0 : m - first] = bits[first:]
        self._dead_in_window += bits.count(1) - old
        self._pos = (pos + m) % w
        self._seen += n
        if self._seen >= w and self._dead_in_window > p.max_ratio * w:
            raise CircuitBreakerOpen(
                f"{self._dead_in_window} of the last {w} messages went to the DLQ {p.topic!r} "
                f"(ratio {self._dead_in_window / w:.3f} > DeadLetterPolicy.max_ratio={p.max_ratio}); "
                "stopping instead of draining the topic into the DLQ"
            )

    def _dead_in_slots(self, m: int) -> int:
        """Dead letters in the next ``m`` window slots (the ones a batch of ``m`` overwrites)."""
        pos = self._pos
        first = min(m, len(self._ring) - pos)
        return self._ring.count(1, pos, pos + first) + self._ring.count(1, 0, m - first)

    def _trip_consecutive(self, run: int) -> None:
        raise _consecutive_error(self.policy, run)

    def batch(self, n: int) -> BatchCheck:
        """A check that follows one batch of ``n`` input messages while its dead letters are
        found, to trip before the batch is done (see :class:`BatchCheck`)."""
        return BatchCheck(self, n)


def _consecutive_error(p: DeadLetterPolicy, run: int, during: str = "") -> CircuitBreakerOpen:
    return CircuitBreakerOpen(
        f"{run} consecutive messages went to the DLQ {p.topic!r}{during} "
        f"(DeadLetterPolicy.max_consecutive={p.max_consecutive}); stopping instead of "
        "draining the topic into the DLQ"
    )


class BatchCheck:
    """Would :meth:`CircuitBreaker.record` of this batch trip, from the dead letters known so far?

    ``add(i)`` marks input ``i`` (0 <= i < n, any order) as dead and returns True when
    ``record(n, dead)`` is already certain to raise: the known dead letters alone trip it,
    even if every other message of the batch turns out fine. That is the case when

    * they hold a run of ``max_consecutive`` consecutive inputs (a run starting at input 0
      continues the run the previous batch ended with), or
    * the ratio is checked after this batch (``window`` messages seen by then) and the dead
      letters the window will still hold from earlier batches plus the known ones among
      this batch's last ``window`` inputs are more than ``max_ratio · window``.

    A dead letter found later can only add to both, so a check that trips never trips
    wrongly, and once every dead letter is added it trips exactly when ``record`` would.
    Nothing of the breaker changes (``record`` does that for a batch that is done).
    ``add`` is O(1); making a check counts the window slots the batch overwrites (C).
    """

    def __init__(self, breaker: CircuitBreaker, n: int) -> None:
        p = breaker.policy
        self.policy = p
        self.n = n
        self._carry = breaker._run  # dead letters in a row at the end of the previous batch
        self._dead: set[int] = set()
        self._start: dict[int, int] = {}  # run of known dead inputs: first -> last + 1
        self._end: dict[int, int] = {}  # last + 1 -> first
        w = len(breaker._ring)
        self._w = w
        self._ratio = breaker._seen + n >= w  # record() checks the ratio after this batch
        self._tail = max(0, n - w)  # inputs before this are out of the window by then
        # kept from earlier batches: the window slots this batch does not overwrite
        self._in_window = breaker._dead_in_window - breaker._dead_in_slots(min(n, w))
        self.error: CircuitBreakerOpen | None = None

    def copy(self) -> BatchCheck:
        c = object.__new__(BatchCheck)
        c.__dict__.update(self.__dict__)
        c._dead, c._start, c._end = set(self._dead), dict(self._start), dict(self._end)
        return c

    def add(self, i: int) -> bool:
        """Mark input ``i`` dead; True (and ``error`` set) when the batch will trip the breaker."""
        if self.error is not None:
            return True
        if i in self._dead or not 0 <= i < self.n:
            return False
        self._dead.add(i)
        p = self.policy
        lo, hi = i, i + 1
        if hi in self._start:
            hi = self._start.pop(hi)
        if lo in self._end:
            lo = self._end.pop(lo)
        self._start[lo], self._end[hi] = hi, lo
        run = hi - lo + (self._carry if lo == 0 else 0)
        if p.max_consecutive is not None and run >= p.max_consecutive:
            self.error = _consecutive_error(p, run, " within a batch not yet written")
            return True
        if i >= self._tail:
            self._in_window += 1
            if self._ratio and self._in_window > p.max_ratio * self._w:
                self.error = CircuitBreakerOpen(
                    f"at least {self._in_window} of the last {self._w} messages go to the DLQ "
                    f"{p.topic!r} once the batch being written is done (ratio "
                    f"{self._in_window / self._w:.3f} > DeadLetterPolicy.max_ratio="
                    f"{p.max_ratio}); stopping instead of draining the topic into the DLQ"
                )
                return True
        return False
