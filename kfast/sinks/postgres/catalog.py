"""What the sink reads from and creates in ``pg_catalog``: the table's columns, its triggers
and catalog version, and the DDL.

Every DDL statement here (the target table with ``create_table``, ``kfast_offsets``, the TEMP
staging and probe tables) is run by the sink in its own transaction, before any data
transaction: never inside a write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

__all__ = [
    "PROBE_TABLE",
    "STAGE_TABLE",
    "TableColumn",
    "TableInfo",
    "create_offsets_table",
    "create_probe_table",
    "create_stage_table",
    "create_table",
    "introspect",
    "offsets_ident",
    "rules_version",
    "table_state",
    "VERSION_SQL",
]

PROBE_TABLE = "kfast_probe"
STAGE_TABLE = "kfast_stage"


@dataclass
class TableColumn:
    name: str
    typname: str  # pg_type.typname ("int4", "_text", ...); a domain's base type
    elem_typname: str | None
    elem_oid: int
    not_null: bool
    has_default: bool
    display: str  # format_type()


@dataclass
class TableInfo:
    oid: int
    ident: sql.Identifier  # schema-qualified
    columns: dict[str, TableColumn]
    kind: str = "r"  # pg_class.relkind: "r" table, "p" partitioned, "f" foreign, "v" view


def offsets_ident(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split("."))


def introspect(conn: psycopg.Connection[Any], table: str) -> TableInfo | None:
    """The table's columns (names, types, NOT NULL, defaults); None when it does not exist."""
    row = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (table,),
    ).fetchone()
    if row is None:
        return None
    oid, nsp, rel, kind = row
    rows = conn.execute(
        "SELECT a.attname, t.typname, et.typname, COALESCE(et.oid, 0), a.attnotnull, "
        "a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '', "
        "format_type(a.atttypid, a.atttypmod), t.typtype, bt.typname "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' "
        "LEFT JOIN pg_type bt ON bt.oid = t.typbasetype "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (oid,),
    ).fetchall()
    cols: dict[str, TableColumn] = {}
    for name, typ, etyp, eoid, notnull, hasdef, display, typtype, basetyp in rows:
        if typtype == "d" and basetyp:  # a domain: encode as its base type
            typ = basetyp
        cols[name] = TableColumn(name, typ, etyp, int(eoid), bool(notnull), bool(hasdef), display)
    return TableInfo(int(oid), sql.Identifier(nsp, rel), cols, str(kind))


def create_table(
    conn: psycopg.Connection[Any],
    ident: sql.Composable,
    columns: Sequence[tuple[str, str]],
    key: Sequence[str],
) -> None:
    """``CREATE TABLE IF NOT EXISTS`` with ``(name, SQL type)`` columns and ``key`` as PK."""
    defs: list[sql.Composable] = [
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(typ)) for name, typ in columns
    ]
    if key:
        defs.append(
            sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, key)))
        )
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(ident, sql.SQL(", ").join(defs))
    )


def create_offsets_table(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (group_id text NOT NULL, topic text NOT NULL, "
            "partition integer NOT NULL, next_offset bigint NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (group_id, topic, partition))"
        ).format(offsets_ident(name))
    )


def create_stage_table(
    conn: psycopg.Connection[Any], table: sql.Composable, columns: Sequence[str]
) -> None:
    """``pg_temp.kfast_stage``: the written columns plus a ``_kfast_seq`` row number, no
    constraint, emptied at each commit (the upsert path COPYs into it)."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    conn.execute(f"DROP TABLE IF EXISTS pg_temp.{STAGE_TABLE}")
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {} ON COMMIT DELETE ROWS AS SELECT {}, 0::bigint AS _kfast_seq "
            "FROM {} WITH NO DATA"
        ).format(sql.Identifier(STAGE_TABLE), cols, table)
    )


def create_probe_table(conn: psycopg.Connection[Any], table: sql.Composable) -> None:
    """``pg_temp.kfast_probe`` like the table: its defaults, CHECK and NOT NULL constraints,
    generated and identity columns; no index, no trigger."""
    conn.execute(f"DROP TABLE IF EXISTS pg_temp.{PROBE_TABLE}")
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING GENERATED INCLUDING IDENTITY)"
        ).format(sql.Identifier(PROBE_TABLE), table)
    )


# The catalog version of table ``c`` (see :func:`rules_version`): an expression over pg_class c.
VERSION_SQL = (
    "c.xmin::text || '/' || "
    "COALESCE((SELECT string_agg(x.xmin::text, ',' ORDER BY x.oid) FROM pg_constraint x "
    "WHERE x.conrelid = c.oid), '') || '/' || "
    "COALESCE((SELECT string_agg(i.xmin::text, ',' ORDER BY i.indexrelid) FROM pg_index i "
    "WHERE i.indrelid = c.oid), '') || '/' || "
    "COALESCE((SELECT string_agg(a.xmin::text, ',' ORDER BY a.attnum) FROM pg_attribute a "
    "WHERE a.attrelid = c.oid AND a.attnum > 0), '')"
)


def rules_version(conn: psycopg.Connection[Any], oid: int) -> str | None:
    """Changes whenever the table's columns, constraints or indexes change (the catalog
    rows' transaction ids): one cheap query instead of reading the rules again."""
    row = conn.execute(
        "SELECT " + VERSION_SQL + " FROM pg_class c WHERE c.oid = %s", (oid,)
    ).fetchone()
    return None if row is None else str(row[0])


def table_state(
    conn: psycopg.Connection[Any], ident: sql.Composable, oid: int, lock: bool = True
) -> tuple[bool, str | None]:
    """(the table or one of its partitions has a trigger a user created, its rules' catalog
    version), read under the lock the rows' COPY takes anyway (ROW EXCLUSIVE; ``lock=False``
    for relations LOCK does not take, e.g. foreign tables): no ALTER TABLE can change the
    rules between this read and the end of the transaction. One round trip."""
    query = sql.SQL(
        "{lock}SELECT EXISTS (WITH RECURSIVE tree(oid) AS (SELECT c.oid UNION ALL "
        "SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid) "
        "SELECT 1 FROM pg_trigger tg JOIN tree ON tg.tgrelid = tree.oid "
        "WHERE NOT tg.tgisinternal), {v} FROM pg_class c WHERE c.oid = {oid}"
    ).format(
        lock=sql.SQL("LOCK TABLE ONLY {} IN ROW EXCLUSIVE MODE; ").format(ident)
        if lock
        else sql.SQL(""),
        v=sql.SQL(VERSION_SQL),
        oid=sql.Literal(oid),
    )
    with conn.cursor() as cur:
        cur.execute(query)
        if lock:
            cur.nextset()
        row = cur.fetchone()
    if row is None:
        return True, None
    return bool(row[0]), None if row[1] is None else str(row[1])
