"""Set-based screening of a batch's bad rows: one COPY into an unconstrained staging table,
then a few queries that find every row the table would reject, each for its reason.

Evaluated exactly, by PostgreSQL, on the values the table would store:

* values too long for ``varchar(n)``/``char(n)`` (22001) and numeric overflow of
  ``numeric(p, s)`` (22003), with the rules of the types' input functions;
* NULL in a NOT NULL column (23502);
* CHECK constraints of the table (23514) whose columns are all written, evaluated on the
  values cast to the column types;
* foreign keys (23503) to another table, not deferred, whose columns are all written;
* unique constraints and indexes (23505; not partial, not on expressions, not deferrable,
  NULLs distinct): keys already in the table, and keys repeated in the batch, where the
  first occurrence among the rows that are otherwise good wins, as writing the rows in
  order would (greedy in batch order when there are several unique indexes).

What the screen does not cover (triggers, partitioned tables, domain constraints,
exclusion constraints, CHECKs on columns the batch does not write, ...) shows up when the
remaining rows are COPY'd; the caller then discards the screen and isolates from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql

from kfast.errors import PermanentSinkError

__all__ = [
    "SCREEN_TABLE",
    "Rules",
    "Screener",
    "read_rules",
    "row_error",
    "screen_sql",
    "screened_rows",
]

SCREEN_TABLE = "kfast_screen"
SEQ = "_kfast_seq"


@dataclass
class _Column:
    name: str
    loose: str  # staging type: the base type without typmod
    cast: str  # the stored type (a domain's base type with its typmod)
    not_null: bool
    length: int | None = None  # varchar(n) / char(n)
    numeric: tuple[int, int] | None = None  # numeric(p, s)


@dataclass
class _Check:
    name: str
    expr: str
    columns: list[str]


@dataclass
class _Unique:
    name: str
    columns: list[str]


@dataclass
class _ForeignKey:
    name: str
    columns: list[str]
    parent: str  # regclass text, quoted as needed
    parent_columns: list[str]
    full: bool


@dataclass
class Rules:
    """The table's constraints the screen evaluates, for the columns a plan writes."""

    table: str  # regclass text
    relname: str
    columns: list[_Column]
    checks: list[_Check] = field(default_factory=list)
    uniques: list[_Unique] = field(default_factory=list)
    fks: list[_ForeignKey] = field(default_factory=list)


def read_rules(conn: psycopg.Connection[Any], oid: int, written: Sequence[str]) -> Rules | None:
    """The rules of table ``oid`` for the ``written`` columns; None when the table is not
    one the screen can judge (partitioned, typmods on arrays, ...). Float constants of the
    CHECK expressions are printed exactly (shortest round-trip form)."""
    conn.execute("SET LOCAL extra_float_digits = 3")
    row = conn.execute(
        "SELECT %s::oid::regclass::text, c.relname, c.relkind FROM pg_class c WHERE c.oid = %s",
        (oid, oid),
    ).fetchone()
    if row is None or row[2] != "r":
        return None
    table, relname = row[0], row[1]
    cols = conn.execute(
        "SELECT a.attname, a.attnotnull, "
        "format_type(b.oid, NULL), format_type(b.oid, "
        "CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END), b.typname, "
        "CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END, b.typcategory "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype "
        "ELSE a.atttypid END "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (oid,),
    ).fetchall()
    by_name = {r[0]: r for r in cols}
    columns = []
    for name in written:
        r = by_name.get(name)
        if r is None:
            return None
        _, not_null, loose, cast, typname, typmod, category = r
        col = _Column(name, loose, cast, bool(not_null))
        if typmod is not None and typmod >= 4:
            if typname in ("varchar", "bpchar"):
                col.length = typmod - 4
            elif typname == "numeric":
                m = typmod - 4
                col.numeric = ((m >> 16) & 0xFFFF, ((m & 0x7FF) ^ 1024) - 1024)
            elif category == "A":
                return None  # element typmods: casts may truncate or fail
        columns.append(col)
    rules = Rules(table, relname, columns)
    wset = set(written)
    for name, expr, keys in conn.execute(
        "SELECT c.conname, pg_get_expr(c.conbin, c.conrelid), "
        "ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.conrelid "
        "AND a.attnum = ANY(c.conkey)) "
        "FROM pg_constraint c WHERE c.conrelid = %s AND c.contype = 'c' ORDER BY c.conname",
        (oid,),
    ).fetchall():
        if set(keys) <= wset:
            rules.checks.append(_Check(name, expr, list(keys)))
    for name, keys, ok in conn.execute(
        "SELECT ic.relname, ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o), "
        "i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL AND 0 <> ALL(i.indkey) "
        "AND NOT COALESCE((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false) "
        "AND NOT EXISTS (SELECT 1 FROM unnest(i.indcollation) co WHERE co <> 0 "
        "AND co <> (SELECT oid FROM pg_collation WHERE collname = 'default')) "
        "FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid "
        "WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid",
        (oid,),
    ).fetchall():
        if ok and keys and set(keys) <= wset:
            rules.uniques.append(_Unique(name, list(keys)))
    for name, keys, parent, pkeys, match in conn.execute(
        "SELECT c.conname, "
        "ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o) "
        "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o), "
        "c.confrelid::regclass::text, "
        "ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o) "
        "JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o), "
        "c.confmatchtype FROM pg_constraint c WHERE c.conrelid = %s AND c.contype = 'f' "
        "AND NOT c.condeferred AND c.confrelid <> c.conrelid ORDER BY c.conname",
        (oid,),
    ).fetchall():
        if set(keys) <= wset and match in ("s", "f"):
            rules.fks.append(_ForeignKey(name, list(keys), parent, list(pkeys), match == "f"))
    return rules


