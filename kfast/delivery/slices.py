"""Slice by slice: each slice of the batch its own sink write, bad rows found by locators
or bisection.

A located row (``PermanentSinkError.row``) splits the rows into the ones before it (one
write), itself (written alone: dead-lettered only if that fails too) and the rest (about
3k+1 writes for k bad rows); without a locator the rows are bisected recursively (k bad
rows among n cost O(k log n) writes). A located row that writes fine alone disables
locators for the rest of the batch: bisection bounds the cost of a sink that points at
wrong rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from kfast.delivery.letters import Letters
from kfast.delivery.metrics import DeliveryMetrics
from kfast.errors import PermanentSinkError

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = ["Slices", "located"]


def located(exc: PermanentSinkError, lo: int, hi: int) -> int | None:
    """``exc.row`` when it is an int in ``[lo, hi)``, else None."""
    row = exc.row
    if isinstance(row, int) and not isinstance(row, bool) and lo <= row < hi:
        return row
    return None


class Slices:
    """Writes rows of one batch slice by slice.

    ``write(sub_batch)`` is one sink write under the retry policy. With an exactly-once
    sink (``eo``) each slice carries the offsets of its own rows only, and the dead
    letters found so far are confirmed before the next write, so a crash at any moment
    resumes exactly after what is durable.
    """

    def __init__(
        self,
        batch: Batch,
        write: Callable[[Batch], object],
        letters: Letters,
        metrics: DeliveryMetrics,
        eo: bool,
    ) -> None:
        self.batch = batch
        self.write = write
        self.letters = letters
        self.metrics = metrics
        self.eo = eo
        self.hints = True  # follow PermanentSinkError.row locators
        self.bisected = False  # the batch was written in slices

    def slice(self, start: int, stop: int) -> Batch:
        batch = self.batch
        if start == 0 and stop == batch.num_rows:
            return batch
        sub = batch.slice(start, stop)
        ctx = self.letters.ctx
        if self.eo and ctx is not None:
            recs = ctx.records
            src = memoryview(sub.source_indices)
            offs: dict[tuple[str, int], int] = {}
            for i in range(sub.num_rows):
                j = src[i]
                tp = (recs.topic(j), recs.partition(j))
                offs[tp] = max(offs.get(tp, -1), recs.offset(j) + 1)
            sub.context = dataclasses.replace(ctx, next_offsets=offs)
        return sub

    def write_range(
        self,
        start: int,
        stop: int,
        attempts_before: int,
        locate: bool = True,
        known: PermanentSinkError | None = None,
    ) -> None:
        """Write rows ``[start, stop)``; isolate and dead-letter the rows that fail.

        ``known``: the failure of writing exactly these rows, when already seen.
        Iterative over located rows (k located rows never nest k calls deep).
        """
        letters, m = self.letters, self.metrics
        while start < stop:
            if known is None:
                if self.eo:
                    letters.confirm()  # everything before this slice must be durable first
                try:
                    self.write(self.slice(start, stop))
                    return
                except PermanentSinkError as exc:
                    letters.failed(exc, start, stop)
                    known = exc
            failure, known = known, None
            attempts = attempts_before + 1
            if stop - start == 1:
                letters.dead_row(start, failure, attempts)
                return
            hint = located(failure, 0, stop - start) if locate and self.hints else None
            self.bisected = True
            if hint is None:
                m.add("bisections")
                mid = (start + stop) // 2
                self.write_range(start, mid, attempts, locate)
                self.write_range(mid, stop, attempts, locate)
                return
            m.add("located")
            bad = start + hint
            if bad > start:
                # Accepted by the server before the failure: one write; bisected if it fails.
                self.write_range(start, bad, attempts, False)
            dead_before = letters.deaths
            self.write_range(bad, bad + 1, attempts, False)  # confirm the located row alone
            if letters.deaths == dead_before:
                self.hints = False  # it was fine alone: stop trusting locators for this batch
            start, attempts_before = bad + 1, attempts
