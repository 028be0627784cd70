"""copy_row_hint: the COPY line PostgreSQL reports is a locator, never a classifier."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from kfast.errors import PermanentSinkError
from kfast.sinks.postgres import copy_row_hint


def _exc(state: str | None, context: Any) -> Any:
    return SimpleNamespace(sqlstate=state, diag=SimpleNamespace(context=context))


@pytest.mark.parametrize(
    ("state", "context", "ranges", "want"),
    [
        ("23514", "COPY orders, line 1234", [(0, 20000)], 1233),
        ("23505", "COPY orders, line 1", [(0, 5)], 0),
        ("22001", "COPY orders, line 3, column customer", [(0, 5)], 2),
        ("23514", "COPY orders, Zeile 5\n", [(0, 10)], 4),  # translated
        ("23514", "PL/pgSQL function f() line 7 at RAISE\nCOPY orders, line 4", [(0, 10)], 3),
        ("23514", "COPY orders2, line 5", [(0, 10)], 4),  # digits inside a name are not numbers
        ("23514", "COPY o, line 3", [(10, 12), (20, 30)], 20),  # fenced ranges: 3rd copied row
        ("23514", "COPY o, line 2", [(10, 12), (20, 30)], 11),
        ("23514", "COPY orders, line 11", [(0, 10)], None),  # out of range
        ("23514", "COPY orders, line 0", [(0, 10)], None),
        ("23514", "COPY t 3, line 4", [(0, 10)], None),  # ambiguous
        ("23514", "COPY orders", [(0, 10)], None),
        ("23514", "", [(0, 10)], None),
        ("23514", None, [(0, 10)], None),
        ("40001", "COPY orders, line 4", [(0, 10)], None),  # not a row-level class
        ("42P01", "COPY orders, line 4", [(0, 10)], None),
        (None, "COPY orders, line 4", [(0, 10)], None),
    ],
)
def test_copy_row_hint(state: str | None, context: Any, ranges: Any, want: int | None) -> None:
    assert copy_row_hint(_exc(state, context), ranges) == want


def test_copy_row_hint_without_diag() -> None:
    exc: Any = SimpleNamespace(sqlstate="23514")
    assert copy_row_hint(exc, [(0, 10)]) is None


def test_permanent_error_row_is_optional() -> None:
    assert PermanentSinkError("x").row is None
    e = PermanentSinkError("x", sqlstate="23514", row=3)
    assert (e.sqlstate, e.row, str(e)) == ("23514", 3, "x")


@pytest.mark.parametrize(
    ("ranges", "allowed", "want"),
    [
        ([(0, 10)], None, [(0, 10)]),
        ([(0, 0), (3, 5)], None, [(3, 5)]),  # empty ranges dropped
        ([(0, 10)], [(2, 4), (6, 20)], [(2, 4), (6, 10)]),
        ([(0, 3), (5, 8)], [(2, 6)], [(2, 3), (5, 6)]),
        ([(0, 5)], [(5, 9)], []),  # touching, not overlapping
        ([(4, 5)], [(0, 2), (4, 9)], [(4, 5)]),  # a single row
        ([(0, 9)], [], []),  # every row fenced
    ],
)
def test_clip_to_fenced_ranges(ranges: Any, allowed: Any, want: Any) -> None:
    from kfast.sinks.postgres.exactly_once import clip as _clip

    assert _clip(ranges, allowed) == want