def screen_sql(rules: Rules) -> sql.Composed:
    """``CREATE TEMP TABLE kfast_screen``: the written columns with loose types, plus the
    batch row number; emptied at each commit."""
    defs = [
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.loose)) for c in rules.columns
    ]
    defs.append(sql.SQL("{} bigint").format(sql.Identifier(SEQ)))
    return sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DELETE ROWS").format(
        sql.Identifier(SCREEN_TABLE), sql.SQL(", ").join(defs)
    )


def _type_faults(rules: Rules) -> list[tuple[sql.Composable, str, str]]:
    """(condition on the staged row, sqlstate, column) per type or NOT NULL rule, in the
    order PostgreSQL would find them (input first, then NOT NULL)."""
    out: list[tuple[sql.Composable, str, str]] = []
    for c in rules.columns:
        ident = sql.Identifier(c.name)
        if c.length is not None:
            # The input functions accept longer values whose excess characters are spaces.
            out.append(
                (
                    sql.SQL("char_length(rtrim({}, ' ')) > {}").format(
                        ident, sql.Literal(c.length)
                    ),
                    "22001",
                    c.name,
                )
            )
        if c.numeric is not None:
            p, s = c.numeric
            out.append(
                (
                    sql.SQL("({0} <> 'NaN' AND abs(round({0}, {1})) >= 10::numeric ^ {2})").format(
                        ident, sql.Literal(s), sql.Literal(p - s)
                    ),
                    "22003",
                    c.name,
                )
            )
    for c in rules.columns:
        if c.not_null:
            out.append((sql.SQL("{} IS NULL").format(sql.Identifier(c.name)), "23502", c.name))
    return out


def _typed(rules: Rules, ok: sql.Composable, names: set[str]) -> sql.Composed:
    """The staged rows passing ``ok``, columns ``names`` cast to the stored types (OFFSET 0:
    the casts run only on rows that passed, never on a value that would make them fail)."""
    cols = [
        sql.SQL("{0}::{1} AS {0}").format(sql.Identifier(c.name), sql.SQL(c.cast))
        if c.cast != c.loose
        else sql.Identifier(c.name)
        for c in rules.columns
        if c.name in names
    ]
    return sql.SQL("(SELECT {cols} FROM {t} WHERE {ok} OFFSET 0)").format(
        cols=sql.SQL(", ").join([sql.Identifier(SEQ), *cols]),
        t=sql.Identifier("pg_temp", SCREEN_TABLE),
        ok=ok,
    )


def _error(rules: Rules, state: str, what: str) -> PermanentSinkError:
    return row_error(rules.relname, state, what)


