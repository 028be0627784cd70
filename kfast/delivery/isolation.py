"""In one sink transaction: isolate a batch's bad rows, write the rest, commit once.

Used with a sink that offers row transactions (``sink.row_transaction(batch)``, PostgreSQL
``copy`` and ``exactly_once`` without key) when the error of the batch's write locates its
row (``PermanentSinkError.row``: the COPY line). See :class:`Isolation` for the algorithm and
its bound.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from kfast.delivery.letters import Letters
from kfast.delivery.metrics import DeliveryMetrics
from kfast.delivery.slices import located
from kfast.dlq import BatchCheck
from kfast.errors import PermanentSinkError
from kfast.retry import Retrier

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = ["KEY_STATES", "GiveUp", "Isolation", "RowTransaction", "isolate"]


# A key violation depends on other rows: unique (in the batch or the table), foreign key.
KEY_STATES = frozenset({"23505", "23503"})


class RowTransaction(Protocol):
    """What :class:`Isolation` needs from a sink's row transaction (see
    ``kfast.sinks.postgres.RowTransaction`` for the semantics)."""

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> Any: ...
    def copy(self, ranges: list[tuple[int, int]], keep: bool) -> None: ...
    def write(self, ranges: list[tuple[int, int]]) -> None: ...
    def probe(self, ranges: list[tuple[int, int]]) -> None: ...
    def row_only(self, exc: PermanentSinkError) -> bool: ...
    def prescreen(self) -> dict[int, PermanentSinkError] | None: ...
    def screen(
        self, ranges: list[tuple[int, int]], keys: bool
    ) -> dict[int, PermanentSinkError] | None: ...
    def write_screened(self, skip: list[int]) -> None: ...
    def commit(self) -> None: ...


def isolate(
    batch: Batch,
    first: PermanentSinkError | None,
    factory: Callable[[Batch], RowTransaction | None],
    letters: Letters,
    retrier: Retrier,
    metrics: DeliveryMetrics,
    stop: threading.Event,
    eo: bool,
    keys: bool = False,
    screen_first: bool = True,
) -> bool | None:
    """Isolate in one sink transaction, retried as a whole on transient errors.

    ``keys``: screen key rules (unique, foreign key) from the start (the previous batch
    had key violations). ``first`` None: no write was tried; ``screen_first`` screens
    before writing, else the rows are COPY'd in the transaction first (and screened if
    that fails).

    True: committed. False: a located row was not bad after all (nothing committed).
    None: no transaction for this batch, or a failure without a locator (nothing
    committed).
    """
    outcome: bool | None = None

    def op() -> None:
        nonlocal outcome
        t0 = time.perf_counter()
        outcome = _isolate_once(batch, first, factory, letters, metrics, eo, keys, screen_first)
        metrics.latency(time.perf_counter() - t0)

    def on_retry(_attempt: int, _exc: BaseException, _delay: float) -> None:
        metrics.add("retries")
        metrics.add("sink_errors")

    retrier.run(op, stop, on_retry=on_retry, what="sink write")
    return outcome


def _isolate_once(
    batch: Batch,
    first: PermanentSinkError | None,
    factory: Callable[[Batch], RowTransaction | None],
    letters: Letters,
    metrics: DeliveryMetrics,
    eo: bool,
    keys: bool,
    screen_first: bool,
) -> bool | None:
    n = batch.num_rows
    try:
        txn = factory(batch)
    except PermanentSinkError:
        return None  # e.g. a value of the batch fails before any row is sent: bisect
    if txn is None:
        return None
    mark = letters.mark()

    def early(found: dict[int, tuple[PermanentSinkError, int]]) -> None:
        # Certain dead letters: on their way while the rows are written (one produce
        # request with the batch's others, acknowledged by the time the batch commits).
        for row in sorted(found):
            letters.dead_row_early(row, *found[row])
        letters.produce()

    try:
        with txn:
            iso = Isolation(
                txn, n, batch.source_indices, letters.check, metrics, keys, screen_first, early
            )
            try:
                iso.isolate(first)
            except GiveUp as stop:
                return False if stop.wrong_locator else None
            dead = sorted(iso.dead.items())
            # iso.check already holds every dead row and did not trip.
            if eo:  # dead letters durable before the commit stores the offsets
                for row, (exc, attempts) in dead:
                    letters.dead_row(row, exc, attempts, note=False)
                letters.confirm()
                txn.commit()
            else:
                txn.commit()
                for row, (exc, attempts) in dead:
                    letters.dead_row(row, exc, attempts, note=False)
            letters.check = iso.check
            letters.client_found += len(iso.client)
    except BaseException:
        letters.undo(mark)
        raise
    metrics.add("writes", iso.kept)
    metrics.add("rows_written", n - len(dead))
    return True


_MIN_PROBE = 64  # rows in the smallest probe window


def _count(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


class Isolation:
    """Isolate the bad rows of a batch inside one sink transaction (``RowTransaction``).

    C. **Client check** (when the transaction offers one, ``txn.prescreen``): the rows the
       sink found bad on the client (rows the server would reject, e.g. a CHECK it can
       evaluate exactly) are dead at once, without a statement; their dead letters are
       handed to the DLQ producer right away (``early``: certain, they travel while the rows
       are written, and a retried or rolled back isolation does not build them again).
       When the batch's failure
       came from that check (``first.client_side``) or the check explains some of it, the
       other rows are COPY'd first, in one statement, and the steps below run only if that
       fails (they never see the rows found here).
    0. **Screen** (when the transaction offers one, ``txn.screen``): every row the sink
       would reject is found set-based at once (PostgreSQL: NOT NULL, CHECK, length,
       numeric overflow, unique keys in the batch and against the table, foreign keys),
       then every other row is written from the staging table in one statement
       (``txn.write_screened``): a COPY and a few queries whatever the number of bad rows,
       no probe, no row tried alone. If that still fails (something the screen does not
       judge), the screen's results are dropped and steps 1-3 run.
    1. **Probe**: while the last failure is one its row raises on its own
       (``txn.row_only``: a CHECK, NOT NULL or data error) at a located row, exclude
       that row and probe the rows after it to find the next one (``txn.probe``: a COPY
       always rolled back, into an index-less copy of the table when the sink has one).
       Probes run without the rows before them, so only row-only failures are taken
       from them: those do not depend on other rows. A probe covers 4 mean gaps between
       the rows found so far (at least 64 rows) and 4x more after each probe that found
       nothing, so dense bad rows are not each followed by the rest of the batch.
    2. **In order**: COPY every row not excluded, in batch order, in one statement. A
       failure (a unique or foreign key violation, or anything the probes did not see)
       is handled in order, as the slice-by-slice path does: the rows before the
       located row are written (``txn.write``: no savepoint, they were just accepted),
       the located row is tried alone (dead if that fails too), the rest continues.
    3. **Confirm**: each excluded row is COPY'd alone (rolled back) and must fail with a
       row-only error again.

    A located row that is fine alone, rows before it that fail, or a failure without a
    locator raise ``GiveUp``: the caller rolls everything back and goes slice by slice
    (bisecting). Probes and rows tried alone sit in a savepoint that is rolled back, so
    failures cost no reconnect and leave no subtransaction behind; good rows reach the
    table in one COPY instead of once per bad row; the batch commits once.

    Bound, for k bad rows among n that all fail on their own: at most
    ``2k + 1 + k·⌈log4 n⌉`` COPYs (the batch's first write, k - 1 probes that find
    one, at most ⌈log4 n⌉ that find nothing after each, one COPY of the rest, k rows
    alone), typically 2k + 2. Each other bad row adds at most 3 (its failing COPY, the
    rows before it, itself alone).
    """

    def __init__(
        self,
        txn: RowTransaction,
        n: int,
        source_indices: Any,
        check: BatchCheck | None,
        metrics: DeliveryMetrics,
        keys: bool = False,
        screen_first: bool = True,
        early: Callable[[dict[int, tuple[PermanentSinkError, int]]], None] | None = None,
    ) -> None:
        self.txn = txn
        self.early = early  # called with the rows of step C (dead letters built at once)
        self.keys = keys  # screen the key rules from the start
        # With no failure seen yet: screen before writing (else COPY first, screen on failure)
        self.screen_first = screen_first
        self.metrics = metrics
        self.n = n
        self.skip: list[int] = []  # sorted rows not to write: excluded or dead
        self.excl: dict[int, tuple[PermanentSinkError, int]] = {}  # row -> (error, attempts)
        self.dead: dict[int, tuple[PermanentSinkError, int]] = {}
        self.client: list[int] = []  # rows the client-side check found (dead from the start)
        self.kept = 0  # COPYs whose rows were kept
        # The breaker's check of the batch, counting excluded rows too (they are confirmed
        # before it trips); a copy: a rolled back isolation leaves the batch's check as it was.
        self.check = check.copy() if check is not None else None
        self.src = memoryview(source_indices)

    def isolate(self, first: PermanentSinkError | None) -> None:
        """Steps 0-3 (the caller commits); raises ``GiveUp``. ``first``: the failure of the
        batch's plain write, or None when it was not tried (the screen goes first)."""
        found = self._client_check(1 if first is None else 2)
        if first is not None and (found or first.client_side):
            # Nothing was sent, or the failure may be a row found here: COPY the rest first.
            first, self.screen_first = None, False
        if first is None and not self.screen_first:
            first = self._copy_all()  # as the plain write would, but inside the transaction
            if first is None:
                return
        if self._screen(first):
            return
        if first is None:  # not screened: COPY the batch, as its plain write would
            first = self._copy_all()
            if first is None:
                return
        seed = self._probe(first)
        self._in_order(seed)
        self._confirm_excluded()

    def _client_check(self, attempts: int) -> int:
        """Step C: the rows the client-side check found are dead (the breaker counts
        them), with ``attempts`` as the screen counts them. Returns how many."""
        fn = getattr(self.txn, "prescreen", None)  # a sink's own transaction may have none
        found = fn() if callable(fn) else None
        if not found:
            return 0
        for row in sorted(found):
            self._kill(row, found[row], attempts)
        self.client = sorted(found)
        if self.early is not None:
            self.early({row: self.dead[row] for row in self.client})
        self.metrics.add("located", len(found))
        return len(found)

    def _reset(self) -> None:
        """Forget what was found after step C."""
        keep = set(self.client)
        self.dead = {r: d for r, d in self.dead.items() if r in keep}
        self.skip = list(self.client)

    def _copy_all(self) -> PermanentSinkError | None:
        """COPY every row not known bad, kept; the failure, or None when they are in."""
        ranges = self._ranges(0, self.n)
        if not ranges:
            return None
        try:
            self.txn.copy(ranges, keep=True)
        except PermanentSinkError as exc:
            self.metrics.add("sink_errors")
            return exc
        self.kept += 1
        return None

    def _screen(self, first: PermanentSinkError | None) -> bool:
        """Step 0. True when the screened rows are dead and every other row is written;
        else nothing is kept.

        The rules a row breaks on its own are screened first; the key rules (unique, foreign
        key: a pass over indexes) only when the batch's failure, or the insert after the
        first screen, is a key violation."""
        screen = getattr(self.txn, "screen", None)  # a sink's own transaction may have none
        if not callable(screen):
            return False
        keys = self.keys or (first is not None and first.sqlstate in KEY_STATES)
        attempts = 1 if first is None else 2
        while True:
            found = screen(self._ranges(0, self.n), keys)
            if found is None:
                return False
            if not found and first is not None:
                if keys:
                    return False  # the screen explains nothing of the failure
                keys = True
                continue
            check = self.check.copy() if self.check is not None else None
            for row in sorted(found):
                self._kill(row, found[row], attempts)
            try:
                self.txn.write_screened(sorted(found))
            except PermanentSinkError as exc:
                # Something the screen did not judge failed: its results may depend on
                # that row (a key it would have taken), so all of them are dropped.
                self.metrics.add("sink_errors")
                self._reset()
                self.check = check
                if not keys and exc.sqlstate in KEY_STATES:
                    keys = True
                    continue
                return False
            self.kept += 1
            self.metrics.add("located", len(found))
            return True

    def _exclude(self, row: int) -> None:
        bisect.insort(self.skip, row)

    def _ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Rows of ``[lo, hi)`` not skipped, as ranges."""
        out = []
        a = lo
        i = bisect.bisect_left(self.skip, lo)
        while i < len(self.skip) and self.skip[i] < hi:
            r = self.skip[i]
            if r > a:
                out.append((a, r))
            a = r + 1
            i += 1
        if a < hi:
            out.append((a, hi))
        return out

    @staticmethod
    def _row(exc: PermanentSinkError, ranges: list[tuple[int, int]]) -> int | None:
        row = located(exc, ranges[0][0], ranges[-1][1]) if ranges else None
        if row is None or not any(a <= row < b for a, b in ranges):
            return None
        return row

    def _probe(self, first: PermanentSinkError) -> PermanentSinkError | None:
        """Step 1. Returns ``first`` when the in-order step starts with that failure (it
        was not row-only, and the batch's first write had every row before it)."""
        txn, m = self.txn, self.metrics
        err, attempts = first, 1
        ranges = self._ranges(0, self.n)
        while True:
            row = self._row(err, ranges)
            if row is None or not txn.row_only(err):
                return first if err is first else None
            m.add("located")
            self.excl[row] = (err, attempts)
            self._exclude(row)
            self._note(row)
            # Probe a window of a few mean gaps between the rows found so far, growing 4x
            # while nothing fails: dense bad rows are not followed by the whole rest of the
            # batch each time (quadratic), sparse ones cost few extra probes.
            lo, window = row + 1, max(_MIN_PROBE, 4 * (row + 1) // len(self.excl))
            while True:
                ranges = self._ranges(lo, min(self.n, lo + window))
                if not ranges:
                    return None
                try:
                    txn.probe(ranges)
                except PermanentSinkError as exc:
                    m.add("sink_errors")
                    err, attempts = exc, attempts + 1
                    break
                lo, window = ranges[-1][1], 4 * window

    def _in_order(self, err: PermanentSinkError | None) -> None:
        """Step 2; ``err``: the known failure of COPYing every row, if already seen."""
        txn, m = self.txn, self.metrics
        pos, attempts = 0, 1
        while True:
            ranges = self._ranges(pos, self.n)
            if not ranges:
                return
            if err is None:
                try:
                    txn.copy(ranges, keep=True)
                    self.kept += 1
                    return
                except PermanentSinkError as exc:
                    m.add("sink_errors")
                    err = exc
            failure, err = err, None
            attempts += 1
            if _count(ranges) == 1:
                self._kill(ranges[0][0], failure, attempts)
                return
            row = self._row(failure, ranges)
            if row is None:
                raise GiveUp(wrong_locator=False)  # no COPY line: bisect, slice by slice
            m.add("located")
            before = self._ranges(pos, row)
            if before:
                try:
                    txn.write(before)  # accepted by the server right before the failure
                except PermanentSinkError as exc:
                    raise GiveUp(wrong_locator=True) from exc  # the transaction is lost
                self.kept += 1
            try:
                txn.copy([(row, row + 1)], keep=False)  # the located row alone
            except PermanentSinkError as exc2:
                m.add("sink_errors")
                self._kill(row, exc2, attempts + 1)
            else:
                raise GiveUp(wrong_locator=True)  # fine alone: the locator was wrong
            pos = row + 1

    def _kill(self, row: int, exc: PermanentSinkError, attempts: int) -> None:
        self.dead[row] = (exc, attempts)
        self._exclude(row)
        self._note(row)

    def _note(self, row: int) -> None:
        """Count a dead or excluded row in the breaker's check. When the rows found so far
        trip it, confirm the excluded rows (a row fine alone: ``GiveUp``, the batch goes
        slice by slice, where only confirmed rows count) and raise ``CircuitBreakerOpen``:
        the caller rolls the transaction back, no dead letter of the batch is built."""
        if self.check is None or not self.check.add(self.src[row]):
            return
        self._confirm_excluded()
        assert self.check.error is not None
        raise self.check.error

    def _confirm_excluded(self) -> None:
        """Step 3 (rows confirmed already are skipped)."""
        for row in sorted(self.excl):
            if row in self.dead:
                continue
            attempts = self.excl[row][1]
            try:
                self.txn.copy([(row, row + 1)], keep=False)
            except PermanentSinkError as exc:
                self.metrics.add("sink_errors")
                if self.txn.row_only(exc):
                    self.dead[row] = (exc, attempts + 1)
                    continue
            raise GiveUp(wrong_locator=True)


class GiveUp(Exception):
    """Isolating in one transaction cannot go on: roll it back, go slice by slice."""

    def __init__(self, wrong_locator: bool) -> None:
        super().__init__()
        self.wrong_locator = wrong_locator  # a located row was not bad after all
