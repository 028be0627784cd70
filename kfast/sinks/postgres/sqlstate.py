"""SQLSTATE classification: which PostgreSQL errors are transient, bad rows, or configuration.

Errors are classified by SQLSTATE class only (first two characters, PostgreSQL Appendix A).
The COPY line a failed COPY reports is a locator of the bad row, never a classifier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import psycopg

from kfast.errors import ConfigError, KfastError, PermanentSinkError, TransientSinkError

__all__ = [
    "CONFIG_CLASSES",
    "PERMANENT_CLASSES",
    "TRANSIENT_CLASSES",
    "classify",
    "classify_connect",
    "copy_row_hint",
    "row_only_state",
]

TRANSIENT_CLASSES = frozenset(
    {
        "08",  # connection exception
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: admin shutdown, crash shutdown, cannot connect now
        "58",  # system error (I/O error)
        "25",  # invalid transaction state: read-only transaction after a failover
        "55",  # object not in prerequisite state: lock not available
        "XX",  # internal error: the server's problem, bounded by the retry deadline
    }
)
PERMANENT_CLASSES = frozenset(
    {
        "22",  # data exception: out of range, invalid text, bad encoding
        "23",  # integrity constraint violation: unique, not null, check, FK
        "21",  # cardinality violation
        "44",  # WITH CHECK OPTION violation
        "54",  # program limit exceeded (row too big)
        "P0",  # PL/pgSQL raise (a trigger rejecting rows)
        "38",  # external routine exception (trigger)
        "39",  # external routine invocation exception (trigger)
    }
)
CONFIG_CLASSES = frozenset(
    {
        "42",  # syntax error or access rule violation: undefined column, permission denied
        "28",  # invalid authorization specification
        "3D",  # invalid catalog name (database does not exist)
        "3F",  # invalid schema name
        "0A",  # feature not supported
    }
)


def classify(exc: BaseException) -> KfastError:
    """Map a psycopg error to a kfast error by SQLSTATE class.

    08/40/53/57/58 (and 25, 55, XX) are transient; 22/23 (and 21, 44, 54,
    P0, 38, 39) are permanent for the rows involved; 42 (and 28, 3D, 3F, 0A)
    are configuration errors. An error without SQLSTATE from the connection
    layer (``OperationalError``/``InterfaceError``: connection refused or
    lost) is transient. Any other class is treated as transient: retrying is
    bounded by the RetryPolicy deadline, after which the pipeline stops
    without committing, so nothing is lost or dead-lettered by guess.
    """
    if isinstance(exc, KfastError):
        return exc
    state = getattr(exc, "sqlstate", None)
    msg = f"{type(exc).__name__}: {str(exc).strip()}"
    out: KfastError
    if not state:
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, OSError)):
            out = TransientSinkError(msg, sqlstate=None)
        elif isinstance(exc, psycopg.DataError):
            out = PermanentSinkError(msg, sqlstate=None)
        else:
            out = TransientSinkError(msg, sqlstate=None)
    else:
        cls = state[:2]
        if cls in PERMANENT_CLASSES:
            out = PermanentSinkError(msg, sqlstate=state)
        elif cls in CONFIG_CLASSES:
            out = ConfigError(f"{msg} (SQLSTATE {state})")
            out.sqlstate = state  # type: ignore[attr-defined]
        else:
            out = TransientSinkError(msg, sqlstate=state)
    out.__cause__ = exc
    return out


# libpq reports a server's refusal at connection start as text only (no SQLSTATE): the
# server's FATAL message, in English unless the server's lc_messages says otherwise. These are
# the refusals that retrying cannot fix (PostgreSQL's postinit.c and auth.c); any other
# connection failure (refused, timeout, "the database system is starting up", "too many
# clients") stays transient, and so does a translated message: retried until the
# RetryPolicy's deadline, then the pipeline stops.
_CONNECT_CONFIG: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r'database "[^"]*" does not exist'), "3D000"),
    (re.compile(r'role "[^"]*" does not exist'), "28000"),
    (re.compile(r"password authentication failed for user"), "28P01"),
    (re.compile(r"authentication failed for user"), "28000"),
    (re.compile(r"no pg_hba\.conf entry for"), "28000"),
    (re.compile(r'role "[^"]*" is not permitted to log in'), "28000"),
    (re.compile(r"permission denied for database"), "42501"),
    (re.compile(r"no password supplied"), "28000"),  # libpq: the server asked for one
    (re.compile(r"server does not support SSL, but SSL was required"), None),  # libpq: sslmode
)


def classify_connect(exc: BaseException) -> KfastError:
    """Classify a failure to connect: a refusal retrying cannot fix (missing database,
    unknown role, bad password, no pg_hba.conf entry, no CONNECT privilege) is a
    ``ConfigError`` carrying the SQLSTATE PostgreSQL documents for it; anything else goes
    through :func:`classify` (connection refused, timeouts: transient)."""
    if isinstance(exc, psycopg.Error) and not getattr(exc, "sqlstate", None):
        text = str(exc)
        for pattern, state in _CONNECT_CONFIG:
            if pattern.search(text):
                code = f" (SQLSTATE {state})" if state else ""
                out = ConfigError(f"PostgresSink cannot connect: {text.strip()}{code}")
                out.sqlstate = state  # type: ignore[attr-defined]
                out.__cause__ = exc
                return out
    return classify(exc)


# Locator classes: data exceptions and integrity violations are raised for one row of a COPY.
_LOCATOR_CLASSES = frozenset({"22", "23"})
# Errors a row raises on its own, whatever else the table or the batch holds: data exceptions
# (class 22: binary input, typmod overflow, expressions of CHECK constraints and generated
# columns), NOT NULL (23502) and CHECK (23514: also domain checks and partition routing). Only
# triggers can make them depend on other rows, so a table with user triggers has none.
# Unique, foreign key and exclusion violations (23505, 23503, 23P01) depend on other rows.
_ROW_ONLY_CLASSES = frozenset({"22"})
_ROW_ONLY_STATES = frozenset({"23502", "23514"})
_INTEGER = re.compile(r"(?<![\w.])\d+(?![\w.])")


def row_only_state(state: str | None) -> bool:
    """True for a SQLSTATE a row raises on its own (without user triggers on the table)."""
    s = state or ""
    return s[:2] in _ROW_ONLY_CLASSES or s in _ROW_ONLY_STATES


def copy_row_hint(exc: BaseException, ranges: Sequence[tuple[int, int]]) -> int | None:
    """Index (in the written batch) of the COPY row PostgreSQL blamed, or None.

    A locator only, never a classifier: ``exc.diag.context`` of a failed COPY
    reads e.g. ``COPY orders, line 1234`` (possibly translated), the COPY
    context being the outermost, i.e. last, line. The hint is given only for
    SQLSTATE classes 22/23 when exactly one standalone integer of that line
    is a plausible line number (1..rows copied); ``ranges`` are the batch row
    ranges the COPY streamed, in order, so line ``L`` is the ``L``-th row of
    their concatenation. The delivery layer confirms the hint by writing that
    row alone, so a wrong hint costs writes, never correctness.
    """
    state = getattr(exc, "sqlstate", None)
    if not state or state[:2] not in _LOCATOR_CLASSES:
        return None
    diag = getattr(exc, "diag", None)
    context = getattr(diag, "context", None) if diag is not None else None
    if not isinstance(context, str):
        return None
    lines = [line for line in context.splitlines() if line.strip()]
    if not lines:
        return None
    total = sum(b - a for a, b in ranges)
    found = {int(m) for m in _INTEGER.findall(lines[-1])}
    plausible = [v for v in found if 1 <= v <= total]
    if len(plausible) != 1:
        return None
    idx = plausible[0] - 1
    for a, b in ranges:
        if idx < b - a:
            return a + idx
        idx -= b - a
    return None  # pragma: no cover - total bounds idx