def row_error(
    rel: str,
    state: str,
    what: str,
    how: str = "kfast's set-based check",
    cls: type[PermanentSinkError] = PermanentSinkError,
) -> PermanentSinkError:
    """The error PostgreSQL would have raised for the row (its class, SQLSTATE and message;
    the driver's error class is the cause, as for a row the server rejected)."""
    msg = {
        "22001": f"value too long for column {what!r} of relation {rel!r}",
        "22003": f"numeric field overflow in column {what!r} of relation {rel!r}",
        "23502": f'null value in column "{what}" of relation "{rel}" violates not-null constraint',
        "23514": f'new row for relation "{rel}" violates check constraint "{what}"',
        "23503": f'insert or update on table "{rel}" violates foreign key constraint "{what}"',
        "23505": f'duplicate key value violates unique constraint "{what}"',
    }[state]
    cause = psycopg.errors.lookup(state)(f"{msg} (found by {how})")
    err = cls(f"{type(cause).__name__}: {str(cause).strip()}", sqlstate=state)
    err.__cause__ = cause
    return err


def screened_rows(
    conn: psycopg.Connection[Any], rules: Rules, keys: bool = True
) -> dict[int, PermanentSinkError]:
    """Every staged row the table would reject, by batch row number, with its error.

    ``keys=False`` evaluates only the rules a row breaks on its own (types, NOT NULL,
    CHECK): one pass less over the table's indexes, for the common case where only
    those fail."""
    bad: dict[int, PermanentSinkError] = {}
    seq = sql.Identifier(SEQ)
    stage = sql.Identifier("pg_temp", SCREEN_TABLE)
    faults = _type_faults(rules)
    if faults:
        whens = sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(cond, sql.Literal(i))
            for i, (cond, _, _) in enumerate(faults)
        )
        any_fault = sql.SQL(" OR ").join(sql.SQL("({})").format(c) for c, _, _ in faults)
        for row, i in conn.execute(
            sql.SQL("SELECT {seq}, CASE {whens} END FROM {t} WHERE {any}").format(
                seq=seq, whens=whens, t=stage, any=any_fault
            )
        ).fetchall():
            _, state, col = faults[i]
            bad[int(row)] = _error(rules, state, col)
        ok: sql.Composable = sql.SQL("NOT ({})").format(any_fault)
    else:
        ok = sql.SQL("true")
    # Rules that do not depend on the other rows of the batch: CHECK, foreign keys, keys
    # already in the table.
    parts: list[sql.Composable] = []
    if rules.checks:
        # One pass for every CHECK: the first failing one (by name, as PostgreSQL) is named.
        typed = _typed(rules, ok, {c for chk in rules.checks for c in chk.columns})
        whens = sql.SQL(" ").join(
            sql.SQL("WHEN ({}) IS FALSE THEN {}").format(sql.SQL(chk.expr), sql.Literal(n))
            for n, chk in enumerate(rules.checks)
        )
        parts.append(
            sql.SQL(
                "SELECT * FROM (SELECT {seq}, CASE {whens} END n FROM {typed} t) c "
                "WHERE n IS NOT NULL"
            ).format(seq=seq, whens=whens, typed=typed)
        )
    base = len(rules.checks)
    fks = rules.fks if keys else []
    for n, fk in enumerate(fks):
        typed = _typed(rules, ok, set(fk.columns))
        cols = [sql.SQL("t.{}").format(sql.Identifier(c)) for c in fk.columns]
        match = sql.SQL(" AND ").join(
            sql.SQL("p.{} = t.{}").format(sql.Identifier(pc), sql.Identifier(c))
            for c, pc in zip(fk.columns, fk.parent_columns)
        )
        all_set = sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(c) for c in cols)
        missing = sql.SQL("NOT EXISTS (SELECT 1 FROM {p} p WHERE {m})").format(
            p=sql.SQL(fk.parent), m=match
        )
        cond: sql.Composable = sql.SQL("({} AND {})").format(all_set, missing)
        if fk.full and len(cols) > 1:  # MATCH FULL: some but not all NULL fails too
            some = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(c) for c in cols)
            cond = sql.SQL("({} OR (({}) AND NOT ({})))").format(
                cond, some, sql.SQL(" AND ").join(sql.SQL("{} IS NULL").format(c) for c in cols)
            )
        parts.append(
            sql.SQL("SELECT {seq}, {n} FROM {typed} t WHERE {cond}").format(
                seq=seq, n=sql.Literal(base + n), typed=typed, cond=cond
            )
        )
    base2 = base + len(rules.fks)
    for n, uq in enumerate(rules.uniques if keys else []):
        typed = _typed(rules, ok, set(uq.columns))
        match = sql.SQL(" AND ").join(
            sql.SQL("x.{0} = t.{0}").format(sql.Identifier(c)) for c in uq.columns
        )
        parts.append(
            sql.SQL(
                "SELECT {seq}, {n} FROM {typed} t WHERE EXISTS (SELECT 1 FROM {tb} x WHERE {m})"
            ).format(
                seq=seq, n=sql.Literal(base2 + n), typed=typed, tb=sql.SQL(rules.table), m=match
            )
        )
    if parts:
        query = sql.SQL(" UNION ALL ").join(parts)
        found = conn.execute(
            sql.SQL("SELECT {seq}, min(n) FROM ({q}) f({seq}, n) GROUP BY 1").format(
                seq=seq, q=query
            )
        ).fetchall()
        for row, n in found:
            if n < base:
                err = _error(rules, "23514", rules.checks[n].name)
            elif n < base2:
                err = _error(rules, "23503", rules.fks[n - base].name)
            else:
                err = _error(rules, "23505", rules.uniques[n - base2].name)
            bad[int(row)] = err
    if keys:
        _in_batch_duplicates(conn, rules, ok, bad)
    return bad


