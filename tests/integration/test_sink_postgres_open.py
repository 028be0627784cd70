"""PostgresSink.open() against a real PostgreSQL: what retrying cannot fix is a ConfigError,
a server that cannot be reached is transient."""

from __future__ import annotations

import socket
import uuid

import psycopg
import pytest

from kfast.errors import ConfigError, TransientSinkError
from kfast.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration


def _dsn(dsn: str, **change: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info.update(change)
    return psycopg.conninfo.make_conninfo(**info)


def _open(dsn: str, table: str = "kfast_open_t") -> BaseException:
    sink = PostgresSink(dsn, table, connect_timeout=3)
    try:
        with pytest.raises((ConfigError, TransientSinkError)) as ei:
            sink.open(None)
    finally:
        sink.close()
    return ei.value


@pytest.fixture
def table(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS kfast_open_t (id bigint)")
    return "kfast_open_t"


def test_missing_database_is_a_config_error(pg_dsn: str, table: str) -> None:
    err = _open(_dsn(pg_dsn, dbname=f"nope_{uuid.uuid4().hex[:8]}"), table)
    assert isinstance(err, ConfigError) and getattr(err, "sqlstate", None) == "3D000"
    assert "does not exist" in str(err)


def test_unknown_role_is_a_config_error(pg_dsn: str, table: str) -> None:
    err = _open(_dsn(pg_dsn, user=f"nobody_{uuid.uuid4().hex[:8]}"), table)
    assert isinstance(err, ConfigError) and getattr(err, "sqlstate", None) == "28000"


def test_no_connect_privilege_is_a_config_error(pg_dsn: str) -> None:
    db, role = f"closed_{uuid.uuid4().hex[:8]}", f"r_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {db}")
        c.execute(f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")
        c.execute(f"CREATE ROLE {role} LOGIN")
    try:
        err = _open(_dsn(pg_dsn, dbname=db, user=role))
        assert isinstance(err, ConfigError) and getattr(err, "sqlstate", None) == "42501"
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            c.execute(f"DROP DATABASE {db}")
            c.execute(f"DROP ROLE {role}")


def test_missing_table_is_a_config_error(pg_dsn: str) -> None:
    err = _open(pg_dsn, f"missing_{uuid.uuid4().hex[:8]}")
    assert isinstance(err, ConfigError) and "does not exist" in str(err)


def test_connection_refused_is_transient(pg_dsn: str, table: str) -> None:
    with socket.socket() as s:  # a port nobody listens on: bind, then close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _open(_dsn(pg_dsn, host="127.0.0.1", port=str(port)), table)
    assert isinstance(err, TransientSinkError)


def test_the_sink_opens_after_a_refused_start(pg_dsn: str, table: str) -> None:
    """A transient failure leaves nothing behind: the same sink opens once the server is there."""
    sink = PostgresSink(pg_dsn, table)
    good = sink.dsn
    sink.dsn = sink._conns.dsn = _dsn(pg_dsn, host="127.0.0.1", port="1")
    with pytest.raises(TransientSinkError):
        sink.open(None)
    sink.dsn = sink._conns.dsn = good
    sink.open(None)
    sink.close()
