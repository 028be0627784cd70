"""SQLSTATE classification of PostgreSQL errors (by class; connection refusals by libpq text)."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest

from kfast.errors import ConfigError, PermanentSinkError, TransientSinkError
from kfast.sinks.postgres import classify


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ("08006", TransientSinkError),  # connection failure
        ("08001", TransientSinkError),
        ("40001", TransientSinkError),  # serialization failure
        ("40P01", TransientSinkError),  # deadlock
        ("53100", TransientSinkError),  # disk full
        ("53300", TransientSinkError),  # too many connections
        ("57P01", TransientSinkError),  # admin shutdown
        ("57014", TransientSinkError),  # query canceled (statement timeout)
        ("58030", TransientSinkError),  # I/O error
        ("25006", TransientSinkError),  # read-only transaction (failover)
        ("55P03", TransientSinkError),  # lock not available
        ("XX000", TransientSinkError),  # internal error
        ("22003", PermanentSinkError),  # numeric out of range
        ("22P02", PermanentSinkError),  # invalid text representation
        ("22021", PermanentSinkError),  # bad encoding
        ("23505", PermanentSinkError),  # unique violation
        ("23502", PermanentSinkError),  # not null violation
        ("23514", PermanentSinkError),  # check violation
        ("P0001", PermanentSinkError),  # trigger RAISE
        ("42703", ConfigError),  # undefined column
        ("42P01", ConfigError),  # undefined table
        ("42501", ConfigError),  # insufficient privilege
        ("28P01", ConfigError),  # bad password
        ("3D000", ConfigError),  # no such database
    ],
)
def test_sqlstate_class_decides(state: str, kind: type) -> None:
    # Message text deliberately misleading: only the SQLSTATE may decide.
    exc = psycopg.errors.lookup(state)("connection lost; unique; out of range")
    err = classify(exc)
    assert type(err) is kind
    assert getattr(err, "sqlstate", None) == state
    assert err.__cause__ is exc


def test_connection_errors_without_sqlstate_are_transient() -> None:
    assert isinstance(classify(psycopg.OperationalError("could not connect")), TransientSinkError)
    assert isinstance(
        classify(psycopg.InterfaceError("connection already closed")), TransientSinkError
    )
    assert isinstance(classify(OSError("reset by peer")), TransientSinkError)


def test_unknown_class_is_transient() -> None:
    exc = psycopg.errors.lookup("0B000")("invalid transaction initiation")
    assert isinstance(classify(exc), TransientSinkError)


@pytest.mark.parametrize(
    ("message", "state"),
    [
        ('connection failed: FATAL:  database "x" does not exist', "3D000"),
        ('connection failed: FATAL:  role "bob" does not exist', "28000"),
        ('connection failed: FATAL:  password authentication failed for user "bob"', "28P01"),
        ('connection failed: FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "b"', "28000"),
        ('connection failed: FATAL:  permission denied for database "x"', "42501"),
        ("connection failed: fe_sendauth: no password supplied", "28000"),
    ],
)
def test_connect_refusals_retrying_cannot_fix_are_config_errors(message: str, state: str) -> None:
    from kfast.sinks.postgres.sqlstate import classify_connect

    err = classify_connect(psycopg.OperationalError(message))
    assert isinstance(err, ConfigError) and getattr(err, "sqlstate", None) == state


@pytest.mark.parametrize(
    "message",
    [
        'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused',
        "connection failed: FATAL:  the database system is starting up",
        "connection failed: FATAL:  sorry, too many clients already",
        "connection failed: timeout expired",
    ],
)
def test_other_connect_failures_are_transient(message: str) -> None:
    from kfast.sinks.postgres.sqlstate import classify_connect

    assert isinstance(classify_connect(psycopg.OperationalError(message)), TransientSinkError)
