"""Binary COPY of batch rows: the statement, and the stream of encoded chunks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from kfast._layout import RecordNode
from kfast.errors import PermanentSinkError
from kfast.sinks._pgcopy import CopyEncoder, EncodeError, pre_values
from kfast.sinks.postgres.plan import Plan
from kfast.sinks.postgres.types import json_bytes

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = ["CopyTiming", "copy_rows", "copy_sql", "encode_error", "pre_encode"]

Pre = list[list[bytes | None]]


def copy_sql(plan: Plan, target: sql.Composable, seq: bool = False) -> sql.Composed:
    """``COPY target (plan columns[, _kfast_seq]) FROM STDIN (FORMAT BINARY)``."""
    cols = [sql.Identifier(c) for c in plan.columns]
    if seq:
        cols.append(sql.Identifier("_kfast_seq"))
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        target, sql.SQL(", ").join(cols)
    )


class CopyTiming:
    """Where the COPYs of a sink spend their time, summed in seconds (opt-in, for
    benchmarks): ``start`` (BEGIN and the COPY statement, until the server accepts data),
    ``encode`` (kfast's encoder), ``send`` (handing each chunk to libpq: it blocks while the
    socket is full, i.e. while the server parses) and ``finish`` (end of the data until the
    server reports the COPY complete)."""

    __slots__ = ("copies", "encode", "finish", "send", "start")

    def __init__(self) -> None:
        self.copies = 0
        self.start = self.encode = self.send = self.finish = 0.0

    def lap(self, step: str, since: float) -> float:
        """Add the time since ``since`` to ``step``; return now."""
        now = time.perf_counter()
        setattr(self, step, getattr(self, step) + now - since)
        return now


def copy_rows(
    conn: psycopg.Connection[Any],
    enc: CopyEncoder,
    batch: Batch,
    pre: Pre,
    ranges: Sequence[tuple[int, int]],
    stmt: sql.Composed,
    chunk_bytes: int,
    timing: CopyTiming | None = None,
) -> None:
    """One COPY of rows ``[a, b)`` for each range, streamed in ``chunk_bytes`` pieces.

    The server parses chunk k while kfast encodes chunk k+1: libpq's non-blocking send
    returns as soon as the kernel took the bytes, and encoding (in C, without the GIL) is
    several times faster than the server's parsing, so the server always has data."""
    for slot, values in enumerate(pre):
        enc.bind_pre(slot, values, 0)
    enc.clear()
    enc.header()
    t = time.perf_counter() if timing is not None else 0.0
    with conn.cursor() as cur, cur.copy(stmt) as cp:
        if timing is not None:
            t = timing.lap("start", t)
        for start, stop in ranges:
            row = start
            while row < stop:
                row = enc.encode(batch, row, stop, chunk_bytes)
                if timing is not None:
                    t = timing.lap("encode", t)
                if len(enc) >= chunk_bytes:
                    with memoryview(enc) as mv:
                        cp.write(mv)
                    enc.clear()
                    if timing is not None:
                        t = timing.lap("send", t)
        enc.trailer()
        with memoryview(enc) as mv:
            cp.write(mv)
        enc.clear()
        if timing is not None:
            t = timing.lap("send", t)
    if timing is not None:
        timing.lap("finish", t)
        timing.copies += 1


def encode_error(exc: EncodeError, plan: Plan, batch: Batch) -> PermanentSinkError:
    """The PermanentSinkError of a value kfast cannot encode (``row`` locates it)."""
    field_name = plan.columns[exc.field] if 0 <= exc.field < len(plan.columns) else "?"
    row = exc.row if 0 <= exc.row < batch.num_rows else None
    return PermanentSinkError(
        f"row {exc.row}: column {field_name!r}: {exc.reason}", sqlstate=None, row=row
    )


def pre_encode(batch: Batch, plan: Plan) -> Pre:
    """The slow-path (JSON) values of the plan's ``pre`` columns, one list per slot."""
    out = []
    for _slot, src, jsonb in plan.pre:
        values = pre_values(batch, src.node, 0, batch.num_rows)
        if src.valid:
            valid_rows = _valid_mask(batch, src.valid)
            values = [v if ok else None for v, ok in zip(values, valid_rows)]
        try:
            out.append([json_bytes(v, jsonb) for v in values])
        except (TypeError, ValueError) as exc:
            raise PermanentSinkError(
                f"column for {src.dotted!r}: cannot encode as JSON: {exc}"
            ) from exc
    return out


def _valid_mask(batch: Batch, valid: tuple[int, ...]) -> list[bool]:
    # Slow path only (records inside JSON columns): reuse to_pylist's walk.
    mask = [True] * batch.num_rows
    for col in valid:
        node = RecordNode((), valid_col=col)
        for i, v in enumerate(pre_values(batch, node, 0, batch.num_rows)):
            if v is None:
                mask[i] = False
    return mask
