"""``exactly_once`` mode: the offset fence and the offsets stored with the rows.

The rows and one ``kfast_offsets(group_id, topic, partition, next_offset)`` row per partition
of the batch are committed in one transaction. Before writing, :func:`fence` locks the
batch's partitions and drops the rows whose offsets are already stored, so each offset's row
is committed once even when the runtime re-delivers messages after a crash or a fenced-out
consumer delivers a stale batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from kfast.errors import ConfigError
from kfast.sinks.postgres.catalog import offsets_ident

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = ["clip", "fence", "read_offsets", "store_offsets"]


def fence(
    conn: psycopg.Connection[Any], batch: Batch, offsets_table: str, group_id: str | None
) -> list[tuple[int, int]]:
    """Lock this batch's partitions in ``kfast_offsets`` and return the row ranges not yet
    covered by the stored offsets.

    After a crash the runtime may re-deliver messages whose rows were already committed
    here (the Kafka commit lags the PostgreSQL one), and a fenced-out consumer may still
    deliver a stale batch after a rebalance. Rows whose offset is below the stored
    ``next_offset`` of their partition are skipped, inside the same transaction that
    holds the row locks, so each offset's row is committed once. The per-row scan stops
    as soon as every partition's first row is known, unless some rows must be skipped.
    """
    ctx = getattr(batch, "context", None)
    if ctx is None or not ctx.next_offsets or batch.num_rows == 0:
        return [(0, batch.num_rows)] if batch.num_rows else []
    group = ctx.group_id or group_id
    tps = sorted(ctx.next_offsets)
    table = offsets_ident(offsets_table)
    topics, parts = [t for t, _ in tps], [p for _, p in tps]
    # Make sure the rows exist so that FOR UPDATE locks them (first batch of a partition).
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (group_id, topic, partition, next_offset) "
                "SELECT %s, t, p, 0 FROM unnest(%s::text[], %s::int4[]) AS u(t, p) "
                "ON CONFLICT (group_id, topic, partition) DO NOTHING"
            ).format(table),
            (group, topics, parts),
        )
        rows = cur.execute(
            sql.SQL(
                "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s "
                "AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int4[])) "
                "ORDER BY topic, partition FOR UPDATE"
            ).format(table),
            (group, topics, parts),
        ).fetchall()
    stored = {(t, int(p)): int(o) for t, p, o in rows if int(o) > 0}
    if not stored:
        return [(0, batch.num_rows)]
    recs = ctx.records
    src = memoryview(batch.source_indices)
    first: dict[tuple[str, int], int] = {}
    want = set(ctx.next_offsets)
    for row in range(batch.num_rows):
        j = src[row]
        tp = (recs.topic(j), recs.partition(j))
        if tp not in first:
            first[tp] = recs.offset(j)
            if len(first) == len(want):
                break
    if all(first.get(tp, stored[tp]) >= off for tp, off in stored.items()):
        return [(0, batch.num_rows)]
    ranges: list[tuple[int, int]] = []
    start = -1
    for row in range(batch.num_rows):
        j = src[row]
        keep = recs.offset(j) >= stored.get((recs.topic(j), recs.partition(j)), 0)
        if keep and start < 0:
            start = row
        elif not keep and start >= 0:
            ranges.append((start, row))
            start = -1
    if start >= 0:
        ranges.append((start, batch.num_rows))
    return ranges


def store_offsets(
    conn: psycopg.Connection[Any], batch: Batch, offsets_table: str, group_id: str | None
) -> None:
    """Store ``batch.context.next_offsets`` (never moving an offset backwards)."""
    ctx = getattr(batch, "context", None)
    if ctx is None:
        raise ConfigError(
            "PostgresSink(mode='exactly_once') needs batch.context (set by kfast.Pipeline) "
            "to know the offsets to store"
        )
    group = ctx.group_id or group_id
    rows = [(group, t, p, off) for (t, p), off in sorted(ctx.next_offsets.items())]
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} AS o (group_id, topic, partition, next_offset) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (group_id, topic, partition) DO UPDATE "
                "SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), "
                "updated_at = now()"
            ).format(offsets_ident(offsets_table)),
            rows,
        )


def read_offsets(
    conn: psycopg.Connection[Any], offsets_table: str, group_id: str, topics: Sequence[str]
) -> dict[tuple[str, int], int]:
    """``{(topic, partition): next_offset}`` stored for ``group_id`` ({} without the table)."""
    exists = conn.execute("SELECT to_regclass(%s)", (offsets_table,)).fetchone()
    if exists is None or exists[0] is None:
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s AND topic = ANY(%s)"
        ).format(offsets_ident(offsets_table)),
        (group_id, list(topics)),
    ).fetchall()
    return {(t, int(p)): int(o) for t, p, o in rows}


def clip(
    ranges: Sequence[tuple[int, int]], allowed: Sequence[tuple[int, int]] | None
) -> list[tuple[int, int]]:
    """``ranges`` intersected with ``allowed`` (both sorted, disjoint), empty ranges dropped."""
    if allowed is None:
        return [(a, b) for a, b in ranges if a < b]
    out = []
    j = 0
    for a, b in ranges:
        while j < len(allowed) and allowed[j][1] <= a:
            j += 1
        k = j
        while k < len(allowed) and allowed[k][0] < b:
            lo, hi = max(a, allowed[k][0]), min(b, allowed[k][1])
            if lo < hi:
                out.append((lo, hi))
            k += 1
    return out
