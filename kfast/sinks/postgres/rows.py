"""``RowTransaction``: one transaction in which the delivery layer isolates a batch's bad rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from kfast.errors import ConfigError, KfastError, PermanentSinkError, TransientSinkError
from kfast.sinks._pgcopy import EncodeError
from kfast.sinks.postgres.connection import Connections
from kfast.sinks.postgres.exactly_once import clip
from kfast.sinks.postgres.screen import Screener
from kfast.sinks.postgres.sqlstate import classify, copy_row_hint, row_only_state

__all__ = ["RowTransaction"]

_SAVEPOINT = "kfast_rows"
CopyFn = Callable[[psycopg.Connection[Any], Sequence[tuple[int, int]], sql.Composed], None]


class _ProbeTableGone(Exception):
    """The probe table is missing in this session (raised inside RowTransaction only)."""


class RowTransaction:
    """One transaction in which the delivery layer isolates a batch's bad rows.

    Made by :meth:`PostgresSink.row_transaction`; use it as a context manager (leaving it
    without :meth:`commit` rolls everything back and unlocks the sink).

    * ``copy(ranges, keep)``: one COPY of the batch rows ``[a, b)`` of each range, in
      order, inside a savepoint. ``keep=True`` keeps the rows on success; ``keep=False``
      rolls them back whatever happens (a row tried alone). A permanent failure rolls back to the
      savepoint and raises ``PermanentSinkError`` whose ``row`` is the **batch** row
      PostgreSQL blamed (the COPY line mapped through ``ranges``), or None; the
      transaction stays usable. Any other error loses the transaction: it is raised
      (``TransientSinkError`` mostly) and the caller starts over with a new one.
    * ``write(ranges)``: one COPY of rows expected to succeed, kept, without a savepoint;
      a failure loses the transaction.
    * ``probe(ranges)``: like ``copy(ranges, keep=False)``, into ``pg_temp.kfast_probe`` when
      the sink could create it (``LIKE`` the table: its CHECK and NOT NULL constraints,
      defaults, generated and identity columns, no index, no trigger), else the table.
      Cheaper than the table (no index, no WAL) and it leaves no dead rows there.
    * ``screen(ranges, keys=True)``: every row of ``ranges`` the table would reject, with
      its error, found set-based (see :mod:`kfast.sinks.postgres.screen`), or None when
      the table cannot be screened (user triggers, partitioned, no TEMP privilege, a value
      kfast cannot encode). Nothing is written to the table: one COPY into a staging table.
    * ``write_screened(skip)``: the staged rows but ``skip`` into the table, in one
      ``INSERT ... SELECT`` (no COPY line: a failure has no row).
    * ``prescreen()``: the rows of the batch the client-side check found bad (see
      :mod:`kfast.sinks.postgres.prescreen`), with their errors, checked when the
      transaction began under the table's lock; None when the table has no rule the client
      can check. They are rows the server would reject: nothing needs to confirm them.
    * ``row_only(exc)``: True when ``exc`` is an error the blamed row raises on its own,
      whatever else is written (see ``sqlstate.row_only_state``; never with user triggers).
    * ``commit()``: in exactly_once mode store the batch's ``next_offsets`` (the whole
      batch's), then COMMIT.

    ``statements`` counts the COPYs issued (the write bound the tests check).

    The sink hands it only what it uses: its connection slot, a function that COPYs rows
    of the batch with a statement, the statements for the table and the probe table, the
    exactly-once fence and offset store, and the function that unlocks the sink.
    """

    def __init__(
        self,
        *,
        conns: Connections,
        slot: int,
        copy: CopyFn,
        encode_error: Callable[[EncodeError], PermanentSinkError],
        stmt: sql.Composed,
        probe_stmt: sql.Composed | None,
        allowed: list[tuple[int, int]] | None,
        triggers: bool,
        store_offsets: Callable[[psycopg.Connection[Any]], None] | None,
        release: Callable[[], None],
        screener: Callable[[], Screener | None] | None = None,
        prescreened: dict[int, PermanentSinkError] | None = None,
    ) -> None:
        self._conns = conns
        self._slot = slot
        self._conn = conns.get(slot)
        self._copy_fn = copy
        self._encode_error = encode_error
        self._allowed = allowed  # exactly_once: rows not yet stored (the fence)
        self._triggers = triggers
        self._store = store_offsets
        self._release = release
        self._make_screener = screener  # called at the first screen (SELECTs only)
        self._prescreened = prescreened
        self._screener: Screener | None = None
        self._staged = False  # screened rows staged inside the open savepoint
        self._empty = False  # the last screen had no row to stage
        self._stage_used = False  # the staging table holds rows of an earlier insert
        self._stmt = stmt
        self._probe_stmt = probe_stmt if probe_stmt is not None else stmt
        self._savepoint = False  # a savepoint named _SAVEPOINT is open
        self._open = True
        self.statements = 0

    def __enter__(self) -> RowTransaction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Roll back unless committed; unlock the sink. Idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            if self._conns.current(self._slot) is self._conn:
                self._conns.rollback(self._slot)
        finally:
            self._release()

    def prescreen(self) -> dict[int, PermanentSinkError] | None:
        return None if self._prescreened is None else dict(self._prescreened)

    def row_only(self, exc: PermanentSinkError) -> bool:
        if isinstance(exc.__cause__, EncodeError):
            return True  # kfast cannot encode the value: nothing else matters
        return not self._triggers and row_only_state(exc.sqlstate)

    def screen(
        self, ranges: Sequence[tuple[int, int]], keys: bool = True
    ) -> dict[int, PermanentSinkError] | None:
        """Rows of ``ranges`` the table would reject (batch row -> error); None: no screen.
        ``keys=False``: only what a row breaks on its own (types, NOT NULL, CHECK). The
        rows stay staged for :meth:`write_screened` until any other call."""
        if not self._open:
            raise KfastError("RowTransaction is closed")
        if self._make_screener is None or self._triggers:
            return None
        if self._screener is None:
            try:
                self._screener = self._make_screener()
            except psycopg.Error as exc:
                raise self._lost(exc) from exc
            if self._screener is None:
                self._make_screener = None
                return None
        rs = clip(ranges, self._allowed)
        self._unstage()
        if not rs:
            self._empty = True  # every row fenced: nothing to stage, nothing to write
            return {}
        self.statements += 1
        if not self._savepoint:
            self._execute(f"SAVEPOINT {_SAVEPOINT}")
            self._savepoint = True
        try:
            if self._stage_used:
                self._screener.clear(self._conn)
                self._stage_used = False
            found = self._screener.run(self._conn, rs, keys)
        except EncodeError:
            found = None  # a value kfast cannot encode: the probes find it
        except psycopg.Error as exc:
            if self._conn.broken or isinstance(classify(exc), TransientSinkError):
                raise self._lost(exc) from exc
            found = None  # e.g. a CHECK expression that fails on some value: no screen
        except BaseException as exc:
            raise self._lost(exc) from exc
        if found is None:
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        else:
            self._staged = True
        return found

    def write_screened(self, skip: Sequence[int]) -> None:
        """Write every row the last :meth:`screen` staged except the batch rows ``skip``,
        kept, with one ``INSERT ... SELECT`` from the staging table. A permanent failure
        (something the screen does not judge) rolls it back and raises
        ``PermanentSinkError`` without a row; the transaction stays usable."""
        if not self._open:
            raise KfastError("RowTransaction is closed")
        if self._empty:
            self._empty = False
            return
        if not self._staged or self._screener is None:
            raise KfastError("RowTransaction.write_screened without screened rows")
        self._staged = False
        self.statements += 1
        try:
            self._screener.insert(self._conn, skip)
        except psycopg.Error as exc:
            err = classify(exc)
            if not isinstance(err, PermanentSinkError) or self._conn.broken:
                raise self._lost(exc) from exc
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            raise err from exc
        except BaseException as exc:
            raise self._lost(exc) from exc
        self._execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
        self._savepoint = False
        self._stage_used = True

    def _unstage(self) -> None:
        """Drop rows a screen staged (rolled back with its savepoint)."""
        self._empty = False
        if self._staged:
            self._staged = False
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")

    def _lost(self, exc: BaseException) -> KfastError:
        """The transaction cannot continue: roll back (or drop the connection)."""
        err = self._conns.fail(self._slot, exc)
        self._open = False
        self._release()
        return err

    def _execute(self, stmt: str) -> None:
        try:
            self._conn.execute(stmt)
        except psycopg.Error as exc:
            raise self._lost(exc) from exc

    def copy(self, ranges: Sequence[tuple[int, int]], keep: bool) -> None:
        """One COPY of the rows of ``ranges`` into the table, in a savepoint; rolled back
        unless ``keep``."""
        self._copy(ranges, self._stmt, keep)

    def write(self, ranges: Sequence[tuple[int, int]]) -> None:
        """One COPY of rows expected to succeed, kept, without a savepoint: a failure
        loses the transaction (the rows are rolled back and the caller starts over).

        A savepoint released after success stays in the server's per-transaction list
        of subtransactions until COMMIT, and past 64 of them every other session's
        snapshots get slower (pg_subtrans lookups); rows that cannot fail do not need one.
        """
        self._copy(ranges, self._stmt, True, protect=False)

    def probe(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Like ``copy(ranges, keep=False)``, into the probe table when there is one: it
        finds the same row-only errors (see :meth:`row_only`), and only those."""
        if self._probe_stmt is self._stmt:
            self._copy(ranges, self._stmt, False)
            return
        try:
            self._copy(ranges, self._probe_stmt, False, probe_table=True)
        except _ProbeTableGone:
            # Dropped under us (e.g. a pooler that moves sessions): probe the table itself.
            self._probe_stmt = self._stmt
            self._conns.probe_tables[id(self._conn)] = False
            self._copy(ranges, self._stmt, False)

    def _copy(
        self,
        ranges: Sequence[tuple[int, int]],
        stmt: sql.Composed,
        keep: bool,
        protect: bool = True,
        probe_table: bool = False,
    ) -> None:
        if not self._open:
            raise KfastError("RowTransaction is closed")
        rs = clip(ranges, self._allowed)
        if not rs:
            return
        self._unstage()
        self.statements += 1
        if protect and not self._savepoint:
            self._execute(f"SAVEPOINT {_SAVEPOINT}")
            self._savepoint = True
        elif not protect and self._savepoint:
            self._execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")  # nothing in it: rolled back to
            self._savepoint = False
        try:
            self._copy_fn(self._conn, rs, stmt)
        except EncodeError as exc:
            err = self._encode_error(exc)
            if not protect:
                raise self._lost(exc) from exc
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            raise err from exc
        except psycopg.Error as exc:
            err2 = classify(exc)
            if probe_table and isinstance(err2, ConfigError) and not self._conn.broken:
                self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
                raise _ProbeTableGone from exc
            if not protect or not isinstance(err2, PermanentSinkError) or self._conn.broken:
                raise self._lost(exc) from exc
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            err2.row = copy_row_hint(exc, rs)
            raise err2 from exc
        except BaseException as exc:
            raise self._lost(exc) from exc
        if not protect:
            return
        if keep:
            self._execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            self._savepoint = False
        else:
            self._execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            if stmt is self._stmt and self._probe_stmt is not self._stmt:
                # A row tried alone in the table went in: if the probe table rejected it,
                # its definition may be stale (ALTER TABLE). Make it again next time.
                self._conns.probe_tables.pop(id(self._conn), None)

    def commit(self) -> None:
        if not self._open:
            raise KfastError("RowTransaction is closed")
        try:
            self._unstage()
            if self._store is not None:
                self._store(self._conn)
            self._conn.commit()
        except BaseException as exc:
            raise self._lost(exc) from exc
        self._open = False
        self._release()
