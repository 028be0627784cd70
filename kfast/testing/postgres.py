"""A throwaway PostgreSQL cluster for tests, benchmarks and demos.

Made with the machine's PostgreSQL server programs (Debian: ``/usr/lib/postgresql/<v>/bin``):
``initdb`` into a fresh temporary directory, then ``postgres`` runs as a child process on a free
loopback port with its unix socket in the same directory.  Durability is switched off for speed
(``fsync``, ``synchronous_commit``, ``full_page_writes``): this is a test server, never a real one.
initdb refuses to run as root, so under root the programs run as the ``postgres`` user.

``KFAST_TEST_PG_DSN`` makes :class:`PostgresServer` use that server instead (stop/start/restart
raise then).  Command line: ``python -m kfast.testing.postgres run``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kfast.testing import _proc

__all__ = ["PostgresServer", "PostgresStartError", "find_pg_bindir"]

ENV_DSN = "KFAST_TEST_PG_DSN"
ENV_BINDIR = "KFAST_PG_BINDIR"
DATABASE = "kfast"
SUPERUSER = "postgres"
SYSTEM_USER = "postgres"


class PostgresStartError(RuntimeError):
    """The PostgreSQL server could not be made available; the message says why."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.parent.name)) or (0,)


def find_pg_bindir(preferred: str = "15") -> Path:
    """The directory holding ``initdb`` and ``postgres``.

    Order: ``$KFAST_PG_BINDIR``; Debian's ``/usr/lib/postgresql/<preferred>/bin``; the newest
    other ``/usr/lib/postgresql/*/bin``; ``pg_config --bindir``; ``initdb`` on ``PATH``.
    """
    candidates: list[Path] = []
    env = os.environ.get(ENV_BINDIR)
    if env:
        candidates.append(Path(env))
    candidates.append(Path(f"/usr/lib/postgresql/{preferred}/bin"))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "postgres").is_file():
            return c
    raise PostgresStartError(
        "PostgreSQL server programs (initdb, postgres) not found; looked in "
        + ", ".join(str(c) for c in candidates)
        + f". Install the server (Debian: postgresql-15) or set {ENV_BINDIR} or {ENV_DSN}."
    )


def _world_traversable(path: Path) -> bool:
    """True when every directory from / to ``path`` can be entered by other users."""
    p = path.resolve()
    for d in [p, *p.parents]:
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def server_settings(port: int, socket_dir: Path) -> dict[str, str]:
    return {
        "listen_addresses": "'127.0.0.1'",
        "port": str(port),
        "unix_socket_directories": f"'{socket_dir}'",
        "max_connections": "100",
        "shared_buffers": "64MB",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_wal_size": "1GB",
        "checkpoint_timeout": "30min",
        "dynamic_shared_memory_type": "posix",
        "logging_collector": "off",
        "log_min_messages": "warning",
        "log_line_prefix": "'%m [%p] '",
        "timezone": "'UTC'",
        "max_prepared_transactions": "20",
    }


