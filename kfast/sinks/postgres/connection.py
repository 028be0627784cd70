"""The sink's connections: one per slot, reconnected after a transient error.

A connection also carries what the sink created in its session (the TEMP staging and probe
tables); those marks go with the connection when it is dropped.
"""

from __future__ import annotations

from typing import Any

import psycopg

from kfast.errors import KfastError, TransientSinkError
from kfast.sinks.postgres.sqlstate import classify, classify_connect

__all__ = ["Connections", "conn_params"]


def conn_params(dsn: str, connect_timeout: float) -> dict[str, Any]:
    """libpq settings kfast needs, unless the DSN sets them: a bounded connect, TCP
    keepalives and a TCP user timeout, so a silently dead server surfaces as a
    (transient) connection error instead of a write that blocks forever."""
    given = psycopg.conninfo.conninfo_to_dict(dsn)
    wanted: dict[str, Any] = {
        "connect_timeout": max(1, int(connect_timeout)),
        "application_name": "kfast",
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 60_000,
    }
    return {k: v for k, v in wanted.items() if k not in given}


class Connections:
    """``n`` connection slots (non-autocommit), opened on demand."""

    def __init__(self, dsn: str, n: int, connect_timeout: float) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conns: list[psycopg.Connection[Any] | None] = [None] * n
        self.staged: set[int] = set()  # id() of connections that hold the staging table
        # id() of a connection -> it holds the probe table (False: it could not create one)
        self.probe_tables: dict[int, bool] = {}
        # id() of a connection -> the column types of its screening table (False: it could
        # not make one)
        self.screen_tables: dict[int, str | bool] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def params(self) -> dict[str, Any]:
        return conn_params(self.dsn, self.connect_timeout)

    def get(self, i: int = 0) -> psycopg.Connection[Any]:
        """Connection ``i``, (re)connected if needed; a failure is classified."""
        conn = self._conns[i]
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.drop(i)
        try:
            conn = psycopg.connect(self.dsn, autocommit=False, **self.params())
        except psycopg.Error as exc:
            raise classify_connect(exc) from exc
        self._conns[i] = conn
        return conn

    def current(self, i: int = 0) -> psycopg.Connection[Any] | None:
        return self._conns[i]

    def drop(self, i: int) -> None:
        conn = self._conns[i]
        self._conns[i] = None
        if conn is not None:
            self.staged.discard(id(conn))
            self.probe_tables.pop(id(conn), None)
            self.screen_tables.pop(id(conn), None)
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken socket
                pass

    def fail(self, i: int, exc: BaseException) -> KfastError:
        """Classify ``exc``: a transient error drops connection ``i`` (reconnect on the next
        attempt), any other rolls its transaction back."""
        err = classify(exc)
        if isinstance(err, TransientSinkError):
            self.drop(i)
        else:
            self.rollback(i)
        return err

    def rollback(self, i: int) -> None:
        """Roll back connection ``i``'s transaction; drop the connection if that fails."""
        conn = self._conns[i]
        if conn is None or conn.broken:
            self.drop(i)
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self.drop(i)

    def close(self) -> None:
        for i in range(len(self._conns)):
            self.drop(i)
