"""PostgreSQL sink: binary COPY straight from the Batch's columns.

Modes
-----
* ``copy`` (default): ``COPY table (cols) FROM STDIN (FORMAT BINARY)``, one
  transaction per write.
* ``upsert``: COPY into a per-connection TEMP staging table, then
  ``INSERT ... SELECT DISTINCT ON (key) ... ORDER BY key, seq DESC
  ON CONFLICT (key) DO UPDATE``: duplicate keys inside a batch collapse to
  the last row (rows are in consumption order, so the last offset wins).
* ``exactly_once``: the rows (COPY, or the upsert path when ``key`` is given)
  and one ``kfast_offsets(group_id, topic, partition, next_offset)`` row per
  partition from ``batch.context.next_offsets`` are committed in one
  transaction (see :mod:`.exactly_once`). ``stored_offsets(group_id, topics)``
  returns what the runtime seeks to on assignment.

Errors are classified by SQLSTATE class only (see :mod:`.sqlstate`).

The table is introspected at ``open()`` (:mod:`.catalog`). The batch layout is
only known when the first batch arrives: the encoding plan is built then
(:mod:`.plan`, pure) and every mismatch is a ``ConfigError`` naming the column.
DDL (``create_table``, ``kfast_offsets``, the TEMP staging and probe tables)
runs before any row is written, in its own transaction, never inside a data
transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq, sql

from kfast.errors import (
    ConfigError,
    KfastError,
    PermanentSinkError,
    SinkError,
    TransientSinkError,
)
from kfast.sinks import PipelineInfo, Sink
from kfast.sinks._pgcopy import CopyEncoder, EncodeError
from kfast.sinks.postgres import catalog
from kfast.sinks.postgres.catalog import (
    PROBE_TABLE,
    STAGE_TABLE,
    TableInfo,
    rules_version,
    table_state,
)
from kfast.sinks.postgres.connection import Connections
from kfast.sinks.postgres.copy import CopyTiming, copy_rows, copy_sql, encode_error, pre_encode
from kfast.sinks.postgres.exactly_once import fence, read_offsets, store_offsets
from kfast.sinks.postgres.plan import Plan, build_plan, table_definition
from kfast.sinks.postgres.prescreen import PreScreen
from kfast.sinks.postgres.prescreen import build as build_prescreen
from kfast.sinks.postgres.rows import RowTransaction
from kfast.sinks.postgres.screen import (
    SCREEN_TABLE,
    Rules,
    Screener,
    read_rules,
    screen_sql,
)
from kfast.sinks.postgres.sqlstate import classify, classify_connect, copy_row_hint

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = ["MODES", "PostgresSink"]

MODES = ("copy", "upsert", "exactly_once")
Pre = list[list[bytes | None]]


class PostgresSink(Sink):
    """Writes batches to one PostgreSQL table with binary COPY.

    ``columns`` maps dotted batch field paths to table column names
    (``{"address.city": "city"}``); mapping a path to ``None`` skips the
    field; mapping a nested record's path writes the whole record as one
    jsonb column. Unmapped nested fields are flattened with ``_``.
    """

    # Set to a CopyTiming to sum where the write path's COPYs spend their time (benchmarks).
    _timing: CopyTiming | None = None
    # copy mode, one connection: the batch's COPY in autocommit (False: inside BEGIN/COMMIT,
    # for A/B benchmarks).
    _copy_autocommit = True
    # Check the rows on the client before COPY where the table's rules allow it (False: leave
    # every rule to the server, for tests of the server-side isolation and A/B benchmarks).
    _client_check = True

    def __init__(
        self,
        dsn: str,
        table: str,
        mode: str = "copy",
        key: str | Sequence[str] | None = None,
        columns: Mapping[str, str | None] | None = None,
        create_table: bool = False,
        connections: int = 1,
        *,
        offsets_table: str = "kfast_offsets",
        chunk_bytes: int = 128 << 10,
        connect_timeout: float = 10.0,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ConfigError("PostgresSink.dsn must be a non-empty connection string")
        if not isinstance(table, str) or not table:
            raise ConfigError("PostgresSink.table must be a non-empty table name")
        if mode not in MODES:
            raise ConfigError(f"PostgresSink.mode must be one of {', '.join(MODES)}, got {mode!r}")
        keys: tuple[str, ...] = ()
        if key is not None:
            keys = (key,) if isinstance(key, str) else tuple(key)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ConfigError(
                    "PostgresSink.key must be a column name or a non-empty list of names"
                )
        if mode == "upsert" and not keys:
            raise ConfigError(
                "PostgresSink.key is required when mode='upsert' (the ON CONFLICT target)"
            )
        if (
            isinstance(connections, bool)
            or not isinstance(connections, int)
            or not 1 <= connections <= 64
        ):
            raise ConfigError(
                f"PostgresSink.connections must be an int in [1, 64], got {connections!r}"
            )
        if connections > 1 and mode != "copy":
            raise ConfigError(
                "PostgresSink.connections > 1 is only allowed with mode='copy' "
                "(upsert and exactly_once need one transaction per batch)"
            )
        if not 4096 <= chunk_bytes <= 64 << 20:
            raise ConfigError(
                f"PostgresSink.chunk_bytes must be in [4096, 64MiB], got {chunk_bytes!r}"
            )
        self.dsn = dsn
        self.table = table
        self.mode = mode
        self.key = keys
        self.columns: dict[str, str | None] = dict(columns or {})
        self.create_table = bool(create_table)
        self.connections = connections
        self.offsets_table = offsets_table
        self.chunk_bytes = chunk_bytes
        self.connect_timeout = connect_timeout
        self.group_id: str | None = None
        self._conns = Connections(dsn, connections, connect_timeout)
        self._table: TableInfo | None = None
        self._table_ident: sql.Composable | None = None
        self._plan: Plan | None = None
        self._plan_layout: Any = None
        self._encoders: list[CopyEncoder] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._opened = False
        # The screening rules of the plan and the catalog version they were read at.
        self._rules: tuple[str | None, Rules | None] | None = None
        # The plan's encoder for the screening table (False: the layout has none).
        self._screen_encoder: CopyEncoder | bool | None = None
        # The client-side check of the plan (copy and exactly_once without key) and the
        # catalog version it was built at; None: not built yet.
        self._client: tuple[str | None, PreScreen | None] | None = None
        self.fenced_rows = 0  # exactly_once: rows skipped because their offset was already stored

    @property
    def stores_offsets(self) -> bool:
        """True in exactly_once mode: writes store ``batch.context.next_offsets``."""
        return self.mode == "exactly_once"

    def __repr__(self) -> str:
        return (
            f"PostgresSink(table={self.table!r}, mode={self.mode!r}, key={list(self.key) or None})"
        )

    # ------------------------------------------------------------ open / introspection

    def open(self, pipeline_info: PipelineInfo | None = None) -> None:
        """Connect, introspect the table, create kfast_offsets (exactly_once).

        A missing database, an unknown role, bad credentials, no CONNECT privilege or a
        missing table (without ``create_table``) raise ``ConfigError``; a server that cannot
        be reached (refused, timeout, starting up) raises ``TransientSinkError``, which the
        Pipeline retries under its ``RetryPolicy`` as it does mid-run."""
        if pipeline_info is not None:
            self.group_id = pipeline_info.group_id
        conn = self._conns.get(0)
        try:
            self._introspect(conn)
            if self.mode == "exactly_once":
                catalog.create_offsets_table(conn, self.offsets_table)
            conn.commit()
        except psycopg.Error as exc:
            raise self._conns.fail(0, exc) from exc
        except ConfigError:
            self._conns.rollback(0)
            raise
        self._opened = True

    def _introspect(self, conn: psycopg.Connection[Any]) -> None:
        info = catalog.introspect(conn, self.table)
        if info is None:
            if self.create_table:
                self._table = None  # created when the first batch shows the layout
                self._table_ident = sql.Identifier(*self.table.split("."))
                return
            raise ConfigError(
                f"PostgresSink.table: table {self.table!r} does not exist "
                "(create it, or pass create_table=True)"
            )
        self._table = info
        self._table_ident = info.ident
        cols = info.columns
        for path, target in self.columns.items():
            if target is not None and target not in cols:
                raise ConfigError(
                    f"PostgresSink.columns maps {path!r} to column {target!r}, "
                    f"which table {self.table} does not have (columns: {', '.join(cols)})"
                )
        for k in self.key:
            if k not in cols:
                raise ConfigError(
                    f"PostgresSink.key: column {k!r} does not exist in table {self.table}"
                )

    def _create_table(self, batch: Batch) -> None:
        """``create_table=True`` and no table yet: create it from the batch's layout (DDL in
        its own transaction), then introspect it."""
        assert self._table_ident is not None
        defs = table_definition(batch, self.columns)
        conn = self._conns.get(0)
        try:
            catalog.create_table(conn, self._table_ident, defs, self.key)
            conn.commit()
            self._introspect(conn)
            conn.commit()
        except psycopg.Error as exc:
            raise self._conns.fail(0, exc) from exc

    # ------------------------------------------------------------ plan

    def _ensure_plan(self, batch: Batch) -> Plan:
        layout = batch.layout
        if self._plan is not None and (layout is self._plan_layout or layout == self._plan_layout):
            return self._plan
        if not self._opened:
            ctx = getattr(batch, "context", None)
            if self.group_id is None and ctx is not None:
                self.group_id = ctx.group_id
            self.open(None)
        if self._table is None:
            self._create_table(batch)
        assert self._table is not None
        plan = build_plan(batch, self.table, self._table.columns, self.columns, self.key)
        entries = list(plan.entries)
        if self.key and self.mode in ("upsert", "exactly_once"):
            entries.append({"op": "rownum"})
        try:
            self._encoders = [CopyEncoder(entries) for _ in range(self.connections)]
        except ValueError as exc:
            raise ConfigError(f"PostgresSink: cannot encode this layout: {exc}") from exc
        self._plan = plan
        self._plan_layout = layout
        self._conns.staged.clear()
        self._conns.probe_tables.clear()
        self._conns.screen_tables.clear()
        self._screen_encoder = None
        self._rules = None
        self._client = None
        return plan

    # ------------------------------------------------------------ writes

    def write(self, batch: Batch) -> None:
        """Write every row of ``batch``; durable (committed) when it returns."""
        with self._lock:
            plan = self._ensure_plan(batch)
            self._check_rows(batch, plan)
            pre = pre_encode(batch, plan)
            if self.connections > 1 and batch.num_rows >= 2 * self.connections:
                self._write_parallel(batch, plan, pre)
                return
            conn = self._conns.get(0)
            copying: list[tuple[int, int]] | None = None  # the COPY in progress, for its hint
            try:
                if self.mode == "copy":
                    copying = [(0, batch.num_rows)]
                    self._copy_alone(conn, batch, pre, copying, self._copy_stmt(plan))
                elif self.mode == "upsert":
                    copying = [(0, batch.num_rows)] if batch.num_rows else []
                    self._upsert(conn, batch, plan, pre, copying)
                else:
                    copying = self._fence(conn, batch)
                    if self.key:
                        self._upsert(conn, batch, plan, pre, copying)
                    elif copying:
                        self._copy_ranges(conn, 0, batch, pre, copying, self._copy_stmt(plan))
                    copying = None
                    self._store_offsets(conn, batch)
                copying = None
                conn.commit()
            except EncodeError as exc:
                self._conns.fail(0, exc)
                raise encode_error(exc, plan, batch) from exc
            except psycopg.Error as exc:
                err = self._conns.fail(0, exc)
                if isinstance(err, PermanentSinkError) and copying is not None:
                    err.row = copy_row_hint(exc, copying)
                raise err from exc
            except (SinkError, ConfigError):
                self._conns.fail(0, RuntimeError("aborted"))
                raise

    def _check_rows(self, batch: Batch, plan: Plan) -> None:
        """Raise the error of the first row the client-side check finds bad (see
        :mod:`.prescreen`) before anything is sent: the delivery layer then writes the
        other rows in one row transaction, which checks them again under the table's lock
        with the current rules."""
        if not self._client_checks() or batch.num_rows == 0:
            return
        if self._client is None:
            conn = self._conns.get(0)
            try:
                assert self._table is not None
                triggers, version = table_state(
                    conn, self._table.ident, self._table.oid, self._table.kind == "r"
                )
                self._client = (version, None if triggers else self._build_client(conn, plan))
                conn.commit()
            except psycopg.Error as exc:
                raise self._conns.fail(0, exc) from exc
        client = self._client[1]
        if client is None:
            return
        try:
            found = client.run(batch)
        except ValueError:  # the program does not match this batch: the server judges
            self._client = (self._client[0], None)
            return
        if found:
            raise found[min(found)]

    def _client_checks(self) -> bool:
        return (
            self._client_check
            and self.mode != "upsert"
            and not self.key
            and self._table is not None
        )

    def _build_client(self, conn: psycopg.Connection[Any], plan: Plan) -> PreScreen | None:
        """The client-side check of ``plan`` for the table's current rules (None: nothing
        to check, or a table the rules cannot be read for)."""
        assert self._table is not None
        rules = self._read_rules(conn, plan)
        if rules is None:
            return None
        utf8 = all(
            conn.pgconn.parameter_status(p) == b"UTF8"
            for p in (b"server_encoding", b"client_encoding")
        )
        try:
            return build_prescreen(plan, rules, self._table.columns, utf8)
        except ValueError:  # a layout the program cannot read: the server judges
            return None

    def _copy_stmt(self, plan: Plan) -> sql.Composed:
        assert self._table_ident is not None
        return copy_sql(plan, self._table_ident)

    def _copy_alone(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        pre: Pre,
        ranges: Sequence[tuple[int, int]],
        stmt: sql.Composed,
    ) -> None:
        """A COPY that is the whole transaction, run in autocommit: one statement is atomic
        and committed when the server reports it complete, and the server, idle during each
        round trip, is spared two per batch (BEGIN and COMMIT)."""
        if not self._copy_autocommit or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            self._copy_ranges(conn, 0, batch, pre, ranges, stmt)  # committed by the caller
            return
        conn.autocommit = True
        try:
            self._copy_ranges(conn, 0, batch, pre, ranges, stmt)
        finally:
            # A failed COPY leaves the connection idle too (its implicit transaction is
            # gone); one that cannot go back to transactions is not reused.
            if conn.broken or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                self._conns.drop(0)
            else:
                conn.autocommit = False

    def _copy_ranges(
        self,
        conn: psycopg.Connection[Any],
        i: int,
        batch: Batch,
        pre: Pre,
        ranges: Sequence[tuple[int, int]],
        stmt: sql.Composed,
    ) -> None:
        copy_rows(conn, self._encoders[i], batch, pre, ranges, stmt, self.chunk_bytes, self._timing)

    def _fence(self, conn: psycopg.Connection[Any], batch: Batch) -> list[tuple[int, int]]:
        ranges = fence(conn, batch, self.offsets_table, self.group_id)
        self.fenced_rows += batch.num_rows - sum(b - a for a, b in ranges)
        return ranges

    def _store_offsets(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        store_offsets(conn, batch, self.offsets_table, self.group_id)

    def _upsert(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        plan: Plan,
        pre: Pre,
        ranges: list[tuple[int, int]],
    ) -> None:
        """COPY ``ranges`` into the staging table, then one ``INSERT ... ON CONFLICT``.
        Empties ``ranges`` once the COPY is done (an INSERT failure has no COPY line)."""
        if not ranges:
            return
        if id(conn) not in self._conns.staged:
            assert self._table_ident is not None
            catalog.create_stage_table(conn, self._table_ident, plan.columns)
            conn.commit()
            self._conns.staged.add(id(conn))
        stage = sql.Identifier("pg_temp", STAGE_TABLE)
        self._copy_ranges(conn, 0, batch, pre, ranges, copy_sql(plan, stage, seq=True))
        ranges.clear()
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key))
        cols = sql.SQL(", ").join(map(sql.Identifier, plan.columns))
        rest = [c for c in plan.columns if c not in self.key]
        action: sql.Composable
        if rest:
            action = sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest
                )
            )
        else:
            action = sql.SQL("DO NOTHING")
        conn.execute(
            sql.SQL(
                "INSERT INTO {t} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM {s} "
                "ORDER BY {keys}, _kfast_seq DESC ON CONFLICT ({keys}) {action}"
            ).format(t=self._table_ident, cols=cols, keys=keys, s=stage, action=action)
        )

    def _write_parallel(self, batch: Batch, plan: Plan, pre: Pre) -> None:
        n = self.connections
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kfast-pg")
        step = (batch.num_rows + n - 1) // n
        ranges = [(i, i * step, min(batch.num_rows, (i + 1) * step)) for i in range(n)]
        stmt = self._copy_stmt(plan)

        def part(i: int, start: int, stop: int) -> None:
            self._copy_ranges(self._conns.get(i), i, batch, pre, [(start, stop)], stmt)

        futures = [self._pool.submit(part, i, a, b) for i, a, b in ranges if a < b]
        errors: list[tuple[int, BaseException]] = []
        for (i, _, _), fut in zip(ranges, futures):
            exc = fut.exception()
            if exc is not None:
                errors.append((i, exc))
        if errors:
            first: KfastError | None = None
            for i in range(n):
                exc2 = next((e for j, e in errors if j == i), None)
                if exc2 is not None:
                    a, b = ranges[i][1], ranges[i][2]
                    if isinstance(exc2, EncodeError):
                        row = exc2.row if 0 <= exc2.row < batch.num_rows else None
                        err: KfastError = PermanentSinkError(
                            f"row {exc2.row}: {exc2.reason}", row=row
                        )
                        self._conns.fail(i, exc2)
                    elif isinstance(exc2, KfastError):
                        err = exc2
                        self._conns.fail(i, exc2)
                    else:
                        err = self._conns.fail(i, exc2)
                        if isinstance(err, PermanentSinkError):
                            err.row = copy_row_hint(exc2, [(a, b)])
                    first = first or err
                else:
                    conn = self._conns.current(i)
                    if conn is not None:
                        try:
                            conn.rollback()
                        except psycopg.Error:
                            self._conns.drop(i)
            assert first is not None
            raise first
        # All parts are in; commit them (a failure between these commits can
        # duplicate rows on retry: at-least-once, documented).
        for i in range(n):
            conn = self._conns.current(i)
            if conn is None:
                continue
            try:
                conn.commit()
            except psycopg.Error as exc:
                raise self._conns.fail(i, exc) from exc

    # ------------------------------------------------------------ isolating bad rows

    def row_transaction(self, batch: Batch) -> RowTransaction | None:
        """A transaction in which the delivery layer isolates the bad rows of ``batch``.

        See :class:`RowTransaction`. ``None`` in ``upsert`` mode and with ``key`` (their
        constraint errors come from ``INSERT ... SELECT``, without a COPY line). In
        ``exactly_once`` mode the batch's partitions are fenced first, as in :meth:`write`.
        The sink is locked until the transaction is closed.
        """
        if self.mode == "upsert" or self.key:
            return None
        self._lock.acquire()
        try:
            plan = self._ensure_plan(batch)
            pre = pre_encode(batch, plan)
            conn = self._conns.get(0)
            try:
                probe = self._ensure_probe_table(conn)
                screen = self._screen_fn(conn, batch, plan, pre)  # its DDL commits
                if self._table is None:
                    triggers, version = True, None
                else:
                    triggers, version = table_state(
                        conn, self._table.ident, self._table.oid, self._table.kind == "r"
                    )
                client: PreScreen | None = None
                if triggers:
                    screen = None  # a trigger may change a row before its constraints
                elif self._client_checks():
                    if self._client is None or self._client[0] != version:
                        self._client = (version, self._build_client(conn, plan))
                    client = self._client[1]
                allowed = self._fence(conn, batch) if self.mode == "exactly_once" else None
            except psycopg.Error as exc:
                raise self._conns.fail(0, exc) from exc
            # The rows the server would reject for what the client can check, among the
            # rows to write (in exactly_once mode, those not stored yet).
            found = None
            if client is not None:
                try:
                    found = client.run(
                        batch, allowed if allowed is not None else [(0, batch.num_rows)]
                    )
                except ValueError:  # the program does not match this batch
                    self._client = (self._client[0] if self._client else None, None)
            stmt = self._copy_stmt(plan)

            def copy(
                c: psycopg.Connection[Any], ranges: Sequence[tuple[int, int]], st: sql.Composed
            ) -> None:
                self._copy_ranges(c, 0, batch, pre, ranges, st)

            def store(c: psycopg.Connection[Any]) -> None:
                store_offsets(c, batch, self.offsets_table, self.group_id)

            return RowTransaction(
                conns=self._conns,
                slot=0,
                copy=copy,
                encode_error=lambda exc: encode_error(exc, plan, batch),
                stmt=stmt,
                probe_stmt=copy_sql(plan, sql.Identifier("pg_temp", PROBE_TABLE))
                if probe
                else None,
                allowed=allowed,
                triggers=triggers,
                store_offsets=store if self.mode == "exactly_once" else None,
                release=self._lock.release,
                screener=screen,
                prescreened=found,
            )
        except BaseException:
            self._lock.release()
            raise

    def _screen_fn(
        self, conn: psycopg.Connection[Any], batch: Batch, plan: Plan, pre: Pre
    ) -> Callable[[], Screener | None] | None:
        """The set-based screen of this batch on ``conn`` (see :mod:`.screen`), made when
        first used; None when the table cannot be screened. The staging table is made here,
        once per connection and plan (DDL in its own transaction, before the data
        transaction). The rules are read again whenever the table's catalog rows changed (a
        constraint added or dropped while the pipeline runs is seen at the next screen)."""
        if self._table is None or self._screen_encoder is False:
            return None
        if self._screen_encoder is None:
            try:
                self._screen_encoder = CopyEncoder([*plan.entries, {"op": "rownum"}])
            except ValueError:
                self._screen_encoder = False
                return None
        made = self._conns.screen_tables.get(id(conn))
        if made is None:
            rules = self._read_rules(conn, plan)
            made = False
            if rules is not None:
                try:
                    conn.execute(f"DROP TABLE IF EXISTS pg_temp.{SCREEN_TABLE}")
                    conn.execute(screen_sql(rules))
                    conn.commit()
                    made = ",".join(c.loose for c in rules.columns)
                except psycopg.Error as exc:
                    if isinstance(classify(exc), TransientSinkError):
                        raise
                    conn.rollback()  # e.g. no TEMP privilege: probes instead
            self._conns.screen_tables[id(conn)] = made
        if made is False:
            return None
        shape = made
        enc = self._screen_encoder
        assert isinstance(enc, CopyEncoder)
        stmt = copy_sql(plan, sql.Identifier("pg_temp", SCREEN_TABLE), seq=True)
        chunk = self.chunk_bytes
        table = self._table_ident
        assert table is not None

        def stage(c: psycopg.Connection[Any], ranges: Sequence[tuple[int, int]]) -> None:
            copy_rows(c, enc, batch, pre, ranges, stmt, chunk)

        def make() -> Screener | None:
            rules = self._read_rules(conn, plan)
            if rules is None or ",".join(c.loose for c in rules.columns) != shape:
                # The column types changed under the staging table: no screen now, the
                # table is made again before the next data transaction.
                self._conns.screen_tables.pop(id(conn), None)
                return None
            return Screener(rules, table, stage)

        return make

    def _read_rules(self, conn: psycopg.Connection[Any], plan: Plan) -> Rules | None:
        """The screening rules, read again only when the table's catalog rows changed."""
        assert self._table is not None
        version = rules_version(conn, self._table.oid)
        if version is None or self._rules is None or self._rules[0] != version:
            self._rules = (version, read_rules(conn, self._table.oid, plan.columns))
        return self._rules[1]

    def _ensure_probe_table(self, conn: psycopg.Connection[Any]) -> bool:
        """Create ``pg_temp.kfast_probe`` like the table (see :func:`catalog.create_probe_table`)
        in its own transaction, once per connection and plan. Probes COPY into it, always
        rolled back to a savepoint (it stays empty): the same row-only errors as the table,
        without index or WAL work and without dead rows left in the table. False when it
        cannot be created (no TEMP privilege): probes use the table."""
        made = self._conns.probe_tables.get(id(conn))
        if made is not None:
            return made
        try:
            assert self._table_ident is not None
            catalog.create_probe_table(conn, self._table_ident)
            conn.commit()
            made = True
        except psycopg.Error as exc:
            if isinstance(classify(exc), TransientSinkError):
                raise
            conn.rollback()
            made = False
        self._conns.probe_tables[id(conn)] = made
        return made

    # ------------------------------------------------------------ exactly-once support

    def stored_offsets(self, group_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """``{(topic, partition): next_offset}`` stored by exactly_once writes."""
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, **self._conns.params())
        except psycopg.Error as exc:
            raise classify_connect(exc) from exc
        try:
            with conn:
                return read_offsets(conn, self.offsets_table, group_id, topics)
        except psycopg.Error as exc:
            raise classify(exc) from exc

    def close(self) -> None:
        self._conns.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