def _in_batch_duplicates(
    conn: psycopg.Connection[Any],
    rules: Rules,
    ok: sql.Composable,
    bad: dict[int, PermanentSinkError],
) -> None:
    """Keys repeated among the rows not yet found bad: in batch order, a row whose key an
    earlier kept row holds in any unique index is rejected (greedy, as writing in order)."""
    if not rules.uniques:
        return
    seq = sql.Identifier(SEQ)
    known = sorted(bad)
    ok2 = sql.SQL("({}) AND NOT ({} = ANY({}))").format(ok, seq, sql.Literal(known))
    groups: dict[int, list[tuple[int, int]]] = {}  # row -> [(index, group id)]
    for n, uq in enumerate(rules.uniques):
        typed = _typed(rules, ok2, set(uq.columns))
        keys = sql.SQL(", ").join(sql.Identifier(c) for c in uq.columns)
        set_ = sql.SQL(" AND ").join(
            sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in uq.columns
        )
        # One hash aggregate: only the keys held by more than one row come back.
        found = conn.execute(
            sql.SQL(
                "SELECT array_agg({seq}) FROM {typed} t WHERE {set} GROUP BY {k} HAVING count(*) > 1"
            ).format(seq=seq, k=keys, typed=typed, set=set_)
        ).fetchall()
        for g, (members,) in enumerate(found):
            for row in members:
                groups.setdefault(int(row), []).append((n, g))
    taken: set[tuple[int, int]] = set()
    for row in sorted(groups):
        hit = next(((n, g) for n, g in groups[row] if (n, g) in taken), None)
        if hit is not None:
            bad[row] = _error(rules, "23505", rules.uniques[hit[0]].name)
        else:
            taken.update(groups[row])


class Screener:
    """The screen of one batch: stage its rows, find the bad ones, insert the others.

    ``run(conn, ranges, keys)`` COPYs the rows of ``ranges`` into the staging table and
    returns the bad ones; ``insert(conn, skip)`` then writes every staged row but ``skip``
    into the table with one ``INSERT ... SELECT`` (the values are not sent or parsed
    again). Both run inside the caller's savepoint.
    """

    def __init__(
        self,
        rules: Rules,
        table: sql.Composable,
        copy: Any,  # (conn, ranges) -> None: COPY the batch rows into the staging table
    ) -> None:
        self.rules = rules
        self.table = table
        self._copy = copy

    def run(
        self, conn: psycopg.Connection[Any], ranges: Sequence[tuple[int, int]], keys: bool
    ) -> dict[int, PermanentSinkError]:
        self._copy(conn, ranges)
        return screened_rows(conn, self.rules, keys)

    def insert(self, conn: psycopg.Connection[Any], skip: Sequence[int]) -> None:
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.rules.columns)
        conn.execute(
            sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM {s} WHERE {seq} <> ALL(%s)").format(
                t=self.table,
                c=cols,
                s=sql.Identifier("pg_temp", SCREEN_TABLE),
                seq=sql.Identifier(SEQ),
            ),
            (list(skip),),
        )

    def clear(self, conn: psycopg.Connection[Any]) -> None:
        """Empty the staging table (rows left by an insert earlier in the transaction)."""
        conn.execute(f"TRUNCATE pg_temp.{SCREEN_TABLE}")