class PostgresServer(_proc.LocalService):
    """A throwaway PostgreSQL server on loopback, or an external one (``KFAST_TEST_PG_DSN``).

    ``dsn`` points at database ``kfast`` as superuser ``postgres`` (trust auth on loopback).
    :meth:`stop` / :meth:`start` / :meth:`restart` keep the port and the data directory.
    """

    log_name = "postgres.log"

    def __init__(
        self,
        *,
        dsn: str | None = None,
        bindir: Path | None = None,
        startup_timeout: float = 60.0,
        settings: Mapping[str, str] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        if dsn is None:
            dsn = os.environ.get(ENV_DSN) or None
        self.external = dsn is not None
        self._dsn = dsn
        self._bindir = bindir
        self.startup_timeout = startup_timeout
        self._extra = dict(settings or {})
        self._base_dir = base_dir
        self.tmp_dir: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None
        self.timings: dict[str, float] = {}

    # -- properties ---------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """libpq URI of database ``kfast`` on this server."""
        if self._dsn is None:
            raise PostgresStartError("the PostgreSQL server has not been started")
        return self._dsn

    def dsn_for(self, dbname: str) -> str:
        """The DSN of another database on the same server."""
        if self.external:
            import psycopg.conninfo

            params = psycopg.conninfo.conninfo_to_dict(self.dsn)
            params["dbname"] = dbname
            return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path | None:
        return self.tmp_dir / "data" if self.tmp_dir is not None else None

    @property
    def socket_dir(self) -> Path | None:
        return self.tmp_dir / "sock" if self.tmp_dir is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    def _refuse_external(self, what: str) -> None:
        if self.external:
            raise PostgresStartError(
                f"{what}() is not possible with an external server ({ENV_DSN} is set); "
                "unset it to let kfast.testing run its own PostgreSQL"
            )

    def start(self) -> PostgresServer:
        """Start the server (first time: initdb, create database ``kfast``); wait until ready."""
        if self.external:
            self._wait_ready(time.monotonic() + self.startup_timeout)
            return self
        if self.running:
            return self
        if self.tmp_dir is None:
            self._first_start()
        else:
            self._launch()
            self._await_ready()
        return self

    def _cmd(self, program: str, *args: str, pdeathsig: str | None = None) -> list[str]:
        bindir = self._bindir if self._bindir is not None else find_pg_bindir()
        self._bindir = bindir
        argv = [str(bindir / program), *args]
        if pdeathsig is not None:
            return _proc.with_parent_death_signal(argv, pdeathsig, self._run_as)
        if self._run_as is not None:
            return _proc.with_parent_death_signal(argv, "KILL", self._run_as)
        return argv

    def _make_tmp_dir(self) -> Path:
        base = self._base_dir
        if base is None and self._run_as is not None:
            default = Path(tempfile.gettempdir())
            base = default if _world_traversable(default) else Path("/tmp")
        _proc.sweep_stale_tmp_dirs("kfast-pg-", base)
        tmp = _proc.make_owned_tmp_dir("kfast-pg-", base)
        (tmp / "sock").mkdir()
        if self._run_as is not None:
            pw = pwd.getpwnam(self._run_as)
            for p in (tmp, tmp / "sock"):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        return tmp

    def _first_start(self) -> None:
        t0 = time.monotonic()
        self.tmp_dir = self._make_tmp_dir()
        _proc.register_cleanup(self, self._atexit)
        assert self.data_dir is not None and self.socket_dir is not None
        initdb = self._cmd(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        proc = subprocess.run(
            initdb,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=180,
            cwd=self.tmp_dir,
        )
        if proc.returncode != 0:
            raise PostgresStartError(
                f"initdb failed (exit {proc.returncode}): {' '.join(initdb)}\n{proc.stdout}"
            )
        self.timings["initdb_s"] = time.monotonic() - t0
        last_error: PostgresStartError | None = None
        for _attempt in range(3):
            self.port = _proc.free_port()
            settings = server_settings(self.port, self.socket_dir)
            settings.update(self._extra)
            conf = self.data_dir / "postgresql.conf"
            with open(conf, "a", encoding="utf-8") as f:
                f.write("\n# kfast.testing\n")
                f.writelines(f"{k} = {v}\n" for k, v in settings.items())
            self._dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"
            self._launch()
            try:
                self._await_ready(dbname="postgres")
            except PostgresStartError as exc:
                last_error = exc
                if "could not bind" in self.log_tail(50) or "already in use" in self.log_tail(50):
                    continue
                raise
            break
        else:
            assert last_error is not None
            raise last_error
        import psycopg

        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        self.timings["start_s"] = time.monotonic() - t0

    def _launch(self) -> None:
        assert self.tmp_dir is not None and self.data_dir is not None
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.tmp_dir / "postgres.log", "ab")
        argv = self._cmd("postgres", "-D", str(self.data_dir), pdeathsig="INT")
        self._proc = _proc.spawn(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.tmp_dir,
            start_new_session=True,
        )

    def _await_ready(self, dbname: str = DATABASE) -> None:
        try:
            self._wait_ready(time.monotonic() + self.startup_timeout, dbname)
        except PostgresStartError:
            self._stop_proc(timeout=10)
            raise

    def _wait_ready(self, deadline: float, dbname: str | None = None) -> None:
        import psycopg

        dsn = self.dsn if dbname is None else self.dsn_for(dbname)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                with psycopg.connect(dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1").fetchone()
                return
            except psycopg.OperationalError as exc:
                last = exc
            time.sleep(0.05)
        if self.external:
            raise PostgresStartError(
                f"the external PostgreSQL server {ENV_DSN}={self._dsn!r} does not answer "
                f"SELECT 1 within {self.startup_timeout:.0f} s: {last}"
            )
        state = self.process_state
        raise PostgresStartError(
            f"PostgreSQL on 127.0.0.1:{self.port} did not answer SELECT 1 within "
            f"{self.startup_timeout:.0f} s (postgres {state}; last error: {last}). "
            f"Log {self.log_path}, last lines:\n{self.log_tail(30)}"
        )

    def _stop_proc(self, timeout: float) -> None:
        if self._proc is not None:
            # SIGINT = "fast" shutdown: disconnect clients, roll back, checkpoint, exit.
            _proc.stop_process(self._proc, signal.SIGINT, timeout)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGKILL after ``timeout``); keeps the port and the data directory."""
        self._refuse_external("stop")
        self._stop_proc(timeout)

    def kill(self, flush_wal: bool = True) -> None:
        """SIGKILL the whole server at once (a crash); :meth:`start` recovers from the data.

        The server runs with ``synchronous_commit=off``, so a crash would also lose commits
        acknowledged in the last few hundred milliseconds (the WAL writer's delay), which a
        real, durable server keeps.  With ``flush_wal`` (the default) one synchronous commit
        first pushes all earlier WAL out to the kernel, so every commit acknowledged before
        ``kill()`` was called survives, as on a production server; pass ``False`` to crash
        with the asynchronous-commit window open.
        """
        self._refuse_external("kill")
        if self._proc is None:
            return
        if flush_wal:
            self._flush_wal()
        # Backends call setsid(), so neither the process group nor the postmaster's death
        # takes them down at once: SIGKILL the postmaster and every child together.
        children = _proc.child_pids(self._proc.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _proc.stop_process(self._proc, signal.SIGKILL, 10)
        self._proc = None
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children):  # shared memory freed
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _flush_wal(self) -> None:
        import psycopg

        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(self.dsn_for("postgres"), autocommit=True, connect_timeout=2) as c:
                c.execute("SET synchronous_commit = on")
                # A transaction that writes WAL (an xid alone writes none), committed synchronously:
                # its commit flushes all WAL before it.
                c.execute("SELECT pg_logical_emit_message(true, 'kfast.testing', 'flush')")

    def restart(self, downtime: float = 0.0) -> None:
        """Stop, stay down ``downtime`` seconds, start again on the same port and data."""
        self._refuse_external("restart")
        self.stop()
        if downtime > 0:
            time.sleep(downtime)
        self.start()

    def close(self) -> None:
        """Stop the server and delete its temporary directory."""
        if self.external:
            return
        self._stop_proc(timeout=30)
        _proc.unregister_cleanup(self)
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def _atexit(self) -> None:
        if self._proc is not None:
            _proc.stop_process(self._proc, signal.SIGINT, 10)
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kfast.testing.postgres",
        description="Run a throwaway PostgreSQL server in the foreground.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run a server until Ctrl-C and print its DSN")
    parser.parse_args(argv)

    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with PostgresServer() as server:
        print(server.dsn, flush=True)
        print(
            f"PostgreSQL running (pid {server.pid}, data {server.data_dir}, log "
            f"{server.log_path}); started in {server.timings.get('start_s', 0):.1f} s. "
            "Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        while not stop and server.running:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
